"""What the edge knows about its link, its cloud and itself, measured from its own traffic as it runs.

Fed by the engine (each offload's bytes and round trip, the cloud's timings from its reply, each local
batch's compute time and how deep it went, queueing, arrivals) and by the offload client (a tiny health
check every ``probe_interval_s`` on the offload connection itself, whose quickest recent answer is the
round-trip time without payload). ``snapshot`` turns the recent samples into ``Measured``: what the
metrics export, ``offramp policy`` prints and the controller (``Measured.conditions``) plans with.

Estimates:

* rtt: the fastest probe of the last ``RTT_WINDOW_S`` since the link last changed (its delay, without
  queueing behind payloads);
* transfer: per offload, its network time (round trip less the cloud's own time) beyond the rtt, which is
  the upload plus jitter plus any wait behind other offloads; the controller plans with a high quantile
  (``transfer_ms``) and sizes the uplink's load with the median (``serialise_ms``). Effective bandwidth is
  the median bytes over the median transfer;
* the cloud: quantiles of its reported decode + queue + compute, per split block and for the input route (one
  not used lately borrows another's, scaled by the blocks its tail runs); bytes per request likewise;
* edge compute: per split and per stage (an exit, or the split with encoding), the median time of the local
  batches whose deepest stage it was, seeded by a profile at start-up (a stage not yet seen still has a time).

Windows keep ``WINDOW_S`` seconds of samples but never fewer than their last ``KEEP`` ones: when offloads
stop (a slow link made the controller keep everything local) their last measurements stay, rather than
vanish and leave the link looking free. Offloads that ran into their deadline count too, with the deadline
as their network time, so a link too slow to answer at all is not mistaken for one without samples.

The probes go on while nothing is offloaded, so they are what notices that the link changed: when every
probe of the last ``RTT_CONFIRM_S`` is slower than the rtt before them by more than ``RTT_SHIFT`` (half of
it, and at least ``RTT_SHIFT_MS``), or two of them are that much faster, the link changed there; the rtt is
measured afresh from those probes on, and the offloads measured before no longer count for the link (the
cloud's timings stay). A link whose bandwidth changes without its delay is noticed through offloads only;
once a slow link has made the controller stop offloading, its samples are forgotten after ``LINK_STALE_S``,
so the controller tries again.
"""
from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .controller import Conditions

RTT_WINDOW_S = 3.0
WINDOW_S = 5.0
KEEP = 8
HIGH = 0.9  # the quantile planned with where a measurement varies from one request to the next
RATE_WINDOW_S = 2.0
RTT_SHIFT, RTT_SHIFT_MS, RTT_CONFIRM_S = 0.5, 10.0, 1.2  # two probes at the default interval
LINK_STALE_S = 30.0
MAX_SAMPLES = 1024  # per window: enough for seconds of traffic at thousands of requests a second


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank, at or above): no interpolation between samples."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


class Window:
    """Recent ``(time, value)`` samples: the last ``seconds`` of them, but at least the last ``keep``."""

    def __init__(self, seconds: float = WINDOW_S, keep: int = KEEP) -> None:
        self.seconds, self.keep = seconds, keep
        self._samples: deque[tuple[float, object]] = deque(maxlen=MAX_SAMPLES)

    def add(self, now: float, value: object) -> None:
        self._samples.append((now, value))

    def values(self, now: float) -> list:
        return [v for _, v in self.items(now)]

    def items(self, now: float) -> list[tuple[float, object]]:
        samples = self._samples
        while len(samples) > self.keep and samples[0][0] < now - self.seconds:
            samples.popleft()
        return list(samples)


@dataclass(frozen=True)
class Offload:
    """One offload as the edge saw it."""

    split_block: int
    bytes: int
    network_ms: float  # round trip less the cloud's own time
    cloud_ms: float  # decode + queue + compute at the cloud (0 for one that timed out)
    cloud_queue_ms: float
    cloud_compute_ms: float


@dataclass(frozen=True)
class Measured:
    """A snapshot of the measurements; None where nothing has been measured yet."""

    rtt_ms: float | None
    transfer_ms: float | None  # high quantile of an offload's time on the link beyond the rtt
    serialise_ms: float | None  # its median
    offload_bytes: float | None  # median bytes per offloaded sample
    cloud_ms: float | None  # high quantile of the cloud's own time per request, all splits
    cloud_queue_ms: float | None  # median
    cloud_compute_ms: float | None  # median
    edge_queue_ms: float  # high quantile of the wait for a local batch
    request_rate: float  # requests per second reaching the edge
    compute_ms: Mapping[int, tuple[float, ...]]  # per split: per exit, then to the split with encoding
    offloads: int  # offloads measured on the link as it is now
    cloud_by_split: Mapping[int, float] = field(default_factory=dict)  # cloud_ms per split block (estimated)
    # The same, typical (median): for predicted means. The high quantile of a few answers holds a fresh cloud's
    # first ones (24 ms against a typical 11 for the whole model), which kept the input route off over wifi.
    cloud_typical_by_split: Mapping[int, float] = field(default_factory=dict)
    bytes_by_split: Mapping[int, float] = field(default_factory=dict)  # median bytes per split block (or INPUT)
    edge_queue_mean_ms: float | None = None  # the mean wait for a local batch: what predicted means take

    @property
    def uplink_bytes_per_s(self) -> float | None:
        """Effective bandwidth: bytes an offload carries over the time it spends on the link beyond the rtt."""
        if self.offload_bytes is None or not self.serialise_ms:
            return None
        return self.offload_bytes / (self.serialise_ms / 1000)

    def conditions(self) -> Conditions:
        return Conditions(self.compute_ms, edge_queue_ms=self.edge_queue_ms,
                          edge_queue_mean_ms=self.edge_queue_mean_ms, rtt_ms=self.rtt_ms,
                          transfer_ms=self.transfer_ms or 0.0, serialise_ms=self.serialise_ms or 0.0,
                          cloud_ms=self.cloud_ms or 0.0, request_rate=self.request_rate,
                          cloud_by_split=self.cloud_by_split, cloud_typical_by_split=self.cloud_typical_by_split,
                          offload_bytes=self.offload_bytes or 0.0,
                          bytes_by_split=self.bytes_by_split, link_measured=self.offloads > 0)


class Measurements:
    """Thread-safe sinks for the edge's samples (event loop and compute thread) and their ``snapshot``."""

    def __init__(self, profile: Mapping[int, Sequence[float]], clock: Callable[[], float] = time.monotonic,
                 tail_blocks: Mapping[int, int] | None = None) -> None:
        """``profile``: per split, the time of each stage (exits, then the split) until measured (NaN: unknown);
        ``tail_blocks``: per split, the blocks the cloud runs after it (the input route, keyed ``INPUT``: all)."""
        self._clock = clock
        self._tail_blocks = dict(tail_blocks or {})
        self._lock = threading.Lock()
        self._profile = {split: tuple(ms) for split, ms in profile.items()}
        self._compute = {split: [Window() for _ in ms] for split, ms in self._profile.items()}
        self._offloads = Window()
        self._probes = Window(RTT_WINDOW_S, keep=3)
        self._queue = Window()
        self._arrivals: deque[float] = deque(maxlen=MAX_SAMPLES * 8)
        self._link_rtt: float | None = None  # the rtt the offloads since ``_link_since`` were measured at
        self._link_since = -float("inf")
        self.link_changes = 0

    def arrival(self) -> None:
        with self._lock:
            self._arrivals.append(self._clock())

    def queued(self, ms: float) -> None:
        with self._lock:
            self._queue.add(self._clock(), ms)

    def batch(self, split: int, stage: int, ms: float) -> None:
        """A local batch at ``split`` whose deepest stage was ``stage`` (an exit's index; the split: past the last)."""
        with self._lock:
            self._compute[split][stage].add(self._clock(), ms)

    def probe(self, rtt_ms: float) -> None:
        """A probe's round trip: the rtt is the quickest since the link last changed (within the window)."""
        with self._lock:
            now = self._clock()
            self._probes.add(now, rtt_ms)
            since = [(t, v) for t, v in self._probes.items(now) if t >= self._link_since]
            recent = [(t, v) for t, v in since if t >= now - RTT_CONFIRM_S]
            ref = min((v for t, v in since if t < now - RTT_CONFIRM_S), default=self._link_rtt)
            shift = max(RTT_SHIFT_MS, RTT_SHIFT * ref) if ref is not None else 0.0
            # Slower: every recent probe (one may have queued behind a payload or a busy loop). Faster: two
            # will do, as no probe beats the link's own delay; a late one among them must not hide the change.
            if ref is not None and len(recent) >= 2 and (
                    all(v > ref + shift for _, v in recent)
                    or sum(v < ref - shift for _, v in recent) >= 2):
                self._link_since, since = recent[0][0], recent
                self.link_changes += 1
            self._link_rtt = min(v for _, v in since)

    def offloaded(self, split: int, nbytes: int, rtt_ms: float, cloud_queue_ms: float, cloud_compute_ms: float,
                  cloud_total_ms: float) -> None:
        """An answered offload after ``split``: its round trip at the edge and the cloud's timings from the reply."""
        with self._lock:
            self._offloads.add(self._clock(), Offload(split, nbytes, max(0.0, rtt_ms - cloud_total_ms),
                                                      cloud_total_ms, cloud_queue_ms, cloud_compute_ms))

    def timed_out(self, split: int, nbytes: int, waited_ms: float) -> None:
        """An offload that got no answer within its deadline: the link (or the cloud) took at least that long."""
        with self._lock:
            self._offloads.add(self._clock(), Offload(split, nbytes, waited_ms, 0.0, 0.0, 0.0))

    def snapshot(self) -> Measured:
        with self._lock:
            now = self._clock()
            timed: list[tuple[float, Offload]] = self._offloads.items(now)
            link = [o for t, o in timed if t >= max(self._link_since, now - LINK_STALE_S)]
            offloads = [o for _, o in timed]
            rtt = self._link_rtt
            queue = self._queue.values(now)
            compute = {split: tuple(statistics.median(v) if (v := w.values(now)) else seed
                                    for w, seed in zip(windows, self._profile[split]))
                       for split, windows in self._compute.items()}
            while self._arrivals and self._arrivals[0] < now - RATE_WINDOW_S:
                self._arrivals.popleft()
            rate = len(self._arrivals) / RATE_WINDOW_S
        rtt = rtt if rtt is not None else min((o.network_ms for o in link), default=None)
        beyond = [max(0.0, o.network_ms - (rtt or 0.0)) for o in link]
        answered = [o for o in offloads if o.cloud_ms > 0]
        return Measured(
            rtt_ms=rtt,
            transfer_ms=quantile(beyond, HIGH) if beyond else None,
            serialise_ms=statistics.median(beyond) if beyond else None,
            offload_bytes=statistics.median(o.bytes for o in link) if link else None,
            cloud_ms=quantile([o.cloud_ms for o in answered], HIGH) if answered else None,
            cloud_queue_ms=statistics.median(o.cloud_queue_ms for o in answered) if answered else None,
            cloud_compute_ms=statistics.median(o.cloud_compute_ms for o in answered) if answered else None,
            edge_queue_ms=quantile(queue, HIGH) if queue else 0.0,
            request_rate=rate,
            compute_ms=compute,
            offloads=len(link),
            cloud_by_split=self._cloud_by_split(answered, lambda v: quantile(v, HIGH)),
            cloud_typical_by_split=self._cloud_by_split(answered, statistics.median),
            bytes_by_split={key: statistics.median(o.bytes for o in link if o.split_block == key)
                            for key in {o.split_block for o in link}},
            edge_queue_mean_ms=statistics.fmean(queue) if queue else 0.0,
        )

    def _cloud_by_split(self, answered: list[Offload], summary: Callable[[list[float]], float]) -> dict[int, float]:
        """The cloud's time (``summary`` of its answers: a high quantile, or typical) per split block: measured
        where there are samples, else the nearest measured split's scaled by how many blocks each tail runs."""
        measured = {split: summary([o.cloud_ms for o in answered if o.split_block == split])
                    for split in {o.split_block for o in answered}}
        out = dict(measured)
        for split in set(self._compute) | set(self._tail_blocks):  # the input route's key among them
            if split in out or not measured:
                continue
            near = min(measured, key=lambda m: abs(m - split))
            blocks, near_blocks = self._tail_blocks.get(split, 1), self._tail_blocks.get(near, 1)
            out[split] = measured[near] * max(blocks, 1) / max(near_blocks, 1)
        return out
