"""The quick start, end to end: a cloud and an edge as separate processes on loopback.

Trains a small ViT with SL-ViT exits on the bundled digits (once; later runs
reuse it), calibrates the exit thresholds, starts ``offramp cloud`` and
``offramp edge``, pushes the validation set through the edge's streaming API
and prints where each answer came from, accuracy, bytes and latency.
"""
from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np

from .checkpoint import CARD, read_card
from .daemon_proc import DaemonProcess
from .errors import OfframpError
from .pipeline import TrainJob, load_validation, run_training
from .report import format_table
from .train import TrainConfig
from .wire import pb, pb_grpc

DEMO_JOB = TrainJob(data="digits", model="vit_micro_32", exits="slvit@2,slvit@4")
DEMO_TRAIN = TrainConfig(epochs=30, exit_epochs=10, copycat="hard", copycat_epochs=5, batch_size=64, lr=2e-3)
ACCURACY_DROP = 0.5  # points of accuracy the exits may cost, as calibrated on validation data


def ensure_demo_model(workdir: Path, retrain: bool = False) -> Path:
    """Train the demo model once; later runs reuse the checkpoint."""
    out = workdir / "model"
    if retrain or not (out / CARD).is_file():
        print(f"training the demo model on digits into {out} (a few minutes on 2 cores)...", flush=True)
        run_training(TrainJob(**{**DEMO_JOB.__dict__, "out": str(out)}), DEMO_TRAIN)
    return out


def calibrate(checkpoint: Path, edge_toml: Path) -> None:
    cmd = [sys.executable, "-m", "offramp.cli", "calibrate", str(checkpoint),
           "--target-accuracy-drop", str(ACCURACY_DROP), "--out", str(edge_toml)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise OfframpError(f"calibration failed: {result.stderr.strip()}")
    print(result.stdout.strip())


def requests(x: np.ndarray) -> Iterator[pb.InferRequest]:
    for i, sample in enumerate(x):
        yield pb.InferRequest(request_id=i, tensor=pb.RawTensor(shape=list(sample.shape),
                                                                data=sample.astype(np.float32).tobytes()))


def run_demo(workdir: str, retrain: bool = False) -> int:
    work = Path(workdir)
    checkpoint = ensure_demo_model(work, retrain)
    card = read_card(checkpoint)
    val, _ = load_validation(card)
    x, y = val.tensors[0].numpy(), val.tensors[1].numpy()
    edge_toml = work / "edge.toml"
    calibrate(checkpoint, edge_toml)

    with DaemonProcess("cloud", ["--checkpoint", str(checkpoint)], log_path=work / "cloud.log") as cloud:
        print(f"cloud serving on {cloud.address}")
        with DaemonProcess("edge", ["--config", str(edge_toml), "--checkpoint", str(checkpoint),
                                    "--cloud", cloud.address], log_path=work / "edge.log") as edge:
            print(f"edge serving on {edge.address}; sending {len(x)} validation inputs...", flush=True)
            start = time.perf_counter()
            with grpc.insecure_channel(edge.address) as channel:
                replies = list(pb_grpc.EdgeStub(channel).InferStream(requests(x), timeout=120))
            wall = time.perf_counter() - start
        print(f"edge stopped (status {edge.proc.returncode}); cloud stopped (status {cloud.stop()})")
    print_summary(card, replies, y, wall)
    return 0


def print_summary(card, replies: list[pb.InferReply], y: np.ndarray, wall: float) -> None:
    by_id = {r.request_id: r for r in replies}
    if len(by_id) != len(y) or len(replies) != len(y):
        raise OfframpError(f"expected exactly one answer per request: {len(y)} sent, {len(replies)} answered")
    ordered = [by_id[i] for i in range(len(y))]
    correct = np.array([r.prediction == t for r, t in zip(ordered, y)])
    where = Counter(r.decided_by for r in ordered)
    offloaded = [r for r in ordered if r.decided_by == "cloud"]
    rows = []
    for name, n in sorted(where.items(), key=lambda kv: (kv[0] == "cloud", kv[0])):
        acc = np.mean([c for r, c in zip(ordered, correct) if r.decided_by == name])
        rows.append([name, n, f"{n / len(y):.1%}", float(acc)])
    print("\nanswers by where they were decided:")
    print(format_table(["decided by", "answers", "share", "accuracy"], rows))
    latency = np.array([r.stage_ms.get("total", 0.0) for r in ordered])
    full = card.metrics.get("copycat", card.metrics.get("exits", {})).get("final", {}).get("accuracy")
    summary = [
        ["requests / answers", f"{len(y)} / {len(replies)}"],
        ["offload rate", f"{len(offloaded) / len(y):.1%}"],
        ["accuracy (edge + cloud)", f"{correct.mean():.4f}"],
        ["accuracy (full model)", f"{full:.4f}" if full is not None else "n/a"],
        ["degraded answers", str(sum(r.degraded for r in ordered))],
        ["bytes per offload", f"{np.mean([r.bytes_sent for r in offloaded]):.0f}" if offloaded else "n/a"],
        [f"latency p50 / p95 (ms, all {len(y)} in flight)",
         f"{np.percentile(latency, 50):.2f} / {np.percentile(latency, 95):.2f}"],
        ["throughput (req/s)", f"{len(y) / wall:.0f}"],
    ]
    print("\nsummary:")
    print(format_table(["", "value"], summary))
