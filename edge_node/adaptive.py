"""The latency controller at run time: calibration tables in, a policy per batch out.

``options_for`` turns the edge config's calibration tables into the controller's options, refusing tables
that do not belong to this edge (another checkpoint, other exits, another score) with a message that says
what to re-run. ``Adaptive`` steps the pure controller (``controller.step``) on the latest measurements at
most every ``DECIDE_EVERY_S`` (each batch asks; deciding more often than measurements change buys nothing)
and keeps the decision, and the measurements behind it, for the policy RPCs and the metrics.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from offramp.core.operating_points import CalibrationTable, InputRouteCalibration
from offramp.serving.config import ControllerSettings

from .controller import Decision, Option, State, step
from .measure import Measured, Measurements
from .policy import PolicySettings

log = logging.getLogger(__name__)

DECIDE_EVERY_S = 0.1


def options_for(tables: Sequence[CalibrationTable], fingerprint: str, exits: Mapping[int, Sequence[str]],
                score: str, input_route: InputRouteCalibration | None = None, route: str | None = None,
                primary: int | None = None) -> list[Option]:
    """The options of the tables for the splits in ``exits`` (split -> the edge's exit names there), points
    that offload nothing as the local route, and the input route where it was calibrated; only ``route``'s
    where one is fixed. ``primary``: the split whose most accurate local point is the input route's fallback.

    A ``ValueError`` when a split has no table or its table was made for another checkpoint, other exits or
    another score: its numbers would describe some other edge; likewise an input route calibrated for
    another checkpoint, or a fixed route no option takes.
    """
    by_split = {t.split_block: t for t in tables}
    options = []
    for split, names in sorted(exits.items()):
        table = by_split.get(split)
        if table is None:
            have = ", ".join(str(s) for s in sorted(by_split)) or "none"
            raise ValueError(f"latency_slo_ms needs a calibration table for split block {split} (the config has "
                             f"{have}): run `offramp calibrate CHECKPOINT --out CONFIG`")
        if table.fingerprint != fingerprint:
            raise ValueError(f"the calibration table of split block {split} was made for another checkpoint "
                             f"(fingerprint {table.fingerprint[:12]}..., this one is {fingerprint[:12]}...): "
                             "re-run `offramp calibrate` for this checkpoint")
        if tuple(table.exits) != tuple(names) or table.score != score:
            raise ValueError(f"the calibration table of split block {split} is for exits {','.join(table.exits)} "
                             f"with score {table.score}; this edge runs {','.join(names)} with score {score}: "
                             "re-run `offramp calibrate`")
        options += [Option(split, p.thresholds, p.accuracy, p.offload, p.shares,
                           route="local" if p.offload == 0.0 else "split") for p in table.points]
    if input_route is not None:
        if input_route.fingerprint != fingerprint:
            raise ValueError("the [input_route] calibration was made for another checkpoint (fingerprint "
                             f"{input_route.fingerprint[:12]}..., this one is {fingerprint[:12]}...): re-run "
                             "`offramp calibrate --input-route`")
        primary = min(exits) if primary is None else primary
        local = [o for o in options if o.split_block == primary and o.local_only] or \
            [o for o in options if o.split_block == primary]
        fallback = max(local, key=lambda o: o.accuracy)
        options.append(Option(primary, fallback.thresholds, input_route.accuracy, 1.0, (1.0,), route="input",
                              bytes=input_route.bytes_per_request))
    if route is not None:
        options = [o for o in options if o.route == route or (route == "split" and o.route == "local")]
        if not options:
            raise ValueError(f"route {route} has no calibrated option: "
                             + ("run `offramp calibrate --input-route`" if route == "input" else
                                "re-run `offramp calibrate`"))
    return options


class Adaptive:
    """The controller's state on one edge: ``tick`` once per batch, ``settings`` for the policy in force."""

    def __init__(self, options: Sequence[Option], settings: ControllerSettings, measurements: Measurements,
                 score: str, clock: Callable[[], float] = time.monotonic) -> None:
        if settings.latency_slo_ms is None:
            raise ValueError("the latency controller needs latency_slo_ms, the p95 target it keeps")
        self.options = list(options)
        self.slack = settings.accuracy_slack_points / 100
        self.slo_ms = settings.latency_slo_ms
        self.window_s = settings.slo_window_s
        self.measurements = measurements
        self.score = score
        self._clock = clock
        self._lock = threading.Lock()
        self._state = State()
        self._next = -float("inf")
        self.decision: Decision | None = None  # None until the link has been measured
        self.measured: Measured | None = None

    def tick(self) -> None:
        """Decide again if ``DECIDE_EVERY_S`` has passed; before the first rtt measurement nothing is known of
        the link, and the configured thresholds stand."""
        now = self._clock()
        with self._lock:
            if now < self._next:
                return
            self._next = now + DECIDE_EVERY_S
            measured = self.measurements.snapshot()
            if measured.rtt_ms is None:
                self.measured = measured
                return
            before = self._state.current
            decision = step(self.options, measured.conditions(), self.slo_ms, self._state, now, self.window_s,
                            self.slack)
            self._state, self.decision, self.measured = decision.state, decision, measured
        if decision.state.current != before:
            o = decision.option
            log.info("controller: route %s, %s at split %d, expected accuracy %.4f, offload %.1f%%, predicted p95 "
                     "%.1f ms (target %g ms%s): %s", o.route, "thresholds " + ", ".join(f"{t:g}" for t in o.thresholds),
                     o.split_block, o.accuracy, 100 * o.offload, decision.predicted_p95_ms, self.slo_ms,
                     "" if decision.target_met else ", NOT MET", decision.reason)

    def settings(self) -> PolicySettings | None:
        """The chosen option as a policy; None before the first decision."""
        decision = self.decision
        if decision is None:
            return None
        o = decision.option
        return PolicySettings(o.thresholds, self.score, offload_enabled=not o.local_only, split_block=o.split_block,
                              route=o.route)

    @property
    def target_met(self) -> bool:
        decision = self.decision
        return decision is None or decision.target_met
