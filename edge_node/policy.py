"""When the edge answers on its own and when it asks the cloud.

The policy in force is one immutable ``PolicySettings`` value behind a lock:
a batch reads it once, so a run-time change never applies half-way through a
batch, and every change is validated against the model before it takes over.
On an edge with a latency target a controller chooses the settings
(``follow``); a change over the admin RPC pins them until ``unpin`` hands the
choice back.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from offramp.core.errors import OfframpError
from offramp.core.exit_rule import thresholds_to_run
from offramp.core.scores import check_score
from offramp.core.wire import pb

# A threshold per score that an uncalibrated edge starts from. max_prob, margin
# and entropy are bounded and these values let only clearly confident samples
# leave; std (regression) has no scale-free value, so 0 keeps every sample on
# its way to the cloud until thresholds are calibrated.
DEFAULT_THRESHOLD: dict[str, float] = {"max_prob": 0.9, "margin": 0.8, "entropy": 0.3, "std": 0.0}


# How a request is answered: exits on the edge and tokens to the cloud for the rest ("split"), the input
# itself to the cloud, which runs the whole model ("input"), or the edge's exits alone ("local").
ROUTES = ("split", "input", "local")


class PolicyError(OfframpError):
    """A policy that does not fit the model: wrong threshold count, unknown score, ..."""


@dataclass(frozen=True)
class PolicySettings:
    """One threshold per edge exit (cheapest first), the score they apply to, whether to offload, and the
    route (``ROUTES``). Offload off and the local route are the same choice: ``ExitPolicy.validate`` makes
    each imply the other."""

    thresholds: tuple[float, ...]
    score: str
    offload_enabled: bool = True
    split_block: int | None = None  # which of the edge's split blocks; None: its split_block
    route: str = "split"

    def run_thresholds(self) -> list[float]:
        """The thresholds to run the exits with: unless tokens may go to the cloud (the split route, offload
        on) the last exit must take every sample; on the input route the edge computes only as a fallback."""
        return thresholds_to_run(self.thresholds, self.score, self.offload_enabled and self.route == "split")

    def to_proto(self) -> pb.Policy:
        return pb.Policy(thresholds=self.thresholds, score=self.score, offload_enabled=self.offload_enabled,
                         split_block=self.split_block, route=self.route)

    @classmethod
    def from_proto(cls, message: pb.Policy) -> "PolicySettings":
        split = message.split_block if message.HasField("split_block") else None
        # A route, where given, decides; older callers say offload_enabled only.
        route = message.route or ("split" if message.offload_enabled else "local")
        return cls(tuple(message.thresholds), message.score, route != "local", split, route)


def default_settings(num_exits: int, score: str, offload_enabled: bool = True, route: str = "split"
                     ) -> PolicySettings:
    return PolicySettings((DEFAULT_THRESHOLD[score],) * num_exits, score, offload_enabled, route=route)


class ExitPolicy:
    """The policy in force on one edge, safe to read from the compute thread and replace from RPCs."""

    def __init__(self, settings: PolicySettings, num_exits: int, task: str,
                 splits: Mapping[int, int] | None = None) -> None:
        """``num_exits``: of the edge's split block; ``splits``: every split block it runs, with its exit count."""
        self.num_exits = num_exits
        self.splits = dict(splits or {})
        self.task = task
        self._lock = threading.Lock()
        self._settings = self.validate(settings)
        self._chooser: Callable[[], PolicySettings | None] | None = None
        self._pinned = False

    def follow(self, chooser: Callable[[], PolicySettings | None]) -> None:
        """Take the settings from ``chooser`` (a controller; None: it has not chosen yet) unless pinned."""
        self._chooser = chooser

    @property
    def adaptive(self) -> bool:
        """A controller chooses the settings now: there is one and nothing is pinned."""
        return self._chooser is not None and not self._pinned

    @property
    def pinned(self) -> bool:
        return self._pinned

    def unpin(self) -> PolicySettings:
        """Hand the choice back to the controller; returns the policy now in force."""
        if self._chooser is None:
            raise PolicyError("this edge has no latency target (latency_slo_ms): there is no controller to "
                              "hand the thresholds to")
        with self._lock:
            self._pinned = False
        return self.get()

    def validate(self, settings: PolicySettings) -> PolicySettings:
        """``settings`` if they fit this model; a ``PolicyError`` saying what is wrong otherwise."""
        if not settings.score:
            raise PolicyError("the policy names no score function")
        try:
            check_score(settings.score, self.task)
        except ValueError as e:
            raise PolicyError(str(e)) from None
        num_exits = self.num_exits
        if settings.split_block is not None:
            if settings.split_block not in self.splits:
                runs = ", ".join(str(s) for s in sorted(self.splits)) or "only its split_block"
                raise PolicyError(f"the edge does not hand over after block {settings.split_block} (it runs {runs})")
            num_exits = self.splits[settings.split_block]
        if len(settings.thresholds) != num_exits:
            raise PolicyError(f"{len(settings.thresholds)} thresholds given, the edge has {num_exits} exits "
                              f"(one threshold per exit, cheapest first)")
        if any(math.isnan(t) for t in settings.thresholds):
            raise PolicyError("thresholds must be numbers, not NaN")
        if settings.route not in ROUTES:
            raise PolicyError(f"unknown route {settings.route!r}; use one of: {', '.join(ROUTES)}")
        local = settings.route == "local" or not settings.offload_enabled
        if local and num_exits == 0:
            raise PolicyError("offload cannot be disabled (route local): the edge has no exit to answer with")
        return PolicySettings(tuple(float(t) for t in settings.thresholds), settings.score, not local,
                              settings.split_block, "local" if local else settings.route)

    def get(self) -> PolicySettings:
        with self._lock:
            settings, chooser = self._settings, None if self._pinned else self._chooser
        chosen = chooser() if chooser is not None else None
        return settings if chosen is None else chosen

    def set(self, settings: PolicySettings) -> PolicySettings:
        """Validate, then replace the whole policy at once (pinning it, where a controller chooses); returns
        the policy now in force."""
        checked = self.validate(settings)
        with self._lock:
            self._settings = checked
            self._pinned = self._chooser is not None
        return checked
