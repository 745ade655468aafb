"""The one load driver: when each request is sent, for every load generator in the project.

Whatever they send (images to an edge's API, offloads to a cloud's stream, both at once), experiments and
benchmarks time their requests here:

- **Open loop** (``poisson``, ``stepped_poisson``, then ``due`` or ``open_loop``): request *i* goes at its
  scheduled time whether or not earlier ones were answered, so a server that falls behind shows it as
  queueing. Schedules come from a ``numpy`` generator the caller seeds: same seed, same times.
- **Closed loop** (``closed_loop``): a fixed number of requests in flight, each answer releasing the next;
  the offered rate is whatever the server sustains.

``orchestrator.workload`` (an edge's API, sync), ``orchestrator.loadgen`` (a cloud's offload streams,
async) and the benchmarks built on them differ only in what they send and what they record.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import numpy as np


def poisson(rng: np.random.Generator, rate: float, count: int | None = None,
            duration_s: float | None = None) -> np.ndarray:
    """Arrival offsets (seconds from the start) of a Poisson process at ``rate`` per second: the first
    ``count`` of them, cut at ``duration_s`` (at least one of the two must be given)."""
    if not rate > 0:
        raise ValueError(f"an arrival rate must be positive, not {rate}")
    if count is None and duration_s is None:
        raise ValueError("give a count, a duration, or both")
    limit = count if count is not None else math.ceil(duration_s * rate * 1.5 + 100)
    times = np.cumsum(rng.exponential(1.0 / rate, size=limit))
    while count is None and times[-1] <= duration_s:  # a rare long tail: draw more
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, size=limit))])
    return times if duration_s is None else times[times <= duration_s]


def stepped_poisson(rng: np.random.Generator, steps: tuple[tuple[float, float], ...],
                    duration_s: float) -> np.ndarray:
    """Poisson arrivals whose rate changes on a schedule: ``steps`` of (from second, rate), each rate held to
    the next step's time, up to ``duration_s``. A rate of 0 pauses the load."""
    times: list[np.ndarray] = []
    for (start, rate), (end, _) in zip(steps, [*steps[1:], (duration_s, 0.0)]):
        end = min(end, duration_s)
        if rate <= 0 or end <= start:
            continue
        n = rng.poisson(rate * (end - start))
        times.append(np.sort(rng.uniform(start, end, n)))
    return np.concatenate(times) if times else np.zeros(0)


def due(arrivals: np.ndarray, t0: float, stop: threading.Event | None = None) -> Iterator[tuple[int, float]]:
    """(i, scheduled time) for each arrival, each yielded once its time (``t0`` + offset, perf_counter) has
    come: the pacing of a request iterator handed to a sync gRPC stream. Ends early once ``stop`` is set
    (the stream ended: nobody reads the rest)."""
    for i, offset in enumerate(arrivals.tolist()):
        at = t0 + offset
        while (wait := at - time.perf_counter()) > 0:
            if stop is None:
                time.sleep(wait)
            elif stop.wait(min(wait, 0.5)):
                return
        yield i, at


async def adue(arrivals: np.ndarray, t0: float) -> AsyncIterator[tuple[int, float]]:
    """``due`` for an event loop: (i, scheduled time) for each arrival once its time has come."""
    for i, offset in enumerate(arrivals.tolist()):
        at = t0 + offset
        if (wait := at - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        yield i, at


async def open_loop(send: Callable[[int, float], Awaitable[None]], arrivals: np.ndarray,
                    t0: float | None = None) -> set[asyncio.Task[None]]:
    """Start ``send(i, scheduled time)`` at each arrival without waiting for earlier ones. Returns once the
    last is started, with the tasks still running (await them for the answers)."""
    tasks: set[asyncio.Task[None]] = set()
    async for i, at in adue(arrivals, time.perf_counter() if t0 is None else t0):
        task = asyncio.create_task(send(i, at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    return tasks


async def closed_loop(request: Callable[[int, int], Awaitable[None]], workers: int, seconds: float) -> float:
    """Run ``workers`` loops of ``await request(worker, i)`` (i counts that worker's requests) for ``seconds``.

    Returns the wall time, from the start to the last answer: every worker
    finishes the request it has in flight when time is up.
    """
    stop_at = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        i = 0
        while time.perf_counter() < stop_at:
            await request(k, i)
            i += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(workers)))
    return time.perf_counter() - start
