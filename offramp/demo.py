"""The quick start: train a small model on the bundled digits (or reuse it), then evaluate."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import CARD
from .pipeline import TrainJob, evaluate_checkpoint, run_training
from .report import format_report
from .train import TrainConfig

DEMO_JOB = TrainJob(data="digits", model="vit_micro_32", exits="slvit@2,slvit@4", out="runs/demo/model")
DEMO_TRAIN = TrainConfig(epochs=30, exit_epochs=10, copycat="hard", copycat_epochs=5, batch_size=64, lr=2e-3)


def ensure_demo_model(workdir: str, retrain: bool = False) -> Path:
    """Train the demo model once; later runs reuse the checkpoint."""
    out = Path(workdir) / "model"
    if retrain or not (out / CARD).is_file():
        print(f"training the demo model on digits into {out} (a few minutes on 2 cores)...")
        run_training(TrainJob(**{**DEMO_JOB.__dict__, "out": str(out)}), DEMO_TRAIN)
    return out


def run_demo(workdir: str, retrain: bool = False) -> int:
    out = ensure_demo_model(workdir, retrain)
    print(f"\nper-exit evaluation of {out} (validation split):\n")
    print(format_report(evaluate_checkpoint(out)))
    return 0
