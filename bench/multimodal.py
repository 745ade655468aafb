"""Audiovisual exits on the synthetic crowd scenes: which modality to exit on, and what the ladder saves.

One audiovisual model (``vit_micro_32``, counts by regression, audio fused
into the backbone at block 4, the split) is trained on SYNTHETIC ``crowd-av``
scenes with SL-ViT exits of every modality:

* ``slvit@0:audio`` -- audio tokens only. The audio encoder runs before any
  exit and its tokens do not change with the visual blocks, so an audio-only
  exit at block 2 or 4 would see exactly the input of the one at block 0 and
  differ only in its random start: it is trained once, at position 0, and
  stands for "audio-only" at every position;
* ``slvit@2``, ``slvit@4`` -- visual tokens only;
* ``slvit@2:fused``, ``slvit@4:fused`` -- visual and audio tokens.

A second, visual-only model (same backbone, same split, same training
settings, exits ``slvit@2`` and ``slvit@4``, a visual-only cloud) is trained
beside it as the deployment that has no microphone at all.

Then, on the held-out TEST split (the generator's 15%, never used to train
or pick anything):

(a) per exit: MAE overall and in bright, dim and dark scenes, the mean
    predicted standard deviation (the exit's own confidence score), the
    same two on the training split (how far each head overfits), params
    and MACs (the exit alone, and everything it needs to answer on its own);
(b) the MAE-cost trade-off of a policy that walks a list of exits in order
    and lets a sample leave at the first exit whose predicted std is at most
    ONE threshold shared by all its exits, swept over a grid (quantiles of the
    exits' predicted std on the validation split); samples no exit takes go
    to the final head (the cloud). Policies: ``ladder`` (audio, then visual,
    then fused: the audiovisual deployment default), ``ladder-lean`` (the
    ladder without the visual rung), ``visual`` (the audiovisual model's
    visual-only exits, then its audiovisual cloud: the baseline the targets
    name) and ``visual-model`` (the visual-only model end to end).

    Cost per sample is the MACs actually spent on the walk, as ``EdgeHalf``
    runs it: the audio encoder once an exit (or the cloud, for offloaded
    samples) needs audio tokens, visual blocks only once a visual or fused
    exit is reached, every exit tried, and for offloaded samples the rest of
    the edge and the cloud's tail (``macs_lazy_audio``; the verdict uses it).
    ``macs`` charges the audio encoder to every sample up front, as an edge
    that always encodes the clip on arrival would (and as ``EdgeHalf`` did
    before it encoded lazily). Latency is
    measured too: ``EdgeHalf.run`` over the test set in batches, then
    ``CloudHalf.run`` on each batch's survivors; wall time per sample, the
    fastest of a few rounds that interleave all operating points, same
    process, same cores.

Prints the tables and a verdict for the two targets, writes JSON and a plot
to bench/results/.

    python -m bench.multimodal            # full run, 10-20 min on 2 cores
    python -m bench.multimodal --quick    # smoke run on 300 scenes, under a minute
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from offramp.core.checkpoint import Card, load_checkpoint, save_checkpoint
from offramp.core.data import DataSplits
from offramp.core.data.crowd import CROWD_SPEC, CrowdSet, load_crowd
from offramp.core.exit_rule import always_leave, answer_costs, walk
from offramp.core.models import MultiExitModel
from offramp.core.models.cost import count_macs, count_params
from offramp.training.pipeline import TrainJob, build_model
from offramp.training.plots import pyplot
from offramp.core.tables import format_table
from offramp.core.halves import CloudHalf, EdgeHalf
from offramp.core.hostinfo import machine
from offramp.training.train import HeadResult, TrainConfig, evaluate, train_backbone, train_exits

RESULTS = Path(__file__).parent / "results"
VARIANT = "vit_micro_32"
SPLIT = 4  # the edge runs blocks [0, 4) and audio joins the backbone there
EXITS = "slvit@0:audio,slvit@2,slvit@2:fused,slvit@4,slvit@4:fused"
VISUAL_EXITS = "slvit@2,slvit@4"
# policy -> (which model, the exits it walks, in order)
POLICIES = {
    "ladder": ("audiovisual", ["slvit@0:audio", "slvit@2", "slvit@2:fused", "slvit@4:fused"]),
    "ladder-lean": ("audiovisual", ["slvit@0:audio", "slvit@2:fused", "slvit@4:fused"]),
    "visual": ("audiovisual", ["slvit@2", "slvit@4"]),
    "visual-model": ("visual", ["slvit@2", "slvit@4"]),
}
BASELINE = "visual"
SCORE = "std"
MAE_TOLERANCE = 0.01  # a ladder point "reaches" a visual-only point's MAE within 1% of it
log = logging.getLogger("bench.multimodal")


@dataclass(frozen=True)
class Settings:
    scenes: int
    seed: int
    train: TrainConfig
    copycat: bool  # hard copycat fine-tuning of the exits after the label phase
    quantiles: int  # threshold grid: this many quantiles of the validation std, plus "all offload" and "no offload"
    batch_size: int  # latency: samples per EdgeHalf.run call
    reps: int  # latency: rounds over all operating points (the fastest is kept, the median beside it)


def settings(args: argparse.Namespace) -> Settings:
    base = TrainConfig(batch_size=128, lr=2e-3, exit_lr=2e-3, augment=False, flip=False, progress=False,
                       seed=args.seed)
    if args.quick:
        return Settings(scenes=args.scenes or 300, seed=args.seed, train=replace(base, epochs=2, exit_epochs=1,
                        copycat_epochs=1, batch_size=64), copycat=args.copycat, quantiles=6, batch_size=64, reps=1)
    return Settings(scenes=args.scenes or 3000, seed=args.seed,
                    train=replace(base, epochs=args.epochs, exit_epochs=args.exit_epochs, copycat_epochs=3),
                    copycat=args.copycat, quantiles=16, batch_size=64, reps=5)


# ---------------------------------------------------------------- model

def splits_of(crowd: CrowdSet, audio: bool = True) -> DataSplits:
    """Train/val as the pipeline wants them: (image, audio, count), or (image, count) for the visual-only
    model; the lighting is kept aside for analysis."""
    take = (0, 1, 2) if audio else (0, 2)
    return DataSplits(train=TensorDataset(*(crowd.train.tensors[i] for i in take)),
                      val=TensorDataset(*(crowd.val.tensors[i] for i in take)), label_names=["count"],
                      input_shape=crowd.image_shape, modality="audiovisual" if audio else "image", spec=crowd.spec,
                      task="regression", audio_shape=crowd.audio_shape if audio else None)


def train_model(data: DataSplits, exits: str, s: Settings, checkpoint: Path | None
                ) -> tuple[MultiExitModel, dict[str, float]]:
    """Backbone (with the audio encoder, audiovisual) for ``s.train.epochs``, then the exits on labels."""
    torch.manual_seed(s.seed)
    model, split = build_model(TrainJob(data=data.spec, model=VARIANT, exits=exits, split_block=SPLIT, seed=s.seed),
                               data)
    assert split == SPLIT and (model.config.audio is None or model.config.audio.fuse_at == SPLIT)
    t0 = time.time()
    log.info("training %s %s on %d scenes (backbone %d epochs)", data.modality, VARIANT, len(data.train),
             s.train.epochs)
    train_backbone(model, data.train, s.train)
    seconds = {"backbone": time.time() - t0}
    log.info("backbone done in %.0f s; exits %s, %d epochs", seconds["backbone"], exits, s.train.exit_epochs)
    t0 = time.time()
    train_exits(model, data.train, s.train, targets="labels")
    seconds["exits"] = time.time() - t0
    if s.copycat:
        t0 = time.time()
        train_exits(model, data.train, s.train, targets="hard", epochs=s.train.copycat_epochs)
        seconds["copycat"] = time.time() - t0
    if checkpoint is not None:
        save_checkpoint(checkpoint, model, Card(
            config=model.config, label_names=data.label_names, modality=data.modality, input_shape=data.input_shape,
            split_block=SPLIT, data={"spec": data.spec, "seed": s.seed}, metrics={}))
        log.info("checkpoint saved to %s", checkpoint)
    return model, {k: round(v, 1) for k, v in seconds.items()}


def reuse_model(directory: Path, data: DataSplits, seed: int) -> MultiExitModel:
    model, card = load_checkpoint(directory)
    if card.data.get("spec") != data.spec or card.data.get("seed") != seed or card.modality != data.modality:
        raise SystemExit(f"{directory} holds a {card.modality} model trained on {card.data}, "
                         f"not {data.modality} on {data.spec} seed {seed}")
    return model


# ---------------------------------------------------------------- costs

@torch.no_grad()
def unit_costs(model: MultiExitModel, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """MACs per sample of each piece the walk may run: audio encoder, visual blocks up to p, each exit, the tail."""
    bb = model.backbone
    x = torch.zeros(1, *input_shape)
    audio = torch.zeros(1, *model.config.audio.input_shape) if model.audiovisual else None
    audio_tokens = model.encode_audio(audio)
    visual = {p: count_macs(lambda t, p=p: bb.head(t, p), x) for p in range(SPLIT + 1)}
    feats = bb.head(x, SPLIT)
    exits = {}
    for i, e in enumerate(model.exit_configs):
        f = bb.head(x, e.position)
        exits[e.name] = {"macs": count_macs(lambda t, i=i: model.run_exit(i, t, audio_tokens), f),
                         "params": count_params(model.exits[i])}
    av = model.audiovisual
    c = {"audio_encoder": count_macs(model.audio_encoder, audio) if av else 0, "visual_to": visual, "exits": exits,
         "tail": count_macs(lambda t, *a: model.tail(t, SPLIT, *a), feats, *([audio_tokens] if av else [])),
         "final": count_macs(model.final, x, audio) if av else count_macs(model.final, x),
         "audio_encoder_params": count_params(model.audio_encoder) if av else 0,
         "trunk_params": count_params(model) - count_params(model.exits)}
    parts = c["audio_encoder"] + visual[SPLIT] + c["tail"]
    if abs(parts - c["final"]) > 0.01 * c["final"]:
        log.warning("audio encoder + edge blocks + tail = %d MACs, the whole final pass %d", parts, c["final"])
    return c


def standalone_macs(costs: dict[str, Any], model: MultiExitModel, name: str) -> int:
    """What one exit costs when it is the only one the edge runs: its inputs' compute plus the exit."""
    e = next(e for e in model.exit_configs if e.name == name)
    visual_to = costs["visual_to"]
    return answer_costs([e], [costs["exits"][name]["macs"]], lambda p: visual_to[p], costs["audio_encoder"])[0]


def walk_costs(costs: dict[str, Any], model: MultiExitModel, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """MACs per sample by where it leaves: (len(names) + 1,) with the last for offloaded, with the audio
    encoded first for every sample, and the same with the audio encoder charged only once a step needs
    audio tokens (as ``EdgeHalf`` runs it)."""
    by_name = {e.name: e for e in model.exit_configs}
    exits = [by_name[name] for name in names]
    exit_macs = [costs["exits"][name]["macs"] for name in names]
    audio, visual_to = costs["audio_encoder"], costs["visual_to"]
    eager = [audio + macs for macs in answer_costs(exits, exit_macs, lambda p: visual_to[p])]
    lazy = answer_costs(exits, exit_macs, lambda p: visual_to[p], audio)
    offload = audio + visual_to[SPLIT] + sum(exit_macs) + costs["tail"]
    return np.array([*eager, offload], dtype=np.float64), np.array([*lazy, offload], dtype=np.float64)


# ---------------------------------------------------------------- accuracy

def _mae(err: np.ndarray) -> float | None:
    return float(err.mean()) if len(err) else None


def exit_table(model: MultiExitModel, results: list[HeadResult], lighting: np.ndarray, names: list[str],
               costs: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        if r.name == "final":
            row = {"exit": "final", "position": model.num_blocks,
                   "modality": "fused (cloud)" if model.audiovisual else "visual (cloud)",
                   "params": costs["trunk_params"], "macs": costs["final"], "macs_standalone": costs["final"]}
        else:
            e = next(e for e in model.exit_configs if e.name == r.name)
            row = {"exit": r.name, "position": e.position, "modality": e.modality,
                   "params": costs["exits"][r.name]["params"], "macs": costs["exits"][r.name]["macs"],
                   "macs_standalone": standalone_macs(costs, model, r.name)}
        row["mae"] = _mae(r.error)
        row["rmse"] = float(np.sqrt((r.error ** 2).mean()))
        row["mae_by_lighting"] = {n: _mae(r.error[lighting == k]) for k, n in enumerate(names)}
        row["std_by_lighting"] = {n: _mae(r.confidence[lighting == k]) for k, n in enumerate(names)}
        rows.append(row)
    return rows


def paired_bootstrap(a: np.ndarray, b: np.ndarray, seed: int, n: int = 2000) -> tuple[float, float] | None:
    """95% interval of mean(a - b) over resampled samples (a, b: per-sample errors of two heads)."""
    d = a - b
    if len(d) == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, len(d), (n, len(d)))
    means = d[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


# ---------------------------------------------------------------- policies

def thresholds_for(val: dict[str, HeadResult], names: list[str], quantiles: int) -> list[float]:
    """0 (everything offloaded), quantiles of the exits' predicted std on validation, inf (nothing offloaded)."""
    stds = np.concatenate([val[n].confidence for n in names])
    qs = np.quantile(stds, np.linspace(0.0, 1.0, quantiles + 2)[1:-1])
    return [0.0, *sorted({float(f"{q:.4g}") for q in qs}), always_leave(SCORE)]


def policy_curve(test: dict[str, HeadResult], names: list[str], thresholds: list[float], lighting: np.ndarray,
                 light_names: list[str], macs: tuple[np.ndarray, np.ndarray]) -> list[dict[str, Any]]:
    heads = [*names, "final"]
    confidences = np.stack([test[n].confidence for n in names])
    errors = np.stack([test[h].error for h in heads])
    points = []
    for t in thresholds:
        walked = walk(confidences, [t] * len(names), SCORE)
        err = walked.answers(errors)
        points.append({
            "threshold": t if math.isfinite(t) else "inf",
            "mae": float(err.mean()),
            "mae_by_lighting": {n: _mae(err[lighting == k]) for k, n in enumerate(light_names)},
            "shares": dict(zip(heads, walked.shares())),
            "macs": walked.mean_cost(macs[0]),
            "macs_lazy_audio": walked.mean_cost(macs[1]),
        })
    return points


@torch.no_grad()
def measure_latency(policies: dict[str, tuple[MultiExitModel, list[str], list[float]]], data: TensorDataset,
                    batch_size: int, reps: int) -> dict[str, list[dict[str, Any]]]:
    """Wall time per sample of EdgeHalf.run + CloudHalf.run on the survivors, over the whole test set.

    Every operating point of every policy is timed once per round, ``reps`` rounds, so that a neighbour
    loading the CPU for a while slows all of them alike; the minimum over rounds (the least disturbed
    pass) is what the comparison uses, the median is kept beside it.
    """
    halves = {name: (EdgeHalf(model, SPLIT, exits=names), CloudHalf(model, SPLIT))
              for name, (model, names, _) in policies.items()}
    x_all, a_all, y_all = data.tensors[:3]
    n = len(x_all)
    chunks = [(x_all[i:i + batch_size], a_all[i:i + batch_size]) for i in range(0, n, batch_size)]

    def once(name: str, t: float) -> tuple[float, np.ndarray, np.ndarray]:
        edge, cloud = halves[name]
        preds, exited = [], []
        t0 = time.perf_counter()
        for x, a in chunks:
            r = edge.run(x, [t] * edge.num_exits, SCORE, audio=a if edge.model.audiovisual else None)
            pred = r.output[:, 0].clone()
            if len(r.offload):
                out = cloud.run(r.tokens, r.audio_tokens)
                pred[r.offload] = out[:, 0]
            preds.append(pred)
            exited.append(r.exit_index)
        return (time.perf_counter() - t0) / n, torch.cat(preds).numpy(), torch.cat(exited).numpy()

    for name in halves:  # warm-up
        once(name, math.inf)
        once(name, 0.0)
    times: dict[tuple[str, int], list[float]] = {}
    answers: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    for _ in range(reps):
        for name, (_, _, thresholds) in policies.items():
            for k, t in enumerate(thresholds):
                sec, pred, exited = once(name, t)
                times.setdefault((name, k), []).append(sec)
                answers[name, k] = pred, exited
    out: dict[str, list[dict[str, Any]]] = {}
    for name, (_, _, thresholds) in policies.items():
        out[name] = []
        for k, t in enumerate(thresholds):
            pred, exited = answers[name, k]
            out[name].append({"threshold": t if math.isfinite(t) else "inf",
                              "ms_per_sample": 1e3 * min(times[name, k]),
                              "ms_per_sample_median": 1e3 * float(np.median(times[name, k])),
                              "mae_measured": float(np.abs(pred - y_all.numpy()).mean()),
                              "offloaded": float((exited < 0).mean())})
    return out


def compare(baseline: list[dict[str, Any]], other: list[dict[str, Any]], key: str, base_key: str
            ) -> list[dict[str, Any]]:
    """For each baseline point: the cheapest ``other`` point whose MAE is within the tolerance of it."""
    rows = []
    for b in baseline:
        ok = [p for p in other if p["mae"] <= b["mae"] * (1 + MAE_TOLERANCE)]
        best = min(ok, key=lambda p: p[key]) if ok else None
        rows.append({"baseline_threshold": b["threshold"], "baseline_mae": b["mae"], "baseline_cost": b[base_key],
                     "match_threshold": None if best is None else best["threshold"],
                     "match_mae": None if best is None else best["mae"],
                     "match_cost": None if best is None else best[key],
                     "ratio": None if best is None else best[key] / b[base_key]})
    return rows


# ---------------------------------------------------------------- verdicts

def verdicts(exits: list[dict[str, Any]], test: dict[str, HeadResult], lighting: np.ndarray, dark: int,
             comparison: dict[str, list[dict[str, Any]]], best_points: dict[str, list[dict[str, Any]]],
             seed: int) -> dict[str, Any]:
    by = {r["exit"]: r for r in exits}
    fused_rows = []
    for p in sorted({r["position"] for r in exits if r["modality"] == "fused"}):
        v, f = f"slvit@{p}", f"slvit@{p}:fused"
        mask = lighting == dark
        ci = paired_bootstrap(test[v].error[mask], test[f].error[mask], seed)
        mv, mf = by[v]["mae_by_lighting"]["dark"], by[f]["mae_by_lighting"]["dark"]
        fused_rows.append({"position": p, "visual_dark_mae": mv, "fused_dark_mae": mf,
                           "reduction": None if not mv else 1 - mf / mv, "diff_ci95": ci and list(ci),
                           "clearly_lower": ci is not None and ci[0] > 0})
    target1 = {"rule": "at every position, the paired-bootstrap 95% interval of (visual MAE - fused MAE) in dark "
                       "test scenes lies above zero",
               "met": all(r["clearly_lower"] for r in fused_rows), "positions": fused_rows}
    target2 = {"rule": f"for most visual-only operating points, the cheapest ladder point with MAE within "
                       f"{MAE_TOLERANCE:.0%} of it costs fewer MACs (visual-only costed with audio encoded only for "
                       "offloaded samples)", **_summary(comparison["strict"])}
    target2["met"] = target2["matched"] > 0 and target2["ladder_cheaper"] > target2["points"] / 2
    best = {k: min(v, key=lambda p: p["mae"]) for k, v in best_points.items()}
    target2["best"] = {k: {"threshold": p["threshold"], "mae": p["mae"], "macs": p["macs"],
                           "macs_lazy_audio": p["macs_lazy_audio"]} for k, p in best.items()}
    target2["audio_up_front"] = _summary(comparison["eager"])
    target2["latency"] = _summary(comparison["latency"])
    target2["against_visual_model"] = {"macs": _summary(comparison["visual_model"]),
                                       "latency": _summary(comparison["visual_model_latency"])}
    return {"fused_beats_visual_in_dark": target1, "ladder_cheaper_at_same_mae": target2}


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How many baseline points the ladder matches, at how many it is cheaper, and the median cost ratio."""
    matched = [r for r in rows if r["ratio"] is not None]
    cheaper = [r for r in matched if r["ratio"] < 1]
    return {"points": len(rows), "matched": len(matched), "ladder_cheaper": len(cheaper),
            "median_ratio": float(np.median([r["ratio"] for r in matched])) if matched else None,
            "cheaper_mae_range": [min(r["baseline_mae"] for r in cheaper), max(r["baseline_mae"] for r in cheaper)]
            if cheaper else None}


# ---------------------------------------------------------------- output

def _m(macs: float) -> str:
    return f"{macs / 1e6:.2f}M"


def _short(summary: dict[str, Any]) -> str:
    ratio = summary["median_ratio"]
    return (f"ladder cheaper at {summary['ladder_cheaper']}/{summary['matched']} matched points, median ratio "
            + ("-" if ratio is None else f"{ratio:.2f}"))


def print_tables(result: dict[str, Any]) -> None:
    names = result["lighting_names"]
    print(f"\n{result['data']}: {result['train_samples']} train / {result['val_samples']} val / "
          f"{result['test_samples']} test scenes; {VARIANT}, audio fused at block {SPLIT} (the split)")
    print(format_table(["model", "exit", "pos", "modality", "MAE", *[f"MAE {n}" for n in names], "std", "MAE train",
                        "std train", "params", "exit MACs", "MACs alone"],
                       [[model, r["exit"], r["position"], r["modality"], r["mae"],
                         *[r["mae_by_lighting"][n] for n in names], r["std"], r["mae_train"], r["std_train"],
                         r["params"], r["macs"], r["macs_standalone"]]
                        for model, rows in (("audiovisual", result["exits"]),
                                            ("visual-only", result["visual_model"]["exits"])) for r in rows]))
    c = result["costs"]
    print(f"(audio encoder {c['audio_encoder'] / 1e6:.2f}M MACs, {c['audio_encoder_params']} params; visual blocks "
          + ", ".join(f"to {p}: {v / 1e6:.2f}M" for p, v in c["visual_to"].items() if p) + f"; cloud tail "
          f"{c['tail'] / 1e6:.2f}M; MACs alone = what an exit needs when it is the only one on the edge)")
    for name, pol in result["policies"].items():
        print(f"\npolicy {name} ({pol['model']} model): {' -> '.join(pol['exits'])} -> cloud "
              "(one std threshold for all exits)")
        lat = {str(p["threshold"]): p for p in pol["latency"]}
        print(format_table(["std thr", *[h.split("slvit")[-1] or h for h in pol["points"][0]["shares"]], "MAE",
                            "MAE dark", "MACs", "MACs lazy audio", "ms/sample"],
                           [[str(p["threshold"]), *[f"{s:.0%}" for s in p["shares"].values()], p["mae"],
                             p["mae_by_lighting"]["dark"], _m(p["macs"]), _m(p["macs_lazy_audio"]),
                             lat.get(str(p["threshold"]), {}).get("ms_per_sample", math.nan)]
                            for p in pol["points"]]))
    print(f"\nladder vs visual-only at the same MAE (within {MAE_TOLERANCE:.0%}): cheapest ladder point per "
          "visual-only point")
    print(format_table(["visual thr", "visual MAE", "visual MACs", "ladder thr", "ladder MAE", "ladder MACs", "ratio",
                        "ratio (ms)"],
                       [[str(r["baseline_threshold"]), r["baseline_mae"], _m(r["baseline_cost"]),
                         str(r["match_threshold"] if r["match_threshold"] is not None else "-"),
                         r["match_mae"] if r["match_mae"] is not None else "-",
                         _m(r["match_cost"]) if r["match_cost"] is not None else "-",
                         r["ratio"] if r["ratio"] is not None else "-",
                         lr["ratio"] if lr["ratio"] is not None else "-"]
                        for r, lr in zip(result["comparison"]["strict"], result["comparison"]["latency"])]))
    t1 = result["verdict"]["fused_beats_visual_in_dark"]
    print("\ntarget 1, fused exit clearly better than the visual exit in dark scenes: "
          + ("MET" if t1["met"] else "MISSED") + " -- " + "; ".join(
              f"@{r['position']}: visual {r['visual_dark_mae'] or math.nan:.2f} "
              f"vs fused {r['fused_dark_mae'] or math.nan:.2f} "
              f"({(r['reduction'] or 0):.0%} lower, 95% CI of the gap "
              f"[{(r['diff_ci95'] or [math.nan])[0]:.2f}, {(r['diff_ci95'] or [0, math.nan])[1]:.2f}])"
              for r in t1["positions"]))
    t2 = result["verdict"]["ladder_cheaper_at_same_mae"]
    eager = t2["audio_up_front"]
    print("target 2, ladder reaches the visual-only policy's MAE at lower mean cost: "
          + ("MET" if t2["met"] else "MISSED") + f" -- cheaper at {t2['ladder_cheaper']} of {t2['points']} "
          f"visual-only points ({t2['matched']} reachable), median MACs ratio "
          + (f"{t2['median_ratio']:.2f}" if t2["median_ratio"] is not None else "-")
          + f"; with audio encoded up front {eager['ladder_cheaper']}/{eager['matched']}"
          f", measured latency {_short(t2['latency'])}; against the separately trained visual-only model: MACs "
          f"{_short(t2['against_visual_model']['macs'])}, latency {_short(t2['against_visual_model']['latency'])}")
    print("most accurate point of each: " + "; ".join(
        f"{k} MAE {p['mae']:.3f} at {_m(p['macs'])} (thr {p['threshold']})" for k, p in t2["best"].items()))


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    names = result["lighting_names"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    ax = axes[0]
    rows = result["exits"] + [{**r, "exit": "V-only " + r["exit"]} for r in result["visual_model"]["exits"]]
    width = 0.8 / len(names)
    for k, n in enumerate(names):
        ax.bar(np.arange(len(rows)) + (k - (len(names) - 1) / 2) * width,
               [r["mae_by_lighting"][n] or 0 for r in rows], width, label=n)
    ax.set_xticks(np.arange(len(rows)), [r["exit"].replace("slvit", "") for r in rows], rotation=30, fontsize=8)
    ax.set_ylabel("test MAE (people)")
    ax.set_title("MAE by exit and lighting")
    ax.legend(fontsize=8)
    styles = {"ladder": ("o-", "C0"), "ladder-lean": ("s--", "C2"), "visual": ("^-", "C3"),
              "visual-model": ("v-.", "C1")}
    batch = result["settings"]["batch_size"]
    for ax, key, label in [(axes[1], "macs", "mean MACs per sample (millions)"),
                           (axes[2], "ms_per_sample", f"measured ms per sample (batches of {batch})")]:
        for name, pol in result["policies"].items():
            style, colour = styles.get(name, ("x-", None))
            if key == "macs":
                xs = [p["macs"] / 1e6 for p in pol["points"]]
                ys = [p["mae"] for p in pol["points"]]
                if name == BASELINE:
                    ax.plot([p["macs_lazy_audio"] / 1e6 for p in pol["points"]], ys, ":", color=colour, alpha=0.7,
                            label=f"{name} (audio only when offloaded)")
            else:
                xs = [p["ms_per_sample"] for p in pol["latency"]]
                ys = [p["mae_measured"] for p in pol["latency"]]
            ax.plot(xs, ys, style, color=colour, label=name, ms=4)
        ax.axhline(next(r["mae"] for r in rows if r["exit"] == "final"), color="gray", ls="--", lw=1,
                   label="audiovisual final head (cloud)")
        ax.set_xlabel(label)
        ax.set_ylabel("test MAE (people)")
        ax.legend(fontsize=8)
    axes[1].set_title("MAE vs compute: one std threshold swept")
    axes[2].set_title("MAE vs measured latency (edge + cloud, same CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench.multimodal", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 300 scenes, 2 + 1 epochs, under a minute")
    ap.add_argument("--scenes", type=int, default=None, help="crowd-av scenes to generate (default 3000; quick 300)")
    ap.add_argument("--seed", type=int, default=0, help="scene and training seed")
    ap.add_argument("--epochs", type=int, default=60, help="backbone epochs (full run)")
    ap.add_argument("--exit-epochs", type=int, default=20, help="exit epochs on labels (full run)")
    ap.add_argument("--copycat", action="store_true", help="then fine-tune the exits on the final head's answers")
    ap.add_argument("--out", default=None, help="JSON output (default bench/results/multimodal[-quick].json)")
    ap.add_argument("--checkpoints", default="runs/bench-multimodal",
                    help="where to save the trained models ('' for nowhere); a quick/ or full/ folder under it")
    ap.add_argument("--reuse", action="store_true", help="evaluate the models saved there instead of training")
    args = ap.parse_args(argv)
    if args.reuse and not args.checkpoints:
        ap.error("--reuse needs --checkpoints")
    return args


def obtain_models(data: dict[str, Any], s: Settings, ckpt: Path | None, reuse: bool
                  ) -> tuple[dict[str, MultiExitModel], dict[str, dict[str, float]]]:
    """The audiovisual model and the visual-only one: trained (and saved under ``ckpt``), or read back."""
    models: dict[str, MultiExitModel] = {}
    train_seconds: dict[str, dict[str, float]] = {}
    for key, exits_spec in (("audiovisual", EXITS), ("visual", VISUAL_EXITS)):
        where = None if ckpt is None else ckpt / key
        if reuse:
            models[key] = reuse_model(where, data[key], s.seed)
        else:
            models[key], train_seconds[key] = train_model(data[key], exits_spec, s, where)
    return models, train_seconds


@dataclass
class Evaluated:
    """Every head of each model on the test and validation splits, its costs, and the exit table."""

    test: dict[str, dict[str, Any]]
    val: dict[str, dict[str, Any]]
    costs: dict[str, Any]
    exit_rows: dict[str, list[dict[str, Any]]]


def evaluate_models(models: dict[str, MultiExitModel], data: dict[str, Any], test_sets: dict[str, TensorDataset],
                    crowd: Any, lighting: np.ndarray, names: list[str]) -> Evaluated:
    e = Evaluated({}, {}, {}, {})
    for key, model in models.items():
        model.eval()
        e.test[key] = {r.name: r for r in evaluate(model, test_sets[key])}
        e.val[key] = {r.name: r for r in evaluate(model, data[key].val)}
        e.costs[key] = unit_costs(model, crowd.image_shape)
        e.exit_rows[key] = exit_table(model, list(e.test[key].values()), lighting, names, e.costs[key])
        for row, r in zip(e.exit_rows[key], evaluate(model, data[key].train)):  # how far each head overfits
            row["mae_train"] = float(r.error.mean())
            row["std_train"] = float(r.confidence.mean())
        for row, r in zip(e.exit_rows[key], e.test[key].values()):
            row["std"] = float(r.confidence.mean())
    return e


def measure_policies(models: dict[str, MultiExitModel], e: Evaluated, test_set: TensorDataset, s: Settings,
                     lighting: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Each policy's thresholds (chosen on validation), its accuracy-cost curve on test, and its latency."""
    policies = {}
    for name, (key, chosen) in POLICIES.items():
        thresholds = thresholds_for(e.val[key], chosen, s.quantiles)
        macs = walk_costs(e.costs[key], models[key], chosen)
        policies[name] = {"model": key, "exits": chosen, "thresholds": thresholds,
                          "walk_macs": {"eager": macs[0].tolist(), "lazy_audio": macs[1].tolist()},
                          "points": policy_curve(e.test[key], chosen, thresholds, lighting, names, macs)}
    latency = measure_latency({k: (models[v["model"]], v["exits"], v["thresholds"]) for k, v in policies.items()},
                              test_set, s.batch_size, s.reps)
    for name, pol in policies.items():
        pol["latency"] = latency[name]
        pol["thresholds"] = [t if math.isfinite(t) else "inf" for t in pol["thresholds"]]
        for p, q in zip(pol["points"], pol["latency"]):
            p["ms_per_sample"] = q["ms_per_sample"]
            if abs(p["mae"] - q["mae_measured"]) > 1e-3 * max(1.0, p["mae"]):
                log.warning("policy %s thr %s: walk MAE %.4f, EdgeHalf+CloudHalf MAE %.4f", name,
                            p["threshold"], p["mae"], q["mae_measured"])
    return policies


def compare_policies(policies: dict[str, Any]) -> dict[str, Any]:
    ladder = policies["ladder"]["points"]
    base, vmodel = policies[BASELINE]["points"], policies["visual-model"]["points"]
    return {"strict": compare(base, ladder, "macs", "macs_lazy_audio"),
            "eager": compare(base, ladder, "macs", "macs"),
            "latency": compare(base, ladder, "ms_per_sample", "ms_per_sample"),
            "visual_model": compare(vmodel, ladder, "macs", "macs"),
            "visual_model_latency": compare(vmodel, ladder, "ms_per_sample", "ms_per_sample")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    s = settings(args)
    out = Path(args.out) if args.out else RESULTS / ("multimodal-quick.json" if args.quick else "multimodal.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.checkpoints) / ("quick" if args.quick else "full") if args.checkpoints else None
    t_start = time.time()
    prev_grad = torch.is_grad_enabled()
    try:
        t0 = time.time()
        crowd = load_crowd(s.scenes, s.seed)
        data = {"audiovisual": splits_of(crowd), "visual": splits_of(crowd, audio=False)}
        gen_seconds = round(time.time() - t0, 1)
        log.info("generated %d synthetic scenes in %.0f s", s.scenes, gen_seconds)
        models, train_seconds = obtain_models(data, s, ckpt, args.reuse)
        torch.set_grad_enabled(False)
        names = list(crowd.lighting_names)
        lighting = crowd.test.tensors[3].numpy()
        test_sets = {"audiovisual": TensorDataset(*crowd.test.tensors[:3]),
                     "visual": TensorDataset(crowd.test.tensors[0], crowd.test.tensors[2])}
        e = evaluate_models(models, data, test_sets, crowd, lighting, names)
        t0 = time.time()
        policies = measure_policies(models, e, test_sets["audiovisual"], s, lighting, names)
        latency_seconds = round(time.time() - t0, 1)
        comparison = compare_policies(policies)
        points = {"ladder": policies["ladder"]["points"], BASELINE: policies[BASELINE]["points"],
                  "visual-model": policies["visual-model"]["points"]}
        result = {
            "command": " ".join(["python -m bench.multimodal", *(argv if argv is not None else sys.argv[1:])]),
            "machine": {**machine(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()},
            "data": crowd.spec if crowd.spec != CROWD_SPEC else f"{CROWD_SPEC} (3000 scenes)",
            "synthetic": True, "seed": s.seed,
            "settings": {**{k: v for k, v in asdict(s).items() if k != "train"}, "train": asdict(s.train)},
            "backbone": VARIANT, "exits_trained": EXITS, "split_block": SPLIT,
            "train_samples": len(crowd.train), "val_samples": len(crowd.val), "test_samples": len(crowd.test),
            "lighting_names": names,
            "test_lighting_counts": {n: int((lighting == k).sum()) for k, n in enumerate(names)},
            "costs": e.costs["audiovisual"], "exits": e.exit_rows["audiovisual"],
            "visual_model": {"exits_trained": VISUAL_EXITS, "costs": e.costs["visual"],
                             "exits": e.exit_rows["visual"]},
            "policies": policies, "comparison": comparison,
            "verdict": verdicts(e.exit_rows["audiovisual"], e.test["audiovisual"], lighting, names.index("dark"),
                                comparison, points, s.seed),
            "seconds": {"generate": gen_seconds, **{f"train_{k}": v for k, v in train_seconds.items()},
                        "policies_and_latency": latency_seconds, "total": round(time.time() - t_start, 1)},
        }
    finally:
        torch.set_grad_enabled(prev_grad)
    print_tables(result)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
