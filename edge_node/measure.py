"""What the edge knows about its link, its cloud and itself, measured from its own traffic as it runs.

Fed by the engine (each offload's bytes and round trip, the cloud's timings from its reply, each local
batch's compute time and how deep it went, queueing, arrivals) and by the offload client (a tiny health
check every ``probe_interval_s`` on the offload connection itself, whose quickest recent answer is the
round-trip time without payload). ``snapshot`` turns the recent samples into ``Measured``: what the
metrics export, ``offramp policy`` prints and the controller (``Measured.conditions``) plans with.

Estimates:

* rtt: the fastest probe of the last ``RTT_WINDOW_S`` (the link's delay, without queueing behind payloads);
* transfer: per offload, its network time (round trip less the cloud's own time) beyond the rtt, which is
  the upload plus jitter plus any wait behind other offloads; the controller plans with a high quantile
  (``transfer_ms``) and sizes the uplink's load with the median (``serialise_ms``). Effective bandwidth is
  the median bytes over the median transfer;
* the cloud: quantiles of its reported decode + queue + compute;
* edge compute: per split and per stage (an exit, or the split with encoding), the median time of the local
  batches whose deepest stage it was, seeded by a profile at start-up (a stage not yet seen still has a time).

Windows keep ``WINDOW_S`` seconds of samples but never fewer than their last ``KEEP`` ones: when offloads
stop (a slow link made the controller keep everything local) their last measurements stay, rather than
vanish and leave the link looking free. Offloads that ran into their deadline count too, with the deadline
as their network time, so a link too slow to answer at all is not mistaken for one without samples.
"""
from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .controller import Conditions

RTT_WINDOW_S = 3.0
WINDOW_S = 5.0
KEEP = 8
HIGH = 0.9  # the quantile planned with where a measurement varies from one request to the next
RATE_WINDOW_S = 2.0
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
        samples = self._samples
        while len(samples) > self.keep and samples[0][0] < now - self.seconds:
            samples.popleft()
        return [v for _, v in samples]


@dataclass(frozen=True)
class Offload:
    """One offload as the edge saw it."""

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
    cloud_ms: float | None  # high quantile of the cloud's own time per request
    cloud_queue_ms: float | None  # median
    cloud_compute_ms: float | None  # median
    edge_queue_ms: float  # high quantile of the wait for a local batch
    request_rate: float  # requests per second reaching the edge
    compute_ms: Mapping[int, tuple[float, ...]]  # per split: per exit, then to the split with encoding
    offloads: int  # offloads in the window

    @property
    def uplink_bytes_per_s(self) -> float | None:
        """Effective bandwidth: bytes an offload carries over the time it spends on the link beyond the rtt."""
        if self.offload_bytes is None or not self.serialise_ms:
            return None
        return self.offload_bytes / (self.serialise_ms / 1000)

    def conditions(self) -> Conditions:
        return Conditions(self.compute_ms, edge_queue_ms=self.edge_queue_ms, rtt_ms=self.rtt_ms,
                          transfer_ms=self.transfer_ms or 0.0, serialise_ms=self.serialise_ms or 0.0,
                          cloud_ms=self.cloud_ms or 0.0, request_rate=self.request_rate)


class Measurements:
    """Thread-safe sinks for the edge's samples (event loop and compute thread) and their ``snapshot``."""

    def __init__(self, profile: Mapping[int, Sequence[float]], clock: Callable[[], float] = time.monotonic) -> None:
        """``profile``: per split, the start-up time of each stage (exits, then the split), the seed."""
        self._clock = clock
        self._lock = threading.Lock()
        self._profile = {split: tuple(ms) for split, ms in profile.items()}
        self._compute = {split: [Window() for _ in ms] for split, ms in self._profile.items()}
        self._offloads = Window()
        self._probes = Window(RTT_WINDOW_S, keep=3)
        self._queue = Window()
        self._arrivals: deque[float] = deque(maxlen=MAX_SAMPLES * 8)

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
        with self._lock:
            self._probes.add(self._clock(), rtt_ms)

    def offloaded(self, nbytes: int, rtt_ms: float, cloud_queue_ms: float, cloud_compute_ms: float,
                  cloud_total_ms: float) -> None:
        """An answered offload: its round trip at the edge and the cloud's timings from the reply."""
        with self._lock:
            self._offloads.add(self._clock(), Offload(nbytes, max(0.0, rtt_ms - cloud_total_ms), cloud_total_ms,
                                                      cloud_queue_ms, cloud_compute_ms))

    def timed_out(self, nbytes: int, waited_ms: float) -> None:
        """An offload that got no answer within its deadline: the link (or the cloud) took at least that long."""
        with self._lock:
            self._offloads.add(self._clock(), Offload(nbytes, waited_ms, 0.0, 0.0, 0.0))

    def snapshot(self) -> Measured:
        with self._lock:
            now = self._clock()
            offloads: list[Offload] = self._offloads.values(now)
            probes = self._probes.values(now)
            queue = self._queue.values(now)
            compute = {split: tuple(statistics.median(v) if (v := w.values(now)) else seed
                                    for w, seed in zip(windows, self._profile[split]))
                       for split, windows in self._compute.items()}
            while self._arrivals and self._arrivals[0] < now - RATE_WINDOW_S:
                self._arrivals.popleft()
            rate = len(self._arrivals) / RATE_WINDOW_S
        rtt = min(probes) if probes else min((o.network_ms for o in offloads), default=None)
        beyond = [max(0.0, o.network_ms - (rtt or 0.0)) for o in offloads]
        answered = [o for o in offloads if o.cloud_ms > 0]
        return Measured(
            rtt_ms=rtt,
            transfer_ms=quantile(beyond, HIGH) if beyond else None,
            serialise_ms=statistics.median(beyond) if beyond else None,
            offload_bytes=statistics.median(o.bytes for o in offloads) if offloads else None,
            cloud_ms=quantile([o.cloud_ms for o in answered], HIGH) if answered else None,
            cloud_queue_ms=statistics.median(o.cloud_queue_ms for o in answered) if answered else None,
            cloud_compute_ms=statistics.median(o.cloud_compute_ms for o in answered) if answered else None,
            edge_queue_ms=quantile(queue, HIGH) if queue else 0.0,
            request_rate=rate,
            compute_ms=compute,
            offloads=len(offloads),
        )
