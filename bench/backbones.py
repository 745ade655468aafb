"""The trained backbones at a glance: accuracy, training wall time, epochs and number format,
read from their checkpoints' cards (``offramp train`` records how each was made).

    offramp train --data imagefolder:DIR/cifar10-train.zip --model airbench_c10 --exits none --out runs/airbench_c10
    offramp train --data imagefolder:DIR/cifar10-train.zip --model cct_c10 --exits none \\
                  --teacher runs/airbench_c10 --out runs/cct_c10
    offramp train --data fsdd:DIR/fsdd-train.zip --model vit_tiny_spec --exits none --out runs/vit_tiny_spec
    python -m bench.backbones runs/airbench_c10 runs/cct_c10 runs/vit_tiny_spec [--extra gpu.json]

Writes ``bench/results/backbones.json`` (one entry per backbone) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from offramp.core.hostinfo import cpu_name
from offramp.core.checkpoint import read_card
from offramp.core.tables import format_table

RESULTS = Path(__file__).parent / "results"
FAMILY = {"map": "cnn", "tokens": "vit"}


def entry(directory: str) -> dict[str, Any]:
    """One backbone, as its card describes it."""
    from offramp.core.models import create_backbone

    card = read_card(directory)
    m, t = card.metrics, card.metrics.get("training", {})
    with torch.device("meta"):
        spec = create_backbone(card.config.backbone, img_size=card.config.img_size, in_chans=card.config.in_chans,
                               **card.config.backbone_options).feature_spec(1)
    teacher = t.get("teacher", {})
    out = {
        "variant": card.config.backbone, "family": FAMILY[spec.kind],
        "data": "cifar10" if "cifar10" in card.data.get("spec", "") else card.data.get("spec", "").split(":")[0],
        "val_accuracy": m.get("backbone", {}).get("accuracy"),
        "val_accuracy_tta": m.get("backbone_tta", {}).get("accuracy"),
        "val_accuracy_bf16_eval": m.get("backbone_bf16", {}).get("accuracy"),
        "train_wall_s": round(t["wall_s"], 1) if "wall_s" in t else None,
        "total_wall_s": t.get("total_wall_s"), "img_per_s": round(t["img_per_s"]) if "img_per_s" in t else None,
        "epochs": t.get("epochs"), "dtype": t.get("dtype"), "device": t.get("device"), "recipe": t.get("recipe"),
        "command": t.get("command"), "checkpoint": str(directory), "fingerprint": card.fingerprint,
    }
    if teacher:
        out["teacher"] = {k: teacher.get(k) for k in ("checkpoint", "fingerprint")}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.backbones", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="checkpoint directories written by 'offramp train'")
    ap.add_argument("--extra", action="append", default=[],
                    help="a JSON file of further entries, each with a 'machine': a list, or this script's own "
                         "output (e.g. the same recipe trained on a GPU machine: '--out backbones-gpu.json' there)")
    ap.add_argument("--out", default=str(RESULTS / "backbones.json"))
    args = ap.parse_args(argv)
    backbones = [entry(c) for c in args.checkpoints]
    for c, b in zip(args.checkpoints, backbones):  # a teacher's time is part of its student's budget
        teacher = b.get("teacher", {}).get("checkpoint")
        match = [o for o in backbones if o["checkpoint"] == teacher]
        if match and b["total_wall_s"] and match[0]["total_wall_s"]:
            b["wall_s_including_teacher"] = round(b["total_wall_s"] + match[0]["total_wall_s"], 1)
    for path in args.extra:  # entries gathered elsewhere, or this script's own output on another machine
        extra = json.loads(Path(path).read_text())
        backbones += extra["backbones"] if isinstance(extra, dict) else extra
    machine = {"cpu": cpu_name(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "platform": platform.platform(), "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "command": "python -m bench.backbones " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine, "backbones": backbones}, indent=2) + "\n")
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    print(format_table(
        ["variant", "data", "device", "dtype", "epochs", "val acc %", "with TTA %", "bf16 eval %", "train s", "total s"],
        [[b["variant"], b["data"], b.get("device") or "-", b.get("dtype") or "-", b.get("epochs") or "-",
          pct(b.get("val_accuracy")), pct(b.get("val_accuracy_tta")), pct(b.get("val_accuracy_bf16_eval")),
          b.get("train_wall_s") or "-", b.get("wall_s_including_teacher") or b.get("total_wall_s") or "-"]
         for b in backbones]))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
