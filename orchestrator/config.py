"""Experiment files: TOML → frozen dataclasses, checked up front so a typo fails before Ray starts.

An experiment names a checkpoint, how the daemons run (``[edge]``, ``[cloud]``),
the load each edge receives (``[workload]``), the grid to sweep (``[sweep]``)
and the baselines run beside it (``[baselines]``)::

    name = "tradeoff"
    checkpoint = "../../runs/bench-exits/cifar10-vit"   # relative to this file

    [edge]
    slowdown = 8.0

    [workload]
    arrival = "poisson"
    rate = 20.0
    count = 500

    [sweep]
    thresholds = [0.7, 0.8, 0.9, [0.85, 0.95]]   # a number applies to every exit; a list is one per exit
    codecs = ["int8"]
    profiles = ["lan", "wifi", "lte", "3g", "wifi; 30s:3g", ["lte", "3g"]]  # a list is one link per edge
    edges = [1, 2]
    policies = ["fixed"]   # "adaptive", "adaptive_two_splits": the edge's latency controller (a policy study)

``[edge]`` and ``[cloud]`` hold daemon settings, any of those in the README's
tables except what each point sets (the checkpoint, the edge's thresholds,
codec and cloud); the orchestrator hands each daemon its settings as a config
file. The file is checked by the daemons' own reader: every error names the
file and the key (``sweep.codecs[1]``) and says what was expected. Relative
paths in the file are taken relative to the file.
"""
from __future__ import annotations

import dataclasses
import re
import math
import os
import typing
from pathlib import Path
from typing import Any, Literal

from offramp.serving.config import CloudConfig, CodecName, EdgeConfig, build, read_toml, require, setting
from offramp.core.errors import OfframpError
from offramp.netem import Schedule

__all__ = ["BASELINES", "BaselinesConfig", "CloudLoadConfig", "ExperimentConfig", "NodesConfig", "POLICIES",
           "StudyConfig", "SweepConfig", "WorkloadConfig", "check_cores", "load_experiment", "parse_rates"]

Baseline = Literal["edge_only", "cloud_only", "fixed_split"]
BASELINES: tuple[Baseline, ...] = typing.get_args(Baseline)
# How the edge chooses its thresholds: as the sweep sets them, or by its latency controller (latency_slo_ms)
# over the calibration table of the checkpoint's split, or of every block in edge.split_blocks.
# "adaptive_routes" also weighs the input route (the cloud runs the whole model on the input as sent, at the
# baselines' image format and quality) and the local route against the split.
Policy = Literal["fixed", "adaptive", "adaptive_two_splits", "adaptive_routes"]
POLICIES: tuple[Policy, ...] = typing.get_args(Policy)
# "calibrated": the thresholds `offramp calibrate` picks for [study].accuracy_drop.
Threshold = float | tuple[float, ...] | Literal["calibrated"]
LinkSpec = str | tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class NodesConfig:
    """Where daemons run. Node *counts* follow from the sweep: one ``cloud`` slot, max(sweep.edges) ``edge`` slots."""

    # Address the cloud-side servers bind and advertise. "auto": loopback when the
    # experiment starts its own Ray, the node's IP when it joins a cluster (--address).
    host: str = "auto"
    # CPUs of the Ray instance started locally (without --address); daemons and
    # actors reserve none, so this only bounds Ray's own workers.
    cpus: int = 2
    # CPU cores (per node, as taskset numbers them) for everything in an edge slot (edge daemon, link proxy,
    # load driver, edge-only baseline) and in the cloud slot (cloud daemon, cloud-load sender, cloud-only
    # baseline); unset: no pinning. On one machine, disjoint sets keep the emulated edge's compute off the
    # cores that serve the cloud and its load.
    edge_cores: tuple[int, ...] | None = None
    cloud_cores: tuple[int, ...] | None = None
    # Seconds a daemon may take from its process starting to serving before the point fails (a timeout names
    # the start-up step it was stuck in). Idle, a daemon starts in a few seconds; a machine busy with other
    # work may need several times that.
    startup_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        require(bool(self.host), "host must not be empty")
        require(self.startup_timeout_s > 0, "startup_timeout_s must be positive")
        require(self.cpus >= 1, "cpus must be at least 1")
        for name in ("edge_cores", "cloud_cores"):
            check_cores(getattr(self, name), name)


def check_cores(cores: tuple[int, ...] | None, name: str) -> None:
    """``cores`` (None: no pinning) must be distinct cores that this machine lets this process use."""
    if cores is None:
        return
    require(len(cores) > 0, f"{name} must list at least one core (or be unset: no pinning)")
    require(len(set(cores)) == len(cores), f"{name} lists a core twice")
    have = os.sched_getaffinity(0)
    missing = sorted(set(cores) - have)
    require(not missing, f"{name}: core(s) {', '.join(map(str, missing))} do not exist here; "
                         f"this machine offers cores {', '.join(map(str, sorted(have)))}")


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    """The load on each edge: which inputs, when they arrive, and how many."""

    # A data spec (digits, imagefolder:PATH, ...); None: the checkpoint's own validation split.
    data: str | None = None
    # "poisson": open loop, requests arrive at `rate` per second whatever the answers do;
    # "closed": `concurrency` requests in flight, each answer releases the next.
    arrival: Literal["poisson", "closed"] = "poisson"
    rate: float = 20.0
    concurrency: int = 4
    # Requests per edge and/or seconds of sending; whichever ends first.
    count: int | None = None
    duration_s: float | None = None
    # Requests per edge sent one by one before the measured load and not recorded:
    # they pay for lazy initialisation and open the edge's connection to the cloud.
    warmup: int = 8
    # Seconds a point may run beyond its planned sending time before it is abandoned.
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        require(self.rate > 0, "rate must be positive")
        require(self.concurrency >= 1, "concurrency must be at least 1")
        require(self.count is not None or self.duration_s is not None, "count or duration_s must be set")
        require(self.count is None or self.count >= 1, "count must be at least 1")
        require(self.duration_s is None or self.duration_s > 0, "duration_s must be positive")
        require(self.warmup >= 0, "warmup must not be negative")
        require(self.timeout_s > 0, "timeout_s must be positive")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """The grid: every combination of thresholds × codecs × profiles × number of edges is one point."""

    thresholds: tuple[Threshold, ...] = (0.9,)
    codecs: tuple[CodecName, ...] = ("int8",)
    # Link specs as `offramp link` reads them: a profile ("lte"), custom values
    # ("delay=20ms,bw=8mbit") or a schedule ("wifi; 30s:3g"); a list gives one per edge, cycled.
    profiles: tuple[LinkSpec, ...] = ("lan",)
    edges: tuple[int, ...] = (1,)
    # "fixed" runs each of `thresholds`; each adaptive policy is one point per profile, codec and edge count.
    policies: tuple[Policy, ...] = ("fixed",)
    # Run each link's points this many times, forward then backward in turn, so that a slow drift of the
    # host's speed weighs on every policy alike; the records carry `repeat`, and summaries may pool them.
    repeats: int = 1

    def __post_init__(self) -> None:
        require(self.repeats >= 1, f"repeats must be at least 1, not {self.repeats}")
        for name in ("thresholds", "codecs", "profiles", "edges", "policies"):
            require(len(getattr(self, name)) > 0, f"{name} must list at least one value")
        require(len(set(self.policies)) == len(self.policies), "policies must not repeat a policy")
        for i, t in enumerate(self.thresholds):
            if t == "calibrated":
                continue
            values = t if isinstance(t, tuple) else (t,)
            require(len(values) > 0 and not any(math.isnan(v) for v in values),
                    f"thresholds[{i}] must be a number or a non-empty list of numbers")
        for i, spec in enumerate(self.profiles):
            specs = spec if isinstance(spec, tuple) else (spec,)
            require(len(specs) > 0, f"profiles[{i}] must not be an empty list")
            for s in specs:
                try:
                    Schedule.parse(s)
                except OfframpError as e:
                    raise ValueError(f"profiles[{i}]: {e}") from None
        require(all(n >= 1 for n in self.edges), "edges must all be at least 1")


def parse_rates(text: str) -> tuple[tuple[float, float], ...]:
    """``"0; 40s:200"`` -> ``((0, 0), (40, 200))``: requests per second from each time on, as link schedules read."""
    steps: list[tuple[float, float]] = []
    for i, part in enumerate(p.strip() for p in text.split(";")):
        when, sep, rate = part.rpartition(":")
        try:
            at = float(when.strip().removesuffix("s")) if sep else 0.0
            value = float(rate)
        except ValueError:
            raise ValueError(f"schedule step {part!r} must be RATE or TIMEs:RATE (e.g. '40s:200')") from None
        if i == 0 and at != 0.0:
            steps.append((0.0, 0.0))
        require(value >= 0 and math.isfinite(value), f"schedule step {part!r}: the rate must be a number >= 0")
        require(not steps or at > steps[-1][0], f"schedule step {part!r} must come after the one before it")
        steps.append((at, value))
    return tuple(steps)


@dataclasses.dataclass(frozen=True)
class CloudLoadConfig:
    """Other edges' offloads reaching the cloud: a load that changes during the run, sent straight to the
    cloud (not through the studied edges' links) as requests at the checkpoint's split."""

    # Requests per second from each time on, e.g. "0; 40s:200": idle, then a second group of edges joins
    # at 40 s. The clock starts with the measured load, as the link schedules' do. "0": no cloud load.
    schedule: str = "0"

    def __post_init__(self) -> None:
        parse_rates(self.schedule)

    @property
    def steps(self) -> tuple[tuple[float, float], ...]:
        return parse_rates(self.schedule)

    @property
    def active(self) -> bool:
        return any(rate > 0 for _, rate in self.steps)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """How a policy study calibrates and judges: used where the sweep has "calibrated" thresholds or
    adaptive policies, and to read timelines where conditions change during a point."""

    # `offramp calibrate --target-accuracy-drop`: the "calibrated" thresholds (the fixed policy) and where
    # adaptive edges start before they have measured anything.
    accuracy_drop: float = 0.5
    # One-second windows starting within this long after a change of the link or the cloud's load are
    # not judged against the target: the controller needs measurements of the new conditions.
    settle_s: float = 5.0
    # Which of the checkpoint's splits the thresholds and the input route are chosen on: "selection" (held out
    # of training and of validation: `offramp train --selection-fraction`) keeps the validation split, which
    # the workload draws from, free of any choice.
    calibrate_on: Literal["validation", "selection"] = "validation"
    # `offramp calibrate --shared-threshold`: one threshold for every exit, in the fixed policy and in the
    # adaptive edge's tables, which a few thousand calibration samples cannot tune to their own noise.
    shared_threshold: bool = False
    # `offramp calibrate --consistent`: the exits judged by agreement with the full model where it is right
    # (no credit for their lucky answers), in the fixed policy and in the tables: what a small split shows
    # of them then carries over to the workload's inputs.
    consistent: bool = False

    def __post_init__(self) -> None:
        require(0 <= self.accuracy_drop <= 100, "accuracy_drop must be in 0..100 points")
        require(self.settle_s >= 0, "settle_s must not be negative")


@dataclasses.dataclass(frozen=True)
class BaselinesConfig:
    """Baselines run beside the system at every profile and edge count of the sweep."""

    run: tuple[Baseline, ...] = BASELINES
    # How the cloud-only baseline ships an image input: re-encoded from its pixels, as a camera would.
    image_format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = 90
    edge_onnx_dir: str | None = setting(
        "The whole model exported for onnxruntime (`offramp export CHECKPOINT --onnx DIR --split-block L`, L its "
        "number of blocks): the edge-only baseline runs it where the edges run onnxruntime, so both sides of the "
        "comparison compute on the same runtime.", None, path=True)

    def __post_init__(self) -> None:
        require(len(set(self.run)) == len(self.run), "run must not repeat a baseline")
        require(1 <= self.jpeg_quality <= 95, "jpeg_quality must be in 1..95")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment file."""

    checkpoint: str = setting("Checkpoint directory the daemons serve.", path=True)
    name: str = "experiment"
    # Seeds arrivals, input order and link randomness: same seed, same requests, same decisions.
    seed: int = 0
    out: str | None = setting("Output folder; unset: runs/experiments/NAME under the working directory.", None,
                              path=True)
    nodes: NodesConfig = NodesConfig()
    # Settings of every edge and of the cloud. Their checkpoint is the experiment's, and an edge
    # given no thread count gets one: a small device, and several emulated edges may share a machine.
    edge: EdgeConfig = EdgeConfig(checkpoint="")
    cloud: CloudConfig = CloudConfig(checkpoint="")
    workload: WorkloadConfig = WorkloadConfig(count=100)
    sweep: SweepConfig = SweepConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    cloud_load: CloudLoadConfig = CloudLoadConfig()
    study: StudyConfig = StudyConfig()

    def __post_init__(self) -> None:
        require(bool(self.name) and "/" not in self.name, "name must be a non-empty string without '/'")
        adaptive = [p for p in self.sweep.policies if p != "fixed"]
        require(not adaptive or self.edge.controller.latency_slo_ms is not None,
                f"sweep.policies {', '.join(adaptive)} need edge.latency_slo_ms, the p95 target the controller keeps")
        require(self.edge.runtime != "onnxruntime" or "edge_only" not in self.baselines.run
                or self.baselines.edge_onnx_dir is not None,
                "the edges run onnxruntime: the edge-only baseline needs baselines.edge_onnx_dir (the whole model "
                "exported) to compute on the same runtime")
        two = "adaptive_two_splits" in self.sweep.policies
        require(not two or len(self.edge.split_blocks or ()) >= 2,
                "sweep.policies adaptive_two_splits needs edge.split_blocks with two or more blocks")
        require(two or self.edge.split_blocks is None or len(self.edge.split_blocks) < 2,
                "edge.split_blocks lists several blocks, which only the adaptive_two_splits policy uses")
        object.__setattr__(self, "edge", dataclasses.replace(self.edge, checkpoint=self.checkpoint))
        object.__setattr__(self, "cloud", dataclasses.replace(self.cloud, checkpoint=self.checkpoint))

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path("runs") / "experiments" / self.name


# Daemon settings each point sets itself: in [edge] or [cloud] they would be silently replaced.
# The edge's codec format (``codec``, or ``dtype`` in ``[edge.codec]``) is set per point; its other codec settings
# (``[edge.codec] top_k``) are the experiment's.
SET_PER_POINT = {"edge": ("checkpoint", "listen", "cloud", "thresholds", "codec", "calibration"),
                 "cloud": ("checkpoint", "listen", "split_blocks")}


def load_experiment(path: str | Path, *, checkpoint: str | None = None, out: str | None = None) -> ExperimentConfig:
    """The experiment in ``path``; ``checkpoint`` and ``out`` (from the command line) override the file's."""
    path = Path(path)
    table = read_toml(path, "experiment file")
    for key, value in (("checkpoint", checkpoint), ("out", out)):
        if value is not None:
            table[key] = str(Path(value).resolve())
    for daemon, keys in SET_PER_POINT.items():
        section = table.get(daemon)
        if not isinstance(section, dict):
            continue
        for key in keys:
            if key in section and not (key == "codec" and isinstance(section[key], dict) and "dtype" not in section[key]):
                raise OfframpError(f"{path}: {daemon}.{key} is set per point (the checkpoint at the top, thresholds "
                                   f"and codecs in [sweep], calibration tables and the cloud's splits by the "
                                   f"policy), not in [{daemon}]")
        section["checkpoint"] = table.get("checkpoint", "")  # a daemon's required setting, the experiment's
    sweep = table.get("sweep")
    if isinstance(sweep, dict) and isinstance(sweep.get("profiles"), list):
        sweep["profiles"] = [[_traces_from(s, path.resolve().parent) for s in p] if isinstance(p, list)
                             else _traces_from(p, path.resolve().parent) for p in sweep["profiles"]]
    return build(ExperimentConfig, table, str(path), path.resolve().parent)


_TRACE_KEYS = re.compile(r"\b((?:up|down)?trace)=([^,;]+)")


def _traces_from(spec: Any, base_dir: Path) -> Any:
    """A link spec with its trace files (``trace=``, ``uptrace=``, ``downtrace=``) taken relative to the
    experiment file, as the checkpoint is."""
    if not isinstance(spec, str):
        return spec
    return _TRACE_KEYS.sub(lambda m: f"{m.group(1)}={(base_dir / m.group(2).strip()).resolve()}", spec)
