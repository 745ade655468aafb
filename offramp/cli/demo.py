"""The quick start, end to end: a cloud and an edge as separate processes on loopback.

Trains a small ViT with SL-ViT exits on the bundled digits, or on another data
spec (``--data fsdd:PATH`` trains the spectrogram ViT on spoken digits), once:
later runs reuse the checkpoint while its card names the same data. Then it
calibrates the exit thresholds, starts ``offramp cloud`` and ``offramp edge``,
pushes the validation set through the edge's streaming API and prints where
each answer came from, accuracy, bytes and latency. Like the CLI, it sits on
top of the serving code (it calibrates through the edge's own function).
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np

from offramp.core.checkpoint import CARD, read_card
from offramp.serving.daemon_proc import DaemonProcess
from offramp.core.data import load_data
from offramp.core.errors import OfframpError
from offramp.core.data.card_splits import load_validation
from offramp.training.pipeline import TrainJob, run_training
from offramp.core.tables import format_table
from offramp.training.train import TrainConfig
from offramp.core.wire import pb
from offramp.serving.client import EdgeClient, request

DEMO_JOB = TrainJob(data="digits", model="vit_micro_32", exits="slvit@2,slvit@4")
DEMO_TRAIN = TrainConfig(epochs=30, exit_epochs=10, copycat="hard", copycat_epochs=5, batch_size=64, lr=2e-3)
# Other data, by modality: half the FSDD benchmark's schedule (30 backbone, 10 exit epochs) is
# enough for a demo; images from an imagefolder are many more samples per epoch, so fewer epochs.
OTHER_TRAIN = {
    "audio": TrainConfig(epochs=15, exit_epochs=5, copycat="hard", copycat_epochs=3, batch_size=64, lr=2e-3),
    "image": TrainConfig(epochs=4, exit_epochs=2, copycat="hard", copycat_epochs=1, batch_size=128, lr=2e-3),
}
ACCURACY_DROP = 0.5  # points of accuracy the exits may cost, as calibrated on validation data


def _stale_reason(checkpoint: Path, data: str, model: str | None) -> str | None:
    """Why the checkpoint there cannot serve this demo (None: reuse it)."""
    if not (checkpoint / CARD).is_file():
        return "no checkpoint yet"
    card = read_card(checkpoint)
    if card.data.get("spec") != data:
        return f"the checkpoint there was trained on '{card.data.get('spec')}', not '{data}'"
    if model is not None and card.config.backbone != model:
        return f"the checkpoint there is a {card.config.backbone}, not a {model}"
    return None


def ensure_demo_model(workdir: Path, retrain: bool = False, data: str = "digits", model: str | None = None) -> Path:
    """Train the demo model once; later runs reuse the checkpoint if it was trained on ``data`` (and is ``model``)."""
    out = workdir / "model"
    reason = "--retrain" if retrain else _stale_reason(out, data, model)
    if reason is None:
        return out
    if data == DEMO_JOB.data:
        job = TrainJob(**{**DEMO_JOB.__dict__, "model": model or DEMO_JOB.model, "out": str(out)})
        print(f"training the demo model on digits into {out} ({reason}; a few minutes on 2 cores)...", flush=True)
        run_training(job, DEMO_TRAIN)
        return out
    job = TrainJob(data=data, model=model, exits=DEMO_JOB.exits, out=str(out))
    if data.partition(":")[0].strip().lower() == "crowd-av":
        raise OfframpError("the demo streams classification data; for the audiovisual crowd-av model use "
                           "'offramp train --data crowd-av', 'offramp infer --audio' or 'python -m bench.multimodal'")
    splits = load_data(job.data, val_fraction=job.val_fraction, seed=job.seed)
    cfg = OTHER_TRAIN.get(splits.modality, OTHER_TRAIN["image"])
    print(f"training the demo model on {data} ({len(splits.train)} {splits.modality} samples) into {out} "
          f"({reason}; {cfg.epochs} + {cfg.exit_epochs} + {cfg.copycat_epochs} epochs)...", flush=True)
    run_training(job, cfg, data=splits)
    return out


def calibrate(checkpoint: Path, edge_toml: Path) -> None:
    """Thresholds that cost at most ``ACCURACY_DROP`` points, written into the edge's config, as
    ``offramp calibrate`` does."""
    from offramp.training.calibrate import Target
    from offramp.serving.edge_toml import calibrate_into

    result, _, _ = calibrate_into(edge_toml, checkpoint, Target(accuracy_drop=ACCURACY_DROP))
    print(result.summary())


def run_demo(workdir: str, retrain: bool = False, data: str = "digits", model: str | None = None) -> int:
    work = Path(workdir)
    checkpoint = ensure_demo_model(work, retrain, data, model)
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
            with EdgeClient(edge.address) as client:  # the raw stream: the summary checks one answer per request
                replies = list(client.stream(request(i, sample) for i, sample in enumerate(x)))
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
