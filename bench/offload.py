"""Offload path on loopback: codec bytes, per-stage latency, and cloud throughput with batching.

(a) codec table (see bench/codec.py): bytes per offloaded sample vs accuracy,
    with the input's own JPEG/PNG size as yardstick;
(b) latency per stage through the real daemons (client -> edge -> cloud), and
    the framework overhead = end to end minus model compute (edge + cloud);
    then the offload leg alone at 1 and 16 concurrent edges (one gRPC stream each);
(c) cloud throughput from 16 edge streams with cross-stream batching vs batch
    size 1, against the tail model's own best batched throughput, measured in
    the same run.

    python -m bench.offload --checkpoint runs/bench-exits/cifar10-vit
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from bench import codec as codec_bench
from edge_node.offload import OffloadClient, OffloadSettings
from offramp.checkpoint import load_checkpoint
from offramp.codec import CodecConfig, encode
from offramp.daemon_proc import DaemonProcess
from offramp.pipeline import load_validation
from offramp.report import format_table
from offramp.split import CloudHalf, EdgeHalf
from offramp.wire import pb, pb_grpc

RESULTS = Path(__file__).parent / "results"
CODEC = CodecConfig(dtype="int8", zstd_level=3)


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)), "mean": float(a.mean())}


def end_to_end(checkpoint: str, x: torch.Tensor, n: int) -> dict[str, Any]:
    """Client -> edge daemon -> cloud daemon, one request at a time, every sample offloaded."""
    stages: dict[str, list[float]] = {}
    client_ms: list[float] = []
    with DaemonProcess("cloud", ["--checkpoint", checkpoint, "--max-wait-ms", "0"]) as cloud, \
            DaemonProcess("edge", ["--checkpoint", checkpoint, "--cloud", cloud.address, "--codec", CODEC.dtype]) as edge:
        with grpc.insecure_channel(edge.address) as channel:
            stub = pb_grpc.EdgeStub(channel)
            exits = len(stub.GetPolicy(pb.GetPolicyRequest(), timeout=10).thresholds)
            stub.SetPolicy(pb.Policy(thresholds=[float("inf")] * exits, score="max_prob", offload_enabled=True))
            for i in range(n + 10):
                sample = x[i % len(x)].numpy()
                t0 = time.perf_counter()
                reply = stub.Infer(pb.InferRequest(request_id=i, tensor=pb.RawTensor(
                    shape=list(sample.shape), data=sample.tobytes())), timeout=30)
                elapsed = (time.perf_counter() - t0) * 1e3
                if i < 10 or reply.decided_by != "cloud":
                    continue  # warm-up, or not offloaded
                client_ms.append(elapsed)
                for k, v in reply.stage_ms.items():
                    stages.setdefault(k, []).append(v)
    compute = np.asarray(stages["edge_compute"]) + np.asarray(stages["cloud_compute"])
    overhead = np.asarray(client_ms) - compute
    return {"requests": len(client_ms), "client_ms": percentiles(client_ms),
            "stages_ms": {k: percentiles(v) for k, v in stages.items()},
            "model_compute_ms": percentiles(list(compute)), "framework_overhead_ms": percentiles(list(overhead))}


async def drive_streams(address: str, fingerprint: str, split: int, tokens: list[pb.EncodedTensor], edges: int,
                        window: int, seconds: float) -> dict[str, Any]:
    """``edges`` clients, one stream each, ``window`` requests in flight per stream, for ``seconds``."""
    clients = [OffloadClient([address], fingerprint, split, OffloadSettings()) for _ in range(edges)]
    for c in clients:
        c.start()
    connect_by = time.perf_counter() + 30
    while not all(c.connected_to for c in clients):  # each client dials and checks the pairing first
        if time.perf_counter() > connect_by:
            raise RuntimeError("edge clients did not connect to the cloud within 30 s")
        await asyncio.sleep(0.01)
    latencies: list[float] = []
    batch_sizes: list[int] = []
    compute: list[float] = []
    done = 0
    stop_at = 0.0

    async def worker(client: OffloadClient, k: int) -> None:
        nonlocal done
        i = k
        while time.perf_counter() < stop_at:
            req = pb.OffloadRequest(model_fingerprint=fingerprint, split_block=split, tokens=tokens[i % len(tokens)])
            t0 = time.perf_counter()
            reply = await client.infer(req, timeout_s=30)
            latencies.append((time.perf_counter() - t0) * 1e3)
            batch_sizes.append(reply.batch_size)
            compute.append(reply.timings.compute_ms)
            done += 1
            i += edges * window
    try:
        warm = pb.OffloadRequest(model_fingerprint=fingerprint, split_block=split, tokens=tokens[0])
        await asyncio.gather(*(c.infer(warm, timeout_s=30) for c in clients))
        start = time.perf_counter()
        stop_at = start + seconds
        await asyncio.gather(*(worker(c, e * window + w) for e, c in enumerate(clients) for w in range(window)))
        wall = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return {"edges": edges, "window": window, "requests": done, "throughput_rps": done / wall,
            "latency_ms": percentiles(latencies), "cloud_compute_ms": percentiles(compute),
            "mean_batch": float(np.mean(batch_sizes))}


async def offload_runs(checkpoint: str, fingerprint: str, split: int, tokens: list[pb.EncodedTensor],
                       seconds: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All gRPC-client runs in one event loop (grpc.aio binds to the first loop it meets)."""
    legs, throughput = [], []
    with DaemonProcess("cloud", ["--checkpoint", checkpoint]) as cloud:
        for edges in (1, 16):
            legs.append(await drive_streams(cloud.address, fingerprint, split, tokens, edges, 1, seconds))
    for max_batch in (1, 32):
        with DaemonProcess("cloud", ["--checkpoint", checkpoint, "--max-batch", str(max_batch),
                                     "--max-wait-ms", "2"]) as cloud:
            run = await drive_streams(cloud.address, fingerprint, split, tokens, 16, 4, seconds)
        throughput.append({"max_batch": max_batch, **run})
    return legs, throughput


def tail_best_throughput(half: CloudHalf, token: torch.Tensor, batches: tuple[int, ...] = (1, 8, 16, 32, 64)) -> dict[int, float]:
    """Samples/s of the tail model alone, in this process, per batch size."""
    out = {}
    for b in batches:
        x = token.expand(b, *token.shape[1:]).contiguous()
        for _ in range(3):
            half.run(x)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 1.5:
            half.run(x)
            reps += 1
        out[b] = reps * b / (time.perf_counter() - t0)
    return out


@torch.no_grad()  # scoped: main() also runs inside test processes
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.offload", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="runs/bench-exits/cifar10-vit")
    ap.add_argument("--samples", type=int, default=1000, help="samples for the codec table")
    ap.add_argument("--requests", type=int, default=200, help="sequential requests for the latency breakdown")
    ap.add_argument("--seconds", type=float, default=8.0, help="duration of each throughput run")
    ap.add_argument("--quick", action="store_true", help="small numbers, for a smoke test")
    ap.add_argument("--out", default=str(RESULTS / "offload.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.requests, args.seconds = 100, 20, 1.0
    result: dict[str, Any] = {"command": "python -m bench.offload " + " ".join(argv if argv is not None else sys.argv[1:])}

    result["codec"] = codec = codec_bench.run(args.checkpoint, args.samples)
    print(f"(a) codec: {codec['samples']} samples, tokens {codec['token_shape']}, "
          f"input JPEG q90 {codec['jpeg_bytes']:.0f} B / PNG {codec['png_bytes']:.0f} B")
    print(format_table(["codec", "bytes", "x smaller", "vs JPEG", "encode ms", "decode ms", "accuracy", "change (pts)"],
                       [[r["codec"], round(r["bytes"]), r["x_smaller_than_float32"], r["vs_jpeg"], r["encode_ms"],
                         r["decode_ms"], r["accuracy"], r["accuracy_change_points"]] for r in codec["rows"]]))

    model, card = load_checkpoint(args.checkpoint)
    val, _ = load_validation(card)
    x = val.tensors[0][:256]
    e2e = end_to_end(args.checkpoint, x, args.requests)
    result["end_to_end"] = e2e
    print(f"\n(b) latency through the daemons, {e2e['requests']} sequential offloaded requests (ms):")
    order = ["preprocess", "queue", "edge_compute", "encode", "cloud_decode", "cloud_queue", "cloud_compute", "cloud",
             "offload_rtt", "total"]
    rows = [[k, v["p50"], v["p95"]] for k in order if (v := e2e["stages_ms"].get(k))]
    rows += [["client end to end", e2e["client_ms"]["p50"], e2e["client_ms"]["p95"]],
             ["model compute (edge + cloud)", e2e["model_compute_ms"]["p50"], e2e["model_compute_ms"]["p95"]],
             ["framework overhead", e2e["framework_overhead_ms"]["p50"], e2e["framework_overhead_ms"]["p95"]]]
    print(format_table(["stage", "p50", "p95"], rows))

    edge, cloud_half = EdgeHalf(model, card.split_block), CloudHalf(model, card.split_block)
    res = edge.run(x, [2.0] * edge.num_exits, "max_prob")
    tokens = [encode(res.tokens[i:i + 1], CODEC) for i in range(len(res.tokens))]
    best = tail_best_throughput(cloud_half, res.tokens[:1])  # before the daemons start: nothing else running
    legs, throughput = asyncio.run(offload_runs(args.checkpoint, card.fingerprint, card.split_block, tokens,
                                                args.seconds))
    print("\n(b') offload leg alone (encoded tokens -> cloud -> answer), one request in flight per edge:")
    print(format_table(["edges", "requests", "p50 ms", "p95 ms", "cloud compute p50", "overhead p50", "mean batch"],
                       [[r["edges"], r["requests"], r["latency_ms"]["p50"], r["latency_ms"]["p95"],
                         r["cloud_compute_ms"]["p50"], r["latency_ms"]["p50"] - r["cloud_compute_ms"]["p50"],
                         r["mean_batch"]] for r in legs]))
    result["offload_leg"] = legs
    result["throughput"] = throughput
    result["tail_model_samples_per_s"] = best
    top = max(best.values())
    b1, b32 = throughput[0]["throughput_rps"], throughput[1]["throughput_rps"]
    print("\n(c) cloud throughput, 16 edge streams x 4 in flight:")
    print(format_table(["max batch", "req/s", "mean batch", "p50 ms", "p95 ms"],
                       [[t["max_batch"], t["throughput_rps"], t["mean_batch"], t["latency_ms"]["p50"],
                         t["latency_ms"]["p95"]] for t in throughput]))
    print("tail model alone (samples/s by batch size): " + ", ".join(f"{b}: {v:.0f}" for b, v in best.items()))
    result["targets"] = {
        "int8_zstd_x_smaller": next(r["x_smaller_than_float32"] for r in codec["rows"] if r["codec"] == "int8+zstd"),
        "int8_zstd_accuracy_change_points": next(r["accuracy_change_points"] for r in codec["rows"]
                                                 if r["codec"] == "int8+zstd"),
        "framework_overhead_p50_ms": e2e["framework_overhead_ms"]["p50"],
        "batching_speedup_vs_batch1": b32 / b1,
        "batching_share_of_tail_best": b32 / top,
    }
    print("\ntargets: " + ", ".join(f"{k}={v:.3g}" for k, v in result["targets"].items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
