"""The arithmetic behind bench/scale.py's headline figures: compute per request, CPU by thread, rebalancing."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from bench.scale import FAIR_SHARE, _rebalance_s, compute_per_request
from orchestrator.loadgen import loop_and_others, thread_cpu_seconds


def test_compute_per_request_weighs_each_batch_size_by_the_samples_it_carried() -> None:
    # 2 batches of 1 (2 samples at 1.0 ms each) and 1 batch of 8 (8 samples at 0.25 ms each): 4 ms for 10.
    assert compute_per_request({1: 1.0, 8: 0.25}, {1: 2, 8: 1}) == pytest.approx(0.4)
    # Fractions of batches (cut by the run's ends) count by their samples too.
    assert compute_per_request({4: 0.5}, {4: 2.5}) == pytest.approx(0.5)


def test_loop_and_others_split_a_process_cpu_by_its_main_thread() -> None:
    before = {100: 1.0, 101: 0.5, 102: 0.0}
    after = {100: 1.75, 101: 0.75, 102: 0.5, 103: 0.25}  # 103 started between the readings
    assert loop_and_others(100, before, after) == pytest.approx((0.75, 1.0))


def test_thread_cpu_seconds_sees_a_busy_thread_apart_from_the_main_thread() -> None:
    pid = os.getpid()
    before = thread_cpu_seconds(pid)
    assert pid in before
    spun, leave = threading.Event(), threading.Event()

    def spin() -> None:
        start = time.thread_time()
        while time.thread_time() - start < 0.3:
            pass
        spun.set()
        leave.wait()

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        assert spun.wait(30)
        loop, others = loop_and_others(pid, before, thread_cpu_seconds(pid))  # the worker still alive, idle
    finally:
        leave.set()
        worker.join()
    assert others >= 0.25 and loop < others


def test_rebalance_counts_from_the_return_until_the_replica_carries_a_fair_share() -> None:
    t = np.arange(0.0, 10.01, 0.25)
    rate = np.tile([100.0, 100.0, 0.0], (len(t), 1))
    rate[t >= 6.0, 2] = 100.0  # the third replica answers again from 6 s
    counts = np.cumsum(rate * 0.25, axis=0)
    back = _rebalance_s(t, counts, returned_s=5.0)
    # Its share of a one-second window reaches FAIR_SHARE once enough of the window lies after 6 s.
    assert back is not None and 1.0 <= back <= 2.0
    window = (counts[t == 5.0 + back][0] - counts[t == 4.0 + back][0])
    assert window[2] / window.sum() >= FAIR_SHARE
    assert _rebalance_s(t, np.cumsum(np.tile([100.0, 100.0, 0.0], (len(t), 1)), axis=0), 5.0) is None


def test_the_load_can_come_from_several_processes_started_together() -> None:
    import asyncio

    import torch

    from bench.scale import drive
    from offramp.core.codec import CodecConfig, encode
    from orchestrator.floors import child_server, serve_echo

    tokens = [encode(torch.randn(1, 5, 8), CodecConfig()) for _ in range(4)]
    with child_server(serve_echo, "f" * 64, 2, None) as (port, pid):
        run = asyncio.run(drive(f"127.0.0.1:{port}", "f" * 64, 2, tokens, edges=3, window=2, seconds=1.0,
                                server_pid=pid, processes=2))
    assert run["load_processes"] == 2 and run["requests"] > 50
    assert run["batches_by_size"] == {1: run["requests"]}  # the echo answers one at a time
    # Both processes' CPU is counted: a load generator spends well over nothing per request.
    assert run["client_cpu_ms_per_request"] > 0.005 and run["server_cpu_ms_per_request"] > 0.005


def test_a_front_end_relays_each_request_to_one_of_its_clouds_and_keeps_its_id() -> None:
    import asyncio

    import torch

    from offramp.core.codec import CodecConfig, encode
    from offramp.core.wire import pb
    from orchestrator.floors import child_server, serve_echo, serve_relay
    from orchestrator.loadgen import connected_clients

    fingerprint, split = "f" * 64, 2
    tokens = encode(torch.randn(1, 5, 8), CodecConfig())

    async def ask(address: str) -> list[pb.OffloadReply]:
        (client,) = await connected_clients(address, fingerprint, split, 1)
        try:
            return await asyncio.gather(*(client.infer(pb.OffloadRequest(
                model_fingerprint=fingerprint, split_block=split, tokens=tokens), timeout_s=30) for _ in range(40)))
        finally:
            await client.close()

    # (How the pool spreads requests over its clouds is tested in test_pool.py.)
    with child_server(serve_echo, fingerprint, split, None) as (a, _), \
            child_server(serve_echo, fingerprint, split, None) as (b, _):
        with child_server(serve_relay, fingerprint, split, [f"127.0.0.1:{a}", f"127.0.0.1:{b}"]) as (port, _):
            replies = asyncio.run(ask(f"127.0.0.1:{port}"))
    assert len(replies) == 40 and all(r.status.code == 0 for r in replies)
    assert len({r.request_id for r in replies}) == 40  # each reply carries its own request's id back
