"""How wide must the airbench CNN be, and how long must it train, to reach a target accuracy?

Trains the ``airbench_c10`` recipe on widened copies of the network for a
grid of (widths, epochs), evaluates each on the validation split (plain and
with test-time augmentation) and records its training throughput, so the
accuracy a CPU can reach within a time budget can be read off:

    python -m bench.cnn_capacity --data imagefolder:DIR/cifar10-train.zip \\
        --grid 64,256,256:16 128,384,384:9 --device cuda --out cnn_capacity.json
    python -m bench.cnn_capacity --speed-only --grid 64,256,256 128,384,384 --out cpu_speed.json  # on the CPU
    python -m bench.cnn_capacity --combine cnn_capacity.json --cpu-speed cpu_speed.json   # table, JSON, plot

A fast device (a GPU) trains the grid in minutes; ``--combine`` adds what each
point would cost on the CPU (its epochs x training images / the CPU's img/s
for those widths) and writes ``bench/results/cnn_capacity.json`` and a plot
of accuracy against that time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from offramp.core.hostinfo import machine as host_machine
from offramp.core.models import registry
from offramp.training.plots import pyplot
from offramp.core.tables import format_table
from offramp.core.models.airbench import AirbenchCNN
from offramp.training.pipeline import TrainJob, build_model, data_settings
from offramp.core.precision import resolve_precision
from offramp.training.recipes import RECIPES
from offramp.training.train import TrainConfig, evaluate, train_backbone


def parse_point(text: str) -> tuple[tuple[int, ...], int | None, dict[str, str]]:
    """``64,256,256:16:lr=x1.5/seed=1`` -> ((64, 256, 256), 16, {"lr": "x1.5", "seed": "1"}): widths, then
    optionally epochs and recipe settings changed for this point alone (see ``point_settings``)."""
    widths, _, rest = text.partition(":")
    epochs, _, settings = rest.partition(":")
    changes = dict(item.split("=", 1) for item in settings.split("/") if item)
    return tuple(int(w) for w in widths.split(",")), int(epochs) if epochs else None, changes


def point_settings(recipe: TrainConfig, changes: dict[str, str]) -> dict[str, Any]:
    """Typed recipe settings from a point's ``SETTING=VALUE`` strings; ``xF`` scales the recipe's value."""
    settings = {}
    for key, text in changes.items():
        if key not in recipe.__dataclass_fields__:
            raise ValueError(f"unknown setting '{key}' (settings are TrainConfig's fields)")
        current = getattr(recipe, key)
        kind = type(current) if current is not None else float
        if kind not in (int, float, bool):
            raise ValueError(f"setting '{key}' is not a number; only numeric settings vary in a grid")
        try:
            value = float(text[1:]) * current if text.startswith("x") else float(text)
            settings[key] = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"setting {key}={text}: expected a number or xFACTOR") from None
    return settings


def variant_for(widths: tuple[int, ...]) -> str:
    """Registers an airbench variant of these widths (once) and returns its name."""
    name = "airbench_w" + "_".join(map(str, widths))
    if name not in registry.variant_names():
        def factory(**kw):
            return AirbenchCNN(**{"img_size": (32, 32), "widths": widths, **kw})
        factory.__name__ = name
        registry.register(factory)
    return name


def train_speed(widths: tuple[int, ...], batch: int, device: torch.device, steps: int = 4) -> float:
    """Training img/s of the bare network at ``batch`` (bf16 autocast, channels_last), after 2 warm-up steps."""
    prec = resolve_precision("auto", device.type)
    model = AirbenchCNN(widths=widths).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.85, nesterov=True)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    for i in range(2 + steps):
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with prec.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


RESULTS = Path(__file__).parent / "results"
TRAIN_IMAGES = 45_000  # CIFAR-10's training split less the 10% validation split


def combine(runs: list[Path], cpu_speed_file: Path, out: Path, target: float, budget_s: float) -> None:
    """Merges grid runs, adds each point's estimated CPU training time, prints a table, writes JSON and a plot."""
    loaded = [json.loads(r.read_text()) for r in runs]
    cpu = json.loads(cpu_speed_file.read_text())
    speed = {tuple(e["widths"]): e["train_img_per_s"] for e in cpu["points"]}
    points = [p for run in loaded for p in run["points"]]
    for p in points:
        p.setdefault("changed", {})  # runs before per-point settings existed changed none
        if tuple(p["widths"]) in speed:
            p["cpu_train_s_est"] = round(p["epochs"] * TRAIN_IMAGES / speed[tuple(p["widths"])], 1)
    result = {"commands": [r["command"] for r in loaded] + [cpu["command"]],
              "machines": {"grid": loaded[0]["machine"], "cpu": cpu["machine"]},
              "wall_s": {"grid": round(sum(r["wall_s"] for r in loaded), 1), "cpu_speed": cpu["wall_s"]},
              "target_accuracy": target, "cpu_budget_s": budget_s, "cpu_speed": cpu["points"], "points": points}
    out.write_text(json.dumps(result, indent=2) + "\n")
    rows = [["/".join(map(str, p["widths"])), p["epochs"], "/".join(f"{k}={v}" for k, v in p["changed"].items()) or "-",
             f"{p['val_accuracy']:.2%}", f"{p['val_accuracy_tta']:.2%}", p.get("cpu_train_s_est", "?")]
            for p in points]
    print(format_table(["widths", "epochs", "changed", "val", "val TTA", "CPU train s (est.)"], rows))
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in points:
        if "cpu_train_s_est" not in p:
            continue
        ax.scatter(p["cpu_train_s_est"] / 60, 100 * p["val_accuracy_tta"], color="C1" if p["changed"] else "C0")
        label = "/".join(map(str, p["widths"])) + f" x{p['epochs']}"
        label += "".join(f" {k}={v}" for k, v in p["changed"].items())
        ax.annotate(label, (p["cpu_train_s_est"] / 60, 100 * p["val_accuracy_tta"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.axhline(100 * target, color="grey", ls="--", lw=1, label=f"target {target:.0%}")
    ax.axvline(budget_s / 60, color="grey", ls=":", lw=1, label=f"{budget_s / 60:.0f} min budget")
    ax.set_xscale("log")
    ax.set_xticks([10, 15, 20, 30, 60, 120], labels=["10", "15", "20", "30", "60", "120"])
    ax.minorticks_off()
    ax.set_xlabel("estimated training time on the 2-core CPU (min, log scale)")
    ax.set_ylabel("validation accuracy with TTA (%)")
    ax.set_title("airbench CNN on CIFAR-10: width and epochs vs accuracy (orange: a recipe setting changed)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.cnn_capacity", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--grid", nargs="+", help="points WIDTHS[:EPOCHS[:SETTING=VALUE/...]], e.g. 128,384,384:9 or "
                   "64,256,256:16:lr=x1.4/seed=1 (xF scales the recipe's value)")
    p.add_argument("--data", help="the CIFAR-10 archive, as imagefolder:PATH (not needed with --speed-only)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--speed-only", action="store_true", help="measure training img/s per widths, train nothing")
    p.add_argument("--cpu-speed", help="with --combine: a --speed-only JSON from the CPU")
    p.add_argument("--limit", type=int, help="use only this many images (a smoke test)")
    p.add_argument("--combine", nargs="+", type=Path, metavar="RUN", help="merge grid runs (needs --cpu-speed)")
    p.add_argument("--target", type=float, default=0.93, help="accuracy line on the plot (default 0.93)")
    p.add_argument("--budget-s", type=float, default=1200, help="CPU time line on the plot (default 1200 s)")
    p.add_argument("--out", type=Path, help="default: cnn_capacity.json, or bench/results/cnn_capacity.json "
                   "with --combine")
    return p


def grid_points(p: argparse.ArgumentParser, grid: list[str], recipe: Any) -> list[Any]:
    """The grid's points, each checked against the recipe (a bad one is a usage error naming it)."""
    points = []
    for text in grid:
        try:
            points.append(parse_point(text))
        except ValueError:
            p.error(f"grid point {text!r}: expected WIDTHS[:EPOCHS[:SETTING=VALUE/...]], e.g. 96,384,384:11:seed=1")
        try:
            point_settings(recipe, points[-1][2])
        except ValueError as e:
            p.error(f"grid point {text!r}: {e}")
    return points


def train_point(data: Any, data_spec: str, recipe: Any, widths: tuple[int, ...], epochs: int | None,
                changes: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Train one grid point's CNN from scratch and read its accuracy (plain and with TTA)."""
    job = TrainJob(data=data_spec, model=variant_for(widths), exits="none")
    settings = point_settings(recipe, changes)
    cfg = data_settings(job, data, dataclasses.replace(recipe, **settings, **({"epochs": epochs} if epochs else {})))
    torch.manual_seed(cfg.seed)
    model, _ = build_model(job, data)
    timing = train_backbone(model, data.train, cfg)
    plain, tta = (evaluate(model, data.val, tta=t, device=device.type)[-1].summary()["accuracy"]
                  for t in (False, True))
    return {"widths": list(widths), "epochs": cfg.epochs, "changed": changes,
            "params": sum(p.numel() for p in model.parameters()), "val_accuracy": plain, "val_accuracy_tta": tta,
            "train_wall_s": round(timing["wall_s"], 1), "img_per_s": round(timing["img_per_s"], 1),
            "dtype": timing["dtype"], "device": timing["device"]}


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.combine:
        if not args.cpu_speed:
            p.error("--combine needs --cpu-speed")
        combine(args.combine, Path(args.cpu_speed), args.out or RESULTS / "cnn_capacity.json", args.target,
                args.budget_s)
        return 0
    if not args.grid:
        p.error("--grid is needed (or --combine)")
    if not args.speed_only and not args.data:
        p.error("--data is needed unless --speed-only")
    args.out = args.out or Path("cnn_capacity.json")
    started = time.time()
    recipe = RECIPES["airbench_c10"].config(device=args.device, progress=False)
    points = grid_points(p, args.grid, recipe)
    prec = resolve_precision("auto", args.device)
    machine = {**host_machine(), "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name() if prec.device.type == "cuda" else None}
    result: dict[str, Any] = {"command": "python -m bench.cnn_capacity " + " ".join(sys.argv[1:]),
                              "machine": machine, "recipe": "airbench_c10", "points": []}

    def save() -> None:
        result["wall_s"] = round(time.time() - started, 1)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    if args.speed_only:
        for widths, _, _ in points:
            speed = train_speed(widths, recipe.batch_size, prec.device)
            result["points"].append({"widths": list(widths), "train_img_per_s": round(speed, 1)})
            print(f"{widths}: {speed:.0f} img/s", flush=True)
            save()
        return 0
    from offramp.core.data import load_data
    data = load_data(args.data, val_fraction=0.1, seed=0, limit=args.limit)
    for widths, epochs, changes in points:
        entry = train_point(data, args.data, recipe, widths, epochs, changes, prec.device)
        result["points"].append(entry)
        print(json.dumps(entry), flush=True)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
