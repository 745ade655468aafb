"""Soak: sustained load for minutes; do memory, errors or latency drift?

One cloud (pinned to core 0, one torch thread) serves 32 edge streams at
``--load`` (default 70%) of its measured capacity, Poisson arrivals, for
``--minutes``: 31 streams are offload clients straight to the cloud, the
32nd is a real edge daemon (every request offloaded) fed through its
InferStream, so an edge's memory is watched too. Reported: the RSS of the
cloud and of the edge after warm-up (the first tenth of the run) and at the
end, errors, and p50/p99 latency per tenth of the run; a plot of both.

    python -m bench.soak --checkpoint runs/bench-exits/cifar10-vit --minutes 10
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.load import offload_tokens, percentiles, write_result
from bench.offload import SERVER_CORES, client_cores, drive_streams, machine
from bench.overload import connected_clients
from edge_node.offload import OffloadError
from offramp.daemon_proc import DaemonProcess
from offramp.exit_policy import edge_exit_ids
from offramp.report import format_table
from offramp.wire import pb, pb_grpc

RESULTS = Path(__file__).parent / "results"
STREAMS = 32
PARTS = 10  # the run is judged in tenths: the first is warm-up


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def soak(cloud: DaemonProcess, edge: DaemonProcess, fingerprint: str, split: int,
               tokens: list[pb.EncodedTensor], images: list[pb.InferRequest], rate: float,
               seconds: float) -> dict[str, Any]:
    clients = await connected_clients(cloud.address, fingerprint, split)
    clients = clients[:STREAMS - 1]
    requests = [pb.OffloadRequest(model_fingerprint=fingerprint, split_block=split, tokens=t) for t in tokens]
    records: list[tuple[float, float, bool]] = []  # (sent at, ms, ok)
    errors: dict[str, int] = {}  # what went wrong, by kind
    memory: list[tuple[float, float, float]] = []  # (t, cloud MB, edge MB)
    edge_queue: asyncio.Queue[pb.InferRequest | None] = asyncio.Queue()
    sent_at: dict[int, float] = {}
    start = time.perf_counter()

    async def direct(i: int) -> None:
        t0 = time.perf_counter()
        try:
            request = pb.OffloadRequest()
            request.CopyFrom(requests[i % len(requests)])  # infer() sets the id: one message per call
            await clients[i % len(clients)].infer(request, timeout_s=10)
            ok = True
        except OffloadError as e:
            ok = False
            errors[f"offload: {str(e)[:60]}"] = errors.get(f"offload: {str(e)[:60]}", 0) + 1
        records.append((t0 - start, (time.perf_counter() - t0) * 1e3, ok))

    async def edge_requests():
        while (item := await edge_queue.get()) is not None:
            yield item

    async def through_edge() -> None:
        async with grpc.aio.insecure_channel(edge.address) as channel:
            async for reply in pb_grpc.EdgeStub(channel).InferStream(edge_requests()):
                t0 = sent_at.pop(reply.request_id)
                ok = reply.status.code == 0 and reply.decided_by == "cloud" and not reply.degraded
                if not ok:
                    kind = f"edge: {reply.status.message or reply.degraded_reason}"[:70]
                    errors[kind] = errors.get(kind, 0) + 1
                records.append((t0 - start, (time.perf_counter() - t0) * 1e3, ok))

    async def watch_memory() -> None:
        while True:
            memory.append((time.perf_counter() - start, rss_mb(cloud.proc.pid), rss_mb(edge.proc.pid)))
            await asyncio.sleep(max(0.5, seconds / 200))

    edge_task = asyncio.create_task(through_edge())
    watcher = asyncio.create_task(watch_memory())
    tasks: set[asyncio.Task[None]] = set()
    rng = random.Random(0)
    i, next_at = 0, start
    while next_at < start + seconds:
        now = time.perf_counter()
        if next_at > now:
            await asyncio.sleep(next_at - now)
        if i % STREAMS == STREAMS - 1:  # every 32nd request goes through the edge daemon
            request = pb.InferRequest()
            request.CopyFrom(images[i % len(images)])
            request.request_id = i
            sent_at[i] = time.perf_counter()
            edge_queue.put_nowait(request)
        else:
            task = asyncio.create_task(direct(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        i += 1
        next_at += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    edge_queue.put_nowait(None)
    await edge_task
    watcher.cancel()
    memory.append((time.perf_counter() - start, rss_mb(cloud.proc.pid), rss_mb(edge.proc.pid)))
    await asyncio.gather(*(c.close() for c in clients))

    part = seconds / PARTS
    parts = [[ms for t, ms, ok in records if k * part <= t < (k + 1) * part] for k in range(PARTS)]
    return {
        "requests": len(records), "errors": sum(not ok for _, _, ok in records), "errors_by_kind": errors,
        "offered_rps": len(records) / seconds,
        "latency_ms_by_part": [percentiles(p) for p in parts], "part_s": part,
        "memory_mb": [list(m) for m in memory],
        "rss_mb": rss_growth(memory, part),
    }


def rss_growth(memory: list[tuple[float, float, float]], part: float) -> dict[str, dict[str, float]]:
    """RSS of each process after warm-up (median over the second tenth) and at the end (median over the
    last tenth): the cloud's swings by tens of MB with the batches in flight, so single samples mislead."""
    out = {}
    for i, name in ((1, "cloud"), (2, "edge")):
        early = float(np.median([m[i] for m in memory if part <= m[0] < 2 * part] or [memory[0][i]]))
        late = float(np.median([m[i] for m in memory if m[0] >= memory[-1][0] - part]))
        out[name] = {"after_warmup": early, "end": late, "growth": late / early - 1}
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    memory = np.asarray(result["memory_mb"])
    part = result["part_s"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(memory[:, 0], memory[:, 1], label="cloud")
    top.plot(memory[:, 0], memory[:, 2], label="edge")
    top.axvline(part, color="grey", lw=0.8, ls=":")
    top.set_ylabel("RSS (MB)")
    top.legend()
    mid = [(k + 0.5) * part for k in range(len(result["latency_ms_by_part"]))]
    for q in ("p50", "p99"):
        bottom.plot(mid, [p[q] for p in result["latency_ms_by_part"]], marker="o", label=q)
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("seconds")
    bottom.legend()
    fig.suptitle(f"soak: {STREAMS} streams at {result['load']:.0%} of capacity, {result['errors']} errors")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def run(args: argparse.Namespace, checkpoint: str, fingerprint: str, split: int,
              tokens: list[pb.EncodedTensor], images: list[pb.InferRequest]) -> dict[str, Any]:
    with DaemonProcess("cloud", ["--checkpoint", checkpoint, "--threads", "1"], cores=SERVER_CORES) as cloud, \
            DaemonProcess("edge", ["--checkpoint", checkpoint, "--cloud", cloud.address, "--thresholds",
                                   ",".join(["2"] * args.exits)], cores=client_cores()) as edge:
        probe = await drive_streams(cloud.address, fingerprint, split, tokens, 16, 4, args.probe_seconds)
        capacity = probe["throughput_rps"]
        print(f"capacity {capacity:.0f} req/s; soaking at {args.load:.0%} for {args.minutes:g} min", flush=True)
        result = await soak(cloud, edge, fingerprint, split, tokens, images, args.load * capacity, args.minutes * 60)
    return {"capacity_rps": capacity, "load": args.load, **result}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="runs/bench-exits/cifar10-vit")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--load", type=float, default=0.7, help="share of the cloud's measured capacity offered")
    ap.add_argument("--probe-seconds", type=float, default=5.0)
    ap.add_argument("--out", default=str(RESULTS / "soak.json"))
    args = ap.parse_args(argv)
    started = time.perf_counter()
    card, x, tokens = offload_tokens(args.checkpoint, 256)
    args.exits = len(edge_exit_ids(card.config.exits, card.split_block))  # the edge daemon runs them all
    images = [pb.InferRequest(tensor=pb.RawTensor(shape=list(s.shape), data=s.numpy().astype("<f4").tobytes()))
              for s in x]
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, client_cores())
    try:
        result = asyncio.run(run(args, args.checkpoint, card.fingerprint, card.split_block, tokens, images))
    finally:
        os.sched_setaffinity(0, cores)
    parts = result["latency_ms_by_part"]
    print(format_table(["part", "p50 ms", "p99 ms"], [[k + 1, p["p50"], p["p99"]] for k, p in enumerate(parts)]))
    rss = result["rss_mb"]
    p99_change = parts[-1]["p99"] / parts[0]["p99"] - 1
    if result["errors_by_kind"]:
        print("errors:", result["errors_by_kind"])
    print(f"{result['requests']} requests, {result['errors']} errors; RSS cloud {rss['cloud']['after_warmup']:.0f} -> "
          f"{rss['cloud']['end']:.0f} MB ({rss['cloud']['growth']:+.1%}), edge {rss['edge']['after_warmup']:.0f} -> "
          f"{rss['edge']['end']:.0f} MB ({rss['edge']['growth']:+.1%}); p99 last vs first part "
          f"{p99_change:+.1%}")
    result.update({
        "command": "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "checkpoint": args.checkpoint, "minutes": args.minutes,
        "targets": {"cloud_rss_growth": rss["cloud"]["growth"], "edge_rss_growth": rss["edge"]["growth"],
                    "errors": result["errors"], "p99_last_vs_first": p99_change},
        "wall_s": time.perf_counter() - started})
    out = write_result(result, args.out)
    plot(result, out.with_suffix(".png"))
    print(f"plot: {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
