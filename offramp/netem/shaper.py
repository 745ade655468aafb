"""When each segment of one direction of one connection may be delivered: the link's arithmetic, no I/O.

Kept apart from the proxy so the timing rules can be checked exactly, with a
made-up clock, and reused by anything else that shapes traffic.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from offramp.netem.profiles import Direction
from offramp.netem.trace import TraceQueue

BURST_S = 0.001  # the bucket holds 1 ms of line rate: enough to absorb event-loop hiccups, too little to matter
MIN_BURST_BYTES = 1500  # ... and at least one Ethernet frame


@dataclass(frozen=True)
class Delivery:
    at: float  # clock time at which the segment may be handed to the receiver
    lost: bool  # the segment drew a loss (the proxy stalls it, or resets the connection)


class Shaper:
    """Token bucket at the link's bandwidth, then delay + jitter (+ a stall when lost), in order.

    A segment of ``n`` bytes arriving at ``now`` leaves the bucket once it has
    paid ``n / bandwidth`` seconds (minus any saved-up burst), travels
    ``delay + U[0, jitter]`` (plus ``stall`` if it drew a loss), and is never
    delivered before the previous segment: TCP delivers in order, so one late
    segment holds back the ones behind it. The delay is therefore a floor.
    Two random numbers are drawn per segment whatever the profile, so the
    sequence depends only on the seed and the segment count.
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._tokens = 0.0  # bytes; negative while segments are still being serialised
        self._updated: float | None = None  # None: the bucket is full (start, or after an unlimited spell)
        self.last = float("-inf")  # delivery time of the latest segment

    def admit(self, now: float, nbytes: int, link: Direction, queue: TraceQueue | None = None,
              clock0: float = 0.0) -> Delivery:
        """``queue``: a trace-driven link's shared queue, whose clock starts at ``clock0``; it replaces the
        token bucket (the trace is the capacity)."""
        u_jitter, u_loss = self._rng.random(), self._rng.random()
        lost = u_loss < link.loss
        travel_ms = link.delay_ms + u_jitter * link.jitter_ms + (link.stall_ms if lost else 0.0)
        leaves = (queue.send(now - clock0, nbytes) + clock0 if queue is not None
                  else self._serialise(now, nbytes, link.bytes_per_s))
        self.last = max(leaves + travel_ms / 1e3, self.last)
        return Delivery(self.last, lost)

    def _serialise(self, now: float, nbytes: int, rate: float | None) -> float:
        """The time the segment's last byte leaves the bucket."""
        if rate is None:
            self._updated = None
            return now
        burst = max(MIN_BURST_BYTES, rate * BURST_S)
        refill = burst if self._updated is None else self._tokens + (now - self._updated) * rate
        self._tokens = min(burst, refill) - nbytes
        self._updated = now
        return now + max(0.0, -self._tokens) / rate
