"""Load on a cloud's offload stream, for the benchmarks: payloads, connected clients, closed loops, summaries.

Every serving benchmark drives the cloud the same way, so the pieces live here once: the split tokens of
validation inputs as an edge would send them (``offload_tokens``), edge clients that have dialled and
checked the pairing (``connected_clients``), ``drive_streams`` (clients x requests in flight for some
seconds, on ``orchestrator.pacing``'s closed loop; ``drive_streams_from_processes`` spreads it over several
processes), percentile summaries, CPU time of processes and threads from /proc, the core split between
servers and load generators, and the results file. ``orchestrator.workload`` drives an edge's own API the way a
camera would, on the same pacing.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_node.offload import OffloadClient, OffloadSettings
from offramp.core.hostinfo import machine as host_machine
from offramp.core.wire import pb
from orchestrator.pacing import closed_loop

SERVER_CORES = {0}  # servers run here; load generators on the other cores


def client_cores() -> set[int]:
    """Every core but the servers' (all of them on a one-core machine)."""
    return (set(os.sched_getaffinity(0)) - SERVER_CORES) or set(os.sched_getaffinity(0))


def machine() -> dict[str, Any]:
    """The host, and how the benchmark split its cores between servers and load."""
    return {**host_machine(), "server_cores": sorted(SERVER_CORES), "client_cores": sorted(client_cores())}


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99 and mean of ``values`` (NaN when there are none)."""
    a = np.asarray(values if len(values) else [float("nan")])
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def load_summary(edges: int, window: int, wall: float, latencies: Sequence[float], compute: Sequence[float],
                 batch_sizes: Sequence[int]) -> dict[str, float | int | dict[str, float]]:
    """One row of a load run, the same keys for every server measured."""
    return {"edges": edges, "window": window, "requests": len(latencies), "throughput_rps": len(latencies) / wall,
            "latency_ms": percentiles(latencies), "cloud_compute_ms": percentiles(compute),
            "mean_batch": float(np.mean(batch_sizes)) if len(batch_sizes) else 0.0}


@torch.no_grad()
def offload_tokens(checkpoint: str, samples: int, per_request: int = 1) -> tuple[Any, torch.Tensor, list[Any]]:
    """(card, inputs, encoded tokens): the edge half's split tokens for ``samples`` validation inputs, every
    exit told never to answer, int8 + zstd, ``per_request`` samples per message."""
    from offramp.core.checkpoint import load_checkpoint
    from offramp.core.codec import CodecConfig, encode
    from offramp.core.data.card_data import load_validation
    from offramp.core.exit_rule import never_leave
    from offramp.core.halves import EdgeHalf

    model, card = load_checkpoint(checkpoint)
    x = load_validation(card)[0].tensors[0][:samples]
    edge = EdgeHalf(model, card.split_block)
    tokens = edge.run(x, [never_leave("max_prob")] * edge.num_exits, "max_prob").tokens
    codec = CodecConfig(dtype="int8", zstd_level=3)
    return card, x, [encode(tokens[i:i + per_request], codec) for i in range(0, len(x) - per_request + 1, per_request)]


async def connected_clients(address: str, fingerprint: str, split: int, count: int,
                            timeout_s: float = 30.0) -> list[OffloadClient]:
    """``count`` edge clients of the cloud at ``address``, each dialled and its pairing checked."""
    clients = [OffloadClient([address], fingerprint, split, OffloadSettings()) for _ in range(count)]
    for c in clients:
        c.start()
    by = time.perf_counter() + timeout_s
    while not all(c.connected_to for c in clients):
        if time.perf_counter() > by:
            await asyncio.gather(*(c.close() for c in clients))
            raise RuntimeError(f"edge clients did not connect to the cloud within {timeout_s:g} s")
        await asyncio.sleep(0.01)
    return clients


async def drive_streams(address: str, fingerprint: str, split: int, tokens: list[pb.EncodedTensor], edges: int,
                        window: int, seconds: float, on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """``edges`` clients, one stream each, ``window`` requests in flight per stream, for ``seconds``; after the
    warm-up, ``on_start()`` runs just before the load (to read a server's counters). Besides the summary: the
    replies by the size of the batch they were computed in, and this process's CPU seconds over the load."""
    clients = await connected_clients(address, fingerprint, split, edges)
    latencies: list[float] = []
    batch_sizes: list[int] = []
    compute: list[float] = []

    async def request(worker: int, i: int) -> None:
        n = (worker + i * edges * window) % len(tokens)  # every worker its own share of the samples
        req = pb.OffloadRequest(model_fingerprint=fingerprint, split_block=split, tokens=tokens[n])
        t0 = time.perf_counter()
        reply = await clients[worker // window].infer(req, timeout_s=30)
        latencies.append((time.perf_counter() - t0) * 1e3)
        batch_sizes.append(reply.batch_size)
        compute.append(reply.timings.compute_ms)

    try:
        warm = pb.OffloadRequest(model_fingerprint=fingerprint, split_block=split, tokens=tokens[0])
        for _ in range(20):
            await asyncio.gather(*(c.infer(warm, timeout_s=30) for c in clients))
        if on_start is not None:
            on_start()
        cpu0 = time.process_time()
        wall = await closed_loop(request, edges * window, seconds)
        cpu = time.process_time() - cpu0
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return {**load_summary(edges, window, wall, latencies, compute, batch_sizes), "wall_s": wall,
            "replies_by_batch": dict(sorted(Counter(batch_sizes).items())), "client_cpu_s": cpu}


def drive_streams_from_processes(address: str, fingerprint: str, split: int, tokens: list[pb.EncodedTensor],
                                 edges: int, window: int, seconds: float, processes: int,
                                 on_start: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """``drive_streams`` with the ``edges`` shared out over ``processes`` spawned processes (one Python process
    cannot load a server that answers tens of thousands of requests a second), started together once every
    one is connected and warm (``on_start`` runs then, here); each process's result. Blocks: call it from a
    thread."""
    ctx = multiprocessing.get_context("spawn")
    shares = [n for n in (edges // processes + (k < edges % processes) for k in range(processes)) if n]
    start, results = ctx.Barrier(len(shares) + 1), ctx.Queue()
    messages = [t.SerializeToString() for t in tokens]
    children = [ctx.Process(target=_drive_in_process, args=(address, fingerprint, split, messages, n, window,
                                                             seconds, start, results), daemon=True) for n in shares]
    for child in children:
        child.start()
    try:
        start.wait(timeout=180)
        if on_start is not None:
            on_start()
        loads = [results.get(timeout=seconds + 180) for _ in children]
    finally:
        for child in children:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
    failed = [load["error"] for load in loads if "error" in load]
    if failed:
        raise RuntimeError(f"a load process failed: {failed[0]}")
    return loads


def _drive_in_process(address: str, fingerprint: str, split: int, messages: list[bytes], edges: int, window: int,
                      seconds: float, start: Any, results: Any) -> None:
    """A spawned load process: our own token messages in (as bytes), its ``drive_streams`` result out."""
    tokens = [pb.EncodedTensor.FromString(m) for m in messages]
    try:
        results.put(asyncio.run(drive_streams(address, fingerprint, split, tokens, edges, window, seconds,
                                              on_start=lambda: start.wait(timeout=180))))
    except Exception as e:
        results.put({"error": f"{type(e).__name__}: {e}"})


def cpu_seconds(pid: int, descendants: bool = True) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) and, with ``descendants``, of its live
    descendants (e.g. cloud workers), from /proc."""
    total = 0.0
    for p in [pid, *(_descendants(pid) if descendants else ())]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU seconds of each thread of process ``pid`` (its own threads only), by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def loop_and_others(pid: int, before: dict[int, float], after: dict[int, float]) -> tuple[float, float]:
    """CPU seconds between two ``thread_cpu_seconds`` readings: the main thread's (a daemon's event loop, whose
    thread id is the process id) and all its other threads' (compute, gRPC's own) together."""
    spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    loop = spent.pop(pid, 0.0)
    return loop, sum(spent.values())


def _descendants(pid: int) -> list[int]:
    try:
        direct = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return [c for d in direct for c in (d, *_descendants(d))]


def write_result(result: dict[str, Any], out: str | Path) -> Path:
    """The benchmark's JSON, its folder made if need be."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({result.get('wall_s', 0):.0f} s)")
    return out
