"""Exit accuracy vs overhead: MLP, CNN, SL-ViT and CC-SL-ViT exits at the same positions.

For each backbone and dataset (CIFAR-10 on the ViT, CIFAR-10 on the
ResNet-style CNN, FSDD spectrograms on the spectrogram ViT) one backbone is
trained, then every exit type is attached at the same block positions and
trained on the frozen backbone. CC-SL-ViT is the SL-ViT exit after copycat
fine-tuning on the backbone's own answers (hard pseudo-labels; soft
distillation is reported beside it). Prints one table per backbone, writes
JSON (and a plot) to bench/results/.

    python -m bench.exits --data-dir DIR          # full run (~1 h on 2 cores)
    python -m bench.exits --quick                  # smoke run, about a minute
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from offramp.checkpoint import Card, save_checkpoint
from offramp.data import DataSplits, load_data
from offramp.models import ModelConfig, MultiExitModel, parse_exits
from offramp.report import format_table, head_costs
from offramp.train import TrainConfig, evaluate, train_backbone, train_exits

RESULTS = Path(__file__).parent / "results"
EXIT_TYPES = ("mlp", "cnn", "slvit")
log = logging.getLogger("bench.exits")


@dataclass(frozen=True)
class Setting:
    name: str
    data: str
    variant: str
    positions: tuple[int, ...]
    train: TrainConfig
    limit: int | None = None


def settings(data_dir: str | None, quick: bool) -> list[Setting]:
    if quick:
        t = TrainConfig(epochs=1, exit_epochs=1, copycat_epochs=1, batch_size=64, progress=False)
        image = f"imagefolder:{data_dir}/cifar10-train.zip" if data_dir else "digits"
        out = [Setting("quick-vit", image, "vit_tiny_32", (2, 4), t, limit=600),
               Setting("quick-resnet", image, "resnet_tiny_32", (2, 4), t, limit=600)]
        if data_dir:
            out.append(Setting("quick-fsdd", f"fsdd:{data_dir}/fsdd-train.zip", "vit_tiny_spec", (2, 4), t, limit=300))
        return out
    if not data_dir:
        raise SystemExit("bench/exits.py: the full run needs --data-dir (or OFFRAMP_DATA) holding "
                         "cifar10-train.zip and fsdd-train.zip; use --quick for a smoke run")
    cifar, fsdd = f"imagefolder:{data_dir}/cifar10-train.zip", f"fsdd:{data_dir}/fsdd-train.zip"
    base = TrainConfig(exit_epochs=4, copycat_epochs=2, batch_size=128, lr=2e-3, exit_lr=2e-3, progress=False)
    return [
        Setting("cifar10-vit", cifar, "vit_tiny_32", (2, 4), replace(base, epochs=4)),
        Setting("cifar10-resnet", cifar, "resnet_tiny_32", (2, 4), replace(base, epochs=3)),
        Setting("fsdd-vit", fsdd, "vit_tiny_spec", (2, 4), replace(base, epochs=30, exit_epochs=10, copycat_epochs=5,
                                                                  batch_size=64, augment=False)),
    ]


def run_setting(s: Setting, checkpoints: Path | None) -> dict[str, Any]:
    t0 = time.time()
    data: DataSplits = load_data(s.data, limit=s.limit, seed=0)
    cfg = replace(s.train, flip=s.data.startswith("imagefolder"))
    exits = ",".join(f"{t}@{p}" for p in s.positions for t in EXIT_TYPES)
    torch.manual_seed(0)
    model = MultiExitModel(ModelConfig(backbone=s.variant, img_size=tuple(data.input_shape[1:]),
                                       in_chans=data.input_shape[0], num_classes=len(data.label_names),
                                       exits=parse_exits(exits)))
    log.info("[%s] %d train / %d val; training backbone %s", s.name, len(data.train), len(data.val), s.variant)
    train_backbone(model, data.train, cfg)
    t_backbone = time.time() - t0
    log.info("[%s] backbone done in %.0f s; training exits %s", s.name, t_backbone, exits)
    train_exits(model, data.train, replace(cfg, augment=False))
    results = {r.name: r.summary()["accuracy"] for r in evaluate(model, data.val)}
    costs = dict(zip([*model.exit_names, "final"], head_costs(model, data.input_shape)))

    slvit = [i for i, e in enumerate(model.exit_configs) if e.type == "slvit"]
    label_trained = {i: copy.deepcopy(model.exits[i].state_dict()) for i in slvit}
    copycat: dict[str, dict[str, float]] = {}
    fine_tuned: dict[str, dict[int, dict]] = {}
    for mode in ("hard", "soft"):
        for i in slvit:
            model.exits[i].load_state_dict(label_trained[i])
        log.info("[%s] copycat (%s) fine-tuning of the SL-ViT exits", s.name, mode)
        train_exits(model, data.train, replace(cfg, augment=False), targets=mode, epochs=cfg.copycat_epochs, only=slvit)
        copycat[mode] = {r.name: r.summary()["accuracy"] for r in evaluate(model, data.val)}
        fine_tuned[mode] = {i: copy.deepcopy(model.exits[i].state_dict()) for i in slvit}
    # The saved checkpoint keeps the hard-copycat SL-ViT exits (CC-SL-ViT), the paper's choice.
    for i in slvit:
        model.exits[i].load_state_dict(fine_tuned["hard"][i])
    if checkpoints is not None:
        save_checkpoint(checkpoints / s.name, model, Card(
            config=model.config, label_names=data.label_names, modality=data.modality, input_shape=data.input_shape,
            split_block=max(s.positions), metrics={"exits": results, "copycat_hard": copycat["hard"]},
            data={"spec": s.data, "seed": 0, "val_fraction": 0.1, "limit": s.limit}))

    rows = []
    for p in s.positions:
        for label, kind, acc in [("MLP", "mlp", results[f"mlp@{p}"]), ("CNN", "cnn", results[f"cnn@{p}"]),
                                 ("SL-ViT", "slvit", results[f"slvit@{p}"]),
                                 ("CC-SL-ViT", "slvit", copycat["hard"][f"slvit@{p}"]),
                                 ("CC-SL-ViT (soft)", "slvit", copycat["soft"][f"slvit@{p}"])]:
            c = costs[f"{kind}@{p}"]
            rows.append({"position": p, "exit": label, "accuracy": acc, "params": c["params"], "macs": c["macs"]})
    return {
        "setting": s.name, "data": s.data, "backbone": s.variant, "train_samples": len(data.train),
        "val_samples": len(data.val), "train_config": {k: v for k, v in cfg.__dict__.items()},
        "final_accuracy": results["final"], "backbone_params": costs["final"]["params"],
        "backbone_macs": costs["final"]["macs"], "rows": rows, "seconds": round(time.time() - t0, 1),
        "backbone_seconds": round(t_backbone, 1),
    }


def verdict(result: dict[str, Any]) -> dict[str, bool]:
    """The paper's claims, checked on this run's numbers."""
    by = {(r["position"], r["exit"]): r for r in result["rows"]}
    pos = sorted({r["position"] for r in result["rows"]})
    sl_beats = all(by[p, "SL-ViT"]["accuracy"] > max(by[p, "MLP"]["accuracy"], by[p, "CNN"]["accuracy"]) for p in pos)
    sl_cheaper = all(by[p, "SL-ViT"]["macs"] <= by[p, "CNN"]["macs"] for p in pos)
    cc = sum(by[p, "CC-SL-ViT"]["accuracy"] for p in pos) >= sum(by[p, "SL-ViT"]["accuracy"] for p in pos)
    return {"slvit_more_accurate_than_mlp_and_cnn": sl_beats, "slvit_macs_at_most_cnn": sl_cheaper,
            "ccslvit_at_least_slvit_on_average": cc}


def print_result(result: dict[str, Any]) -> None:
    print(f"\n{result['setting']}: {result['backbone']} on {result['data'].split('/')[-1]} "
          f"({result['train_samples']} train / {result['val_samples']} val), final head accuracy "
          f"{result['final_accuracy']:.4f}, {result['seconds']:.0f} s")
    print(format_table(["position", "exit", "accuracy", "params", "MACs"],
                       [[r["position"], r["exit"], r["accuracy"], r["params"], r["macs"]] for r in result["rows"]]))
    print("claims: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in result["verdict"].items()))


def plot(results: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed; no plot")
        return
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    markers = {"MLP": "s", "CNN": "^", "SL-ViT": "o", "CC-SL-ViT": "*", "CC-SL-ViT (soft)": "P"}
    for ax, res in zip(axes[0], results):
        for label, m in markers.items():
            rows = [r for r in res["rows"] if r["exit"] == label]
            ax.scatter([r["macs"] / 1e6 for r in rows], [r["accuracy"] for r in rows], marker=m, s=60, label=label)
            for r in rows:
                ax.annotate(f"@{r['position']}", (r["macs"] / 1e6, r["accuracy"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.axhline(res["final_accuracy"], color="gray", ls="--", lw=1, label="final head")
        ax.set_xscale("log")
        ax.set_xlabel("exit MACs (millions, log)")
        ax.set_ylabel("validation accuracy")
        ax.set_title(res["setting"])
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.exits", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("OFFRAMP_DATA"),
                    help="folder holding cifar10-train.zip and fsdd-train.zip (default: $OFFRAMP_DATA)")
    ap.add_argument("--quick", action="store_true", help="smoke run on small subsets, about a minute")
    ap.add_argument("--out", default=None, help="JSON output (default bench/results/exits[-quick].json)")
    ap.add_argument("--only", default=None, help="comma-separated setting names to run")
    ap.add_argument("--checkpoints", default="runs/bench-exits", help="where to keep the trained models ('' for none)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    chosen = settings(args.data_dir, args.quick)
    if args.only:
        chosen = [s for s in chosen if s.name in args.only.split(",")]
    out = Path(args.out) if args.out else RESULTS / ("exits-quick.json" if args.quick else "exits.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.checkpoints) if args.checkpoints else None
    results = []
    for s in chosen:
        res = run_setting(s, ckpt)
        res["verdict"] = verdict(res)
        print_result(res)
        results.append(res)
        out.write_text(json.dumps({"command": " ".join(["python -m bench.exits", *(argv if argv is not None else sys.argv[1:])]),
                                   "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                               "platform": platform.platform(), "torch": torch.__version__},
                                   "results": results}, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
