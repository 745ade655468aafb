"""When the edge answers on its own and when it asks the cloud.

The policy in force is one immutable ``PolicySettings`` value behind a lock:
a batch reads it once, so a run-time change never applies half-way through a
batch, and every change is validated against the model before it takes over.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from offramp.errors import OfframpError
from offramp.exit_policy import thresholds_to_run
from offramp.scores import check_score
from offramp.wire import pb

# A threshold per score that an uncalibrated edge starts from. max_prob, margin
# and entropy are bounded and these values let only clearly confident samples
# leave; std (regression) has no scale-free value, so 0 keeps every sample on
# its way to the cloud until thresholds are calibrated.
DEFAULT_THRESHOLD: dict[str, float] = {"max_prob": 0.9, "margin": 0.8, "entropy": 0.3, "std": 0.0}


class PolicyError(OfframpError):
    """A policy that does not fit the model: wrong threshold count, unknown score, ..."""


@dataclass(frozen=True)
class PolicySettings:
    """One threshold per edge exit (cheapest first), the score they apply to, and whether to offload."""

    thresholds: tuple[float, ...]
    score: str
    offload_enabled: bool = True

    def run_thresholds(self) -> list[float]:
        """The thresholds to run the exits with: without offload the last exit must take every sample."""
        return thresholds_to_run(self.thresholds, self.score, self.offload_enabled)

    def to_proto(self) -> pb.Policy:
        return pb.Policy(thresholds=self.thresholds, score=self.score, offload_enabled=self.offload_enabled)

    @classmethod
    def from_proto(cls, message: pb.Policy) -> "PolicySettings":
        return cls(tuple(message.thresholds), message.score, message.offload_enabled)


def default_settings(num_exits: int, score: str, offload_enabled: bool = True) -> PolicySettings:
    return PolicySettings((DEFAULT_THRESHOLD[score],) * num_exits, score, offload_enabled)


class ExitPolicy:
    """The policy in force on one edge, safe to read from the compute thread and replace from RPCs."""

    def __init__(self, settings: PolicySettings, num_exits: int, task: str) -> None:
        self.num_exits = num_exits
        self.task = task
        self._lock = threading.Lock()
        self._settings = self.validate(settings)

    def validate(self, settings: PolicySettings) -> PolicySettings:
        """``settings`` if they fit this model; a ``PolicyError`` saying what is wrong otherwise."""
        if not settings.score:
            raise PolicyError("the policy names no score function")
        try:
            check_score(settings.score, self.task)
        except ValueError as e:
            raise PolicyError(str(e)) from None
        if len(settings.thresholds) != self.num_exits:
            raise PolicyError(f"{len(settings.thresholds)} thresholds given, the edge has {self.num_exits} exits "
                              f"(one threshold per exit, cheapest first)")
        if any(math.isnan(t) for t in settings.thresholds):
            raise PolicyError("thresholds must be numbers, not NaN")
        if not settings.offload_enabled and self.num_exits == 0:
            raise PolicyError("offload cannot be disabled: the edge has no exit to answer with")
        return PolicySettings(tuple(float(t) for t in settings.thresholds), settings.score, settings.offload_enabled)

    def get(self) -> PolicySettings:
        with self._lock:
            return self._settings

    def set(self, settings: PolicySettings) -> PolicySettings:
        """Validate, then replace the whole policy at once; returns the policy now in force."""
        checked = self.validate(settings)
        with self._lock:
            self._settings = checked
        return checked
