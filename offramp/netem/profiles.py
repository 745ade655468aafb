"""Link and device profiles: what an emulated network (and a weaker edge device) looks like.

A link has two directions. The *uplink* carries edge → cloud traffic (the
offloaded tokens), the *downlink* cloud → edge (the answers); mobile links are
asymmetric, so each direction has its own numbers. Profiles are parsed from
short strings so experiments and the CLI share one syntax::

    lte                                    a named profile
    lte,loss=0.01                          a named profile with overrides
    delay=20ms,jitter=5ms,bw=8mbit,loss=0.01
    delay=25ms,up=10mbit,down=30mbit
    lte; 30s:3g; 60s:bw=1mbit              a schedule: the link changes during a run
"""
from __future__ import annotations

import bisect
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import wraps
from typing import ParamSpec, TypeVar

from offramp.core.errors import OfframpError
from offramp.netem.trace import PACKET_BYTES, Trace, load_trace

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_STALL_MS = 200.0  # Linux TCP_RTO_MIN: a lost segment costs at least one minimum retransmission timeout


@dataclass(frozen=True)
class Direction:
    """One direction of a link.

    The delay is a floor, never undercut: each segment waits ``delay_ms`` plus a
    jitter sample drawn uniformly from ``[0, jitter_ms]`` (so the mean one-way
    delay is ``delay_ms + jitter_ms / 2``). A lost segment is not dropped (the
    proxy carries TCP, which would retransmit it) but stalled by ``stall_ms``.
    ``cut``: nothing crosses, and the connection stays open (a partition, or a
    half-open peer while it lasts); held bytes go on once the link is back.
    ``trace``: recorded capacity (``offramp.netem.trace``) instead of a
    bandwidth; ``delay_ms`` is then the propagation delay added after the
    trace's queue, and ``queue_bytes`` caps what the link holds per connection
    (the sender is held back beyond it, as TCP's flow control would).
    """

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_mbps: float | None = None  # None: unlimited
    loss: float = 0.0  # probability that a segment stalls
    stall_ms: float = DEFAULT_STALL_MS
    cut: bool = False
    trace: Trace | None = None
    queue_bytes: int | None = None  # None: the proxy's own bound

    def __post_init__(self) -> None:
        if self.trace is not None and self.bandwidth_mbps is not None:
            raise OfframpError("a trace sets the link's capacity: give a trace or a bandwidth, not both")
        if self.queue_bytes is not None and self.queue_bytes < PACKET_BYTES:
            raise OfframpError(f"a queue must hold at least one packet ({PACKET_BYTES} bytes), got {self.queue_bytes}")
        if self.delay_ms < 0 or self.jitter_ms < 0 or self.stall_ms < 0:
            raise OfframpError(f"link delays must be >= 0, got {self}")
        if self.bandwidth_mbps is not None and self.bandwidth_mbps <= 0:
            raise OfframpError(f"bandwidth must be > 0 (or unlimited), got {self.bandwidth_mbps}")
        if not 0.0 <= self.loss <= 1.0:
            raise OfframpError(f"loss is a probability in [0, 1], got {self.loss}")

    @property
    def mean_delay_ms(self) -> float:
        """Expected one-way delay without queueing or stalls."""
        return self.delay_ms + self.jitter_ms / 2

    @property
    def bytes_per_s(self) -> float | None:
        return None if self.bandwidth_mbps is None else self.bandwidth_mbps * 1e6 / 8


@dataclass(frozen=True)
class LinkProfile:
    """A named, possibly asymmetric link: ``uplink`` is edge → cloud, ``downlink`` cloud → edge."""

    name: str
    uplink: Direction
    downlink: Direction
    note: str = ""

    @classmethod
    def build(cls, name: str, *, delay_ms: float = 0.0, jitter_ms: float = 0.0, up_mbps: float | None = None,
              down_mbps: float | None = None, loss: float = 0.0, stall_ms: float = DEFAULT_STALL_MS,
              cut: bool = False, note: str = "") -> LinkProfile:
        """The common case: one delay, jitter and loss for both directions, bandwidth per direction."""
        common = dict(delay_ms=delay_ms, jitter_ms=jitter_ms, loss=loss, stall_ms=stall_ms, cut=cut)
        return cls(name, Direction(bandwidth_mbps=up_mbps, **common), Direction(bandwidth_mbps=down_mbps, **common),
                   note)


# One-way numbers, in the range the usual emulation presets use (Chrome DevTools / Lighthouse
# throttling, Mahimahi's cellular traces, ns-3 and Pantheon examples) and operators' published
# medians. They are stand-ins for "a typical link of this kind", not measurements of any one link.
PROFILES: dict[str, LinkProfile] = {p.name: p for p in (
    LinkProfile.build("lan", delay_ms=0.2, up_mbps=1000, down_mbps=1000,
                      note="switched gigabit Ethernet, same rack / building"),
    LinkProfile.build("wifi", delay_ms=3, jitter_ms=1, up_mbps=50, down_mbps=50,
                      note="802.11ac in one room: ~6 ms RTT, ~50 Mbit/s goodput"),
    LinkProfile.build("lte", delay_ms=25, jitter_ms=5, up_mbps=10, down_mbps=30,
                      note="4G LTE: ~50 ms RTT, uplink a third of downlink"),
    LinkProfile.build("3g", delay_ms=75, jitter_ms=10, up_mbps=1.5, down_mbps=3,
                      note="HSPA 3G: ~150 ms RTT, a few Mbit/s"),
    LinkProfile.build("satellite", delay_ms=300, jitter_ms=5, up_mbps=10, down_mbps=10,
                      note="geostationary: ~600 ms RTT (35,786 km each way, twice)"),
)}

# Not among PROFILES (which the link benchmark measures one by one): a link that carries nothing.
PARTITION = LinkProfile.build("partition", cut=True,
                              note="nothing crosses, connections stay open: a cut link or a half-open peer")

_TIME = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(us|ms|s|m)?\s*$", re.IGNORECASE)
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)?\s*$", re.IGNORECASE)
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_RATE_UNITS = {"bit": 1e-6, "kbit": 1e-3, "mbit": 1.0, "gbit": 1e3, "bps": 1e-6, "kbps": 1e-3, "mbps": 1.0,
               "gbps": 1e3}
_UNLIMITED = {"none", "inf", "unlimited"}


def parse_seconds(text: str, default_unit: str = "s") -> float:
    """``"30s"``, ``"500ms"``, ``"2m"``; a bare number is in ``default_unit``."""
    m = _TIME.match(text)
    if not m:
        raise OfframpError(f"bad duration {text!r} (expected e.g. 20ms, 1.5s)")
    return float(m.group(1)) * _TIME_UNITS[(m.group(2) or default_unit).lower()]


def parse_mbps(text: str) -> float | None:
    """``"8mbit"``, ``"500kbit"``, ``"1gbit"`` (tc's spelling; ``mbps`` is accepted as Mbit/s); bare = Mbit/s."""
    if text.strip().lower() in _UNLIMITED:
        return None
    m = _RATE.match(text)
    if not m:
        raise OfframpError(f"bad bandwidth {text!r} (expected e.g. 8mbit, 500kbit, none)")
    return float(m.group(1)) * _RATE_UNITS[(m.group(2) or "mbit").lower()]


def parse_profile(text: str) -> LinkProfile:
    """A named profile, custom ``key=value`` settings, or a name followed by overrides.

    Keys: ``delay``, ``jitter``, ``stall`` (durations, bare numbers in ms),
    ``bw`` (both directions), ``up``, ``down`` (rates, bare numbers in Mbit/s,
    ``none`` for unlimited), ``loss`` (a probability); recorded capacity:
    ``trace=PREFIX`` (Mahimahi traces ``PREFIX.up`` and ``PREFIX.down``),
    or ``uptrace=FILE`` and ``downtrace=FILE``, with ``queue=N`` packets
    (of 1,500 bytes) per connection.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise OfframpError("empty link profile")
    base, name = LinkProfile.build("custom"), text.strip()
    if "=" not in parts[0]:
        known = {**PROFILES, PARTITION.name: PARTITION}
        if parts[0].lower() not in known:
            raise OfframpError(f"unknown link profile {parts[0]!r}; known: {', '.join(known)}")
        base, parts = known[parts[0].lower()], parts[1:]
    up: dict[str, float | None] = {}
    down: dict[str, float | None] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep:
            raise OfframpError(f"bad link setting {part!r} in {text!r} (expected key=value)")
        if key in ("delay", "jitter", "stall"):
            up[f"{key}_ms"] = down[f"{key}_ms"] = parse_seconds(value, "ms") * 1e3
        elif key in ("bw", "rate"):
            up["bandwidth_mbps"] = down["bandwidth_mbps"] = parse_mbps(value)
        elif key == "up":
            up["bandwidth_mbps"] = parse_mbps(value)
        elif key == "down":
            down["bandwidth_mbps"] = parse_mbps(value)
        elif key == "loss":
            up["loss"] = down["loss"] = _probability(value)
        elif key == "trace":
            up["trace"], down["trace"] = load_trace(f"{value.strip()}.up"), load_trace(f"{value.strip()}.down")
            up["bandwidth_mbps"] = down["bandwidth_mbps"] = None
        elif key in ("uptrace", "downtrace"):
            side = up if key == "uptrace" else down
            side["trace"], side["bandwidth_mbps"] = load_trace(value.strip()), None
        elif key == "queue":
            up["queue_bytes"] = down["queue_bytes"] = _packets(value) * PACKET_BYTES
        else:
            raise OfframpError(f"unknown link setting {key!r} in {text!r}; use delay, jitter, bw, up, down, "
                               "loss, stall, trace, uptrace, downtrace, queue")
    return replace(base, name=name, uplink=replace(base.uplink, **up), downlink=replace(base.downlink, **down))


def _packets(text: str) -> int:
    text = text.strip().lower().removesuffix("pkt").removesuffix("packets").strip()
    if not text.isdigit() or int(text) < 1:
        raise OfframpError(f"bad queue {text!r} (expected a number of packets, e.g. queue=100)")
    return int(text)


def _probability(text: str) -> float:
    text = text.strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise OfframpError(f"bad loss {text!r} (expected e.g. 0.01 or 1%)") from None


@dataclass(frozen=True)
class Schedule:
    """A link that changes during a run: ``steps`` are ``(t_seconds, profile)`` from the link's start."""

    steps: tuple[tuple[float, LinkProfile], ...]
    _times: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        times = tuple(t for t, _ in self.steps)
        if not times or times[0] != 0.0:
            raise OfframpError("a schedule must say what the link is at t=0")
        if any(b <= a for a, b in zip(times, times[1:])):
            raise OfframpError(f"schedule times must increase, got {list(times)}")
        object.__setattr__(self, "_times", times)

    @classmethod
    def constant(cls, profile: LinkProfile) -> Schedule:
        return cls(((0.0, profile),))

    @classmethod
    def parse(cls, text: str, initial: LinkProfile | None = None) -> Schedule:
        """``"lte; 30s:3g"``: steps separated by ``;``, each ``TIME:PROFILE``; a bare first step means t=0.

        A schedule that starts later than t=0 begins with ``initial``.
        """
        steps: list[tuple[float, LinkProfile]] = []
        for i, step in enumerate(s.strip() for s in text.split(";")):
            if not step:
                continue
            when, sep, spec = step.partition(":")
            if sep and _TIME.match(when):
                steps.append((parse_seconds(when), parse_profile(spec)))
            elif i == 0:
                steps.append((0.0, parse_profile(step)))
            else:
                raise OfframpError(f"schedule step {step!r} needs a time, e.g. '30s:3g'")
        if (not steps or steps[0][0] > 0) and initial is not None:
            steps.insert(0, (0.0, initial))
        return cls(tuple(steps))

    def at(self, t: float) -> LinkProfile:
        """The profile in force ``t`` seconds after the link started."""
        return self.steps[max(0, bisect.bisect_right(self._times, t) - 1)][1]


@dataclass(frozen=True)
class DeviceProfile:
    """A weaker edge device, emulated on a faster CPU: compute takes ``slowdown`` times as long."""

    slowdown: float = 1.0

    def __post_init__(self) -> None:
        if self.slowdown < 1.0:
            raise OfframpError(f"slowdown must be >= 1 (a device cannot be made faster), got {self.slowdown}")


def slowed(fn: Callable[P, R], factor: float, cpu_clock: bool = False,
           cost: Callable[[R], float] | None = None) -> Callable[P, R]:
    """``fn``, then a sleep, so that the call takes ``factor`` times as long as ``fn`` took here.

    This emulates a device ``factor`` times slower than the server CPU the
    experiment runs on; the sleep frees the CPU, so several emulated devices
    on one machine do not slow each other down.

    With ``cpu_clock`` (for work that computes in the calling thread alone,
    e.g. torch with one intra-op thread), "took here" is the thread's CPU
    time, and the call lasts ``factor`` times that: time the thread spent
    preempted by other processes on a shared core (a link proxy, a load
    generator) is not the device's work, and is not multiplied by ``factor``.
    Wall-clock time multiplies that stolen time too (measured: the 8x-slowed
    edge took 2x longer per batch beside its load generator than alone).

    With ``cost`` (seconds the measured host took for the work a result
    shows, from a table such as ``device_costs``), the call lasts ``factor``
    times that, whatever this process's own speed: the same work, the same
    device time in every process.
    """
    DeviceProfile(factor)  # validates
    if factor == 1.0:
        return fn

    @wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        t0, c0 = time.perf_counter(), time.thread_time()
        result = fn(*args, **kwargs)
        wall = time.perf_counter() - t0
        device_s = factor * (cost(result) if cost is not None else time.thread_time() - c0 if cpu_clock else wall)
        time.sleep(max(0.0, device_s - wall))
        return result

    return run
