"""Overload: the cloud offered several times its capacity, then normal load again.

Each request carries ``--samples-per-request`` samples (an edge offloads the
survivors of its batch together), so that one load-generator process can
offer several times the cloud's capacity.

1. capacity: a closed loop (16 streams x 4 in flight) for a few seconds: C req/s;
2. overload: an open loop (Poisson arrivals) at ``--factor`` x C for ``--seconds``
   over 16 streams, each request carrying the edge's deadline: how many are
   answered, refused with RESOURCE_EXHAUSTED (the queue bound; how fast),
   expired in the queue (DEADLINE_EXCEEDED, answered without a batch slot),
   and whether any answered request waited past its deadline for its slot;
3. recovery: the closed loop of step 1 again, started the moment the overload
   stops (beside the backlog still queued); answers per 100 ms: how long from the end of the overload until
   throughput is back to 90% of C (the start of the first half-second window at that rate).

An edge answers every refused or expired request from its best exit
(degraded); here the load generator stands in for the edges. The cloud is
pinned to core 0 with one torch thread, the load generator to the others.

    python -m bench.overload --checkpoint runs/bench-exits/cifar10-vit
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from pathlib import Path
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from orchestrator.loadgen import (SERVER_CORES, client_cores, connected_clients, drive_streams, machine, offload_tokens,
                                  percentiles, write_result)
from edge_node.offload import CloudError, DeadlineExceeded, OffloadClient, OffloadError
from offramp.serving.daemon_proc import DaemonProcess
from offramp.core.tables import format_table
from offramp.core.wire import pb
from orchestrator.pacing import closed_loop, open_loop, poisson

RESULTS = Path(__file__).parent / "results"
STREAMS, WINDOW = 16, 4
BIN_S = 0.1


def outcome(error: OffloadError | None) -> str:
    """A short label: ok, the cloud's status code name (and why, for refusals), or the client's own timeout."""
    if error is None:
        return "OK"
    if isinstance(error, DeadlineExceeded):
        return "client timeout"
    if isinstance(error, CloudError):
        text = str(error).removeprefix("cloud error ")
        code, _, why = text.partition(":")
        if code == "RESOURCE_EXHAUSTED":
            return "RESOURCE_EXHAUSTED (stream limit)" if "on this stream" in why else "RESOURCE_EXHAUSTED (queue)"
        return code
    return type(error).__name__


async def offer(clients: list[OffloadClient], requests: list[pb.OffloadRequest], rate: float, seconds: float,
                    deadline_ms: int, seed: int = 0) -> tuple[Callable[[], Awaitable[dict[str, Any]]], float]:
    """Poisson arrivals at ``rate`` for ``seconds``. Returns as soon as the arrivals stop (the end of the
    overload; requests may still be in flight) with a coroutine function that waits for them and summarises
    every request's outcome and reply time, and the perf_counter time the overload ended."""
    records: list[tuple[float, str, float, float]] = []  # (sent at, outcome, reply ms, cloud queue ms)
    start = time.perf_counter()

    async def one(i: int, sent: float) -> None:
        request = pb.OffloadRequest()
        request.CopyFrom(requests[i % len(requests)])
        request.deadline_ms = deadline_ms
        error, queue_ms = None, float("nan")
        try:
            reply = await clients[i % len(clients)].infer(request, timeout_s=deadline_ms / 1e3 + 2.0)
            queue_ms = reply.timings.queue_ms
        except OffloadError as e:
            error = e
        records.append((sent - start, outcome(error), (time.perf_counter() - sent) * 1e3, queue_ms))

    tasks = await open_loop(one, poisson(np.random.default_rng(seed), rate, duration_s=seconds), start)
    # No arrival in the last gap is still the overload: it ends when its time is up.
    await asyncio.sleep(max(0.0, start + seconds - time.perf_counter()))
    ended = time.perf_counter()
    offered_s = ended - start

    async def summary() -> dict[str, Any]:
        await asyncio.gather(*tasks)
        counts = Counter(o for _, o, _, _ in records)
        ok_queue = [q for _, o, _, q in records if o == "OK"]
        return {
            "offered": len(records), "offered_rps": len(records) / offered_s, "seconds": offered_s,
            "outcomes": dict(counts), "answered_rps": counts["OK"] / offered_s,
            "reply_ms": {o: percentiles([ms for _, oo, ms, _ in records if oo == o]) for o in counts},
            "answered_waited_past_deadline": sum(q > deadline_ms for q in ok_queue),
            "answered_queue_ms": percentiles(ok_queue),
        }

    return summary, ended


async def recovery(clients: list[OffloadClient], requests: list[pb.OffloadRequest], seconds: float,
                   capacity: float, since: float) -> dict[str, Any]:
    """The closed loop started the moment the overload stops (``since``, perf_counter), beside whatever of
    the overload is still queued: its answers per ``BIN_S`` from then, and the time back to 90% of C."""
    done: list[float] = []

    async def request(k: int, i: int) -> None:
        try:
            request = pb.OffloadRequest()
            request.CopyFrom(requests[(k + i * STREAMS * WINDOW) % len(requests)])  # infer() sets the id
            await clients[k // WINDOW].infer(request, timeout_s=10)
            done.append(time.perf_counter() - since)
        except OffloadError:
            pass

    await closed_loop(request, STREAMS * WINDOW, since + seconds - time.perf_counter())
    return recovered(done, seconds, capacity)


def recovered(done_s: Sequence[float], seconds: float, capacity: float, window_s: float = 0.5) -> dict[str, Any]:
    """Answers per ``BIN_S`` from ``done_s`` (each answer's time since the overload stopped), and when
    throughput was back: the start of the first ``window_s`` window whose mean is at least 90% of
    ``capacity`` (a window, so that one lucky bin does not count; its start, so that the window's length is
    no floor under the figure)."""
    n_bins = int(round(seconds / BIN_S))
    bins = np.bincount((np.asarray(done_s, dtype=float) / BIN_S).astype(int), minlength=n_bins)[:n_bins]
    rps = bins / BIN_S
    window = max(1, int(round(window_s / BIN_S)))
    smooth = np.convolve(rps, np.ones(window) / window, mode="valid")
    back = next((i for i, v in enumerate(smooth) if v >= 0.9 * capacity), None)
    return {"rps_per_bin": rps.round(1).tolist(), "bin_s": BIN_S, "window_s": window * BIN_S,
            "recovered_after_s": None if back is None else back * BIN_S}


async def run(args: argparse.Namespace, fingerprint: str, split: int, tokens: list[pb.EncodedTensor]) -> dict:
    requests = [pb.OffloadRequest(model_fingerprint=fingerprint, split_block=split, tokens=t) for t in tokens]
    flags = ["--checkpoint", args.checkpoint, "--threads", "1"]
    with DaemonProcess("cloud", flags, cores=SERVER_CORES) as cloud:
        probe = await drive_streams(cloud.address, fingerprint, split, tokens, STREAMS, WINDOW, args.probe_seconds)
        capacity = probe["throughput_rps"]
        print(f"capacity: {capacity:.0f} req/s (closed loop {STREAMS} x {WINDOW}, mean batch {probe['mean_batch']:.1f})",
              flush=True)
        clients = await connected_clients(cloud.address, fingerprint, split, STREAMS)
        try:
            summary, ended = await offer(clients, requests, args.factor * capacity, args.seconds,
                                             args.deadline_ms)
            back = await recovery(clients, requests, args.recovery_seconds, capacity, ended)
            over = await summary()
        finally:
            await asyncio.gather(*(c.close() for c in clients))
    return {"capacity_rps": capacity, "capacity_probe": probe, "overload": over, "recovery": back}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.overload", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="runs/bench-exits/cifar10-vit")
    ap.add_argument("--factor", type=float, default=4.0, help="offered load as a multiple of the capacity")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long the overload lasts")
    ap.add_argument("--samples-per-request", type=int, default=8)
    ap.add_argument("--deadline-ms", type=int, default=1000, help="each request's deadline (the edge's deadline_ms)")
    ap.add_argument("--probe-seconds", type=float, default=5.0, help="capacity measurement")
    ap.add_argument("--recovery-seconds", type=float, default=5.0)
    ap.add_argument("--out", default=str(RESULTS / "overload.json"))
    args = ap.parse_args(argv)
    started = time.perf_counter()
    k = args.samples_per_request
    card, _, tokens = offload_tokens(args.checkpoint, 256 * k, k)
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, client_cores())
    try:
        result = asyncio.run(run(args, card.fingerprint, card.split_block, tokens))
    finally:
        os.sched_setaffinity(0, cores)
    over, back = result["overload"], result["recovery"]
    if over["offered_rps"] < 0.9 * args.factor * result["capacity_rps"]:
        print(f"WARNING: the load generator offered only {over['offered_rps']:.0f} req/s of the "
              f"{args.factor * result['capacity_rps']:.0f} asked for; raise --samples-per-request")
    print(f"\noverload: {over['offered']} requests of {k} samples at {over['offered_rps']:.0f} req/s "
          f"({over['offered_rps'] / result['capacity_rps']:.1f}x capacity) for {over['seconds']:.0f} s, "
          f"deadline {args.deadline_ms} ms; answered {over['answered_rps']:.0f} req/s")
    print(format_table(["outcome", "requests", "share", "reply p50 ms", "reply p99 ms"],
                       [[o, n, n / over["offered"], over["reply_ms"][o]["p50"], over["reply_ms"][o]["p99"]]
                        for o, n in sorted(over["outcomes"].items(), key=lambda kv: -kv[1])]))
    print(f"answered requests that waited past their deadline for a batch slot: "
          f"{over['answered_waited_past_deadline']}")
    print(f"recovery: back to 90% of capacity {back['recovered_after_s']} s after the overload stopped")
    result.update({
        "command": "python -m bench.overload " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "checkpoint": args.checkpoint, "factor": args.factor, "deadline_ms": args.deadline_ms,
        "samples_per_request": k,
        "targets": {"recovered_after_s": back["recovered_after_s"],
                    "refused_queue_p99_ms": over["reply_ms"].get("RESOURCE_EXHAUSTED (queue)", {}).get("p99"),
                    "answered_waited_past_deadline": over["answered_waited_past_deadline"]},
        "wall_s": time.perf_counter() - started})
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
