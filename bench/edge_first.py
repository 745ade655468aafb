"""Edge-first cascades: accuracy against the mean compute per input, one curve per model.

For each model (a checkpoint and the exits its edge walks), on the card's
validation split:

* the final head's accuracy, and each exit's accuracy and cumulative MACs
  from the input (the stem and blocks up to its position, plus the exit);
* per shared threshold: the share answered at each exit, the cascade's
  accuracy, its mean MACs per input (every exit tried on the way counted, as
  the edge runs them) and its *measured* mean edge time per input, at batch 1
  on one pinned core, in PyTorch eager and in onnxruntime (the edge runs
  everything itself: split after the last block, the final head included);
* the cheapest setting within ``--max-drop`` points of the full model, chosen
  on the card's selection split (held out of training and of validation) and
  reported on validation, with the paired standard error of its loss.

Writes ``bench/results/edge_first.json`` and a plot of accuracy against mean
MACs per input (the full models as points).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offramp.training.calibrate import cheapest_within, operating_point
from offramp.core.checkpoint import Card, load_checkpoint
from offramp.core.errors import OfframpError
from offramp.core.exit_rule import edge_exit_ids
from offramp.core.hostinfo import machine
from offramp.core.models import MultiExitModel
from offramp.core.models.cost import count_macs
from offramp.core.data.card_data import load_selection, load_validation
from offramp.core.tables import format_table
from offramp.training.report import head_costs
from offramp.core.scores import default_score
from offramp.core.halves import EdgeHalf, EdgeWalk
from offramp.training.train import HeadResult, evaluate
from orchestrator.loadgen import write_result

RESULTS = Path(__file__).resolve().parent / "results"
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99)
_EVALUATED: dict[tuple[str, str], tuple[list[HeadResult], list[HeadResult]]] = {}


def parse_model(spec: str) -> tuple[str, str, list[str] | None]:
    """``LABEL=CHECKPOINT[@EXIT,EXIT]`` (or just ``CHECKPOINT``) -> (label, checkpoint, exits or None: all)."""
    label, sep, rest = spec.partition("=")
    if not sep:
        label, rest = "", spec
    path, _, exits = rest.partition("@")
    if not path:
        raise OfframpError(f"--model {spec!r}: give LABEL=CHECKPOINT[@EXIT,EXIT]")
    return label or Path(path).name, path, [e for e in exits.split(",") if e] or None


def paired_se_points(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error, in points, of the mean of ``a - b`` (per-sample correctness on the same samples)."""
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(d.std(ddof=1) / np.sqrt(len(d)) * 100) if len(d) > 1 else float("nan")


def se_points(correct: np.ndarray) -> float:
    p = float(np.mean(correct))
    return float(np.sqrt(p * (1 - p) / len(correct)) * 100)


class EdgeTimer:
    """Mean edge time per input at batch 1: the exit walk, then the rest of the model for inputs no exit
    answers (the edge answers everything itself)."""

    def __init__(self, half: EdgeWalk, model: MultiExitModel, inputs: torch.Tensor, score: str) -> None:
        self.half, self.model, self.inputs, self.score = half, model, inputs, score

    @torch.inference_mode()
    def mean_ms(self, thresholds: list[float]) -> float:
        for x in self.inputs[:5]:  # warm-up
            self._one(x[None], thresholds)
        start = time.perf_counter()
        for x in self.inputs:
            self._one(x[None], thresholds)
        return (time.perf_counter() - start) * 1e3 / len(self.inputs)

    def _one(self, x: torch.Tensor, thresholds: list[float]) -> None:
        result = self.half.run(x, thresholds, self.score)
        if len(result.tokens):
            self.model.backbone.forward_head(result.tokens)


@torch.no_grad()
def exit_table(model: MultiExitModel, ids: list[int], results: list[HeadResult],
               input_shape: tuple[int, ...]) -> list[dict[str, Any]]:
    """Each walked exit: its accuracy and its cumulative MACs from the input (blocks up to it, plus itself)."""
    x = torch.zeros(1, *input_shape)
    rows = []
    for i, r in zip(ids, results):
        e = model.exit_configs[i]
        blocks = count_macs(lambda t, p=e.position: model.backbone.head(t, p), x)
        own = count_macs(lambda f, i=i: model.run_exit(i, f), model.backbone.head(x, e.position))
        rows.append({"name": e.name, "position": e.position, "cumulative_macs": blocks + own, "exit_macs": own,
                     "accuracy": float(r.correct.mean()), "accuracy_se_points": se_points(r.correct)})
    return rows


def training_compute(card: Card) -> dict[str, Any]:
    """Training FLOPs and wall time from the card (and its teacher's card, when it names one)."""
    t = card.metrics.get("training", {})
    out: dict[str, Any] = {k: t[k] for k in ("wall_s", "epochs", "flops", "teacher_answer_flops", "dtype") if k in t}
    teacher = t.get("teacher", {}).get("checkpoint")
    if teacher and Path(teacher, "card.json").is_file():
        tt = json.loads(Path(teacher, "card.json").read_text()).get("metrics", {}).get("training", {})
        out["teacher"] = {"checkpoint": os.path.relpath(teacher), **{k: tt[k] for k in ("wall_s", "epochs", "flops")
                                                                      if k in tt}}
    return out


def step_flops(variant: str, exits: str = "none") -> tuple[float, float]:
    """FLOPs of one training step per sample (forward and backward, every exit's loss included) and of one
    forward pass, counted by FlopCounterMode on the variant as its recipe trains it."""
    from offramp.core.models import ModelConfig, parse_exits
    from offramp.core.models.cost import StepFlops

    model = MultiExitModel(ModelConfig(variant, (32, 32), 3, 10, exits=parse_exits(exits)))
    x, counter = torch.zeros(4, 3, 32, 32), StepFlops()
    with counter:
        outs, out = model(x)
        loss = out.sum() + sum(o.sum() for o in outs)
    with counter:
        loss.backward()
    return counter.per_sample(4), 2.0 * count_macs(model.backbone, x)


def training_budget(card: Card) -> dict[str, Any]:
    """This model's training FLOPs (its card's count, its teacher's training and answers) against the
    reference: hybrid_c10 and its airbench_c10 teacher as their recipes train them on 45,000 images."""
    from offramp.training.recipes import RECIPES

    n_ref = 45_000
    teacher_step, teacher_fwd = step_flops("airbench_c10")
    hybrid_step, _ = step_flops("hybrid_c10")
    teacher = teacher_step * n_ref * RECIPES["airbench_c10"].settings["epochs"]
    hybrid = hybrid_step * n_ref * RECIPES["hybrid_c10"].settings["epochs"]
    answers_ref = teacher_fwd * n_ref * RECIPES["hybrid_c10"].settings["teacher_views"]
    reference = teacher + hybrid + answers_ref
    t = card.metrics.get("training", {})
    if "flops" not in t:
        return {"reference_flops": reference, "note": "the card records no training FLOPs"}
    own_teacher = teacher if t.get("teacher") else 0.0  # the same teacher recipe as the reference's
    ours = t["flops"] + t.get("teacher_answer_flops", 0.0) + own_teacher
    return {"reference_flops": reference, "reference": {"airbench_c10_teacher": teacher, "hybrid_c10": hybrid,
                                                        "teacher_answers": answers_ref},
            "flops": ours, "parts": {"student": t["flops"], "teacher_answers": t.get("teacher_answer_flops", 0.0),
                                     "airbench_c10_teacher": own_teacher},
            "ratio": ours / reference, "limit": 1.3}


def measure_model(label: str, checkpoint: str, names: list[str] | None, args: argparse.Namespace,
                  tmp: Path) -> dict[str, Any]:
    """One curve: ``checkpoint``'s exits ``names`` walked at every setting, with the one chosen on selection."""
    model, card = load_checkpoint(checkpoint)
    if card.config.task != "classification" or model.audiovisual:
        raise OfframpError(f"{checkpoint}: this benchmark measures image classifiers")
    score = default_score("classification")
    try:
        ids = edge_exit_ids(model.exit_configs, model.num_blocks, names)
    except ValueError as e:
        raise OfframpError(f"{checkpoint}: {e}") from None
    if not ids:
        raise OfframpError(f"{checkpoint} has no exits to walk")
    val, input_shape = load_validation(card)
    try:
        selection, chosen_on = load_selection(card), "selection"
    except OfframpError:
        selection, chosen_on = val, "validation (the card has no selection split: the choice is not held out)"
    r_val, r_sel = _evaluated(label, checkpoint, model, card, val, selection, score)
    exits_val, final_val = [r_val[i] for i in ids], r_val[-1]
    exits_sel, final_sel = [r_sel[i] for i in ids], r_sel[-1]
    costs = head_costs(model, input_shape, ids)
    to_answer = [c["macs_to_answer"] for c in costs]
    full_macs = costs[-1]["macs"]

    best_sel = cheapest_within(exits_sel, final_sel, score, args.max_drop, to_answer, args.margin_se,
                               args.shared_threshold, args.consistent)
    settings = [((t,) * len(ids), False) for t in args.thresholds] + [(best_sel.thresholds, True)]
    timers, full_timers = _timers(label, checkpoint, model, card, ids, val.tensors[0][:args.timing_samples], score,
                                  args.no_onnx, tmp)
    times, full_ms = _time_settings(timers, full_timers, [s for s, _ in settings])

    rows = []
    for k, (thresholds, chosen) in enumerate(settings):
        p = operating_point(exits_val, final_val, score, thresholds, to_answer)
        walked_correct = _cascade_correct(exits_val, final_val, score, thresholds)
        rows.append({
            "thresholds": [float(t) for t in thresholds], "chosen_on_selection": chosen,
            "accuracy": p.quality, "accuracy_loss_points": (float(final_val.correct.mean()) - p.quality) * 100,
            "loss_se_points": paired_se_points(final_val.correct, walked_correct),
            "mean_macs": p.mean_macs, "macs_speedup": full_macs / p.mean_macs,
            "mean_edge_ms": {rt: times[rt][k] for rt in timers},
            "time_speedup": {rt: full_ms[rt] / times[rt][k] for rt in timers},
            "shares": dict(zip([*(model.exit_configs[i].name for i in ids), "final"], p.shares)),
        })
    best = rows[-1]
    selection_point = operating_point(exits_sel, final_sel, score, best_sel.thresholds, to_answer)
    return {
        "variant": card.config.backbone, "label": label, "checkpoint": checkpoint, "fingerprint": card.fingerprint,
        "val_accuracy": float(final_val.correct.mean()), "val_accuracy_se_points": se_points(final_val.correct),
        "val_samples": len(val), "selection_samples": len(selection), "chosen_on": chosen_on,
        "full_macs": full_macs, "full_edge_ms": full_ms,
        "exits": exit_table(model, ids, exits_val, input_shape),
        "cascade": rows,
        "best_within_half_point" if args.max_drop == 0.5 else f"best_within_{args.max_drop:g}_points": {
            "thresholds": best["thresholds"], "accuracy": best["accuracy"],
            "accuracy_loss_points": best["accuracy_loss_points"], "loss_se_points": best["loss_se_points"],
            "macs_speedup": best["macs_speedup"], "time_speedup": best["time_speedup"],
            "shares": best["shares"],
            "on_selection": {"accuracy_loss_points": (float(final_sel.correct.mean()) - selection_point.quality) * 100,
                             "macs_speedup": full_macs / selection_point.mean_macs,
                             # --consistent: what the choice kept within the drop (answers the exits broke)
                             **({"broken_points": (float(final_sel.correct.mean()) - best_sel.quality) * 100}
                                if args.consistent else {})},
        },
        "training": training_compute(card),
        "training_budget": training_budget(card),
    }


def _evaluated(label: str, checkpoint: str, model: MultiExitModel, card: Card, val: Any, selection: Any,
               score: str) -> tuple[list[HeadResult], list[HeadResult]]:
    """Every head on the validation and the selection split; once per checkpoint, since several curves may
    walk different exits of one."""
    key = (checkpoint, card.fingerprint)
    if key not in _EVALUATED:
        print(f"[{label}] evaluating on {len(val)} validation and {len(selection)} selection images", flush=True)
        r_val = evaluate(model, val, score=score)
        _EVALUATED[key] = (r_val, evaluate(model, selection, score=score) if selection is not val else r_val)
    return _EVALUATED[key]


def _timers(label: str, checkpoint: str, model: MultiExitModel, card: Card, ids: list[int], inputs: torch.Tensor,
            score: str, no_onnx: bool, tmp: Path) -> tuple[dict[str, EdgeTimer], dict[str, EdgeTimer]]:
    """Per runtime, a timer of the walk over exits ``ids`` and one of the whole model (no exits)."""
    names = [model.exit_configs[i].name for i in ids]
    timers = {"eager": EdgeTimer(EdgeHalf(model, model.num_blocks, exits=names), model, inputs, score)}
    full_timers = {"eager": EdgeTimer(EdgeHalf(model, model.num_blocks, exits=[]), model, inputs, score)}
    if not no_onnx:
        from offramp.core.onnx_edge import OnnxEdgeHalf, export_onnx

        out = tmp / label
        print(f"[{label}] exporting the edge (split after block {model.num_blocks}) to ONNX", flush=True)
        export_onnx(checkpoint, out, split_block=model.num_blocks)
        timers["onnxruntime"] = EdgeTimer(OnnxEdgeHalf(out, card, exits=names, threads=1), model, inputs, score)
        full_timers["onnxruntime"] = EdgeTimer(OnnxEdgeHalf(out, card, exits=[], threads=1), model, inputs, score)
    return timers, full_timers


def _time_settings(timers: dict[str, EdgeTimer], full_timers: dict[str, EdgeTimer],
                   settings: list[tuple[float, ...]]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Mean ms per input of each setting and of the whole model, per runtime: two rounds, the second in
    reverse order, so that a drift of the machine's speed evens out across rows."""
    times: dict[str, list[list[float]]] = {rt: [[] for _ in settings] for rt in timers}
    full_times: dict[str, list[float]] = {rt: [] for rt in timers}
    for order in (range(len(settings)), reversed(range(len(settings)))):
        for rt in timers:
            full_times[rt].append(full_timers[rt].mean_ms([]))
            for k in order:
                times[rt][k].append(timers[rt].mean_ms(list(settings[k])))
    return ({rt: [float(np.mean(t)) for t in v] for rt, v in times.items()},
            {rt: float(np.mean(v)) for rt, v in full_times.items()})


def _cascade_correct(exits: list[HeadResult], final: HeadResult, score: str, thresholds: tuple[float, ...]
                     ) -> np.ndarray:
    from offramp.core.exit_rule import walk

    walked = walk(np.stack([r.confidence for r in exits]), list(thresholds), score)
    return walked.answers(np.stack([*(r.correct for r in exits), final.correct]))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    drawn: set[str] = set()
    for i, m in enumerate(result["models"]):
        color = f"C{i}"
        shared = sorted((r for r in m["cascade"] if not r["chosen_on_selection"]), key=lambda r: r["mean_macs"])
        ax.plot([r["mean_macs"] / 1e6 for r in shared], [r["accuracy"] * 100 for r in shared], "o-", color=color,
                ms=4, lw=1.2, alpha=0.8, label=f"{m['label']}")
        b = [r for r in m["cascade"] if r["chosen_on_selection"]][0]
        ax.plot(b["mean_macs"] / 1e6, b["accuracy"] * 100, "D", color=color, ms=9, mfc="none")
        if m["fingerprint"] not in drawn:  # several curves may walk one model: its full model once
            drawn.add(m["fingerprint"])
            ax.plot(m["full_macs"] / 1e6, m["val_accuracy"] * 100, "*", color="k", ms=14)
            ax.annotate(f"{m['variant']} full model", (m["full_macs"] / 1e6, m["val_accuracy"] * 100),
                        xytext=(-10, 8), textcoords="offset points", ha="right", fontsize=8)
            ax.axhline((m["val_accuracy"] - 0.005) * 100, color="0.5", lw=0.7, ls=":")
    ax.plot([], [], "D", color="0.3", mfc="none", label="chosen on the selection split (per-exit thresholds)")
    ax.plot([], [], ":", color="0.5", label="0.5 points below the full model")
    ax.set_xlabel("mean MACs per input (millions; every exit tried counted)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Early-exit cascades: accuracy against mean compute per input")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", title="cascades (shared thresholds)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.edge_first", description=__doc__.split("\n\n")[0],
                                 epilog="example: python -m bench.edge_first --model edge_c10=runs/edge_c10_sel "
                                        "--model hybrid_c10=runs/hybrid_c10@slvit@1,slvit@2",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", metavar="LABEL=CHECKPOINT[@EXIT,EXIT]",
                    help="a model and the exits its edge walks (default: all of them); repeat for each curve")
    ap.add_argument("--stages", metavar="CHECKPOINT",
                    help="instead: time each stage of one model alone (stem, every block, every exit) at batch 1, "
                         "against its MACs (default --out bench/results/edge_first_stages.json)")
    ap.add_argument("--thresholds", type=lambda s: [float(v) for v in s.split(",")], default=list(THRESHOLDS),
                    help="shared max-probability thresholds, one row each (default: %(default)s)")
    ap.add_argument("--max-drop", type=float, default=0.5, help="accuracy points the chosen setting may lose")
    ap.add_argument("--margin-se", type=float, default=0.0,
                    help="standard errors of the loss the setting chosen on the selection split keeps to spare")
    ap.add_argument("--shared-threshold", action="store_true",
                    help="choose the best setting among shared thresholds only (one for every exit), which the "
                         "selection split cannot tune to its own noise")
    ap.add_argument("--consistent", action="store_true",
                    help="choose the best setting by consistency with the full model: an exit's answer counts "
                         "only where the full model is right too (what the exits break counts, their lucky "
                         "answers earn nothing), which is what carries from the selection split to new data")
    ap.add_argument("--timing-samples", type=int, default=300, help="validation images timed per row and round")
    ap.add_argument("--core", type=int, default=max(os.sched_getaffinity(0)), help="the one core timing runs on")
    ap.add_argument("--no-onnx", action="store_true", help="time PyTorch eager only")
    ap.add_argument("--out", default=None, help="JSON output (default bench/results/edge_first.json)")
    args = ap.parse_args(argv)
    if bool(args.model) == bool(args.stages):
        ap.error("give --model (one or more) or --stages, not both")
    if args.stages:
        return stages_main(args, argv)
    args.out = args.out or str(RESULTS / "edge_first.json")
    if not 0 <= args.max_drop <= 100:
        ap.error(f"--max-drop must be in 0..100 points, not {args.max_drop}")
    started = time.perf_counter()
    try:
        specs = [parse_model(s) for s in args.model]
        with one_core(args.core), tempfile.TemporaryDirectory(prefix="offramp-edge-first-") as tmp:
            models = [measure_model(label, ckpt, names, args, Path(tmp)) for label, ckpt, names in specs]
    except OfframpError as e:
        print(f"bench.edge_first: error: {e}", file=sys.stderr)
        return 2
    result = {"command": "python -m bench.edge_first " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "machine": {**machine(), "timing_core": args.core}, "max_drop_points": args.max_drop,
              "margin_se": args.margin_se, "shared_threshold": args.shared_threshold,
              "consistent": args.consistent,
              "wall_s": time.perf_counter() - started, "models": models}
    report(result)
    out = write_result(result, args.out)
    plot(result, out.with_suffix(".png"))
    return 0


@contextlib.contextmanager
def one_core(core: int) -> Iterator[None]:
    """Time on ``core`` alone with one torch thread (batch-1 edge timings), then restore both."""
    mask, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    try:
        yield
    finally:
        os.sched_setaffinity(0, mask)
        torch.set_num_threads(threads)


def stage_times(checkpoint: str, reps: int = 300, rounds: int = 3) -> list[dict[str, Any]]:
    """Each stage of ``checkpoint``'s model as the edge runs it (stem, every block, every exit, then the whole
    model), timed alone at batch 1 (best of ``rounds`` x ``reps`` calls), with its MACs."""
    from offramp.core.halves import ready_for_inference

    model, card = load_checkpoint(checkpoint)
    model = ready_for_inference(model, torch.device("cpu"))
    bb = model.backbone
    x = load_validation(card)[0].tensors[0][:1]

    def best_ms(fn: Any) -> float:
        for _ in range(20):
            fn()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - start) / reps * 1e3)
        return min(times)

    rows = []
    with torch.inference_mode():
        feats = [bb.embed(x)]
        for b in range(bb.num_blocks):
            feats.append(bb.forward_blocks(feats[-1], b, b + 1))
        rows.append(("stem", lambda: bb.embed(x), lambda: count_macs(bb.embed, x)))
        for b in range(bb.num_blocks):
            f = feats[b]
            rows.append((f"block {b + 1}", lambda f=f, b=b: bb.forward_blocks(f, b, b + 1),
                         lambda f=f, b=b: count_macs(lambda z: bb.forward_blocks(z, b, b + 1), f)))
        for i, e in enumerate(model.exit_configs):
            f = feats[e.position]
            rows.append((f"exit {e.name}", lambda f=f, i=i: model.run_exit(i, f, None),
                         lambda f=f, i=i: count_macs(lambda z: model.run_exit(i, z, None), f)))
        rows.append(("whole model", lambda: bb(x), lambda: count_macs(bb, x)))
        return [{"stage": name, "ms": best_ms(run), "macs": macs()} for name, run, macs in rows]


def stages_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    started = time.perf_counter()
    try:
        with one_core(args.core):
            rows = stage_times(args.stages)
    except OfframpError as e:
        print(f"bench.edge_first: error: {e}", file=sys.stderr)
        return 2
    print(format_table(["stage", "ms", "MMACs", "GMAC/s"],
                       [[r["stage"], f"{r['ms']:.3f}", f"{r['macs'] / 1e6:.1f}", f"{r['macs'] / r['ms'] / 1e6:.1f}"]
                        for r in rows]))
    result = {"command": "python -m bench.edge_first " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "machine": {**machine(), "timing_core": args.core}, "checkpoint": args.stages,
              "wall_s": time.perf_counter() - started, "stages": rows}
    write_result(result, args.out or str(RESULTS / "edge_first_stages.json"))
    return 0


def report(result: dict[str, Any]) -> None:
    for m in result["models"]:
        runtimes = list(m["full_edge_ms"])
        print(f"\n{m['label']} ({m['variant']}): full model {m['val_accuracy']:.2%} "
              f"(+-{m['val_accuracy_se_points']:.2f}), {m['full_macs'] / 1e6:.1f}M MACs, edge "
              + ", ".join(f"{rt} {m['full_edge_ms'][rt]:.2f} ms" for rt in runtimes))
        print(format_table(["exit", "cumulative MACs", "accuracy"],
                           [[e["name"], e["cumulative_macs"], e["accuracy"]] for e in m["exits"]]))
        rows = []
        for r in m["cascade"]:
            label = "chosen" if r["chosen_on_selection"] else f"{r['thresholds'][0]:g}"
            rows.append([label, *[f"{s:.1%}" for s in r["shares"].values()], r["accuracy"],
                         f"{r['accuracy_loss_points']:+.2f}+-{r['loss_se_points']:.2f}", round(r["mean_macs"]),
                         f"{r['macs_speedup']:.2f}x",
                         *[f"{r['mean_edge_ms'][rt]:.2f} ({r['time_speedup'][rt]:.2f}x)" for rt in runtimes]])
        print(format_table(["thr", *m["cascade"][0]["shares"], "accuracy", "loss (pts)", "mean MACs", "speed-up",
                            *[f"{rt} ms" for rt in runtimes]], rows))


if __name__ == "__main__":
    raise SystemExit(main())
