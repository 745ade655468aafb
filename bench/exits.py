"""Exit accuracy vs overhead on strong, frozen backbones: MLP, CNN, SL-ViT and CC-SL-ViT exits,
at equal training budgets, and at matched cost.

For each trained backbone checkpoint (``offramp train``), every exit design
is attached at the same block positions and trained on the frozen backbone's
cached features: the same epochs, the same optimiser and the same search
over learning rates (each exit keeps its best rate), so the comparison is
fair. CC-SL-ViT is the SL-ViT exit after copycat fine-tuning on the
backbone's own answers (hard pseudo-labels; soft distillation beside it).
Two cost-matched designs turn single design points into accuracy per MAC:
an SL-ViT exit scaled up (width, tokens) to the CNN exit's MACs, and a CNN
exit scaled down (width) to the SL-ViT exit's. Prints one table per
backbone, writes JSON and a plot to bench/results/, and saves a deployable
checkpoint per backbone (MLP, CNN and CC-SL-ViT exits) for the other studies.

    python -m bench.exits --backbone cifar10-cnn=runs/airbench_c10@2,4 \\
                          --backbone cifar10-vit=runs/cct_c10@1,2 --backbone fsdd-vit=runs/vit_tiny_spec@2,4
    python -m bench.exits --quick        # smoke run on digits, about a minute
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offramp.core.checkpoint import Card, load_checkpoint, save_checkpoint
from offramp.core.hostinfo import machine
from offramp.core.data import load_data
from offramp.core.models import ExitConfig, MultiExitModel
from offramp.core.models.cost import count_macs, count_params
from offramp.training.pipeline import TrainJob, build_model, data_settings
from offramp.training.plots import pyplot
from offramp.core.tables import format_table
from offramp.training.train import TrainConfig, cache_features, evaluate, train_backbone, train_exits

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("bench.exits")

# Candidate sizes for the cost-matched designs (the largest that stays within the target's MACs wins).
SLVIT_SCALES = [dict(dim=d, patch_size=p) for d in (64, 96, 128, 160, 192, 256) for p in (None, 1, 2)]
CNN_WIDTHS = (4, 8, 12, 16, 24, 32, 48, 64)


@dataclass(frozen=True)
class Backbone:
    """One frozen backbone under test: a name, a checkpoint, exit positions."""

    name: str
    checkpoint: str
    positions: tuple[int, ...]


def parse_backbone(text: str) -> Backbone:
    """``NAME=CHECKPOINT@P1,P2``."""
    name, _, rest = text.partition("=")
    path, _, positions = rest.rpartition("@")
    try:
        pos = tuple(int(p) for p in positions.split(",") if p)
    except ValueError:
        pos = ()
    if not name or not path or not pos:
        raise argparse.ArgumentTypeError(f"expected NAME=CHECKPOINT@P1,P2, got {text!r}")
    return Backbone(name, path, pos)


def exit_cost(model: MultiExitModel, config: ExitConfig, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(params, MACs) of one exit design at its position, measured, not computed by hand."""
    from offramp.core.models import create_exit, head_outputs

    spec = model.backbone.feature_spec(config.position)
    module = create_exit(config.type, spec, head_outputs(model.config.task, model.config.num_classes), **config.options)
    grid = torch.zeros(1, *spec.shape) if spec.kind == "map" else torch.zeros(1, spec.channels, *spec.grid)
    return count_params(module), count_macs(module, grid)


def largest_within(model: MultiExitModel, candidates: list[ExitConfig], budget: int,
                   input_shape: tuple[int, ...]) -> ExitConfig:
    """The candidate with the most MACs within ``budget`` (the cheapest, if none fits)."""
    costs = sorted(((exit_cost(model, c, input_shape)[1], i) for i, c in enumerate(candidates)))
    fits = [i for m, i in costs if m <= budget]
    return candidates[fits[-1] if fits else costs[0][1]]


def designs(model: MultiExitModel, position: int, input_shape: tuple[int, ...]) -> list[tuple[str, ExitConfig]]:
    """The exits compared at one position: three defaults and two cost-matched designs."""
    base = {"MLP": ExitConfig("mlp", position), "CNN": ExitConfig("cnn", position),
            "SL-ViT": ExitConfig("slvit", position)}
    cnn_macs = exit_cost(model, base["CNN"], input_shape)[1]
    slvit_macs = exit_cost(model, base["SL-ViT"], input_shape)[1]
    grid = model.backbone.feature_spec(position).grid
    scaled = [ExitConfig("slvit", position, {k: v for k, v in o.items() if v is not None}) for o in SLVIT_SCALES
              if o["patch_size"] is None or (grid[0] % o["patch_size"] == 0 and grid[1] % o["patch_size"] == 0
                                             and (grid[0] // o["patch_size"]) * (grid[1] // o["patch_size"]) <= 256)]
    big = largest_within(model, scaled, cnn_macs, input_shape)
    small = largest_within(model, [ExitConfig("cnn", position, {"hidden": w}) for w in CNN_WIDTHS], slvit_macs,
                           input_shape)
    return [*base.items(), ("SL-ViT (CNN's MACs)", big), ("CNN (SL-ViT's MACs)", small)]


def run_backbone(b: Backbone, cfg: TrainConfig, lrs: list[float], checkpoints: Path | None,
                 search_epochs: int = 4, limit: int | None = None) -> dict[str, Any]:
    t0 = time.time()
    trunk, card = load_checkpoint(b.checkpoint)
    d = card.data
    data = load_data(d["spec"], val_fraction=d.get("val_fraction", 0.1), seed=d.get("seed", 0),
                     limit=limit if limit is not None else d.get("limit"),
                     selection_fraction=d.get("selection_fraction", 0.0))
    # Learning rates are chosen on the selection split when the backbone's training held one out, so the
    # validation accuracies reported below were chosen on nothing; older cards choose on validation (said so).
    probe_on, probe = ("selection", data.selection) if data.selection is not None and len(data.selection) else \
        ("validation", data.val)
    cfg = data_settings(TrainJob(data=d["spec"]), data, cfg)
    labelled = [(label, e) for p in b.positions for label, e in designs(trunk, p, card.input_shape)]
    model = MultiExitModel(replace(card.config, exits=tuple(e for _, e in labelled)))
    # The backbone (and any audio encoder or bottleneck); the trunk's own exits, if it has any, are left out
    # and every design here starts fresh.
    model.load_state_dict({k: v for k, v in trunk.state_dict().items() if not k.startswith("exits.")}, strict=False)
    order = sorted(range(len(labelled)), key=lambda i: labelled[i][1].position)  # the model sorts exits by position
    labels = [labelled[i][0] for i in order]
    n = len(labels)
    log.info("[%s] %s, %d train / %d val, exits: %s", b.name, card.config.backbone, len(data.train), len(data.val),
             ", ".join(f"{lbl}@{e.position}" for lbl, e in (labelled[i] for i in order)))
    cache = cache_features(model, data.train, cfg)
    fresh = copy.deepcopy(model.exits.state_dict())
    search = lr_search(model, fresh, data.train, probe, cfg, cache, lrs, search_epochs,
                       label=f"[{b.name}] on {probe_on}")
    rates = {i: max(search, key=lambda lr: search[lr][i]) if search else lrs[0] for i in range(n)}
    torch.manual_seed(cfg.seed)
    model.exits.load_state_dict(fresh)
    train_exits(model, data.train, cfg, cache=cache, lr=rates)
    heads = evaluate(model, data.val)
    best = [(heads[i].summary()["accuracy"], rates[i], copy.deepcopy(model.exits[i].state_dict())) for i in range(n)]
    correct = {(i, labels[i]): heads[i].correct for i in range(n)}  # per sample, for paired comparisons
    final_acc = heads[-1].summary()["accuracy"]
    slvit = [i for i in range(n) if labels[i] == "SL-ViT"]
    copycat, tuned = copycat_tuning(model, slvit, best, data, cfg, cache, correct)
    del cache

    rows = []
    for i in range(n):
        e = model.exit_configs[i]
        params, macs = exit_cost(model, e, card.input_shape)
        entries = [(labels[i], best[i][0])]
        if i in slvit:
            entries += [("CC-SL-ViT", copycat["hard"][i]), ("CC-SL-ViT (soft)", copycat["soft"][i])]
        for label, acc in entries:
            rows.append({"position": e.position, "exit": label, "accuracy": acc, "params": params, "macs": macs,
                         "lr": best[i][1], "options": e.options, "correct": correct[i, label]})
    rows.sort(key=lambda r: (r["position"], r["macs"], r["exit"]))
    if checkpoints is not None:
        deploy(model, labels, tuned["hard"], card, checkpoints / b.name, b.positions)
    return {
        "setting": b.name, "checkpoint": b.checkpoint, "backbone": card.config.backbone, "data": data.spec,
        "train_samples": len(data.train), "val_samples": len(data.val), "final_accuracy": final_acc,
        "backbone_params": count_params(trunk.backbone), "backbone_macs": count_macs(trunk.backbone,
                                                                                     torch.zeros(1, *card.input_shape)),
        "exit_training": {"epochs": cfg.exit_epochs, "copycat_epochs": cfg.copycat_epochs, "lrs": lrs,
                          "lr_search": {"epochs": search_epochs, "chosen_on": probe_on, "accuracy": {str(k): v for k, v in search.items()}},
                          "batch_size": cfg.batch_size, "views": cfg.exit_views if cfg.augment else 1,
                          "optimizer": "adamw, cosine"},
        "rows": rows, "seconds": round(time.time() - t0, 1),
    }


def lr_search(model: MultiExitModel, fresh: dict, train: Any, probe: Any, cfg: TrainConfig, cache: Any,
              lrs: list[float], epochs: int, label: str) -> dict[float, list[float]]:
    """Each learning rate's accuracy per exit on ``probe`` after a short training from the same fresh exits:
    the same search for every exit, each then keeps its best rate (none with a single rate)."""
    n = len(model.exits)
    search: dict[float, list[float]] = {}
    for lr in lrs if len(lrs) > 1 else []:
        torch.manual_seed(cfg.seed)
        model.exits.load_state_dict(fresh)
        train_exits(model, train, cfg, epochs=epochs, cache=cache, lr=lr)
        search[lr] = [r.summary()["accuracy"] for r in evaluate(model, probe)[:n]]
        log.info("%s lr %g, %d epochs: %s", label, lr, epochs, ", ".join(f"{a:.3f}" for a in search[lr]))
    return search


def copycat_tuning(model: MultiExitModel, slvit: list[int], best: list[tuple[float, float, dict]], data: Any,
                   cfg: TrainConfig, cache: Any, correct: dict[tuple[int, str], Any]
                   ) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, dict]]]:
    """Copycat fine-tuning of the SL-ViT exits on the full model's hard and soft answers, each from its best
    plain weights at its own rate: (accuracy per mode and exit, weights per mode and exit). Per-sample
    correctness goes into ``correct`` for the paired comparisons."""
    copycat: dict[str, dict[int, float]] = {}
    tuned: dict[str, dict[int, dict]] = {}
    for mode in ("hard", "soft"):
        for i in slvit:
            model.exits[i].load_state_dict(best[i][2])
        for i in slvit:
            train_exits(model, data.train, cfg, targets=mode, epochs=cfg.copycat_epochs, only=[i], cache=cache,
                        lr=best[i][1])
        res = evaluate(model, data.val)
        copycat[mode] = {i: res[i].summary()["accuracy"] for i in slvit}
        for i in slvit:
            correct[i, "CC-SL-ViT" if mode == "hard" else "CC-SL-ViT (soft)"] = res[i].correct
        tuned[mode] = {i: copy.deepcopy(model.exits[i].state_dict()) for i in slvit}
    return copycat, tuned


def deploy(model: MultiExitModel, labels: list[str], cc_hard: dict[int, dict], card: Card, out: Path,
           positions: tuple[int, ...]) -> None:
    """A checkpoint with the default designs only (MLP, CNN, CC-SL-ViT per position), exit names unique."""
    keep = [i for i, lbl in enumerate(labels) if lbl in ("MLP", "CNN", "SL-ViT")]
    config = replace(model.config, exits=tuple(model.exit_configs[i] for i in keep))
    target = MultiExitModel(config)
    target.backbone.load_state_dict(model.backbone.state_dict())
    for j, i in enumerate(keep):
        target.exits[j].load_state_dict(cc_hard.get(i, model.exits[i].state_dict()))
    metrics = {r.name: r.summary() for r in evaluate(target, load_validation_of(card))}
    save_checkpoint(out, target, Card(config=config, label_names=card.label_names, modality=card.modality,
                                      input_shape=card.input_shape, split_block=max(positions),
                                      metrics={"exits": metrics, "backbone_card": card.metrics}, data=card.data))
    log.info("saved %s", out)


def load_validation_of(card: Card):
    from offramp.core.data.card_data import load_validation

    return load_validation(card)[0]


def compare(a: dict[str, Any], b: dict[str, Any], n: int) -> dict[str, Any]:
    """Is ``a`` more accurate than ``b`` on the same samples? The difference in points with its standard error
    (paired, from per-sample correctness, when this run has it; else as two independent proportions), and a
    verdict: "yes" or "no" beyond two standard errors, "tie" within them."""
    diff = a["accuracy"] - b["accuracy"]
    if a.get("correct") is not None and b.get("correct") is not None:
        d = np.asarray(a["correct"], np.float64) - np.asarray(b["correct"], np.float64)
        se, paired = float(d.std(ddof=1) / np.sqrt(len(d))), True
    else:
        se = float(np.sqrt((a["accuracy"] * (1 - a["accuracy"]) + b["accuracy"] * (1 - b["accuracy"])) / n))
        paired = False
    said = "yes" if diff > 2 * se else "no" if diff < -2 * se else "tie"
    return {"verdict": said, "diff_points": round(100 * diff, 2), "se_points": round(100 * se, 2), "paired": paired}


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """The paper's claims, checked on this run's numbers position by position, each with its standard error.

    Copycat is judged on the hard variant, the one deployed; the soft one is reported beside it, not pooled
    with it (taking the better of two would give the claim two chances)."""
    by = {(r["position"], r["exit"]): r for r in result["rows"]}
    n = result["val_samples"]
    out: dict[str, Any] = {}
    for p in sorted({r["position"] for r in result["rows"]}):
        sl, cnn, mlp = by[p, "SL-ViT"], by[p, "CNN"], by[p, "MLP"]
        out[str(p)] = {
            "slvit_beats_cnn": compare(sl, cnn, n),
            "slvit_beats_mlp": compare(sl, mlp, n),
            "slvit_fewer_macs_than_cnn": sl["macs"] < cnn["macs"],
            "slvit_beats_cnn_at_cnn_macs": compare(by[p, "SL-ViT (CNN's MACs)"], cnn, n),
            "slvit_beats_cnn_at_slvit_macs": compare(sl, by[p, "CNN (SL-ViT's MACs)"], n),
            "copycat_helps": compare(by[p, "CC-SL-ViT"], sl, n),
            "soft_copycat_helps": compare(by[p, "CC-SL-ViT (soft)"], sl, n),
        }
    return out


def _said(claim: Any) -> str:
    if isinstance(claim, bool):
        return "yes" if claim else "NO"
    if isinstance(claim, dict):
        return f"{claim['verdict']} ({claim['diff_points']:+.2f} +- {claim['se_points']:.2f} pts)"
    return str(claim)


def print_result(result: dict[str, Any]) -> None:
    print(f"\n{result['setting']}: {result['backbone']} on {result['data'].split('/')[-1]} "
          f"({result['train_samples']} train / {result['val_samples']} val), final head accuracy "
          f"{result['final_accuracy']:.4f}, {result['seconds']:.0f} s")
    print(format_table(["position", "exit", "accuracy", "params", "MACs", "lr"],
                       [[r["position"], r["exit"], r["accuracy"], r["params"], r["macs"], r["lr"]]
                        for r in result["rows"]]))
    for p, claims in result["verdict"].items():
        print(f"  @{p}: " + ", ".join(f"{k}={_said(v)}" for k, v in claims.items()))


def plot(results: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    style = {"MLP": ("s", "tab:gray"), "CNN": ("^", "tab:orange"), "CNN (SL-ViT's MACs)": ("v", "tab:orange"),
             "SL-ViT": ("o", "tab:blue"), "SL-ViT (CNN's MACs)": ("D", "tab:blue"), "CC-SL-ViT": ("*", "tab:green"),
             "CC-SL-ViT (soft)": ("P", "tab:green")}
    for ax, res in zip(axes[0], results):
        for p in sorted({r["position"] for r in res["rows"]}):
            for family, names in (("CNN", ("CNN (SL-ViT's MACs)", "CNN")), ("SL-ViT", ("SL-ViT", "SL-ViT (CNN's MACs)"))):
                pts = sorted((r["macs"], r["accuracy"]) for r in res["rows"] if r["position"] == p and r["exit"] in names)
                ax.plot([m / 1e6 for m, _ in pts], [a for _, a in pts], color=style[family][1], lw=0.8, alpha=0.6)
        for label, (marker, color) in style.items():
            rows = [r for r in res["rows"] if r["exit"] == label]
            ax.scatter([r["macs"] / 1e6 for r in rows], [r["accuracy"] for r in rows], marker=marker, color=color,
                       s=55, label=label, edgecolor="black" if "MACs" in label else None)
            for r in rows:
                ax.annotate(f"@{r['position']}", (r["macs"] / 1e6, r["accuracy"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.axhline(res["final_accuracy"], color="black", ls="--", lw=1, label="final head")
        ax.set_xscale("log")
        ax.set_xlabel("exit MACs (millions, log)")
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"{res['setting']} ({res['backbone']})")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def quick_backbone(workdir: Path) -> Backbone:
    """A tiny backbone trained on digits in seconds, for the smoke run."""
    data = load_data("digits", seed=0, limit=600)
    model, _ = build_model(TrainJob(model="vit_micro_32", exits="none"), data)
    train_backbone(model, data.train, TrainConfig(epochs=2, progress=False, precision="fp32"))
    out = workdir / "quick-backbone"
    save_checkpoint(out, model, Card(config=model.config, label_names=data.label_names, modality=data.modality,
                                     input_shape=data.input_shape, split_block=4,
                                     data={"spec": "digits", "seed": 0, "val_fraction": 0.1, "limit": 600}))
    return Backbone("quick-vit", str(out), (2, 4))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.exits", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[-1])
    ap.add_argument("--backbone", action="append", type=parse_backbone, default=[], metavar="NAME=CKPT@P1,P2",
                    help="a trained backbone checkpoint and the exit positions to compare (repeatable)")
    ap.add_argument("--quick", action="store_true", help="smoke run: a tiny backbone on digits, 1 exit epoch")
    ap.add_argument("--exit-epochs", type=int, default=30, help="epochs on labels, every exit the same (default 30)")
    ap.add_argument("--copycat-epochs", type=int, default=10, help="copycat epochs of the SL-ViT exits (default 10)")
    ap.add_argument("--lrs", default="1e-3,3e-3",
                    help="learning rates searched (short runs, the same for every exit; each keeps its best)")
    ap.add_argument("--search-epochs", type=int, default=4, help="epochs of each learning-rate probe (default 4)")
    ap.add_argument("--out", default=None, help="JSON output (default bench/results/exits[-quick].json)")
    ap.add_argument("--only", default=None, help="comma-separated backbone names to run")
    ap.add_argument("--merge", action="store_true",
                    help="keep the results of other backbones already in --out (a backbone run again replaces its own)")
    ap.add_argument("--checkpoints", default="runs/bench-exits", help="where to save deployable checkpoints ('' for none)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    lrs = [float(x) for x in args.lrs.split(",") if x]
    cfg = TrainConfig(exit_epochs=args.exit_epochs, copycat_epochs=args.copycat_epochs, batch_size=512,
                      exit_views=2, translate=2, progress=False)
    chosen = list(args.backbone)
    if args.quick:
        import tempfile

        chosen = [quick_backbone(Path(tempfile.mkdtemp(prefix="offramp-bench-")))]
        cfg, lrs = replace(cfg, exit_epochs=1, copycat_epochs=1, precision="fp32"), lrs[:1]
    if not chosen:
        ap.error("name at least one --backbone NAME=CHECKPOINT@P1,P2 (train it with 'offramp train'), or --quick")
    if args.only:
        chosen = [b for b in chosen if b.name in args.only.split(",")]
    out = Path(args.out) if args.out else RESULTS / ("exits-quick.json" if args.quick else "exits.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.checkpoints) if args.checkpoints else None
    started = time.time()
    command = " ".join(["python -m bench.exits", *(argv if argv is not None else sys.argv[1:])])
    results: list[dict[str, Any]] = []
    if args.merge and out.is_file():  # each result keeps the command that made it
        earlier = json.loads(out.read_text())
        results = [{**r, "command": r.get("command", earlier.get("command"))} for r in earlier["results"]
                   if r["setting"] not in {b.name for b in chosen}]
    for b in chosen:
        res = run_backbone(b, cfg, lrs, ckpt, search_epochs=args.search_epochs)
        res["verdict"] = verdict(res)
        for row in res["rows"]:
            row.pop("correct", None)  # per-sample data served the paired tests; the JSON keeps the summaries
        res["command"] = command
        print_result(res)
        results.append(res)
        out.write_text(json.dumps({
            "command": command,
            "machine": {**machine(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()},
            "wall_s": round(time.time() - started, 1), "results": results}, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
