"""The sweep: expand the grid into points, run each on freshly started daemons, gather the records.

A point is one variant under one set of conditions:

* ``system`` — thresholds × codec × link profile × number of edges, with the
  thresholds fixed; or, for each adaptive policy (a policy study), the edge's
  latency controller choosing among the calibration table's points (and
  splits) per codec × profile × edges;
* ``fixed_split`` — the same daemons with every threshold out of reach
  (every sample offloaded), per codec × profile × edges;
* ``cloud_only`` — the whole model in the cloud, fed the input's file through
  the link, per profile × edges;
* ``edge_only`` — the whole model on the (slowed) edge, per number of edges.

Per point everything starts fresh and stops in a ``finally``: the cloud, one
link proxy per edge (on the edge's node, edge → proxy → cloud), the edges
with the point's thresholds and codec; the drivers warm up, the link
schedules start, the load runs, and every request yields one record. Points
with the same number of edges share one placement (the Ray actors), not
their daemons.

Where conditions change during a point (a link schedule, a ``[cloud_load]``
schedule) or the edge chooses for itself (adaptive policies), the drivers
also poll each edge's ``GetPolicy`` once a second, and the cloud load
starts with the edges' load: ``orchestrator.study`` reads the timelines.
Thresholds "calibrated" and adaptive policies need the checkpoint calibrated
once (``offramp.training.calibrate``) before the first point.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from offramp.core.hostinfo import machine
from offramp.serving.config import CloudConfig, EdgeConfig, replace_settings

from .config import ExperimentConfig, LinkSpec, Policy, Threshold
from .workload import EdgeLoad, Record

log = logging.getLogger(__name__)

Variant = Literal["system", "fixed_split", "cloud_only", "edge_only"]
DAEMON_VARIANTS: tuple[Variant, ...] = ("system", "fixed_split")  # run on the real edge and cloud daemons
NEVER = math.inf  # the fixed split's threshold: no exit is ever sure enough
POLL_EVERY_S = 1.0  # GetPolicy polls per edge, where timelines are read: one per timeline window


@dataclass(frozen=True)
class Point:
    """One run of the sweep; ``params()`` goes into each of its records."""

    index: int
    variant: Variant
    edges: int
    profile: LinkSpec | None = None  # None: no link (edge-only)
    codec: str | None = None  # None: no token codec (the whole-model baselines)
    thresholds: Threshold | None = None
    policy: Policy = "fixed"  # adaptive ones start from the calibrated thresholds
    repeat: int = 0  # which run of the same point this is ([sweep] repeats)

    def links(self) -> tuple[str, ...]:
        """One link spec per edge: a list in the sweep is cycled over the edges."""
        specs = self.profile if isinstance(self.profile, tuple) else (self.profile,)
        return tuple(str(specs[i % len(specs)]) for i in range(self.edges))

    @property
    def profile_label(self) -> str:
        """The link spec as a reader names it: trace files by their names, not their folders."""
        if self.profile is None:
            return ""
        label = " | ".join(self.profile) if isinstance(self.profile, tuple) else self.profile
        return re.sub(r"\b((?:up|down)?trace)=[^,;|]*/([^/,;|]+)", r"\1=\2", label)

    @property
    def thresholds_label(self) -> str:
        if self.thresholds is None:
            return ""
        if self.thresholds == NEVER:
            return "never"
        if isinstance(self.thresholds, str):
            return self.thresholds
        values = self.thresholds if isinstance(self.thresholds, tuple) else (self.thresholds,)
        return "/".join(f"{t:g}" for t in values)

    def params(self) -> dict[str, Any]:
        scalar = self.thresholds if isinstance(self.thresholds, float) and self.thresholds != NEVER else None
        return {"point": self.index, "variant": self.variant, "edges": self.edges, "profile": self.profile_label,
                "codec": self.codec or "", "thresholds": self.thresholds_label, "threshold": scalar,
                "policy": self.policy if self.variant == "system" else "", "repeat": self.repeat}

    def describe(self) -> str:
        system = self.variant == "system"
        parts = [self.variant, f"{self.edges} edge{'s' if self.edges > 1 else ''}", self.profile_label,
                 self.codec or "", self.policy if system and self.policy != "fixed" else "",
                 f"t={self.thresholds_label}" if system and self.policy == "fixed" else "",
                 f"run {self.repeat + 1}" if self.repeat else ""]
        return ", ".join(p for p in parts if p)


def expand(config: ExperimentConfig) -> list[Point]:
    """The grid in run order: grouped by number of edges (one placement each), baselines beside the system;
    with ``repeats``, each link's points again, in reverse order every other time."""
    sweep, baselines = config.sweep, set(config.baselines.run)
    points: list[Point] = []

    def add(group: list[dict[str, Any]]) -> None:
        for repeat in range(sweep.repeats):
            for kwargs in group if repeat % 2 == 0 else group[::-1]:
                points.append(Point(index=len(points), repeat=repeat, **kwargs))

    for edges in sweep.edges:
        for profile in sweep.profiles:
            link: list[dict[str, Any]] = []
            for codec in sweep.codecs:
                for policy in sweep.policies:
                    for thresholds in sweep.thresholds if policy == "fixed" else ("calibrated",):
                        link.append(dict(variant="system", edges=edges, profile=profile, codec=codec,
                                         thresholds=thresholds, policy=policy))
                if "fixed_split" in baselines:
                    link.append(dict(variant="fixed_split", edges=edges, profile=profile, codec=codec,
                                     thresholds=NEVER))
            if "cloud_only" in baselines:
                link.append(dict(variant="cloud_only", edges=edges, profile=profile))
            add(link)
        if "edge_only" in baselines:
            add([dict(variant="edge_only", edges=edges)])
    return points


@dataclass(frozen=True)
class Context:
    """What every point of one experiment shares."""

    config: ExperimentConfig
    num_exits: int  # edge exits at the checkpoint's split
    score: str
    host: str | None  # where cloud-side servers bind (None: each node's IP)
    num_inputs: int
    calibration: Any = None  # offramp.training.calibrate.Calibration, where the sweep needs one
    timelines: bool = False  # conditions change during a point, or edges choose: poll their policy
    split_block: int | None = None  # the edge's own split (edge.split_block, else the checkpoint's)
    input_route: Any = None  # offramp.core.operating_points.InputRouteCalibration, for adaptive_routes

    def edge_thresholds(self, point: Point) -> list[float]:
        """The point's thresholds, one per edge exit; "never" points the right way for the score."""
        from offramp.core.exit_rule import never_leave

        if point.thresholds == NEVER:
            return [never_leave(self.score)] * self.num_exits
        if point.thresholds == "calibrated":
            assert self.calibration is not None
            return list(self.calibration.chosen.thresholds)
        assert point.thresholds is not None
        return list(point.thresholds) if isinstance(point.thresholds, tuple) else [point.thresholds] * self.num_exits

    def edge_config(self, point: Point, cloud: str) -> EdgeConfig:
        """The experiment's edge settings with the point's thresholds, codec and policy, offloading to ``cloud``.

        A fixed policy runs without a target (the thresholds stay); an adaptive one keeps ``latency_slo_ms``
        with the calibration table of the edge's split, the two-split one with every split's and
        ``split_blocks``."""
        thresholds = tuple(self.edge_thresholds(point)) if self.num_exits else None
        e = self.config.edge
        if point.policy == "fixed" or point.variant != "system":
            policy: dict[str, Any] = {"latency_slo_ms": None, "split_blocks": None, "calibration": (),
                                      "input_route": None}
        else:
            splits = e.split_blocks if point.policy == "adaptive_two_splits" else None
            keep = set(splits or (self.split_block,))
            policy = {"split_blocks": splits,
                      "calibration": tuple(t for t in self.calibration.tables if t.split_block in keep),
                      "input_route": self.input_route if point.policy == "adaptive_routes" else None,
                      "input_quality": self.config.baselines.jpeg_quality}
        if e.device_costs is not None:
            policy["device_costs"] = self.device_costs_path()
        return replace_settings(e, cloud=(cloud,), codec=point.codec, score=self.score, thresholds=thresholds,
                                **policy)

    def device_costs_path(self) -> str | None:
        """The experiment's one device-cost table, in its folder: measured by the first edge (and the edge-only
        baseline's whole model by that baseline), charged by every other."""
        e = self.config.edge
        return None if e.device_costs is None else str(self.config.out_dir / Path(e.device_costs).name)

    def cloud_config(self, point: Point) -> CloudConfig:
        """The experiment's cloud settings, serving every split the point's edges may hand over after: the
        edge's split blocks (two-split policies), else its one split block where it sets one (a cloud left at
        the checkpoint's split would refuse an edge that splits elsewhere), else the cloud's own setting."""
        e = self.config.edge
        if point.variant == "system" and point.policy == "adaptive_two_splits":
            splits = e.split_blocks
        elif e.split_block is not None:
            splits = (e.split_block,)
        else:
            splits = self.config.cloud.split_blocks
        return dataclasses.replace(self.config.cloud, split_blocks=splits)

    def load(self, edge: int) -> EdgeLoad:
        return EdgeLoad(self.config.workload, self.config.seed, edge, self.num_inputs)

    def link_seed(self, edge: int) -> int:
        return self.config.seed * 1000 + edge


@dataclass
class PointResult:
    records: list[Record] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # params, nodes, link counters: points.json
    policy: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # GetPolicy polls, per edge
    cloud_load: list[Record] = dataclasses.field(default_factory=list)  # the other edges' offloads
    logs: dict[str, str] = dataclasses.field(default_factory=dict)  # daemon name → its log


def run_point(point: Point, placement: Any, ctx: Context, result: PointResult) -> None:
    """Start what ``point`` needs on ``placement``'s actors, drive the load, stop everything; fill ``result``.

    ``result`` is the caller's so that the daemons' logs reach it even when the point fails.
    """
    cfg, e, w = ctx.config, ctx.config.edge, ctx.config.workload
    slots = placement.edges[:point.edges]
    result.info.update(params=point.params(), nodes={}, links=[])
    with contextlib.ExitStack() as stack:
        cloud = None
        if point.variant in DAEMON_VARIANTS:
            stack.callback(_stop_daemons, [placement.cloud], ["cloud"], result.logs)
            cloud = _get(placement.cloud.start.remote(ctx.cloud_config(point), ctx.host, cfg.nodes.startup_timeout_s))
        elif point.variant == "cloud_only":
            stack.callback(_stop_all, [placement.cloud_full_model])
            cloud = _get(placement.cloud_full_model.start.remote(
                cfg.checkpoint, "cloud", host=ctx.host, slowdown=1.0, max_batch=cfg.cloud.max_batch,
                max_wait_ms=cfg.cloud.max_wait_ms, threads=cfg.cloud.threads, device=cfg.cloud.device))
        links = []
        if cloud is not None:
            stack.callback(_stop_links, [s.link for s in slots], result.info["links"])
            links = _get([s.link.start.remote(cloud.address, spec, ctx.link_seed(i))
                          for i, (s, spec) in enumerate(zip(slots, point.links()))])
        if point.variant in DAEMON_VARIANTS:
            names = [f"edge-{i}" for i in range(len(slots))]
            stack.callback(_stop_daemons, [s.daemon for s in slots], names, result.logs)
            targets = _get([s.daemon.start.remote(ctx.edge_config(point, link.address), "127.0.0.1",
                                                  cfg.nodes.startup_timeout_s)
                            for s, link in zip(slots, links)])
        elif point.variant == "cloud_only":
            targets = links  # the driver sends the input's file straight into the link
        else:
            stack.callback(_stop_all, [s.full_model for s in slots])
            targets = _get([s.full_model.start.remote(
                cfg.checkpoint, "edge", host="127.0.0.1", slowdown=e.slowdown, max_batch=e.max_batch, max_wait_ms=0.0,
                threads=e.threads, device=e.device,
                onnx_dir=cfg.baselines.edge_onnx_dir if e.runtime == "onnxruntime" else None,
                device_costs=ctx.device_costs_path()) for s in slots])
        encoded = point.variant == "cloud_only"
        _get([s.driver.warm_up.remote(t.address, w.warmup, encoded, w.timeout_s) for s, t in zip(slots, targets)])
        _get([s.link.begin.remote() for s in slots[:len(links)]])
        poll = POLL_EVERY_S if ctx.timelines and point.variant in DAEMON_VARIANTS else None
        driven = [s.driver.drive.remote(t.address, ctx.load(i), encoded, poll)
                  for i, (s, t) in enumerate(zip(slots, targets))]
        loaded = None
        if cloud is not None and placement.cloud_load is not None:  # starts with the edges' load, as the links do
            loaded = placement.cloud_load.drive.remote(cloud.address, cfg.cloud_load.steps, ctx.load(0).planned_s,
                                                       cfg.seed, w.timeout_s)
        outputs = _get(driven)
        per_edge = [records for records, _ in outputs]
        # An edge without a controller does not report its split: it is the one it was started with.
        result.policy = [{"point": point.index, "edge": i, **p,
                          "split_block": p["split_block"] if p["split_block"] >= 0 else ctx.split_block}
                         for i, (_, polls) in enumerate(outputs) for p in polls]
        if loaded is not None:
            result.cloud_load = [{"point": point.index, **r} for r in _get(loaded)]
    nodes = {"cloud": cloud.node_id if cloud else "", "edges": [t.node_id for t in targets],
             "drivers": [s.node_id for s in slots]}
    result.info["nodes"] = nodes
    for i, records in enumerate(per_edge):
        result.records += [{**point.params(), "edge": i, **r, "edge_node": nodes["edges"][i],
                            "cloud_node": nodes["cloud"], "driver_node": nodes["drivers"][i]} for r in records]


def _get(refs: Any) -> Any:
    """``ray.get``, with a user error raised inside an actor surfacing as itself rather than as a Ray traceback."""
    import ray

    from offramp.core.errors import OfframpError

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, OfframpError):
            raise OfframpError(str(e.cause)) from None
        raise


def _stop_daemons(actors: Sequence[Any], names: Sequence[str], logs: dict[str, str]) -> None:
    logs.update(zip(names, _get([a.stop.remote() for a in actors])))


def _stop_links(actors: Sequence[Any], stats: list[dict[str, Any]]) -> None:
    stats.extend(_get([a.stop.remote() for a in actors]))


def _stop_all(actors: Sequence[Any]) -> None:
    _get([a.stop.remote() for a in actors])


@dataclass(frozen=True)
class ExperimentResult:
    out_dir: Path
    records: Path
    summary: list[dict[str, Any]]
    plots: list[Path]


def run_experiment(config: ExperimentConfig, address: str | None = None, progress: bool = True,
                   command: str | None = None) -> ExperimentResult:
    """Run every point of ``config`` on a local Ray (or the cluster at ``address``) and write the outputs.

    Records, points and nodes are written even when a point fails, so what
    ran is not lost; the summary and plots only when every point ran.
    """
    import ray
    from tqdm import tqdm

    from offramp.core.checkpoint import read_card
    from offramp.core.scores import default_score

    from . import report, study
    from .actors import Placement, node_resources, ray_session
    from offramp.core.data.preprocess import encode_images
    from .workload import load_dataset

    started = time.perf_counter()
    card = read_card(config.checkpoint)
    num_exits = _num_edge_exits(card, config.edge.exits)
    _check_thresholds(config, num_exits)
    score = config.edge.score or default_score(card.config.task)
    dataset = load_dataset(card, config.workload.data)
    if "cloud_only" in config.baselines.run and card.modality == "image":
        dataset = dataclasses.replace(dataset, encoded=encode_images(
            dataset.inputs, config.baselines.image_format, config.baselines.jpeg_quality))
    points = expand(config)
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "experiment.json", dataclasses.asdict(config))
    if config.edge.device_costs is not None:  # each run measures its own device: no table from an earlier run
        (out / Path(config.edge.device_costs).name).unlink(missing_ok=True)
    calibration = _calibrate(config, points, num_exits, score, out)
    input_route = _calibrate_input_route(config, points, out)
    records: list[Record] = []
    infos: list[dict[str, Any]] = []
    policy: list[dict[str, Any]] = []
    cloud_load: list[Record] = []
    timelines = study.has_timelines(config)
    with ray_session(address, config.nodes, max(config.sweep.edges)) as host:
        split = config.edge.split_block if config.edge.split_block is not None else card.split_block
        ctx = Context(config, num_exits, score, host, len(dataset), calibration, timelines, split, input_route)
        data_ref = ray.put(dataset)
        variants = {p.variant for p in points}
        try:
            with tqdm(total=len(points), disable=not progress, unit="point", dynamic_ncols=True) as bar:
                for edges, group in itertools.groupby(points, key=lambda p: p.edges):
                    with Placement(edges, data_ref, edge_only="edge_only" in variants,
                                   cloud_only="cloud_only" in variants,
                                   cloud_load=config.cloud_load.active,
                                   cores={"cloud": config.nodes.cloud_cores, "edge": config.nodes.edge_cores}
                                   ) as placement:
                        for point in group:
                            bar.set_postfix_str(point.describe())
                            result = _run_logged(point, placement, ctx, out)
                            records += result.records
                            infos.append(result.info)
                            policy += result.policy
                            cloud_load += result.cloud_load
                            bar.update()
        finally:
            report.write_json(out / "nodes.json", node_resources())
            report.write_json(out / "points.json", infos)
            records_path = report.write_records(records, out)
            if timelines:
                report.write_json(out / "policy.json", policy)
                report.write_records(cloud_load, out, "cloud_load")  # one row per request: a table, not JSON
    summary = report.summarize(records)
    wall_s = time.perf_counter() - started
    # What ran, where and for how long, beside every detail file of the folder (they record none of it).
    # ``command``: how the caller was started (a benchmark that runs the experiment says so itself).
    command = command or (shlex.join(["offramp", *sys.argv[1:]]) if sys.argv[1:] else "run_experiment()")
    report.write_json(out / "run.json", {"command": command, "machine": machine(), "wall_s": wall_s,
                                         "points": len(points), "address": address})
    plots = _write_outputs(config, points, ctx, records, policy, cloud_load, wall_s, timelines)
    return ExperimentResult(out, records_path, summary, plots)


def _write_outputs(config: ExperimentConfig, points: list[Point], ctx: Context, records: list[Record],
                   policy: list[dict[str, Any]], cloud_load: list[Record], wall_s: float,
                   timelines: bool = True) -> list[Path]:
    """The summary (with the policy study where conditions change or edges choose) and the plots."""
    from . import report, study

    out, summary = config.out_dir, report.summarize(records)
    if not timelines:
        report.write_summary(summary, out)
        return report.plot_all(summary, records, out / "plots")
    fixed = {p.index: tuple(ctx.edge_thresholds(p)) for p in points
             if p.variant == "system" and p.policy == "fixed" and ctx.num_exits}
    timeline = study.Study(config, points, records, policy, cloud_load, ctx.calibration, fixed)
    report.write_summary(summary, out, extra=timeline.summary(wall_s))
    return report.plot_all(summary, records, out / "plots") + timeline.plot(out / "plots")


def summarize_experiment(config: ExperimentConfig) -> list[Path]:
    """Write the summary and plots again from what a run left in its folder (records, the edges' policy,
    the calibration), with this code's study: no point runs again."""
    import json
    from types import SimpleNamespace

    from offramp.core.checkpoint import read_card
    from offramp.core.errors import OfframpError
    from offramp.core.scores import default_score

    from . import report, study

    out = config.out_dir
    records = report.read_records(out)
    if not records:
        raise OfframpError(f"{out} holds no records (records.parquet or records.csv) to summarize")
    card = read_card(config.checkpoint)
    num_exits = _num_edge_exits(card, config.edge.exits)
    score = config.edge.score or default_score(card.config.task)
    calibration = None
    if (out / "calibration.json").is_file():
        saved = json.loads((out / "calibration.json").read_text())
        calibration = SimpleNamespace(samples=saved["samples"], full_quality=saved["full_accuracy"],
                                      chosen=SimpleNamespace(**saved["chosen"]))
    ctx = Context(config, num_exits, score, None, 0, calibration)
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    timelines = study.has_timelines(config)
    policy = json.loads((out / "policy.json").read_text()) if timelines and (out / "policy.json").is_file() else []
    cloud_load = report.read_records(out, "cloud_load") if timelines else []
    return _write_outputs(config, expand(config), ctx, records, policy, cloud_load, run.get("wall_s", math.nan),
                          timelines)


def _calibrate(config: ExperimentConfig, points: list[Point], num_exits: int, score: str, out: Path) -> Any:
    """The checkpoint calibrated as `offramp calibrate` would, once, where a point needs it (else None).

    With it: the fixed thresholds' cascades on the same validation samples (what each fixed point's answers
    are worth), written to ``calibration.json`` beside the tables the adaptive edges get.
    """
    if not any(p.thresholds == "calibrated" or p.policy != "fixed" for p in points):
        return None
    from offramp.training.calibrate import Target, calibrate_checkpoint

    from . import report

    e = config.edge
    fixed = tuple(dict.fromkeys(tuple(Context(config, num_exits, score, None, 0).edge_thresholds(p))
                                for p in points if p.variant == "system" and p.thresholds != "calibrated"))
    log.info("calibrating %s for the policies (accuracy drop %g points)", config.checkpoint, config.study.accuracy_drop)
    calibration = calibrate_checkpoint(
        config.checkpoint, Target(accuracy_drop=config.study.accuracy_drop, shared=config.study.shared_threshold,
                                  consistent=config.study.consistent),
        score=score,
        data=config.workload.data if config.study.calibrate_on == "validation" else None,
        edge={"split_block": e.split_block, "exits": list(e.exits) if e.exits else None,
              "split_blocks": list(e.split_blocks) if e.split_blocks else None},
        evaluate_thresholds=fixed, on=config.study.calibrate_on)
    report.write_json(out / "calibration.json", {
        "accuracy_drop": config.study.accuracy_drop, "shared_threshold": config.study.shared_threshold,
        "consistent": config.study.consistent,
        "samples": calibration.samples,
        "full_accuracy": calibration.full_quality, "chosen": dataclasses.asdict(calibration.chosen),
        "evaluated": [dataclasses.asdict(p) for p in calibration.evaluated],
        "tables": [dataclasses.asdict(t) for t in calibration.tables]})
    return calibration


def _calibrate_input_route(config: ExperimentConfig, points: list[Point], out: Path) -> Any:
    """The input route measured as `offramp calibrate --input-route` would, once, where a point weighs it (the
    baselines' JPEG quality, the cloud-only baseline's); written to ``input_route.json``."""
    if not any(p.policy == "adaptive_routes" for p in points):
        return None
    from offramp.training.calibrate import calibrate_input_route

    from . import report

    on = config.study.calibrate_on
    route = calibrate_input_route(config.checkpoint, config.baselines.jpeg_quality,
                                  data=config.workload.data if on == "validation" else None, on=on)
    report.write_json(out / "input_route.json", dataclasses.asdict(route))
    return route


def _run_logged(point: Point, placement: Any, ctx: Context, out: Path) -> PointResult:
    """Run a point; its daemons' logs land under ``logs/point-NNN/`` whether it succeeded or not."""
    log.info("point %d: %s", point.index, point.describe())
    result = PointResult()
    try:
        run_point(point, placement, ctx, result)
    finally:
        folder = out / "logs" / f"point-{point.index:03d}"
        for name, text in result.logs.items():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.log").write_text(text)
    return result


def _num_edge_exits(card: Any, names: tuple[str, ...] | None) -> int:
    """How many exits the edge will run: the named ones (checked against the card) or all up to the split."""
    from offramp.core.errors import OfframpError
    from offramp.core.exit_rule import edge_exit_ids

    try:
        return len(edge_exit_ids(card.config.exits, card.split_block, names))
    except ValueError as e:
        raise OfframpError(f"edge.exits: {e}") from None


def _check_thresholds(config: ExperimentConfig, num_exits: int) -> None:
    from offramp.core.errors import OfframpError

    for i, t in enumerate(config.sweep.thresholds):
        if isinstance(t, tuple) and len(t) != num_exits:
            raise OfframpError(f"sweep.thresholds[{i}] lists {len(t)} values; the checkpoint's edge has "
                               f"{num_exits} exit(s), one threshold each (or give one number for all)")
