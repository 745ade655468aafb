"""Closed-loop load for the serving benchmarks: N workers, each with one request in flight, for a while."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import numpy as np


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99 and mean of ``values`` (NaN when there are none)."""
    a = np.asarray(values if len(values) else [float("nan")])
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


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


def load_summary(edges: int, window: int, wall: float, latencies: Sequence[float], compute: Sequence[float],
                 batch_sizes: Sequence[int]) -> dict[str, float | int | dict[str, float]]:
    """One row of a load run, the same keys for every server measured."""
    return {"edges": edges, "window": window, "requests": len(latencies), "throughput_rps": len(latencies) / wall,
            "latency_ms": percentiles(latencies), "cloud_compute_ms": percentiles(compute),
            "mean_batch": float(np.mean(batch_sizes)) if len(batch_sizes) else 0.0}
