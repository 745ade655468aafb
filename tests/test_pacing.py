"""The one load driver: seeded schedules, requests sent on time, open and closed loops."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from orchestrator.pacing import adue, closed_loop, due, open_loop, poisson, stepped_poisson


def test_poisson_is_seeded_and_cut_by_count_or_duration() -> None:
    a = poisson(np.random.default_rng(1), 50.0, count=500)
    assert np.array_equal(a, poisson(np.random.default_rng(1), 50.0, count=500)) and len(a) == 500
    assert np.all(np.diff(a) > 0) and 0.8 / 50 < np.diff(a).mean() < 1.25 / 50
    cut = poisson(np.random.default_rng(1), 50.0, duration_s=3.0)
    assert cut[-1] <= 3.0 and 100 < len(cut) < 200
    # The same draws with or without a count: a count only shortens the list.
    assert np.array_equal(poisson(np.random.default_rng(1), 50.0, count=10, duration_s=3.0), cut[:10])


def test_a_long_duration_draws_past_its_first_guess() -> None:
    # The first draw covers about 1.5 x rate x duration + 100 arrivals; a tiny rate needs more draws.
    times = poisson(np.random.default_rng(0), 0.5, duration_s=1000.0)
    assert 400 < len(times) < 600 and times[-1] > 900


@pytest.mark.parametrize("kwargs, message", [({"rate": 0.0, "count": 5}, "rate must be positive"),
                                             ({"rate": 5.0}, "give a count, a duration")])
def test_a_schedule_needs_a_rate_and_a_length(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        poisson(np.random.default_rng(0), **kwargs)


def test_stepped_rates_follow_their_schedule_and_pause_at_zero() -> None:
    times = stepped_poisson(np.random.default_rng(0), ((0.0, 100.0), (10.0, 0.0), (20.0, 300.0)), 30.0)
    assert np.all(np.diff(times) >= 0)
    counts = [int(((times >= lo) & (times < lo + 10)).sum()) for lo in (0, 10, 20)]
    assert 850 < counts[0] < 1150 and counts[1] == 0 and 2700 < counts[2] < 3300


def test_due_sends_each_request_at_its_time_and_stops_when_told() -> None:
    arrivals = np.array([0.05, 0.10, 0.15, 5.0])
    stop = threading.Event()
    t0 = time.perf_counter()
    sent = []
    for i, at in due(arrivals, t0, stop):
        sent.append(time.perf_counter() - t0)
        assert at == pytest.approx(t0 + arrivals[i])
        if i == 2:
            threading.Timer(0.05, stop.set).start()  # the stream ends before the last arrival's time
    assert len(sent) == 3
    assert all(0 <= s - a < 0.03 for s, a in zip(sent, arrivals))
    assert time.perf_counter() - t0 < 1.0  # it did not wait the 5 s for the arrival nobody reads


def test_open_loop_does_not_wait_for_answers() -> None:
    async def run() -> tuple[list[float], float, float]:
        started: list[float] = []

        async def send(i: int, at: float) -> None:
            started.append(time.perf_counter() - at)
            await asyncio.sleep(0.3)  # a slow server: later requests still go on time

        t0 = time.perf_counter()
        tasks = await open_loop(send, np.array([0.0, 0.02, 0.04, 0.06]), t0)
        sending = time.perf_counter() - t0
        await asyncio.gather(*tasks)
        return started, sending, time.perf_counter() - t0

    started, sending, total = asyncio.run(run())
    assert len(started) == 4 and max(started) < 0.03
    assert sending < 0.2 and 0.3 < total < 0.6


def test_adue_paces_an_event_loop() -> None:
    async def run() -> list[float]:
        t0 = time.perf_counter()
        return [time.perf_counter() - t0 async for _ in adue(np.array([0.02, 0.04]), t0)]

    lags = asyncio.run(run())
    assert len(lags) == 2 and 0.02 <= lags[0] < 0.05 and 0.04 <= lags[1] < 0.07


def test_closed_loop_keeps_each_worker_at_one_request_in_flight() -> None:
    async def run() -> tuple[dict[int, list[int]], float, int]:
        calls: dict[int, list[int]] = {}
        in_flight, most = 0, 0

        async def request(worker: int, i: int) -> None:
            nonlocal in_flight, most
            calls.setdefault(worker, []).append(i)
            in_flight += 1
            most = max(most, in_flight)
            await asyncio.sleep(0.01)
            in_flight -= 1

        wall = await closed_loop(request, 3, 0.1)
        return calls, wall, most

    calls, wall, most = asyncio.run(run())
    assert sorted(calls) == [0, 1, 2] and most == 3
    assert all(c == list(range(len(c))) and len(c) >= 5 for c in calls.values())
    assert 0.1 <= wall < 0.3
