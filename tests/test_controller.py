"""The adaptive controller's choices on scripted measurements, and the measurements behind them: pure
functions and a made-up clock, no sockets."""
from __future__ import annotations

import math

import pytest

from edge_node.controller import BASE_HOLD_S, TAIL, Conditions, Option, State, predict_p95, step, window_tail
from edge_node.measure import Measurements

SPLIT = 4
# A calibration frontier of one split with two exits: more offload, more accuracy.
OPTIONS = [
    Option(SPLIT, (0.9, -math.inf), 0.900, 0.00, (0.70, 0.30, 0.00)),
    Option(SPLIT, (0.9, 0.95), 0.920, 0.04, (0.70, 0.26, 0.04)),
    Option(SPLIT, (0.95, 0.9), 0.950, 0.20, (0.60, 0.20, 0.20)),
    Option(SPLIT, (0.99, 0.99), 0.970, 0.50, (0.40, 0.10, 0.50)),
    Option(SPLIT, (math.inf, math.inf), 0.975, 1.00, (0.00, 0.00, 1.00)),
]
COMPUTE = {SPLIT: (3.0, 5.0, 6.0)}  # ms: batches ending at exit 1, at exit 2, at the split
WIFI = Conditions(COMPUTE, rtt_ms=6, transfer_ms=3, serialise_ms=2, cloud_ms=5, request_rate=20)
LTE = Conditions(COMPUTE, rtt_ms=50, transfer_ms=10, serialise_ms=8, cloud_ms=5, request_rate=20)
G3 = Conditions(COMPUTE, rtt_ms=150, transfer_ms=35, serialise_ms=25, cloud_ms=5, request_rate=20)
SLO = 100.0


def choice(c: Conditions, slo: float = SLO) -> Option:
    return step(OPTIONS, c, slo, State(), now=0.0).option


def test_p95_of_the_mixture() -> None:
    everything_up, local = OPTIONS[-1], OPTIONS[0]
    assert predict_p95(local, G3) == 5.0  # 30 % answered by the second exit: its time is the p95
    d = 6 + 6 + 3 + 5  # to the split, rtt, transfer, cloud
    assert predict_p95(everything_up, WIFI) == d  # utilisation 4 %: no wait at the 95th percentile
    # Offloads at most 5 % of the samples do not reach the p95, however slow the link.
    assert predict_p95(OPTIONS[1], G3) == 5.0
    # A fifth offloaded over 3G: the p95 is an offload's latency, with a wait behind the others when they
    # come often enough (utilisation 10 %, then 30 %).
    assert predict_p95(OPTIONS[2], G3) == 6 + 150 + 35 + 5
    assert predict_p95(OPTIONS[2], G3.__class__(**{**G3.__dict__, "request_rate": 60})) > 6 + 150 + 35 + 5
    # More offloads wait longer: the prediction grows with the request rate, then the link cannot carry them.
    busy = Conditions(COMPUTE, rtt_ms=6, transfer_ms=3, serialise_ms=2, cloud_ms=5, request_rate=300)
    assert predict_p95(everything_up, busy) > predict_p95(everything_up, WIFI)
    assert predict_p95(everything_up, Conditions(COMPUTE, rtt_ms=6, serialise_ms=2, request_rate=500)) == math.inf


@pytest.mark.parametrize("conditions, slo, expected", [
    (WIFI, SLO, 4),  # fast link: everything goes up, the most accurate
    (LTE, SLO, 4),  # 50 ms rtt still fits 100 ms
    (LTE, 60.0, 1),  # ... not 60 ms: only offloads the p95 does not see
    (G3, SLO, 1),
    (G3, 4.0, 0),  # nothing meets 4 ms: the most accurate local-only option (below)
])
def test_the_most_accurate_option_that_meets_the_target(conditions: Conditions, slo: float, expected: int) -> None:
    assert choice(conditions, slo) == OPTIONS[expected]


def test_when_nothing_meets_the_target_it_answers_locally_and_says_so() -> None:
    decision = step(OPTIONS, G3, 4.0, State(), now=0.0)
    assert decision.option.local_only and not decision.target_met
    assert decision.predicted_p95_ms == 5.0


def test_a_busy_cloud_lowers_the_offload_share() -> None:
    busy_cloud = Conditions(COMPUTE, rtt_ms=6, transfer_ms=3, serialise_ms=2, cloud_ms=120, request_rate=20)
    assert choice(busy_cloud) == OPTIONS[1]


def test_leaves_at_once_and_comes_back_only_after_the_hold() -> None:
    first = step(OPTIONS, WIFI, SLO, State(), now=0.0)
    assert first.option == OPTIONS[4] and first.state.changes == 0
    down = step(OPTIONS, G3, SLO, first.state, now=10.0)  # the link slows: leave in the same step
    assert down.option == OPTIONS[1] and down.state.changes == 1 and down.target_met
    hold = down.state.hold_s
    t, state = 10.0, down.state
    while t < 10.0 + hold - 0.2:  # the link is fast again, but the new option must hold first
        t += 0.1
        decision = step(OPTIONS, WIFI, SLO, state, now=t)
        assert decision.option == OPTIONS[1]
        state = decision.state
    up = step(OPTIONS, WIFI, SLO, state, now=10.0 + hold + 0.1)
    assert up.option == OPTIONS[4] and up.state.changes == 2


@pytest.mark.parametrize("period_s", [2.0, 5.0])
def test_a_link_flipping_every_few_seconds_does_not_make_it_oscillate(period_s: float) -> None:
    """Wi-Fi and 3G alternate every ``period_s`` for five minutes, decided ten times a second."""
    state, t, changes, violating, chosen = State(), 0.0, [], 0, set()
    while t < 300:
        c = WIFI if int(t // period_s) % 2 == 0 else G3
        decision = step(OPTIONS, c, SLO, state, now=t)
        if decision.state.changes != state.changes:
            changes.append(t)
        violating += decision.predicted_p95_ms > SLO
        chosen.add(decision.option)
        state = decision.state
        t = round(t + 0.1, 1)
    assert violating == 0  # every step ends on an option that meets the target under what it sees
    # An upgrade needs the better option to look good for a whole hold, which a flipping link never gives
    # once the hold (doubled by each upgrade undone) outlasts a flip.
    assert len(changes) <= 3, changes
    assert state.current == 1 and chosen <= {OPTIONS[1], OPTIONS[4]}


def test_the_hold_resets_after_a_long_calm() -> None:
    state = State(current=1, since=0.0, hold_s=48.0, last_trouble=0.0)
    assert step(OPTIONS, WIFI, SLO, state, now=100.0).state.hold_s == 48.0
    assert step(OPTIONS, WIFI, SLO, state, now=200.0).state.hold_s == BASE_HOLD_S


def test_small_differences_are_not_worth_a_move() -> None:
    near = [OPTIONS[0], Option(SPLIT, (0.5, -math.inf), 0.9005, 0.0, (0.8, 0.2, 0.0))]
    first = step(near, WIFI, SLO, State(), now=0.0)
    assert first.option == near[1]  # the first choice takes the best
    kept = step(near, WIFI, SLO, State(current=0, since=0.0), now=100.0)
    assert kept.option == near[0] and kept.state.changes == 0


# -- measurements, on a made-up clock ------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_measurements_from_traffic() -> None:
    clock = Clock()
    m = Measurements({SPLIT: (math.nan, math.nan, math.nan)}, clock)
    assert m.snapshot().rtt_ms is None and m.snapshot().conditions().rtt_ms is None
    for rtt in (9.0, 6.0, 7.0):
        clock.t += 0.5
        m.probe(rtt)
    for i in range(10):  # 4 kB offloads: 10 ms on the link beyond the rtt, but two 50 ms stragglers
        cloud = 2 + i / 10
        m.offloaded(SPLIT, 4000, rtt_ms=6 + cloud + (10 if i < 8 else 50), cloud_queue_ms=0.5, cloud_compute_ms=1.5,
                    cloud_total_ms=cloud)
        m.arrival()
    m.batch(SPLIT, 1, 4.0)
    snap = m.snapshot()
    assert snap.rtt_ms == 6.0 and snap.serialise_ms == 10.0 and snap.transfer_ms == 50.0  # median, p90
    assert snap.uplink_bytes_per_s == 400_000 and snap.offload_bytes == 4000 and snap.offloads == 10
    assert (snap.cloud_queue_ms, snap.cloud_compute_ms, snap.cloud_ms) == (0.5, 1.5, 2.8)
    assert snap.request_rate == 10 / 2.0 and snap.compute_ms[SPLIT][1] == 4.0 and math.isnan(snap.compute_ms[SPLIT][0])
    clock.t += 60  # nothing new for a minute: the last eight samples stay (a quiet cloud is not a fast one)...
    assert m.snapshot().cloud_ms == 2.9 and m.snapshot().request_rate == 0
    assert m.snapshot().offloads == 0  # ... but the link's are forgotten: stale, the controller may try again


def test_a_changed_rtt_starts_the_link_afresh() -> None:
    clock = Clock()
    m = Measurements({SPLIT: (1.0, 2.0, 3.0)}, clock)

    def probes(rtt: float, n: int) -> None:
        for _ in range(n):
            clock.t += 0.5
            m.probe(rtt)

    probes(6.0, 6)
    m.offloaded(SPLIT, 4000, rtt_ms=160, cloud_queue_ms=0, cloud_compute_ms=1, cloud_total_ms=2)  # the link just slowed
    probes(150.0, 1)
    assert m.snapshot().rtt_ms == 6.0 and m.snapshot().transfer_ms == 152.0  # one slow probe proves nothing
    probes(150.0, 2)
    snap = m.snapshot()  # slow for two probes in a row: the link changed; what it carried before is forgotten
    assert snap.rtt_ms == 150.0 and snap.transfer_ms is None and m.link_changes == 1 and snap.cloud_ms == 2.0
    probes(160.0, 4)  # jitter is not a change
    m.offloaded(SPLIT, 4000, rtt_ms=230, cloud_queue_ms=0, cloud_compute_ms=1, cloud_total_ms=2)
    probes(6.0, 1)
    probes(90.0, 1)  # a probe held up on a busy edge between fast ones does not hide that the link got faster
    probes(6.0, 1)
    snap = m.snapshot()
    assert snap.rtt_ms == 6.0 and m.link_changes == 2
    assert snap.transfer_ms is None  # the slow link's offloads, measured against 150 ms, no longer count


def test_window_tail_keeps_95_percent_of_windows() -> None:
    # Over all requests, or with no rate known: the plain 5 %.
    assert window_tail(10, 0.0) == TAIL and window_tail(0, 1.0) == TAIL
    # 10 requests a window: its p95 is its slowest request, so a slow one may come in 1 window of 20 at most.
    q = window_tail(10, 1.0)
    assert (1 - q) ** 10 == pytest.approx(0.95, abs=1e-6)
    # Longer windows hold more requests and tolerate some slow ones: the allowance grows back towards 5 %.
    assert q < window_tail(100, 1.0) < window_tail(1000, 1.0) < TAIL


def test_a_window_target_stops_offloads_that_alone_miss_it() -> None:
    # 3G at 10 requests a second: an offload takes longer than 100 ms. Over all requests 4 % of them fit under
    # the p95; judged per one-second window, every window holding one would miss: answer locally instead.
    slow = Conditions(COMPUTE, rtt_ms=150, transfer_ms=35, serialise_ms=25, cloud_ms=5, request_rate=10)
    assert step(OPTIONS, slow, SLO, State(), now=0.0).option == OPTIONS[1]
    windowed = step(OPTIONS, slow, SLO, State(), now=0.0, window_s=1.0)
    assert windowed.option == OPTIONS[0] and windowed.target_met
    # A fast link keeps its offloads: each one meets the target on its own.
    fast = Conditions(COMPUTE, rtt_ms=6, transfer_ms=3, serialise_ms=2, cloud_ms=5, request_rate=10)
    assert step(OPTIONS, fast, SLO, State(), now=0.0, window_s=1.0).option == OPTIONS[4]


def test_a_link_not_measured_yet_is_tried_then_chosen_on_what_the_trial_found() -> None:
    unmeasured = Conditions(COMPUTE, rtt_ms=6, request_rate=20, link_measured=False)  # only probes so far
    first = step(OPTIONS, unmeasured, SLO, State(), now=0.0)
    # Were the upload free, everything would go up: tried for this one decision, the local option stays current.
    assert first.option == OPTIONS[4] and "not measured yet" in first.reason
    assert first.state.current == 0 and first.state.trial_pending
    waiting = step(OPTIONS, unmeasured, SLO, first.state, now=0.1)  # no answer yet: local until one comes
    assert waiting.option == OPTIONS[0] and waiting.state.trial_pending
    again = step(OPTIONS, unmeasured, SLO, waiting.state, now=2.0)  # still nothing after TRIAL_EVERY_S: one more
    assert again.option == OPTIONS[4]
    # The answers measured a fast link: everything goes up at once, no hold (a choice afresh, counted).
    fast = step(OPTIONS, WIFI, SLO, again.state, now=2.2)
    assert fast.option == OPTIONS[4] and fast.state.current == 4 and not fast.state.trial_pending
    assert fast.state.changes == 1
    # ... or a slow one: the edge keeps its answers, and a link it measured is not tried again.
    slow = step(OPTIONS, G3, 60.0, waiting.state, now=0.5)
    assert slow.option == OPTIONS[1] and step(OPTIONS, G3, 60.0, slow.state, now=5.0).option == OPTIONS[1]
