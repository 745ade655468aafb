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

Every error names the file and the key (``sweep.codecs[1]``) and says what was
expected. Relative paths in the file are taken relative to the file.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from offramp.config import read_toml
from offramp.errors import OfframpError
from offramp.netem import Schedule

__all__ = ["BASELINES", "BaselinesConfig", "CloudSettings", "EdgeSettings", "ExperimentConfig", "NodesConfig",
           "SweepConfig", "WorkloadConfig", "load_experiment"]

Baseline = Literal["edge_only", "cloud_only", "fixed_split"]
BASELINES: tuple[Baseline, ...] = typing.get_args(Baseline)
Threshold = float | tuple[float, ...]
LinkSpec = str | tuple[str, ...]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class NodesConfig:
    """Where daemons run. Node *counts* follow from the sweep: one ``cloud`` slot, max(sweep.edges) ``edge`` slots."""

    # Address the cloud-side servers bind and advertise. "auto": loopback when the
    # experiment starts its own Ray, the node's IP when it joins a cluster (--address).
    host: str = "auto"
    # CPUs of the Ray instance started locally (without --address); daemons and
    # actors reserve none, so this only bounds Ray's own workers.
    cpus: int = 2

    def __post_init__(self) -> None:
        _require(bool(self.host), "host must not be empty")
        _require(self.cpus >= 1, "cpus must be at least 1")


@dataclasses.dataclass(frozen=True)
class EdgeSettings:
    """Edge daemon settings shared by every sweep point (thresholds and codec come from the sweep)."""

    # Emulated device: compute takes this many times as long as on the host
    # (needs the edge daemon's --slowdown; the edge-only baseline applies it itself).
    slowdown: float = 1.0
    # Torch threads per edge: a small device, and several emulated edges may share one machine.
    threads: int = 1
    max_batch: int = 16
    # How long a request waits for the cloud before its best exit answers, degraded.
    deadline_ms: int = 1000
    # Confidence score the thresholds apply to; None: the task's default (max_prob).
    score: Literal["max_prob", "entropy", "margin"] | None = None
    # Send only the k most attended tokens; None sends all.
    top_k: int | None = None
    # Exits the edge runs, by name ("slvit@2"); None: every exit up to the split.
    exits: tuple[str, ...] | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        _require(self.exits is None or len(self.exits) > 0, "exits must name at least one exit (or be left out)")
        _require(self.slowdown >= 1.0, "slowdown must be at least 1 (a device cannot be made faster)")
        _require(self.threads >= 1, "threads must be at least 1")
        _require(self.max_batch >= 1, "max_batch must be at least 1")
        _require(self.deadline_ms >= 1, "deadline_ms must be at least 1")
        _require(self.top_k is None or self.top_k >= 1, "top_k must be at least 1")


@dataclasses.dataclass(frozen=True)
class CloudSettings:
    """Cloud daemon settings (also used by the cloud-only baseline's server)."""

    max_batch: int = 32
    max_wait_ms: float = 2.0
    # Torch threads; 0: one per core of the cloud node.
    threads: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        _require(self.max_batch >= 1, "max_batch must be at least 1")
        _require(self.max_wait_ms >= 0, "max_wait_ms must not be negative")
        _require(self.threads >= 0, "threads must not be negative")


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
        _require(self.rate > 0, "rate must be positive")
        _require(self.concurrency >= 1, "concurrency must be at least 1")
        _require(self.count is not None or self.duration_s is not None, "count or duration_s must be set")
        _require(self.count is None or self.count >= 1, "count must be at least 1")
        _require(self.duration_s is None or self.duration_s > 0, "duration_s must be positive")
        _require(self.warmup >= 0, "warmup must not be negative")
        _require(self.timeout_s > 0, "timeout_s must be positive")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """The grid: every combination of thresholds × codecs × profiles × number of edges is one point."""

    thresholds: tuple[Threshold, ...] = (0.9,)
    codecs: tuple[Literal["int8", "float16", "float32"], ...] = ("int8",)
    # Link specs as `offramp link` reads them: a profile ("lte"), custom values
    # ("delay=20ms,bw=8mbit") or a schedule ("wifi; 30s:3g"); a list gives one per edge, cycled.
    profiles: tuple[LinkSpec, ...] = ("lan",)
    edges: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        for name in ("thresholds", "codecs", "profiles", "edges"):
            _require(len(getattr(self, name)) > 0, f"{name} must list at least one value")
        for i, t in enumerate(self.thresholds):
            values = t if isinstance(t, tuple) else (t,)
            _require(len(values) > 0 and not any(math.isnan(v) for v in values),
                     f"thresholds[{i}] must be a number or a non-empty list of numbers")
        for i, spec in enumerate(self.profiles):
            specs = spec if isinstance(spec, tuple) else (spec,)
            _require(len(specs) > 0, f"profiles[{i}] must not be an empty list")
            for s in specs:
                try:
                    Schedule.parse(s)
                except OfframpError as e:
                    raise ValueError(f"profiles[{i}]: {e}") from None
        _require(all(n >= 1 for n in self.edges), "edges must all be at least 1")


@dataclasses.dataclass(frozen=True)
class BaselinesConfig:
    """Baselines run beside the system at every profile and edge count of the sweep."""

    run: tuple[Baseline, ...] = BASELINES
    # How the cloud-only baseline ships an image input: re-encoded from its pixels, as a camera would.
    image_format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        _require(len(set(self.run)) == len(self.run), "run must not repeat a baseline")
        _require(1 <= self.jpeg_quality <= 95, "jpeg_quality must be in 1..95")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment file."""

    checkpoint: str
    name: str = "experiment"
    # Seeds arrivals, input order and link randomness: same seed, same requests, same decisions.
    seed: int = 0
    # Output folder; None: runs/experiments/NAME under the working directory.
    out: str | None = None
    nodes: NodesConfig = NodesConfig()
    edge: EdgeSettings = EdgeSettings()
    cloud: CloudSettings = CloudSettings()
    workload: WorkloadConfig = WorkloadConfig(count=100)
    sweep: SweepConfig = SweepConfig()
    baselines: BaselinesConfig = BaselinesConfig()

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name, "name must be a non-empty string without '/'")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path("runs") / "experiments" / self.name


_PATHS = ("checkpoint", "out")  # top-level keys holding paths, resolved against the file's folder


def load_experiment(path: str | Path, *, checkpoint: str | None = None, out: str | None = None) -> ExperimentConfig:
    """The experiment in ``path``; ``checkpoint`` and ``out`` (from the command line) override the file's."""
    path = Path(path)
    table = read_toml(path, "experiment file")
    for key in _PATHS:
        if isinstance(table.get(key), str):
            table[key] = str((path.parent / table[key]).resolve())
    for key, value in (("checkpoint", checkpoint), ("out", out)):
        if value is not None:
            table[key] = str(Path(value).resolve())
    try:
        return _build(ExperimentConfig, table, "")
    except _Invalid as e:
        raise OfframpError(f"{path}: {e}") from None


class _Invalid(Exception):
    """A key that is unknown, missing, mistyped or out of range; the message starts with its full name."""


def _build(cls: type, table: Mapping[str, Any], prefix: str) -> Any:
    """``cls`` from a TOML table, every key checked against ``cls``'s annotations."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise _Invalid(f"unknown key '{prefix}{key}' (known: {', '.join(prefix + k for k in fields)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise _Invalid(f"'{prefix}{key}' must be a table ([{prefix}{key}])")
            values[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            values[key] = _convert(value, tp, f"{prefix}{key}")
    missing = [k for k, f in fields.items()
               if k not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise _Invalid(f"missing required key(s) {', '.join(prefix + k for k in missing)}")
    try:
        return cls(**values)
    except ValueError as e:
        raise _Invalid(f"{prefix}{e}") from None


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against ``tp``: ints widen to floats, lists become tuples; errors name ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        errors: list[_Invalid] = []
        for arg in args:
            try:
                return _convert(value, arg, key)
            except _Invalid as e:
                errors.append(e)
        listed = [e for arg, e in zip(args, errors) if typing.get_origin(arg) is tuple]
        if isinstance(value, list) and listed:  # the list's own error names the item that is wrong
            raise listed[0]
    elif origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
    elif origin is tuple:
        if isinstance(value, list):
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    elif tp is type(None):
        pass  # TOML has no null: an optional key is left out instead
    elif tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise _Invalid(f"'{key}' must be {_describe(tp)}, not {type(value).__name__} {value!r}")


def _describe(tp: Any) -> str:
    """``tp`` in words: 'a number or a list of numbers', "one of 'int8', 'float16'"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a list (each {_describe(args[0])})"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))
