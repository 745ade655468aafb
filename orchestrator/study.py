"""Timelines of points whose conditions change while they run: per phase, per second, per policy.

A phase is a stretch of constant conditions: it ends where any edge's link schedule steps or the
``[cloud_load]`` rate changes. Per point and phase the summary gives ``p95_ms``, the measured
``accuracy`` of the answered requests (with its 95 % interval: a few hundred requests do not resolve a
point), ``accuracy_replayed`` (what the route and thresholds in force for each request score on the whole
validation split by its true labels, with its 95 % interval: ``orchestrator.replay``; never the
controller's own expectation) and ``offload_share``. Per point, ``p95_within_target_share`` is the share of windows of
``edge.slo_window_s`` (one second by default: as the edge judges its target), those starting within
``settle_s`` of a change left out, whose p95 met ``edge.latency_slo_ms``;
a request never answered counts as infinitely slow. ``plot`` draws the per-second timelines.

Every number comes from ``records.parquet``, ``policy.json`` and ``calibration.json``, so it can be
recomputed from them.
"""
from __future__ import annotations

import math
import shlex
import sys
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from offramp.core.hostinfo import machine
from offramp.netem import Schedule
from offramp.training.plots import pyplot

from .config import ExperimentConfig, LinkSpec
from .replay import interval
from .workload import Record

WINDOW_S = 1.0  # the timelines' window when the edge judges its target over all requests (slo_window_s 0)
TAIL = 0.95


def has_timelines(config: ExperimentConfig) -> bool:
    """Whether the experiment's points change conditions (a link schedule, a cloud load) or let edges choose."""
    specs = [s for spec in config.sweep.profiles for s in (spec if isinstance(spec, tuple) else (spec,))]
    return (config.cloud_load.active or any(p != "fixed" for p in config.sweep.policies)
            or any(len(Schedule.parse(s).steps) > 1 for s in specs))


@dataclass(frozen=True)
class Phase:
    key: str  # "p2_3g+load": order, links, and whether the cloud load runs
    start_s: float
    end_s: float
    link: str
    cloud_load_rps: float


def phases(profile: LinkSpec, edges: int, cloud_steps: Sequence[tuple[float, float]], end_s: float) -> list[Phase]:
    """The stretches of constant link (every edge's) and cloud load of a point lasting ``end_s``."""
    specs = profile if isinstance(profile, tuple) else (profile,)
    schedules = [Schedule.parse(specs[i % len(specs)]) for i in range(edges)]
    changes = sorted({t for s in schedules for t, _ in s.steps} | {t for t, _ in cloud_steps} | {0.0})
    changes = [t for t in changes if t < end_s]
    out = []
    for i, (start, end) in enumerate(zip(changes, [*changes[1:], end_s])):
        link = " | ".join(dict.fromkeys(_at(s.steps, start).name for s in schedules))
        rate = _at(cloud_steps, start) if cloud_steps else 0.0
        out.append(Phase(f"p{i + 1}_{link.replace(' | ', '|')}" + ("+load" if rate > 0 else ""), start, end, link,
                         rate))
    return out


def _at(steps: Sequence[tuple[float, Any]], t: float) -> Any:
    """The value of a step schedule at time ``t``."""
    return steps[max(0, bisect_right([s for s, _ in steps], t) - 1)][1]


def tail(latencies: Sequence[float]) -> float:
    """Nearest-rank p95 (at or above), NaN (no answer) counting as infinitely slow; NaN for no requests."""
    if not latencies:
        return math.nan
    ordered = sorted(math.inf if math.isnan(v) else v for v in latencies)
    return ordered[min(len(ordered) - 1, math.ceil(TAIL * len(ordered)) - 1)]


class Study:
    """The policy study over the points of one experiment (see the module docstring)."""

    def __init__(self, config: ExperimentConfig, points: Sequence[Any], records: Sequence[Record],
                 policy: Sequence[dict[str, Any]], cloud_load: Sequence[Record], calibration: Any,
                 fixed: dict[int, tuple[float, ...]]) -> None:
        """``fixed``: the thresholds each fixed point ran with, by point index."""
        self.config = config
        self.fixed = fixed
        self.replay: Any = None  # orchestrator.replay.Replay, built when first needed (it evaluates the model)
        self.target = config.edge.controller.latency_slo_ms
        self.window_s = config.edge.controller.slo_window_s or WINDOW_S
        self.points = [p for p in points if p.variant == "system"]
        self.records: dict[int, list[Record]] = defaultdict(list)
        for r in records:
            self.records[r["point"]].append(r)
        self.polls: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
        for p in policy:
            self.polls[(p["point"], p["edge"])].append(p)
        self.cloud_load: dict[int, list[Record]] = defaultdict(list)
        for r in cloud_load:
            self.cloud_load[r["point"]].append(r)
        self.calibration = calibration
        w = config.workload
        self.end_s = w.duration_s if w.duration_s is not None else max(
            (r["sent_s"] for r in records), default=0.0)
        conditions = {(p.profile, p.codec, p.edges) for p in self.points}
        self.names = {p.index: self._name(p, len(conditions) > 1) for p in self.points}

    def _name(self, point: Any, qualify: bool) -> str:
        name = point.policy if point.policy != "fixed" else (
            "fixed" if point.thresholds == "calibrated" else f"fixed@{point.thresholds_label}")
        name = f"{name} [{point.profile_label}, {point.codec}, {point.edges} edges]" if qualify else name
        return f"{name} (run {point.repeat + 1})" if point.repeat else name

    def phases(self, point: Any) -> list[Phase]:
        return phases(point.profile, point.edges, self.config.cloud_load.steps, self.end_s)

    def replayed(self, point: Any, record: Record) -> float:
        """What the route and thresholds in force when ``record`` was sent score on the validation split."""
        if self.replay is None:
            from .replay import Replay

            self.replay = Replay(self.config, [p for polls in self.polls.values() for p in polls], self.fixed)
        return self.replay.accuracy(point.index, point.variant, record)

    def _metrics(self, point: Any, rows: list[Record]) -> dict[str, Any]:
        answered = [r for r in rows if r["status"] == "OK"]
        n = len(answered)
        acc = sum(r["correct"] for r in answered) / n if n else math.nan
        replayed = [self.replayed(point, r) for r in rows]
        splits = defaultdict(int)
        for r in rows:
            splits[self._split_at(point, r)] += 1
        return {
            "requests": len(rows), "answered": n,
            "p95_ms": tail([r["latency_ms"] for r in rows]),
            "mean_ms": float(np.mean([r["latency_ms"] for r in answered])) if n else math.nan,
            "accuracy": acc,
            "accuracy_ci95": 1.96 * math.sqrt(acc * (1 - acc) / n) if n else math.nan,
            "accuracy_replayed": float(np.mean(replayed)) if replayed else math.nan,
            "accuracy_replayed_ci95": interval(replayed, self.replay.samples) if replayed and self.replay else math.nan,
            "offload_share": sum(r["offloaded"] for r in rows) / len(rows) if rows else math.nan,
            "degraded_share": sum(r["degraded"] for r in rows) / len(rows) if rows else math.nan,
            "split_share": {str(k): v / len(rows) for k, v in sorted(splits.items())} if rows else {},
        }

    def _split_at(self, point: Any, record: Record) -> int:
        polls = self.polls.get((point.index, record["edge"]), [])
        before = [p for p in polls if p["t_s"] <= record["sent_s"]]
        return (before[-1] if before else polls[0])["split_block"] if polls else -1

    def windows(self, point: Any) -> list[dict[str, Any]]:
        """One row per one-second window: p95, measured and offline accuracy, offload share, judged or not."""
        rows = self.records[point.index]
        changes = [ph.start_s for ph in self.phases(point)]
        settle = self.config.study.settle_s
        out = []
        for k in range(int(self.end_s // self.window_s)):
            start = k * self.window_s
            mine = [r for r in rows if start <= r["sent_s"] < start + self.window_s]
            if not mine:
                continue
            answered = [r for r in mine if r["status"] == "OK"]
            p95 = tail([r["latency_ms"] for r in mine])
            out.append({"t_s": start, "requests": len(mine), "p95_ms": p95,
                        "accuracy": sum(r["correct"] for r in answered) / len(answered) if answered else math.nan,
                        "accuracy_replayed": float(np.mean([self.replayed(point, r) for r in mine])),
                        "offload_share": sum(r["offloaded"] for r in mine) / len(mine),
                        "judged": not any(c <= start < c + settle for c in changes),
                        "met": self.target is not None and p95 <= self.target})
        return out

    def summary(self, wall_s: float) -> dict[str, Any]:
        """The study's part of ``summary.json``: per policy and phase, the windows' verdict, the best fixed."""
        policies: dict[str, Any] = {}
        for point in self.points:
            rows = self.records[point.index]
            windows = self.windows(point)
            judged = [w for w in windows if w["judged"]]
            after_start = [w for w in windows if w["t_s"] >= self.config.study.settle_s]
            phase_rows = {ph.key: self._metrics(point, [r for r in rows if ph.start_s <= r["sent_s"] < ph.end_s])
                          for ph in self.phases(point)}
            policies[self.names[point.index]] = {
                "point": point.index, "policy": point.policy, "thresholds": point.thresholds_label,
                "profile": point.profile_label, "codec": point.codec, "edges": point.edges,
                "all": self._metrics(point, rows), "phases": phase_rows,
                "p95_within_target_share": (sum(w["met"] for w in judged) / len(judged)
                                            if judged and self.target else None),
                "windows_judged": len(judged),
                # Every window after the first settle_s, none left out after later changes: the stricter reading.
                "p95_within_target_share_every_window": (sum(w["met"] for w in after_start) / len(after_start)
                                                         if after_start and self.target else None),
                "windows": len(after_start),
            }
        return {"study": self._study_info(), "policies": policies, "best_fixed_meeting_target": self._best_fixed(policies),
                "command": "offramp " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "",
                "machine": machine(), "wall_s": round(wall_s, 1)}

    def _study_info(self) -> dict[str, Any]:
        point = self.points[0] if self.points else None
        cal = self.calibration
        return {
            "target_p95_ms": self.target, "settle_s": self.config.study.settle_s, "window_s": self.window_s,
            "phases": [vars(ph) for ph in self.phases(point)] if point else [],
            "cloud_load": self.config.cloud_load.schedule,
            "full_model_accuracy_validation": self.replay.full if self.replay is not None else None,
            "calibration": None if cal is None else {
                "accuracy_drop": self.config.study.accuracy_drop, "samples": cal.samples,
                "full_model_accuracy": cal.full_quality, "calibrated_thresholds": list(cal.chosen.thresholds),
                "calibrated_accuracy": cal.chosen.quality, "calibrated_offload": cal.chosen.offload},
            "cloud_load_answered": {self.names[p.index]: _load_stats(self.cloud_load.get(p.index, []))
                                    for p in self.points if self.cloud_load.get(p.index)},
        }

    def _best_fixed(self, policies: dict[str, Any]) -> dict[str, Any]:
        """Per phase, the fixed point of the best offline accuracy whose p95 met the target there."""
        best: dict[str, Any] = {}
        if self.target is None:
            return best
        fixed = {name: p for name, p in policies.items() if p["policy"] == "fixed"}
        for name, p in fixed.items():
            for key, ph in p["phases"].items():
                if ph["p95_ms"] <= self.target and (key not in best or
                                                    ph["accuracy_replayed"] > best[key]["accuracy_replayed"]):
                    best[key] = {"policy": name, "accuracy_replayed": ph["accuracy_replayed"],
                                 "accuracy": ph["accuracy"], "p95_ms": ph["p95_ms"]}
        return best

    def plot(self, folder: Path) -> list[Path]:
        """``policy_timeline.png``: per second, p95 against the target, accuracy, offload share, and the
        thresholds and split in force, one line per point, phases marked."""
        plt = pyplot()
        if plt is None:
            return []
        from .report import _save

        if not self.points:
            return []
        folder.mkdir(parents=True, exist_ok=True)
        fig, axes = plt.subplots(5, 1, figsize=(12, 15), sharex=True)
        for point in self.points:
            name = self.names[point.index]
            windows = self.windows(point)
            t = [w["t_s"] + self.window_s / 2 for w in windows]
            line, = axes[0].plot(t, [min(w["p95_ms"], 1e5) for w in windows], marker=".", label=name)
            color = line.get_color()
            axes[1].plot(t, [w["accuracy_replayed"] for w in windows], color=color, label=f"{name} (validation)")
            axes[1].plot(t, _rolling([w["accuracy"] for w in windows], 5), color=color, linestyle=":", alpha=0.7)
            axes[2].plot(t, [w["offload_share"] for w in windows], color=color, marker=".", label=name)
            polls = self.polls.get((point.index, 0), [])
            if polls:
                pt = [p["t_s"] for p in polls]
                for k in range(len(polls[0]["thresholds"])):
                    axes[3].step(pt, [min(max(p["thresholds"][k], -0.05) if len(p["thresholds"]) > k else math.nan,
                                          1.05) for p in polls], where="post", color=color,
                                 linestyle=("-", "--", ":")[k % 3], label=f"{name}, exit {k + 1}")
                axes[4].step(pt, [p["split_block"] for p in polls], where="post", color=color, label=name)
        if self.target is not None:
            axes[0].axhline(self.target, color="red", linestyle="--", label=f"target {self.target:g} ms")
        for ph in self.phases(self.points[0]):
            for ax in axes:
                ax.axvline(ph.start_s, color="grey", alpha=0.4)
            axes[0].annotate(ph.key.split("_", 1)[1], (ph.start_s, 1.0), xycoords=("data", "axes fraction"),
                             xytext=(3, -12), textcoords="offset points", fontsize=8)
        axes[0].set(ylabel="p95 per second (ms)", yscale="log",
                    title="per-second timelines (phases: link, +load = the second group of edges)")
        axes[1].set(ylabel="accuracy", title="solid: policy in force on the validation split; "
                                             "dotted: measured on the answered requests (5 s rolling)")
        axes[2].set(ylabel="offload share", ylim=(-0.03, 1.03))
        axes[3].set(ylabel="thresholds in force", ylim=(-0.1, 1.1),
                    title="edge 0's thresholds (max_prob; above 1: never leave, below 0: always)")
        axes[4].set(ylabel="split block", xlabel="arrival (s since the load started)")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper right")
        return [_save(fig, folder / "policy_timeline.png")]


def _rolling(values: list[float], n: int) -> list[float]:
    out = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i - n + 1):i + 1] if not math.isnan(v)]
        out.append(float(np.mean(window)) if window else math.nan)
    return out


def _load_stats(rows: list[Record]) -> dict[str, Any]:
    ok = [r["latency_ms"] for r in rows if r["status"] == "OK"]
    return {"requests": len(rows), "answered": len(ok), "p50_ms": float(np.median(ok)) if ok else math.nan,
            "p95_ms": tail(ok) if ok else math.nan}

