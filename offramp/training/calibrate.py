"""Choosing exit thresholds offline, on the checkpoint's validation split.

Every head (the edge exits and the full model, which stands in for the cloud)
is evaluated once; a cascade under any thresholds is then a cheap lookup, so
the search can afford to be thorough:

1. one threshold shared by all exits, tried at every candidate value (exact
   in one dimension: the candidates are the exits' own confidence quantiles,
   plus "never leave" and "always leave");
2. from the best few shared values, per-exit descent: each round moves the
   one exit's threshold whose move improves the objective most, until none
   does.

The shared value is a robust starting point on small validation sets; the
per-exit refinement only moves where it strictly helps, which pays off when
exits are calibrated differently (early exits are often over-confident) and
the split is large enough to tell. On a few thousand samples it also fits
their noise: ``Target.shared`` keeps to step 1.
``Target.consistent`` judges the exits by agreement with the full model where
it is right (what they break counts, what they fix by luck does not), which is
what carries from a small split to new data.
Targets: the fewest offloads whose accuracy is no worse than the full model's
minus ``accuracy_drop`` points, the best accuracy (lowest MAE for
regression) with at most ``max_offload`` of the samples sent to the cloud,
or the best accuracy whose mean compute per input (every exit tried on the
way counted, as ``offramp eval`` measures it) is at least ``min_speedup``
times below the full model's.
The cloud is assumed to answer as the full model does: codec loss is ignored.

Beside the chosen thresholds, ``operating_points`` keeps the best point at
each of a range of offload shares (``TABLE_OFFLOADS``): the table from
which an edge with a latency target chooses at run time. The small shares
are dense on purpose: offloads of at most 5 % of the samples do not reach
the p95, so they are what a slow link still affords.
"""
from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offramp.core.checkpoint import load_checkpoint
from offramp.core.operating_points import CalibrationPoint, CalibrationTable, InputRouteCalibration
from offramp.core.errors import OfframpError
from offramp.core.data.card_data import load_selection, load_validation
from offramp.training.report import head_costs
from offramp.core.exit_rule import always_leave, edge_exit_ids, exits_up_to, higher_is_confident, never_leave, walk
from offramp.core.scores import check_score, default_score
from offramp.training.train import HeadResult, evaluate

CANDIDATES_PER_EXIT = 200  # quantiles of each exit's confidence; beyond this the search gains nothing visible
STARTS = 4  # the best shared thresholds, each refined per exit (each start costs one descent)
MAX_ROUNDS = 20  # coordinate descent converges in a handful; this only bounds pathological cases
TABLE_OFFLOADS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8,
                  0.9, 1.0)


@dataclass(frozen=True)
class Target:
    """Exactly one of the three is set."""

    accuracy_drop: float | None = None  # percentage points below the full model's accuracy
    max_offload: float | None = None  # fraction of samples sent to the cloud
    min_speedup: float | None = None  # the full model's MACs over the mean MACs per input
    # With accuracy_drop: keep this many standard errors (paired, against the full model, on the samples
    # calibrated on) inside the drop, so that a setting chosen on a small split keeps to it on new data.
    margin_se: float = 0.0
    # One threshold for every exit (the last may answer all that reach it, offloading nothing): a search with
    # one degree of freedom, which a small split cannot flatter the way it flatters per-exit thresholds tuned
    # to the edge of the target (the winner's curse).
    shared: bool = False
    # Judge the exits by consistency with the full model (as CALM calibrates early exits, Schuster et al.
    # 2022): a sample an exit answers counts as right only where the full model is right too. What the exits
    # break is counted; the inputs they get right where the full model is wrong earn nothing. On a split of a
    # few thousand samples those lucky answers are what flatters the exits (on edge_c10's selection split
    # they made the cascade read above the full model), and they do not carry over to new data.
    consistent: bool = False

    def __post_init__(self) -> None:
        if self.margin_se < 0:
            raise ValueError(f"the margin must not be negative, not {self.margin_se} standard errors")
        if self.margin_se and self.accuracy_drop is None:
            raise ValueError("a margin in standard errors applies to an accuracy-drop target")
        if sum(v is not None for v in (self.accuracy_drop, self.max_offload, self.min_speedup)) != 1:
            raise ValueError("give exactly one target: an accuracy drop, an offload fraction or a speed-up")
        if self.min_speedup is not None and not self.min_speedup > 0:
            raise ValueError(f"speed-up must be positive, not {self.min_speedup}")
        if self.accuracy_drop is not None and not 0 <= self.accuracy_drop <= 100:
            raise ValueError(f"accuracy drop must be in 0..100 points, not {self.accuracy_drop}")
        if self.max_offload is not None and not 0 <= self.max_offload <= 1:
            raise ValueError(f"offload fraction must be in 0..1, not {self.max_offload}")


@dataclass(frozen=True)
class OperatingPoint:
    """Thresholds and what they do on the validation split."""

    thresholds: tuple[float, ...]
    quality: float  # accuracy, or -MAE for regression (higher is better either way)
    offload: float  # fraction answered by the cloud
    shares: tuple[float, ...]  # fraction answered by each exit, then by the cloud
    mean_macs: float | None = None  # per input, every exit tried counted (when the heads' costs are known)
    loss_se: float = 0.0  # standard error of the loss against the full model (paired over the samples)


@dataclass(frozen=True)
class Calibration:
    """The chosen operating point, with what a user needs to judge it."""

    chosen: OperatingPoint
    full_quality: float  # the full model alone (everything offloaded)
    target: Target
    score: str
    exit_names: tuple[str, ...]
    samples: int
    metric: str  # "accuracy", or "mae" for regression
    table: tuple[OperatingPoint, ...] = ()  # the best point per offload share, fewest offloads first
    tables: tuple[CalibrationTable, ...] = ()  # as the edge config stores them, one per split block
    evaluated: tuple[OperatingPoint, ...] = ()  # the thresholds a caller asked about, on the same samples
    full_macs: float | None = None  # the full model's MACs per input, when the heads' costs are known
    split: str = "validation"  # what the samples were: the card's validation or selection split, or a data spec

    def summary(self) -> str:
        p, sign = self.chosen, ">=" if higher_is_confident(self.score) else "<="
        if self.metric == "accuracy":
            quality = f"accuracy {p.quality:.4f} (full model {self.full_quality:.4f})"
            if self.target.consistent:
                quality += ", exits credited only where the full model is right"
        else:
            quality = f"MAE {-p.quality:.4g} (full model {-self.full_quality:.4g})"
        if self.target.accuracy_drop is not None:
            goal = f"accuracy at most {self.target.accuracy_drop:g} points below the full model, fewest offloads"
        elif self.target.max_offload is not None:
            goal = f"at most {self.target.max_offload:.1%} offloaded, best {self.metric}"
        else:
            goal = f"mean compute at least {self.target.min_speedup:g}x below the full model's, best {self.metric}"
        compute = ([f"  mean compute  {p.mean_macs / 1e6:.1f}M MACs per input, {self.full_macs / p.mean_macs:.2f}x "
                    f"below the full model's {self.full_macs / 1e6:.1f}M"]
                   if p.mean_macs is not None and self.full_macs else [])
        answered = [f"{name} {share:.1%}" for name, share in zip([*self.exit_names, "cloud"], p.shares)]
        return "\n".join([
            f"calibrated on {self.samples} samples ({self.split}), score {self.score} ({goal}):",
            "  thresholds    " + ", ".join(f"{n} {sign} {t:.6g}" for n, t in zip(self.exit_names, p.thresholds)),
            f"  expected      {quality}",
            f"  offload rate  {p.offload:.1%}",
            *compute,
            "  answered by   " + ", ".join(answered),
            *(f"  table         split block {t.split_block}: {len(t.points)} operating points, offload "
              f"{t.points[0].offload:.0%} to {t.points[-1].offload:.0%}, for latency_slo_ms" for t in self.tables),
            "  (the cloud is assumed to answer as the full model does; codec loss is not included)",
        ])


class _Cascade:
    """Confidences (E, n) of the edge exits and per-sample quality (E + 1, n) of every head; ``costs``: the
    MACs of answering at each exit and of going on (``offramp.training.report.head_costs``' ``macs_to_answer``)."""

    def __init__(self, exits: list[HeadResult], final: HeadResult, score: str,
                 costs: list[float] | None = None, consistent: bool = False) -> None:
        self.score = score
        self.costs = costs
        self.conf = np.stack([r.confidence for r in exits]).astype(np.float64)
        heads = [*exits, final]
        if final.correct is not None:
            self.quality = np.stack([r.correct for r in heads]).astype(np.float64)
            if consistent:  # an exit's answer counts only where the full model's is right too (``Target``)
                self.quality[:-1] *= self.quality[-1]
        elif consistent:
            raise ValueError("consistency with the full model applies to classification, not regression")
        else:
            self.quality = -np.stack([r.error for r in heads]).astype(np.float64)
        self.num_exits, self.n = self.conf.shape

    def point(self, thresholds: tuple[float, ...]) -> OperatingPoint:
        walked = walk(self.conf, thresholds, self.score)
        shares = walked.shares()
        macs = None if self.costs is None else walked.mean_cost(self.costs)
        answers = walked.answers(self.quality)
        se = float((self.quality[-1] - answers).std(ddof=1) / np.sqrt(self.n)) if self.n > 1 else 0.0
        return OperatingPoint(tuple(thresholds), float(answers.mean()), shares[-1], tuple(shares), macs, se)

    def candidates(self, confidences: np.ndarray) -> list[float]:
        qs = np.quantile(confidences, np.linspace(0, 1, CANDIDATES_PER_EXIT), method="lower")
        return [never_leave(self.score), *sorted({float(q) for q in qs}), always_leave(self.score)]


def calibrate(exits: list[HeadResult], final: HeadResult, score: str, target: Target,
              table: bool = False, costs: list[float] | None = None, full_macs: float | None = None) -> Calibration:
    """Thresholds for ``exits`` (edge exits, cheapest first) meeting ``target``; see the module docstring.
    ``table``: also find the operating points of the run-time controller's table. ``costs`` (MACs of
    answering at each exit, then of going on) and ``full_macs`` (the full model's) are needed for a
    speed-up target and reported with any other."""
    if not exits:
        raise ValueError("the edge has no exits: there is nothing to calibrate")
    regression = final.correct is None
    if regression and target.accuracy_drop is not None:
        raise ValueError("an accuracy drop applies to classification; for regression give an offload fraction")
    if target.min_speedup is not None and (costs is None or not full_macs):
        raise ValueError("a speed-up target needs the heads' costs")
    cascade = _Cascade(exits, final, score, costs, target.consistent)
    full = float(cascade.quality[-1].mean())
    best = _search(cascade, _objective(target, full, full_macs), target.shared)
    if target.min_speedup is not None and full_macs / best.mean_macs < target.min_speedup - 1e-9:
        cheapest = min(cascade.point((always_leave(score),) * cascade.num_exits).mean_macs, min(costs))
        raise ValueError(f"no threshold setting reaches a {target.min_speedup:g}x speed-up: at most "
                         f"{full_macs / cheapest:.2f}x, answering every input at the first exit "
                         f"({cheapest / 1e6:.1f}M of the full model's {full_macs / 1e6:.1f}M MACs)")
    points = operating_points(cascade, target.shared) if table else ()
    return Calibration(best, full, target, score, tuple(r.name for r in exits), cascade.n,
                       "mae" if regression else "accuracy", points, full_macs=full_macs)


def _search(cascade: _Cascade, key: Callable[[OperatingPoint], tuple[bool, float, float]],
            shared_only: bool = False) -> OperatingPoint:
    """The best point by ``key``: the best few shared thresholds, each refined by per-exit coordinate
    descent (one start can stall where only two thresholds moving together improve); with
    ``shared_only`` the best shared threshold, unrefined.

    Every shared value is tried twice: as it is, and with the last exit answering all that reach it
    (nothing offloaded). A local point must start there: from a shared start, raising an earlier exit's
    threshold sends samples on to a last exit that offloads some, so no single move keeps the point local
    and the descent stalls far from the best local thresholds (on ``edge_c10``, 1.4 points below them)."""
    values = cascade.candidates(cascade.conf.ravel())
    last = always_leave(cascade.score)
    shared = sorted((cascade.point(thresholds) for t in values
                     for thresholds in ((t,) * cascade.num_exits, (t,) * (cascade.num_exits - 1) + (last,))),
                    key=key, reverse=True)
    if shared_only:  # one value, or one value and a last exit answering all that reach it
        return shared[0]
    starts, seen = [], set()
    for p in shared:  # many shared values walk the same way: start from distinct outcomes only
        if (outcome := (p.shares, p.quality)) not in seen:
            seen.add(outcome)
            starts.append(p)
        if len(starts) == STARTS:
            break
    per_exit = [cascade.candidates(c) for c in cascade.conf]
    return max((_descend(cascade, key, start, per_exit) for start in starts), key=key)


def _descend(cascade: _Cascade, key: Callable[[OperatingPoint], tuple[bool, float, float]], best: OperatingPoint,
             per_exit: list[list[float]]) -> OperatingPoint:
    """Steepest descent over single thresholds: each round takes the best move of any one exit's
    threshold (moving the first exit that helps can close off a better move of another)."""
    for _ in range(MAX_ROUNDS):
        moves = (cascade.point(best.thresholds[:e] + (t,) + best.thresholds[e + 1:])
                 for e, values in enumerate(per_exit) for t in values)
        step = max(moves, key=key)
        if not key(step) > key(best):
            break
        best = step
    return best


def operating_points(cascade: _Cascade, shared: bool = False) -> tuple[OperatingPoint, ...]:
    """The most accurate point at each share of ``TABLE_OFFLOADS`` (``shared``: of one threshold for every
    exit), keeping only those that add accuracy over every point with fewer offloads: the frontier a
    controller trades along."""
    found: list[OperatingPoint] = []
    for cap in TABLE_OFFLOADS:
        point = _search(cascade, _objective(Target(max_offload=cap), 0.0), shared)
        if point.offload > cap + 1e-12:  # cannot happen (offloading nothing is always possible); never store it
            continue
        if not found or point.quality > found[-1].quality:
            found.append(point)
    return tuple(found)


def calibrate_checkpoint(checkpoint: str | Path, target: Target, score: str | None = None, data: str | None = None,
                         edge_toml: str | Path | None = None, edge: dict[str, Any] | None = None,
                         evaluate_thresholds: tuple[tuple[float, ...], ...] = (),
                         on: str = "validation") -> Calibration:
    """Evaluate a checkpoint's heads on validation data and calibrate its edge exits.

    An existing ``edge_toml`` (or the same keys in ``edge``, for a caller holding the settings rather than a
    file) supplies the split block and the exits list (which exits are on the edge) and, unless ``score`` is
    given, the score; the card and the task's default score fill in what it does not set.
    ``evaluate_thresholds``: thresholds whose cascade the result also reports (``evaluated``), from the same
    evaluation: what fixed thresholds do on these samples, without evaluating the model again.
    ``on="selection"``: choose on the card's selection split (held out of training and of validation),
    so that the validation split can report on the choice honestly.
    """
    if on not in ("validation", "selection"):
        raise OfframpError(f"calibrate on 'validation' or 'selection', not {on!r}")
    if on == "selection" and data is not None:
        raise OfframpError("--on selection uses the checkpoint's own selection split; leave out --data")
    model, card = load_checkpoint(checkpoint)
    task = model.config.task
    configured = _read_edge_toml(Path(edge_toml)) if edge_toml is not None else {}
    configured |= {k: v for k, v in (edge or {}).items() if v is not None}
    score = score or configured.get("score") or default_score(task)
    split = configured.get("split_block", card.split_block)
    names = configured.get("exits")
    try:
        check_score(score, task)
        val = load_selection(card) if on == "selection" else load_validation(card, data)[0]
        results = evaluate(model, val, score=score)
        ids = edge_exit_ids(model.exit_configs, split, names)
        costs = head_costs(model, card.input_shape, ids)
        to_answer = [c["macs_to_answer"] for c in costs]
        result = calibrate([results[i] for i in ids], results[-1], score, target, table=True, costs=to_answer,
                           full_macs=costs[-1]["macs"])
        cascade = _Cascade([results[i] for i in ids], results[-1], score, to_answer)
        evaluated = tuple(cascade.point(tuple(float(t) for t in ts)) for ts in evaluate_thresholds)
        tables = []
        for s in configured.get("split_blocks") or [split]:  # the controller's table for each split it may use
            s_ids = edge_exit_ids(model.exit_configs, s, exits_up_to(model.exit_configs, names, s))
            points = (result.table if s == split else _table(model, card.input_shape, results, s_ids, score,
                                                              target)
                      if s_ids else (_everything_offloaded(results[-1]),))
            tables.append(CalibrationTable(card.fingerprint, s, score, tuple(results[i].name for i in s_ids),
                                           result.samples, tuple(_stored(p) for p in points)))
        return dataclasses.replace(result, tables=tuple(tables), evaluated=evaluated,
                                   split=on if data is None else data)
    except ValueError as e:
        raise OfframpError(str(e)) from None


def _table(model, input_shape: tuple[int, ...], results: list[HeadResult], ids: list[int],
           score: str, target: Target) -> tuple[OperatingPoint, ...]:
    """The controller's table for the exits ``ids`` (another split block's)."""
    costs = head_costs(model, input_shape, ids)
    return operating_points(_Cascade([results[i] for i in ids], results[-1], score,
                                     [c["macs_to_answer"] for c in costs], target.consistent), target.shared)


def _stored(p: OperatingPoint) -> CalibrationPoint:
    """A point as the edge config stores it: thresholds exact, the rest rounded where digits buy nothing."""
    return CalibrationPoint(tuple(float(t) for t in p.thresholds), round(p.quality, 6), round(p.offload, 6),
                            tuple(round(x, 6) for x in p.shares))


def _everything_offloaded(final: HeadResult) -> OperatingPoint:
    """The one point of a split with no exit on the edge."""
    quality = final.correct if final.correct is not None else -final.error
    return OperatingPoint((), float(np.mean(quality)), 1.0, (1.0,))


def _read_edge_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise OfframpError(f"{path} is not valid TOML: {e}") from None


def _objective(target: Target, full_quality: float,
               full_macs: float | None = None) -> Callable[[OperatingPoint], tuple[bool, float, float]]:
    """Sort key: feasible points first, then the target's goal, then the other quantity as tie-break."""
    if target.min_speedup is not None:
        budget = full_macs / target.min_speedup * (1 + 1e-12)
        return lambda p: (p.mean_macs <= budget, p.quality, -p.mean_macs)
    if target.accuracy_drop is not None:
        floor = full_quality - target.accuracy_drop / 100 - 1e-12
        return lambda p: (p.quality - target.margin_se * p.loss_se >= floor, -p.offload, p.quality)
    cap = target.max_offload + 1e-12
    return lambda p: (p.offload <= cap, p.quality, -p.offload)


def cheapest_within(exits: list[HeadResult], final: HeadResult, score: str, accuracy_drop: float,
                    costs: list[float], margin_se: float = 0.0, shared: bool = False,
                    consistent: bool = False) -> OperatingPoint:
    """The thresholds with the lowest mean compute per input whose accuracy is at most ``accuracy_drop``
    points below the full model's, with ``margin_se`` standard errors of the loss to spare (same search as
    ``calibrate``, ``shared`` and ``consistent`` as ``Target`` has them); ``costs`` as ``_Cascade`` takes
    them."""
    cascade = _Cascade(exits, final, score, costs, consistent)
    floor = float(cascade.quality[-1].mean()) - accuracy_drop / 100 - 1e-12
    return _search(cascade, lambda p: (p.quality - margin_se * p.loss_se >= floor, -p.mean_macs, p.quality),
                   shared)


def operating_point(exits: list[HeadResult], final: HeadResult, score: str, thresholds: tuple[float, ...],
                    costs: list[float] | None = None) -> OperatingPoint:
    """What ``thresholds`` do on these results: e.g. thresholds chosen on one split, judged on another."""
    return _Cascade(exits, final, score, costs).point(tuple(float(t) for t in thresholds))


def calibrate_input_route(checkpoint: str | Path, quality: int = 90, data: str | None = None,
                          on: str = "validation") -> InputRouteCalibration:
    """The input route measured like the operating points, on the same samples: the whole model's quality on
    the inputs as the cloud receives them (images through JPEG at ``quality``, so its loss is counted; other
    inputs as raw float32 tensors) and the mean bytes of the request that carries each."""
    from torch.utils.data import TensorDataset

    from offramp.core.data.preprocess import encode_images, preprocess_bytes
    from offramp.core.wire import pb

    if on not in ("validation", "selection"):
        raise OfframpError(f"calibrate on 'validation' or 'selection', not {on!r}")
    model, card = load_checkpoint(checkpoint)
    if card.modality not in ("image", "audio"):
        raise OfframpError(f"the input route is calibrated for image and audio models, not {card.modality}")
    val = load_selection(card) if on == "selection" else load_validation(card, data)[0]
    x, y = val.tensors[0], val.tensors[-1]
    envelope = pb.OffloadRequest(request_id=1 << 20, deadline_ms=1000)  # as the edge sends it
    if card.modality == "image":
        files = encode_images(x.numpy(), "jpeg", quality)
        sent = torch.stack([preprocess_bytes(f, "image", tuple(card.input_shape)) for f in files])
        sizes = [pb.OffloadRequest(input=pb.InferRequest(encoded_file=f)).ByteSize() for f in files]
    else:
        sent = x
        one = pb.InferRequest(tensor=pb.RawTensor(shape=list(x.shape[1:]), data=bytes(4 * x[0].numel())))
        sizes = [pb.OffloadRequest(input=one).ByteSize()] * len(x)
    final = evaluate(model, TensorDataset(sent, y))[-1]
    quality_of = final.correct if final.correct is not None else -final.error
    return InputRouteCalibration(card.fingerprint, quality, round(float(np.mean(quality_of)), 6),
                                 round(float(np.mean(sizes)) + envelope.ByteSize(), 1), len(x))
