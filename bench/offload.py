"""Offload path on loopback: codec bytes, framework overhead, and the cloud's batching at both ends of load.

(a) codec table (orchestrator/codec_table.py, alone: bench/codec.py): bytes per offloaded sample vs accuracy,
    with the input's own JPEG/PNG size as yardstick;
(b) latency per stage through the real daemons (client -> edge -> cloud),
    every sample offloaded; framework overhead = end to end minus the edge
    half's and the cloud half's compute measured alone, in a plain loop at
    batch 1 on the daemons' core (compute the daemons inflate counts as
    overhead); the daemons' torch threads (1 vs 2) compared; and the
    two-hop floor: the same client through an edge and a cloud that do no
    work (a relay and an echo server), what two Python gRPC hops cost;
(c) the offload leg alone at 1 stream (light load: does batching add
    latency?) and 16 streams x 4 in flight (heavy load: does it fill
    batches?), adaptive batching (no timer) vs a fixed 2 ms window vs no
    batching, against the tail's best batched throughput on the same core;
    and their floors: an echo server (no work), and for one stream the echo
    server running the tail inline on every request (the least a leg with
    compute costs: the model's compute also slows what runs after it);
(d) Ray Serve serving the same tail (``@serve.batch``, its gRPC proxy) under
    the same load, in the same run, when ``offramp[serve]`` is installed.

Servers are pinned to core 0, the load generator (this process) to the
others, so client CPU does not pollute server figures.

    python -m bench.offload --checkpoint runs/bench-exits/cifar10-vit
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from orchestrator import codec_table
from orchestrator.floors import child_server, serve_echo, serve_until_killed
from orchestrator.loadgen import SERVER_CORES, client_cores, drive_streams, machine, percentiles, write_result
from edge_node.offload import OffloadClient, OffloadSettings
from offramp.core.checkpoint import Card, load_checkpoint
from offramp.core.codec import CodecConfig, encode
from offramp.serving.daemon_proc import DaemonProcess
from offramp.core.exit_rule import never_leave
from offramp.core.data.card_data import load_validation
from offramp.core.tables import format_table
from offramp.core.halves import CloudHalf, EdgeHalf
from offramp.core.wire import pb, pb_grpc

RESULTS = Path(__file__).parent / "results"
CODEC = CodecConfig(dtype="int8", zstd_level=3)


def timed_p50(fn, seconds: float = 1.0) -> float:
    """Median milliseconds of ``fn()`` over ``seconds`` (after a warm-up)."""
    for _ in range(5):
        fn()
    times, stop = [], time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def compute_alone(edge: EdgeHalf, cloud: CloudHalf, x: torch.Tensor, tokens: torch.Tensor) -> dict[str, Any]:
    """Batch-1 compute of each half and the tail's best batched throughput, on the servers' core, 1 thread."""
    mask, threads = os.sched_getaffinity(0), torch.get_num_threads()
    never = [never_leave("max_prob")] * edge.num_exits  # every sample runs every exit and leaves as tokens
    os.sched_setaffinity(0, SERVER_CORES)
    torch.set_num_threads(1)
    try:
        out = {"edge_half_ms": timed_p50(lambda: edge.run(x[:1], never, "max_prob")),
               "cloud_half_ms": timed_p50(lambda: cloud.run(tokens[:1])), "tail_samples_per_s": {}}
        for b in (1, 8, 16, 32, 64):
            batch = tokens[:1].expand(b, *tokens.shape[1:]).contiguous()
            out["tail_samples_per_s"][b] = b / timed_p50(lambda: cloud.run(batch), 1.5) * 1e3
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, mask)
    # Does a second intra-op thread help at batch 1? (It decides the daemons' default --threads.)
    torch.set_num_threads(min(2, len(mask)))
    out["two_threads"] = {"edge_half_ms": timed_p50(lambda: edge.run(x[:1], never, "max_prob")),
                          "cloud_half_ms": timed_p50(lambda: cloud.run(tokens[:1]))}
    torch.set_num_threads(threads)
    return out


def sequential_infer(address: str, x: torch.Tensor, n: int) -> tuple[list[float], dict[str, list[float]]]:
    """``n`` Infer calls one at a time (after 20 warm-ups) from a plain gRPC client: client milliseconds of
    the cloud-answered ones, and the stage times the edge reported."""
    stages: dict[str, list[float]] = {}
    client_ms: list[float] = []
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.EdgeStub(channel)
        for i in range(n + 20):
            sample = x[i % len(x)].numpy()
            t0 = time.perf_counter()
            reply = stub.Infer(pb.InferRequest(request_id=i, tensor=pb.RawTensor(
                shape=list(sample.shape), data=sample.tobytes())), timeout=30)
            elapsed = (time.perf_counter() - t0) * 1e3
            if i < 20 or reply.decided_by != "cloud":
                continue  # warm-up, or not offloaded
            client_ms.append(elapsed)
            for k, v in reply.stage_ms.items():
                stages.setdefault(k, []).append(v)
    return client_ms, stages


def end_to_end(checkpoint: str, x: torch.Tensor, n: int, threads: int, cores: set[int] | None) -> dict[str, Any]:
    """Client -> edge daemon -> cloud daemon, one request at a time, every sample offloaded."""
    common = ["--checkpoint", checkpoint, "--threads", str(threads)]
    with DaemonProcess("cloud", common, cores=cores) as cloud, \
            DaemonProcess("edge", [*common, "--cloud", cloud.address, "--codec", CODEC.dtype], cores=cores) as edge:
        with grpc.insecure_channel(edge.address) as channel:
            stub = pb_grpc.EdgeStub(channel)
            exits = len(stub.GetPolicy(pb.GetPolicyRequest(), timeout=10).thresholds)
            stub.SetPolicy(pb.Policy(thresholds=[never_leave("max_prob")] * exits, score="max_prob",
                                     offload_enabled=True))
        client_ms, stages = sequential_infer(edge.address, x, n)
    return {"threads": threads, "pinned": sorted(cores) if cores else None, "requests": len(client_ms),
            "client_ms": percentiles(client_ms), "stages_ms": {k: percentiles(v) for k, v in stages.items()}}


class _RelayEdge(pb_grpc.EdgeServicer):
    """The two-hop floor's edge: computes nothing; per request it sends one fixed token message to the echo
    server over the edge's own offload client and answers "cloud" when the echo comes back."""

    def __init__(self, client: OffloadClient, request: pb.OffloadRequest) -> None:
        self._client, self._request = client, request

    async def Infer(self, request, context):
        await self._client.infer(self._request, timeout_s=30)
        return pb.InferReply(request_id=request.request_id, decided_by="cloud", exit_index=-1)


def serve_relay(echo_port: int, request: bytes, port: Any) -> None:
    """Child process: the relay edge pinned to the servers' core, in front of the echo server."""
    os.sched_setaffinity(0, SERVER_CORES)
    offload = pb.OffloadRequest.FromString(request)

    async def run() -> None:
        client = OffloadClient([f"127.0.0.1:{echo_port}"], offload.model_fingerprint, offload.split_block,
                               OffloadSettings())
        client.start()
        while not client.connected_to:
            await asyncio.sleep(0.01)
        relay = _RelayEdge(client, offload)
        await serve_until_killed(lambda server: pb_grpc.add_EdgeServicer_to_server(relay, server), port)

    asyncio.run(run())


def two_hop_floor(fingerprint: str, split: int, x: torch.Tensor, tokens: pb.EncodedTensor, n: int
                  ) -> dict[str, Any]:
    """The same client and requests as (b) through an edge and a cloud that do no work (both on the servers'
    core): what two Python gRPC hops cost here, the floor under the framework overhead."""
    request = pb.OffloadRequest(model_fingerprint=fingerprint, split_block=split, tokens=tokens)
    with child_server(serve_echo, fingerprint, split, None) as (echo_port, _), \
            child_server(serve_relay, echo_port, request.SerializeToString()) as (relay_port, _):
        client_ms, _ = sequential_infer(f"127.0.0.1:{relay_port}", x, n)
    return {"requests": len(client_ms), "client_ms": percentiles(client_ms)}


FLOOR, FLOOR_WITH_TAIL = "gRPC floor (no work)", "gRPC floor + the tail inline (no decoding or batching)"


async def grpc_floor(checkpoint: str, fingerprint: str, split: int, tokens: list[pb.EncodedTensor],
                     seconds: float) -> list[dict]:
    """The same clients and load against the echo server: what any Python gRPC server costs here; and one
    stream against the echo server running the tail on every request: what a leg with compute costs at least."""
    runs = []
    with child_server(serve_echo, fingerprint, split, None) as (port, _):
        for edges, window in ((1, 1), (16, 4)):
            run = await drive_streams(f"127.0.0.1:{port}", fingerprint, split, tokens, edges, window, seconds)
            runs.append({"batching": FLOOR, **run})
    with child_server(serve_echo, fingerprint, split, checkpoint) as (port, _):
        run = await drive_streams(f"127.0.0.1:{port}", fingerprint, split, tokens, 1, 1, seconds)
        runs.append({"batching": FLOOR_WITH_TAIL, **run})
    return runs


# (name, cloud flags): adaptive batching (the default), a fixed window, and no batching at all.
BATCHING = [("adaptive", ["--max-wait-ms", "0"]), ("window 2 ms", ["--max-wait-ms", "2"]),
            ("batch 1", ["--max-batch", "1"])]


async def offload_runs(checkpoint: str, fingerprint: str, split: int, tokens: list[pb.EncodedTensor],
                       seconds: float) -> list[dict[str, Any]]:
    """Every batching mode at light (1 x 1) and heavy (16 x 4) load, the cloud pinned, one thread.

    All runs share this event loop (grpc.aio binds to the first loop it meets).
    """
    runs = await grpc_floor(checkpoint, fingerprint, split, tokens, seconds)
    for name, flags in BATCHING:
        with DaemonProcess("cloud", ["--checkpoint", checkpoint, "--threads", "1", *flags],
                           cores=SERVER_CORES) as cloud:
            for edges, window in ((1, 1), (16, 4)):
                if name == "batch 1" and edges == 1:
                    continue  # same as adaptive at one request in flight
                run = await drive_streams(cloud.address, fingerprint, split, tokens, edges, window, seconds)
                runs.append({"batching": name, **run})
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.offload", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="runs/bench-exits/cifar10-vit")
    ap.add_argument("--samples", type=int, default=1000, help="samples for the codec table")
    ap.add_argument("--requests", type=int, default=300, help="sequential requests for the latency breakdown")
    ap.add_argument("--seconds", type=float, default=8.0, help="duration of each throughput run")
    ap.add_argument("--no-ray-serve", action="store_true", help="skip the Ray Serve comparison")
    ap.add_argument("--quick", action="store_true", help="small numbers, for a smoke test")
    ap.add_argument("--out", default=str(RESULTS / "offload.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.requests, args.seconds = 100, 20, 1.0
    cores = os.sched_getaffinity(0)
    try:
        return measure(args, argv)
    finally:  # this process moved off the servers' core; a caller (a test run) gets its cores back
        os.sched_setaffinity(0, cores)


@torch.no_grad()  # scoped: main() also runs inside test processes
def measure(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Everything ``main`` prints and writes, for parsed ``args``: (a) the codecs, (b) latency through the
    daemons, (c) the offload leg alone, the targets, and Ray Serve beside (c)."""
    started = time.perf_counter()
    result: dict[str, Any] = {
        "command": "python -m bench.offload " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine()}
    result["codec"] = codec = codec_step(args)
    card, tokens, latency = latency_step(args)
    result.update(latency)
    alone = latency["compute_alone"]
    result["offload_runs"] = streams = asyncio.run(
        offload_runs(args.checkpoint, card.fingerprint, card.split_block, tokens, args.seconds))
    print_offload_leg(streams, alone)
    result["targets"] = targets(codec, latency, streams)
    if not args.no_ray_serve:
        ours = next(r for r in streams if r["batching"] == "adaptive" and r["edges"] == 16)
        requests = [pb.OffloadRequest(model_fingerprint=card.fingerprint, split_block=card.split_block, tokens=t)
                    for t in tokens]
        result["ray_serve"] = ray_serve_comparison(args, ours, requests)
        if "throughput_rps" in result["ray_serve"]:
            result["targets"]["vs_ray_serve"] = ours["throughput_rps"] / result["ray_serve"]["throughput_rps"]
    print("\ntargets: " + ", ".join(f"{k}={v:.3g}" for k, v in result["targets"].items()))
    result["wall_s"] = time.perf_counter() - started
    write_result(result, args.out)
    return 0


def codec_step(args: argparse.Namespace) -> dict[str, Any]:
    """(a) Every codec on the split tokens: bytes, speed, accuracy."""
    codec = codec_table.run(args.checkpoint, args.samples)
    print(f"(a) codec: {codec['samples']} samples, tokens {codec['token_shape']}, "
          f"input JPEG q90 {codec['jpeg_bytes']:.0f} B / PNG {codec['png_bytes']:.0f} B")
    print(format_table(["codec", "bytes", "x smaller", "vs JPEG", "encode ms", "decode ms", "accuracy", "change (pts)"],
                       [[r["codec"], round(r["bytes"]), r["x_smaller_than_float32"], r["vs_jpeg"], r["encode_ms"],
                         r["decode_ms"], r["accuracy"], r["accuracy_change_points"]] for r in codec["rows"]]))
    return codec


def latency_step(args: argparse.Namespace) -> tuple[Card, list[pb.EncodedTensor], dict[str, Any]]:
    """(b) Sequential offloaded requests through edge and cloud daemons, stage by stage, against each half's
    compute alone and the two-hop floor. Returns the card, the encoded tokens (c) sends, and the figures."""
    model, card = load_checkpoint(args.checkpoint)
    val, _ = load_validation(card)
    x = val.tensors[0][:256]
    edge, cloud_half = EdgeHalf(model, card.split_block), CloudHalf(model, card.split_block)
    res = edge.run(x, [never_leave("max_prob")] * edge.num_exits, "max_prob")
    alone = compute_alone(edge, cloud_half, x, res.tokens)  # before any daemon starts: nothing else running
    os.sched_setaffinity(0, client_cores())  # the load generator keeps off the servers' core

    runs = [end_to_end(args.checkpoint, x, args.requests, threads, cores)
            for threads, cores in ((1, SERVER_CORES), (1, None), (2, None))]
    for r in runs:
        r["framework_overhead_p50_ms"] = r["client_ms"]["p50"] - alone["edge_half_ms"] - alone["cloud_half_ms"]
    e2e = runs[0]
    tokens = [encode(res.tokens[i:i + 1], CODEC) for i in range(len(res.tokens))]
    floor2 = two_hop_floor(card.fingerprint, card.split_block, x, tokens[0], args.requests)
    token_shape = list(res.tokens.shape[1:])
    print(f"\n(b) latency through the daemons (pinned to core 0, 1 thread), {e2e['requests']} sequential "
          f"offloaded requests, tokens {token_shape} (ms):")
    order = ["preprocess", "queue", "edge_compute", "encode", "cloud_decode", "cloud_queue", "cloud_compute", "cloud",
             "offload_rtt", "total"]
    rows = [[k, v["p50"], v["p95"]] for k in order if (v := e2e["stages_ms"].get(k))]
    rows += [["client end to end", e2e["client_ms"]["p50"], e2e["client_ms"]["p95"]],
             ["edge half alone (batch 1)", alone["edge_half_ms"], None],
             ["cloud half alone (batch 1)", alone["cloud_half_ms"], None],
             ["framework overhead", e2e["framework_overhead_p50_ms"], None],
             ["two-hop floor: the same through an edge and a cloud that do no work", floor2["client_ms"]["p50"],
              floor2["client_ms"]["p95"]]]
    print(format_table(["stage", "p50", "p95"], rows))
    print(f"batch-1 compute alone with 2 threads: edge half {alone['two_threads']['edge_half_ms']:.2f} ms, "
          f"cloud half {alone['two_threads']['cloud_half_ms']:.2f} ms")
    print(format_table(["daemon threads", "pinned", "client p50", "overhead p50"],
                       [[r["threads"], "core 0" if r["pinned"] else "no", r["client_ms"]["p50"],
                         r["framework_overhead_p50_ms"]] for r in runs]))
    return card, tokens, {"compute_alone": alone, "token_shape": token_shape, "end_to_end": e2e,
                          "two_hop_floor": floor2, "end_to_end_by_threads": runs}


def print_offload_leg(streams: list[dict[str, Any]], alone: dict[str, Any]) -> None:
    """(c) The offload leg's runs against the tail's best rate alone."""
    best = max(alone["tail_samples_per_s"].values())
    print(f"\n(c) offload leg alone, cloud pinned to core 0 with 1 thread; tail alone there: batch-1 "
          f"{alone['cloud_half_ms']:.2f} ms, best {best:.0f} samples/s")
    print(format_table(["batching", "streams x in flight", "req/s", "share of tail best", "mean batch", "p50 ms",
                        "p95 ms", "p50 - tail b1"],
                       [[r["batching"], f"{r['edges']} x {r['window']}", r["throughput_rps"],
                         r["throughput_rps"] / best, r["mean_batch"], r["latency_ms"]["p50"], r["latency_ms"]["p95"],
                         r["latency_ms"]["p50"] - alone["cloud_half_ms"]] for r in streams]))


def targets(codec: dict[str, Any], latency: dict[str, Any], streams: list[dict[str, Any]]) -> dict[str, float]:
    """The figures the issue's targets read, from (a), (b) and (c)."""
    alone, e2e, floor2 = latency["compute_alone"], latency["end_to_end"], latency["two_hop_floor"]
    best = max(alone["tail_samples_per_s"].values())
    ours = next(r for r in streams if r["batching"] == "adaptive" and r["edges"] == 16)
    light = next(r for r in streams if r["batching"] == "adaptive" and r["edges"] == 1)
    single = next(r for r in streams if r["batching"] == "batch 1")
    floor = next(r for r in streams if r["batching"] == FLOOR and r["edges"] == 16)
    leg_floor = next(r for r in streams if r["batching"] == FLOOR_WITH_TAIL)
    int8 = next(r for r in codec["rows"] if r["codec"] == "int8+zstd")
    return {
        "int8_zstd_x_smaller": int8["x_smaller_than_float32"],
        "int8_zstd_accuracy_change_points": int8["accuracy_change_points"],
        "framework_overhead_p50_ms": e2e["framework_overhead_p50_ms"],
        "two_hop_floor_p50_ms": floor2["client_ms"]["p50"],
        "leg_p50_minus_compute_ms": light["latency_ms"]["p50"] - alone["cloud_half_ms"],
        # The same for a server that only runs the tail inline: gRPC, and the compute slowed by what runs
        # between requests, with no work of ours.
        "leg_floor_minus_compute_ms": leg_floor["latency_ms"]["p50"] - alone["cloud_half_ms"],
        "share_of_tail_best_pinned": ours["throughput_rps"] / best,
        # The most any server can reach when each request also costs the floor's time: 1 / (1/best + 1/floor).
        "share_bound_by_grpc_floor": 1 / (1 + best / floor["throughput_rps"]),
        "batching_speedup_vs_batch1": ours["throughput_rps"] / single["throughput_rps"],
    }


def ray_serve_comparison(args: argparse.Namespace, ours: dict[str, Any],
                         requests: list[pb.OffloadRequest]) -> dict[str, Any]:
    """Ray Serve on the same tail, requests, cores and load as ``ours``; the reason instead when it cannot run."""
    from orchestrator.ray_serve import RayServeMissing, run_ray_serve_baseline
    try:
        run = run_ray_serve_baseline(args.checkpoint, requests=requests, edges=ours["edges"], window=ours["window"],
                                     seconds=args.seconds, server_cores=sorted(SERVER_CORES),
                                     client_cores=sorted(client_cores()))
    except RayServeMissing as e:
        print(f"\n(d) Ray Serve skipped: {e}")
        return {"skipped": str(e)}
    print(f"\n(d) Ray Serve {run['ray']} on the same tail, cores and load ({ours['edges']} x {ours['window']}): "
          f"{run['throughput_rps']:.0f} req/s, p50 {run['latency_ms']['p50']:.1f} ms, mean batch "
          f"{run['mean_batch']:.1f}, {run['errors']} errors; ours {ours['throughput_rps']:.0f} req/s")
    return run


if __name__ == "__main__":
    sys.exit(main())
