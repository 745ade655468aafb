"""Hostile messages against both daemons: a status histogram per RPC, log bytes per bad message, memory.

For every RPC of the cloud (Offload.Infer, Offload.Describe) and the edge
(Edge.Infer, InferStream, GetPolicy, SetPolicy), N messages are sent over
real sockets to daemons started as a user would: valid messages truncated,
bit-flipped, spliced with random bytes, prefixed with a field claiming ~32
GiB, or replaced by random bytes up to 3 MB. Every answer must be a precise
status (never UNKNOWN or INTERNAL), health must stay SERVING, and the log
must stay small: bytes of log per bad message, amortised, are reported.

    python -m bench.fuzz --checkpoint runs/bench-exits/cifar10-vit --count 10000
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offramp.core.checkpoint import load_checkpoint
from offramp.core.codec import CodecConfig, encode
from offramp.serving.daemon_proc import DaemonProcess
from offramp.core.exit_rule import never_leave
from offramp.core.tables import format_table
from offramp.core.halves import EdgeHalf
from offramp.core.wire import pb, status_code

RESULTS = Path(__file__).parent / "results"
BAD = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


def mutate(valid: bytes, rng: np.random.Generator) -> bytes:
    """One hostile variant of ``valid``."""
    kind = rng.integers(6)
    if kind == 0:
        return valid[:rng.integers(len(valid))]
    if kind == 1:
        out = bytearray(valid)
        for i in rng.integers(len(valid), size=rng.integers(1, 9)):
            out[i] ^= 1 << int(rng.integers(8))
        return bytes(out)
    if kind == 2:
        at = int(rng.integers(len(valid) + 1))
        return valid[:at] + rng.bytes(int(rng.integers(1, 65))) + valid[at:]
    if kind == 3:
        return b"\x0a\xff\xff\xff\xff\x7f" + valid  # a length-delimited field claiming ~32 GiB
    if kind == 4 and rng.random() < 0.02:
        return rng.bytes(int(rng.integers(64 << 10, 3 << 20)))  # large blobs, now and then
    return rng.bytes(int(rng.integers(0, 2048)))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def fuzz_rpc(channel: grpc.Channel, path: str, streaming: bool, reply: type, valid: bytes, count: int,
             rng: np.random.Generator) -> Counter:
    """Status histogram of ``count`` hostile messages to one RPC (a stream per message for streaming RPCs)."""
    codes: Counter = Counter()
    if streaming:
        call = channel.stream_stream(path, request_serializer=None, response_deserializer=reply.FromString)
    else:
        call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    for _ in range(count):
        raw = mutate(valid, rng)
        try:
            if streaming:
                for r in call(iter([raw]), timeout=10):
                    codes[status_code(r.status).name + " (in reply)"] += 1
            else:
                call(raw, timeout=10)
                codes["OK"] += 1
        except grpc.RpcError as e:
            codes[e.code().name] += 1
    return codes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="runs/bench-exits/cifar10-vit")
    ap.add_argument("--count", type=int, default=10_000, help="messages per RPC")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "fuzz.json"))
    args = ap.parse_args(argv)
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    model, card = load_checkpoint(args.checkpoint)
    edge_half = EdgeHalf(model, card.split_block)
    with torch.no_grad():
        tokens = edge_half.run(torch.zeros(1, *card.input_shape), [never_leave("max_prob")] * edge_half.num_exits,
                               "max_prob").tokens
    offload = pb.OffloadRequest(request_id=1, model_fingerprint=card.fingerprint, split_block=card.split_block,
                                tokens=encode(tokens, CodecConfig("int8", zstd_level=3))).SerializeToString()
    shape = list(card.input_shape)
    infer = pb.InferRequest(request_id=1, tensor=pb.RawTensor(
        shape=shape, data=np.zeros(shape, np.float32).tobytes())).SerializeToString()
    policy = pb.Policy(thresholds=[0.9] * edge_half.num_exits, score="max_prob").SerializeToString()
    rpcs = [("cloud", "/offramp.v1.Offload/Infer", True, pb.OffloadReply, offload),
            ("cloud", "/offramp.v1.Offload/Describe", False, None, b""),
            ("edge", "/offramp.v1.Edge/Infer", False, None, infer),
            ("edge", "/offramp.v1.Edge/InferStream", True, pb.InferReply, infer),
            ("edge", "/offramp.v1.Edge/GetPolicy", False, None, b""),
            ("edge", "/offramp.v1.Edge/SetPolicy", False, None, policy)]
    rows, results = [], []
    with DaemonProcess("cloud", ["--checkpoint", args.checkpoint]) as cloud, \
            DaemonProcess("edge", ["--checkpoint", args.checkpoint, "--cloud", cloud.address]) as edge:
        daemons = {"cloud": cloud, "edge": edge}
        rss_before = {name: rss_mb(d.proc.pid) for name, d in daemons.items()}
        for name, path, streaming, reply, valid in rpcs:
            daemon = daemons[name]
            log_before = daemon.log_path.stat().st_size
            with grpc.insecure_channel(daemon.address) as channel:
                codes = fuzz_rpc(channel, path, streaming, reply, valid or b"\x08\x01", args.count, rng)
            log_bytes = daemon.log_path.stat().st_size - log_before
            bad = sum(n for code, n in codes.items() if code.split(" ")[0] in {c.name for c in BAD})
            refused = sum(n for code, n in codes.items() if code != "OK" and "(in reply)" not in code)
            results.append({"daemon": name, "rpc": path, "messages": args.count, "statuses": dict(codes),
                            "unknown_or_internal": bad, "log_bytes": log_bytes,
                            "log_bytes_per_refused_message": log_bytes / max(1, refused),
                            "serving_after": serving(daemon.address)})
            rows.append([path, args.count, bad, log_bytes, results[-1]["log_bytes_per_refused_message"],
                         results[-1]["serving_after"], ", ".join(f"{c} {n}" for c, n in codes.most_common(4))])
        rss = {name: {"before_mb": rss_before[name], "after_mb": rss_mb(d.proc.pid)} for name, d in daemons.items()}
        crashes = sum(d.proc.poll() is not None for d in daemons.values())
    print(format_table(["rpc", "messages", "UNKNOWN/INTERNAL", "log bytes", "per refused", "serving", "statuses"],
                       rows))
    print("RSS (MB): " + ", ".join(f"{n} {r['before_mb']:.0f} -> {r['after_mb']:.0f}" for n, r in rss.items()))
    from orchestrator.loadgen import machine
    out = {"command": "python -m bench.fuzz " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine(),
           "count_per_rpc": args.count, "seed": args.seed, "results": results, "rss": rss,
           "crashes": crashes, "wall_s": time.perf_counter() - started}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} ({out['wall_s']:.0f} s)")
    return 0 if not crashes and all(r["unknown_or_internal"] == 0 and r["serving_after"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
