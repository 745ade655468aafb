"""Choosing the exit thresholds (and the split) at run time: the best expected accuracy whose predicted p95
latency meets the target.

Pure functions of what the edge measured (``Conditions``), the operating points the calibration table
offers (``Option``), the target and the controller's previous ``State``: no clock, no I/O, so a test can
replay any sequence of measurements and check every decision.

Latency model of one option (an operating point at a split):

* a sample an edge exit answers takes ``edge_queue + compute[k]``: the local batches whose deepest stage
  was that exit;
* an offloaded one takes ``D = edge_queue + compute[split] + rtt + transfer + cloud`` and, when offloads
  follow each other faster than the uplink drains them, a wait behind the others. Its tail is taken as an
  M/M/1 queue's, ``P(W > t) = rho * exp(-(1 - rho) * t / serialise)`` with utilisation
  ``rho = rate * offload share * serialise``: conservative for fixed-size payloads, and it is what makes
  a higher offload share cost latency on a slow link.
* the input route (``Option.route == "input"``) sends every input itself: ``D = rtt + transfer + cloud`` with
  the cloud's time for the whole model (``cloud_for(INPUT)``) and no edge compute;
* an option's upload scales with its bytes: where the option's bytes per request (measured for its split or
  route, else calibrated) differ from those of the offloads the link was measured with, ``transfer`` and
  ``serialise`` scale by their ratio (jitter is taken to scale too: conservative for larger payloads);
* the mean (``predict_mean``) is that of the same mixture, with the link's typical time (``serialise``) for
  the transfer, the mean wait for a local batch for ``edge_queue`` and the cloud's typical time (the p95 takes
  their high quantiles), and
  the M/M/1 wait's mean ``rho * serialise / (1 - rho)``;
* the p95 is that of the mixture: the smallest ``t`` with ``sum_k share_k * P(L_k > t) <= tail``. Over all
  requests ``tail`` is 5 %: offloads slower than the target still fit when at most 5 % of the samples take
  them; that is how a slow link is met: the exits answer more.
* the target is judged per window (``slo_window_s``, one second by default): the p95 of each window must meet
  it in 95 % of windows. A window of ``n`` requests tolerates few slow ones (for ``n <= 20`` its p95 is its
  slowest request), so ``tail`` shrinks to what keeps a window's count of slow requests within its allowance
  in 95 % of windows (``window_tail``): at 10 requests a window, 0.5 %. A link where one offload alone takes
  longer than the target then means not offloading, rather than one miss in every window holding an offload.

Stability (fast down, slow up): an option that stops meeting the target is left at once, for the best one
predicted to meet it with ``HEADROOM`` to spare; a better option is taken only once it has been predicted to
meet the target with that headroom continuously for ``hold_s`` seconds. Each time an option has to be left
soon after it was taken, ``hold_s`` doubles (up to ``MAX_HOLD_S``); it returns to ``BASE_HOLD_S`` only after
no option has lost its standing for four holds. So a link that flips every few seconds settles on the option
that survives both states instead of following it. Measurements are smoothed over
windows before they get here (``measure``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

TAIL = 0.05  # p95
WINDOWS_MET = 0.95  # the share of windows whose p95 must meet the target
MAX_WINDOW_REQUESTS = 2000  # beyond this the window's tail is within a few % of its limit: not worth the sums
HEADROOM = 0.1  # a new option must be predicted this fraction below the target: noise must not flip it back
MIN_GAIN = 0.001  # expected accuracy an upgrade must add (0.1 point): no moves for nothing
MAX_UTILISATION = 0.9  # beyond this the uplink's queue grows without bound in practice: never plan for it
BASE_HOLD_S = 3.0  # an option is kept at least this long before a better one replaces it
MAX_HOLD_S = 60.0
TRIAL_EVERY_S = 2.0  # a link not measured yet is tried (one decision's requests) at most this often


INPUT = -1  # the input route's key among split blocks (measurements, cloud times): before block 0


@dataclass(frozen=True)
class Option:
    """One choice: a route, and for the split route thresholds at a split, with what calibration expects.

    The input route's ``thresholds`` and ``split_block`` are the edge's fallback, used only when the cloud
    cannot answer; its ``shares`` are ``(1.0,)``: the cloud answers all."""

    split_block: int
    thresholds: tuple[float, ...]
    accuracy: float  # expected quality (accuracy; -MAE for regression): higher is better
    offload: float  # expected share of samples sent to the cloud
    shares: tuple[float, ...]  # expected share answered by each edge exit, then by the cloud
    route: str = "split"  # "split", "input" or "local" (see edge_node.policy.ROUTES)
    bytes: float = 0.0  # expected bytes per offloaded request; 0: unknown

    @property
    def local_only(self) -> bool:
        """Nothing goes upstream: the edge runs it with offload off, and needs no cloud for it."""
        return self.route == "local" or self.offload == 0.0

    @property
    def link_key(self) -> int:
        """Whose measurements describe its offloads: its split block, or ``INPUT``."""
        return INPUT if self.route == "input" else self.split_block


@dataclass(frozen=True)
class Conditions:
    """What the edge knows now, smoothed (see ``measure``); times in milliseconds.

    ``compute_ms[split]`` holds, per edge exit of that split, the local batch time when that exit was the
    deepest stage reached, then the time to the split (exits and encoding included).
    """

    compute_ms: Mapping[int, Sequence[float]]
    edge_queue_ms: float = 0.0
    rtt_ms: float | None = None  # propagation round trip (None: not measured yet)
    transfer_ms: float = 0.0  # an offload's time on the link beyond the rtt (upload, jitter), high quantile
    serialise_ms: float = 0.0  # the same, typical: how long one offload holds the uplink
    cloud_ms: float = 0.0  # the cloud's own time per request (decode, queue, compute), high quantile
    request_rate: float = 0.0  # requests per second reaching the edge
    cloud_by_split: Mapping[int, float] = field(default_factory=dict)  # cloud_ms per split block, where known
    offload_bytes: float = 0.0  # median bytes of the offloads transfer_ms was measured on; 0: none yet
    # Whether any offload has been measured on the link as it is now; False: transfer_ms and serialise_ms are
    # unknown, not zero, and options over the link are only tried (see ``step``).
    link_measured: bool = True
    bytes_by_split: Mapping[int, float] = field(default_factory=dict)  # median bytes per split block (or INPUT)
    # The mean wait for a local batch, for predicted means (None: edge_queue_ms). Most requests find the
    # compute thread free and a few wait a whole batch: on the slowed edge a median of 0.1 ms, a mean of 8.5
    # and a high quantile of 33, which made the local route's mean look 25 ms slower than it was.
    edge_queue_mean_ms: float | None = None
    # cloud_by_split's typical (median) values, for predicted means, as the wait above (empty: the high quantile).
    cloud_typical_by_split: Mapping[int, float] = field(default_factory=dict)

    def cloud_for(self, split: int, typical: bool = False) -> float:
        """The cloud's time for an offload after ``split``: its high quantile, or typical (for means) where
        measured."""
        if typical and split in self.cloud_typical_by_split:
            return self.cloud_typical_by_split[split]
        return self.cloud_by_split.get(split, self.cloud_ms)

    def upload_scale(self, option: Option) -> float:
        """How much longer than the measured offloads ``option``'s take on the uplink (by their bytes)."""
        nbytes = self.bytes_by_split.get(option.link_key) or option.bytes
        return nbytes / self.offload_bytes if nbytes and self.offload_bytes else 1.0

    def utilisation(self, offload: float, scale: float = 1.0) -> float:
        """Share of the uplink's time offloads take at this offload share (of ``scale`` times the bytes)."""
        return self.request_rate * offload * self.serialise_ms * scale / 1000


@lru_cache(maxsize=256)
def _window_tail(n: int) -> float:
    allowed = n - math.ceil(round((1 - TAIL) * n, 9))  # slow answers a window holds with its nearest-rank p95 met

    def windows_met(q: float) -> float:  # P(Binomial(n, q) <= allowed)
        if q <= 0.0:
            return 1.0
        return sum(math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                            + k * math.log(q) + (n - k) * math.log1p(-q)) for k in range(allowed + 1))

    lo, hi = 0.0, TAIL
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if windows_met(mid) >= WINDOWS_MET else (lo, mid)
    return lo


def window_tail(request_rate: float, window_s: float) -> float:
    """The share of requests that may exceed the target so that the p95 of a ``window_s`` window (holding
    ``request_rate * window_s`` requests) meets it in ``WINDOWS_MET`` of windows; ``TAIL`` when the target is
    judged over all requests (``window_s`` 0) or nothing is known of the rate."""
    n = min(MAX_WINDOW_REQUESTS, round(request_rate * window_s))
    return TAIL if n <= 1 else _window_tail(n)


@dataclass(frozen=True)
class _Mixture:
    """An option's latency as a mixture: local answers at fixed times, and offloads that take ``d`` plus, when
    they follow each other faster than the uplink drains them, an M/M/1 wait (``rho``, ``wait_scale``)."""

    local: list[tuple[float, float]]  # (share, ms) of the samples the edge's exits answer
    offload: float  # share of samples sent upstream
    d: float  # an offload's latency before any wait behind the others
    rho: float
    wait_scale: float


def _mixture(option: Option, c: Conditions, high_quantile: bool) -> _Mixture | None:
    """The option's mixture under ``c``, its transfer and the edge's queue at their high quantiles (for the
    p95) or typical (for the mean); None when the uplink could not carry its offloads."""
    scale = c.upload_scale(option)
    f = option.shares[-1] if not option.local_only else 0.0
    rho = c.utilisation(f, scale)
    if f > 0 and rho >= MAX_UTILISATION:
        return None
    transfer = (c.transfer_ms if high_quantile else c.serialise_ms) * scale
    network = (c.rtt_ms or 0.0) + transfer + c.cloud_for(option.link_key, typical=not high_quantile)
    if option.route == "input":  # nothing computed on the edge
        local, d = [], network
    else:
        compute = c.compute_ms[option.split_block]
        queue = c.edge_queue_ms if high_quantile or c.edge_queue_mean_ms is None else c.edge_queue_mean_ms
        local = [(share, queue + compute[k]) for k, share in enumerate(option.shares[:-1]) if share > 0]
        d = queue + compute[-1] + network
    return _Mixture(local, f, d, rho, c.serialise_ms * scale / (1 - rho) if rho > 0 else 0.0)


def predict_mean(option: Option, c: Conditions) -> float:
    """The option's mean latency (ms) under ``c``: what "fastest" means among options that meet the target
    and are equally accurate within the slack (users and studies compare means; the p95 is the constraint);
    ``inf`` when the uplink could not carry its offloads."""
    m = _mixture(option, c, high_quantile=False)
    if m is None:
        return math.inf
    return sum(share * ms for share, ms in m.local) + m.offload * (m.d + m.rho * m.wait_scale)


def predict_p95(option: Option, c: Conditions, tail: float = TAIL) -> float:
    """The option's p95 latency (ms) under ``c``: the latency that only ``tail`` of the samples exceed (see
    ``window_tail``); ``inf`` when the uplink could not carry its offloads."""
    m = _mixture(option, c, high_quantile=True)
    if m is None:
        return math.inf
    local, f, d, rho, wait_scale = m.local, m.offload, m.d, m.rho, m.wait_scale

    def beyond(t: float) -> float:
        """P(latency > t)."""
        p = sum(share for share, ms in local if t < ms)
        if f > 0:
            p += f * (1.0 if t < d else rho * math.exp(-(t - d) / wait_scale) if wait_scale > 0 else 0.0)
        return p

    # P(latency > t) falls in steps at the local times and at d, then smoothly in the wait's tail.
    steps = sorted({ms for _, ms in local} | ({d} if f > 0 else set()))
    for t in [0.0, *steps]:
        if beyond(t) <= tail + 1e-12:
            return t
    lo, hi = steps[-1], steps[-1] + wait_scale * 50  # beyond(steps[-1]) > tail: only the wait's tail is left
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if beyond(mid) <= tail else (mid, hi)
    return hi


@dataclass(frozen=True)
class State:
    """What the controller remembers between decisions."""

    current: int | None = None  # index into the options; None before the first decision
    since: float = -math.inf  # when it was chosen
    hold_s: float = BASE_HOLD_S  # how long an option is kept before a better one may replace it
    last_trouble: float = -math.inf  # when an option last stopped meeting the target with headroom
    changes: int = 0
    good_since: tuple[float, ...] = ()  # per option: since when it has met the target with headroom (inf: not now)
    trial_at: float = -math.inf  # when an option over a link not measured yet was last tried
    trial_pending: bool = False  # a trial went out and the link has not been measured since


@dataclass(frozen=True)
class Decision:
    """The option in force after one step, and why."""

    state: State
    option: Option
    predicted_p95_ms: float
    target_met: bool  # False: no option meets the target; the edge answers locally with its best exits
    reason: str
    predictions: tuple[float, ...] = field(repr=False, default=())
    tail: float = TAIL  # the share of answers planned to exceed the target (``window_tail``)


def step(options: Sequence[Option], c: Conditions, slo_ms: float, state: State, now: float,
         window_s: float = 0.0, slack: float = 0.0) -> Decision:
    """One decision at time ``now`` (seconds, any origin): keep the current option or move (see the module).
    ``window_s``: the target holds for the p95 of windows this long (0: of all requests). ``slack``: expected
    accuracy (a fraction) the controller may give up for speed: options within it of the most accurate one
    that meets the target count as equally good, and the fastest of them (lowest predicted mean) is taken.

    A link nothing has been measured on yet (``Conditions.link_measured``) cannot be predicted: options over it
    count as missing the target, except that one of them, where it would be chosen if its upload were free, is
    tried for this one decision, at most every ``TRIAL_EVERY_S``, and the controller stays where it was until
    an answer (or a deadline) has measured the link. Then it chooses afresh, as at its first decision.
    Trusting an unmeasured upload as free, a controller starting on a slow link sends every request over it
    until the first answers come back, which on a cellular trace's dead stretch takes seconds.
    """
    if c.link_measured:
        if not state.trial_pending:
            return _step(options, c, slo_ms, state, now, window_s, slack)
        # The link is measured since a trial: choose as the first time, on what it found.
        fresh = _step(options, c, slo_ms, replace(state, current=None, trial_pending=False), now, window_s, slack)
        kept = fresh.state.current == state.current
        return replace(fresh, state=replace(fresh.state, since=state.since if kept else now,
                                            changes=state.changes + (not kept and state.current is not None)))
    unknown = [not o.local_only for o in options]
    decision = _step(options, c, slo_ms, state, now, window_s, slack, unknown=unknown)
    if now - state.trial_at < TRIAL_EVERY_S or not any(unknown):
        return decision
    hoped = _step(options, c, slo_ms, replace(state, current=None), now, window_s, slack)  # upload taken as free
    if not unknown[hoped.state.current]:
        return decision
    return replace(hoped, state=replace(decision.state, trial_at=now, trial_pending=True),
                   reason=f"trying the {hoped.option.route} route on a link not measured yet")


def _step(options: Sequence[Option], c: Conditions, slo_ms: float, state: State, now: float, window_s: float,
          slack: float, unknown: Sequence[bool] | None = None) -> Decision:
    """``step`` on a measured link; ``unknown`` options (over a link not measured yet) count as missing."""
    if not options:
        raise ValueError("the controller needs at least one option")
    tail = window_tail(c.request_rate, window_s)
    p95 = tuple(math.inf if unknown and unknown[i] else predict_p95(o, c, tail) for i, o in enumerate(options))
    mean = tuple(predict_mean(o, c) for o in options) if slack else p95
    cur = state.current
    limit = slo_ms * (1 - HEADROOM)
    before = state.good_since if len(state.good_since) == len(options) else (math.inf,) * len(options)
    good_since = tuple(min(b, now) if p <= limit else math.inf for b, p in zip(before, p95))
    trouble = any(b < math.inf and g == math.inf for b, g in zip(before, good_since))
    state = replace(state, good_since=good_since, last_trouble=now if trouble else state.last_trouble)

    def preferred(candidates: Sequence[int]) -> int:
        """The most accurate of ``candidates``; with ``slack``, the fastest of those within it of the best."""
        if not slack:
            return max(candidates, key=lambda i: (options[i].accuracy, -options[i].offload))
        top = max(options[i].accuracy for i in candidates)
        near = [i for i in candidates if options[i].accuracy >= top - slack - 1e-12]
        return min(near, key=lambda i: (mean[i], p95[i], -options[i].accuracy, options[i].offload))

    def best(limit: float) -> int | None:
        fits = [i for i in range(len(options)) if p95[i] <= limit]
        return preferred(fits) if fits else None

    def fallback() -> int:
        """Nothing meets the target: the most accurate local-only option, else the fastest."""
        local = [i for i, o in enumerate(options) if o.local_only]
        if local:
            return max(local, key=lambda i: (options[i].accuracy, -p95[i]))
        return min(range(len(options)), key=lambda i: p95[i])

    def moved(to: int, why: str, **changes: float) -> Decision:
        if to == cur:
            return Decision(replace(state, **changes), options[to], p95[to], p95[to] <= slo_ms, why, p95, tail)
        new = replace(state, current=to, since=now, changes=state.changes + (cur is not None), **changes)
        return Decision(new, options[to], p95[to], p95[to] <= slo_ms, why, p95, tail)

    safe = best(limit)
    if cur is None:
        return moved(safe if safe is not None else (best(slo_ms) if best(slo_ms) is not None else fallback()),
                     "first choice")
    if p95[cur] > slo_ms:  # missing the target: leave now
        to = safe if safe is not None else best(slo_ms)
        hold = min(2 * state.hold_s, MAX_HOLD_S) if now - state.since < 2 * state.hold_s else state.hold_s
        if to is None:
            to = fallback()
            why = (f"no option meets p95 {slo_ms:g} ms (best predicted {min(p95):.0f} ms): answering locally"
                   if to != cur or p95[to] > slo_ms else "no option meets the target")
            return moved(to, why, last_trouble=now, hold_s=hold)
        return moved(to, f"predicted p95 {p95[cur]:.0f} ms > target {slo_ms:g} ms", last_trouble=now, hold_s=hold)
    # Meeting the target: after a long calm the hold is reset; a better option must have been good for as long.
    hold = BASE_HOLD_S if now - state.last_trouble > 4 * state.hold_s else state.hold_s
    held = [i for i in range(len(options)) if now - good_since[i] >= hold]
    up = preferred([*held, cur]) if held else None
    if up is not None and up != cur and (
            options[up].accuracy > options[cur].accuracy + slack + MIN_GAIN
            or (slack and options[up].accuracy >= options[cur].accuracy - slack
                and mean[up] < mean[cur] * (1 - HEADROOM))):
        return moved(up, f"a better option met the target for {hold:g} s (p95 {p95[up]:.0f} ms)", hold_s=hold)
    return moved(cur, "meets the target", hold_s=hold)

