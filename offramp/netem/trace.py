"""Recorded link capacity, replayed: Mahimahi's trace format and the arithmetic of a trace-driven queue.

A trace file holds one line per *delivery opportunity*: the time in whole
milliseconds since the trace began at which the link can carry one packet of
up to ``PACKET_BYTES`` bytes; a time on several lines carries several. When
the trace ends it starts again from its beginning, shifted by its last time
(Mahimahi's convention). Real cellular capacity swings tenfold within seconds
and drops to nothing for stretches, which constant-rate profiles never do.

``TraceQueue`` is one direction's bottleneck queue: bytes wait in order for
the opportunities, an opportunity's unused bytes are lost (the link does not
save capacity up), and the propagation delay is added on top. It is shared
by every connection crossing that direction, as a real link's capacity is.
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from offramp.core.errors import OfframpError

PACKET_BYTES = 1500  # what one delivery opportunity carries (Mahimahi: one MTU-sized packet)


@dataclass(frozen=True, eq=False)
class Trace:
    """Delivery opportunities of one direction, in seconds from the trace's start, and its period."""

    path: str
    times_s: np.ndarray  # (n,) float64, non-decreasing
    period_s: float  # the trace repeats after this (its last time)

    @property
    def mean_mbps(self) -> float:
        """Mean capacity over one period."""
        return len(self.times_s) * PACKET_BYTES * 8 / self.period_s / 1e6

    def capacity_bytes(self, start_s: float, stop_s: float) -> int:
        """Bytes the opportunities in ``[start_s, stop_s)`` can carry (the trace repeating as needed)."""
        return PACKET_BYTES * (self._count_before(stop_s) - self._count_before(start_s))

    def next_opportunity(self, t: float) -> float:
        """Time of the first delivery opportunity at or after ``t`` seconds (the trace repeating)."""
        laps, rest = divmod(t, self.period_s)
        i = bisect.bisect_left(self.times_s, rest)
        if i == len(self.times_s):
            return (laps + 1) * self.period_s + float(self.times_s[0])
        return laps * self.period_s + float(self.times_s[i])

    def _count_before(self, t: float) -> int:
        """Opportunities strictly before ``t`` seconds, counted over the repeated trace."""
        laps, rest = divmod(t, self.period_s)
        count = int(laps) * len(self.times_s) + bisect.bisect_left(self.times_s, rest)
        if laps >= 1:  # the previous lap's opportunities at its very end (time == period) fall at or after t
            count -= len(self.times_s) - bisect.bisect_left(self.times_s, self.period_s + rest)
        return count


@lru_cache(maxsize=16)
def load_trace(path: str) -> Trace:
    """Read a Mahimahi trace; a file that is not one is a one-line error naming the file and the line."""
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise OfframpError(f"link trace {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise OfframpError(f"link trace {path}: cannot read it ({e})") from None
    times: list[int] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            ms = int(line.strip())
        except ValueError:
            raise OfframpError(f"link trace {path}, line {number}: {line.strip()[:40]!r} is not a whole number of "
                               "milliseconds") from None
        if ms < 0:
            raise OfframpError(f"link trace {path}, line {number}: negative time {ms}")
        if times and ms < times[-1]:
            raise OfframpError(f"link trace {path}, line {number}: time goes backwards ({ms} after {times[-1]})")
        times.append(ms)
    if not times:
        raise OfframpError(f"link trace {path} is empty: it needs one line per delivery opportunity (ms)")
    if times[-1] <= 0:
        raise OfframpError(f"link trace {path}: its last time must be after 0 ms (it sets the period)")
    return Trace(str(p), np.asarray(times, dtype=np.float64) / 1e3, times[-1] / 1e3)


class TraceQueue:
    """One direction's bottleneck: ``send(now, n)`` gives the time the last of ``n`` bytes leaves the link.

    Times are seconds on the link's own clock (0 = the trace's start). Bytes
    leave in arrival order, using the opportunities after their arrival;
    ``backlog(now)`` says how many are still waiting (for a queue limit).
    """

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self._lap = 0  # how many times the trace has wrapped at the cursor
        self._index = -1  # the current opportunity; -1: none used yet
        self._left = 0  # bytes still free in it
        self._departures: deque[tuple[float, int]] = deque()  # (leaves at, bytes) of data not yet gone, in order

    def _time(self) -> float:
        return self._lap * self.trace.period_s + float(self.trace.times_s[self._index])

    def _advance(self) -> None:
        self._index += 1
        if self._index == len(self.trace.times_s):
            self._index, self._lap = 0, self._lap + 1
        self._left = PACKET_BYTES

    def _seek(self, t: float) -> None:
        """Move the cursor to the first opportunity at or after ``t`` (unused capacity before it is lost)."""
        if self._index >= 0 and self._time() >= t and self._left > 0:
            return
        laps, rest = divmod(t, self.trace.period_s)
        i = bisect.bisect_left(self.trace.times_s, rest)
        if i == len(self.trace.times_s):
            i, laps = 0, laps + 1
        candidate = (int(laps), i)
        if self._index < 0 or candidate > (self._lap, self._index):
            self._lap, self._index = candidate
            self._left = PACKET_BYTES
        elif self._left == 0:
            self._advance()

    def send(self, now: float, nbytes: int) -> float:
        """Queue ``nbytes`` arriving at ``now``; the time their last byte leaves the link."""
        self._seek(now)
        remaining = nbytes
        while remaining > self._left:
            remaining -= self._left
            self._advance()
        self._left -= remaining
        leaves = self._time()
        self._departures.append((leaves, nbytes))
        return leaves

    def backlog(self, now: float) -> int:
        """Bytes that arrived and have not left by ``now``."""
        while self._departures and self._departures[0][0] <= now:
            self._departures.popleft()
        return sum(n for _, n in self._departures)
