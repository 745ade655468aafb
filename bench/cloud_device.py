"""The cloud daemon on an accelerator: the tail's throughput by batch size, the daemon's under load, and
whether its answers match the CPU's.

(a) the tail alone on the device (``CloudHalf.run`` in a loop, synchronised)
    at batch 1..512: samples/s;
(b) the cloud daemon with ``--device DEVICE`` under 64 streams x 4 in
    flight, by ``--max-batch``: req/s, mean batch, latency; the same load
    on a CPU daemon beside it for scale;
(c) answers: validation tokens sent as int8+zstd and as float32 through the
    device daemon, against ``CloudHalf.run`` on the CPU in float32 on the
    same decoded tokens: largest logit difference, argmax agreement.

No test depends on it; run it where a GPU is present:

    python -m bench.cloud_device --checkpoint runs/hybrid_c10 --device cuda
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.loadgen import drive_streams, write_result
from edge_node.offload import OffloadClient, OffloadSettings
from offramp.core.checkpoint import load_checkpoint
from offramp.core.codec import CodecConfig, decode, encode
from offramp.serving.daemon_proc import DaemonProcess
from offramp.core.exit_rule import never_leave
from offramp.core.data.card_data import load_validation
from offramp.core.tables import format_table
from offramp.core.halves import CloudHalf, EdgeHalf
from offramp.core.wire import pb

RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MAX_BATCH = (1, 8, 32, 128, 256)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tail_by_batch(half: CloudHalf, tokens: torch.Tensor, seconds: float = 0.5) -> list[dict[str, float]]:
    """Samples/s and ms per batch of the tail alone, tokens already on the device."""
    rows = []
    for b in BATCHES:
        x = tokens[torch.arange(b) % len(tokens)].to(half.device)
        for _ in range(3):
            half.run(x)
        sync(half.device)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            half.run(x)
            n += 1
        sync(half.device)
        wall = time.perf_counter() - start
        rows.append({"batch": b, "ms_per_batch": wall / n * 1e3, "samples_per_s": b * n / wall})
    return rows


async def answers(address: str, fingerprint: str, split: int, messages: list[pb.EncodedTensor]) -> np.ndarray:
    """The daemon's outputs for each message, one request each, in order."""
    client = OffloadClient([address], fingerprint, split, OffloadSettings())
    client.start()
    connect_by = time.perf_counter() + 30
    while not client.connected_to:  # it dials and checks the pairing first
        if time.perf_counter() > connect_by:
            raise RuntimeError("could not connect to the cloud within 30 s")
        await asyncio.sleep(0.01)
    replies = []
    try:
        for at in range(0, len(messages), 128):  # within the per-stream bound on requests in flight
            replies += await asyncio.gather(*(client.infer(
                pb.OffloadRequest(model_fingerprint=fingerprint, split_block=split, tokens=m), timeout_s=60)
                for m in messages[at:at + 128]))
    finally:
        await client.close()
    return np.stack([np.asarray(r.output, dtype=np.float32).reshape(tuple(r.output_shape)) for r in replies])[:, 0]


async def daemon_runs(args: argparse.Namespace, fingerprint: str, split: int, int8: list[pb.EncodedTensor],
                      fp32: list[pb.EncodedTensor], reference: dict[str, np.ndarray]) -> dict[str, Any]:
    """(b) and (c), on one event loop (grpc.aio binds to the first it meets)."""
    out: dict[str, Any] = {"load": [], "match": {}}
    for device in (args.device, "cpu"):
        for max_batch in (args.max_batches if device != "cpu" else (32,)):
            flags = ["--checkpoint", args.checkpoint, "--device", device, "--max-batch", str(max_batch)]
            with DaemonProcess("cloud", flags, startup_timeout=120) as cloud:
                if device != "cpu" and max_batch == args.max_batches[-1]:
                    for name, messages in (("int8+zstd", int8), ("float32", fp32)):
                        got = await answers(cloud.address, fingerprint, split, messages)
                        want = reference[name]
                        out["match"][name] = {"samples": len(got),
                                              "max_abs_logit_diff": float(np.abs(got - want).max()),
                                              "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).mean())}
                run = await drive_streams(cloud.address, fingerprint, split, int8, args.streams, args.window,
                                          args.seconds)
                out["load"].append({"device": device, "max_batch": max_batch, **run})
                print(f"  {device} max-batch {max_batch}: {run['throughput_rps']:.0f} req/s, "
                      f"mean batch {run['mean_batch']:.1f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.cloud_device", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--samples", type=int, default=512, help="validation samples whose answers are compared")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--window", type=int, default=4, help="requests in flight per stream")
    ap.add_argument("--max-batches", type=lambda v: [int(b) for b in v.split(",")], default=list(MAX_BATCH),
                    help="the daemon's --max-batch values to run, comma-separated (the last also answers (c))")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each load run")
    ap.add_argument("--out", default=str(RESULTS / "cloud_device.json"))
    args = ap.parse_args(argv)
    started = time.perf_counter()
    model, card = load_checkpoint(args.checkpoint)
    val, _ = load_validation(card)
    edge = EdgeHalf(model, card.split_block)
    res = edge.run(val.tensors[0][:args.samples], [never_leave("max_prob")] * edge.num_exits, "max_prob")
    int8 = [encode(res.tokens[i:i + 1], CodecConfig(dtype="int8", zstd_level=3)) for i in range(len(res.tokens))]
    fp32 = [encode(res.tokens[i:i + 1], CodecConfig(dtype="float32")) for i in range(len(res.tokens))]
    cpu = CloudHalf(load_checkpoint(args.checkpoint)[0], card.split_block)
    reference = {name: cpu.run(torch.stack([torch.from_numpy(decode(m))[0] for m in messages])).numpy()
                 for name, messages in (("int8+zstd", int8), ("float32", fp32))}

    on_device = CloudHalf(load_checkpoint(args.checkpoint)[0], card.split_block, device=args.device)
    by_batch = tail_by_batch(on_device, res.tokens)
    print(f"(a) tail alone on {args.device}, tokens {list(res.tokens.shape[1:])}:")
    print(format_table(["batch", "ms per batch", "samples/s"],
                       [[r["batch"], r["ms_per_batch"], r["samples_per_s"]] for r in by_batch]))
    del on_device
    print(f"(b) the daemon under {args.streams} streams x {args.window} in flight:")
    daemons = asyncio.run(daemon_runs(args, card.fingerprint, card.split_block, int8, fp32, reference))
    print(format_table(["device", "max batch", "req/s", "mean batch", "p50 ms", "p99 ms"],
                       [[r["device"], r["max_batch"], r["throughput_rps"], r["mean_batch"], r["latency_ms"]["p50"],
                         r["latency_ms"]["p99"]] for r in daemons["load"]]))
    print("(c) device daemon vs CPU float32 tail on the same tokens:")
    print(format_table(["codec", "samples", "max |logit diff|", "argmax agreement"],
                       [[k, v["samples"], v["max_abs_logit_diff"], v["argmax_agreement"]]
                        for k, v in daemons["match"].items()]))
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() else None
    result = {"command": "python -m bench.cloud_device " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"device": gpu or args.device, "cpus": os.cpu_count(), "torch": torch.__version__,
                          "python": platform.python_version()},
              "checkpoint": args.checkpoint, "fingerprint": card.fingerprint, "token_shape": list(res.tokens.shape[1:]),
              "tail_by_batch": by_batch, **daemons, "wall_s": time.perf_counter() - started}
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
