"""The exit rule, written once: a sample leaves at the first exit whose confidence passes that exit's threshold.

The edge walks its exits cheapest first and answers a sample at the first one
sure enough; the others go on (to the cloud, or offline to the final head),
keeping their most confident exit's answer as the degraded fallback.
Evaluation, calibration and the benchmarks replay the same walk on recorded
confidences and must decide exactly as the edge does, so every one of them,
the edge included, calls ``walk``; the edge's per-exit step calls ``passes``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from offramp.core.scores import SCORES

if TYPE_CHECKING:
    from offramp.core.models import ExitConfig

# For max_prob and margin an exit is confident when its score is at least the
# threshold; for entropy and std (the predicted standard deviation) when at most.
HIGHER_IS_CONFIDENT = {"max_prob": True, "margin": True, "entropy": False, "std": False}


def higher_is_confident(score: str) -> bool:
    if score not in HIGHER_IS_CONFIDENT:
        raise ValueError(f"unknown score {score!r}; choose from {', '.join(SCORES)}")
    return HIGHER_IS_CONFIDENT[score]


def least_confident(score: str) -> float:
    """A confidence every real one beats: where the search for a sample's most confident exit starts."""
    return -math.inf if higher_is_confident(score) else math.inf


def always_leave(score: str) -> float:
    """A threshold every confidence passes: the exit answers each sample that reaches it."""
    return least_confident(score)


def never_leave(score: str) -> float:
    """A threshold no confidence passes: every sample walks on past the exit."""
    return -least_confident(score)


def thresholds_to_run(thresholds: Sequence[float], score: str, offload_enabled: bool) -> list[float]:
    """The thresholds an edge runs with: without offload its last exit must answer every sample that reaches it."""
    if offload_enabled or not thresholds:
        return list(thresholds)
    return [*thresholds[:-1], always_leave(score)]


def passes(confidence: Any, threshold: float, score: str) -> Any:
    """Which samples (a NumPy array or a tensor of confidences) may leave at an exit with this threshold.

    The threshold is compared as a Python float, in the confidences' own
    precision, so that the edge (tensors) and the offline walk (arrays) agree
    to the last bit.
    """
    threshold = float(threshold)
    return confidence >= threshold if higher_is_confident(score) else confidence <= threshold


@dataclass(frozen=True)
class WalkResult:
    """Where each of n samples leaves a walk over ``num_exits`` exits."""

    num_exits: int
    leaves_at: np.ndarray  # (n,) the first exit confident enough, or num_exits: none was, the sample goes on
    best: np.ndarray  # (n,) its most confident exit of those it reached (the first of equals); -1 if none

    @property
    def goes_on(self) -> np.ndarray:
        return self.leaves_at == self.num_exits

    def shares(self) -> list[float]:
        """Fraction of the samples leaving at each exit, then the fraction going on."""
        return (np.bincount(self.leaves_at, minlength=self.num_exits + 1) / len(self.leaves_at)).tolist()

    def answers(self, per_head: np.ndarray) -> np.ndarray:
        """Each sample's entry of ``per_head`` (num_exits + 1, n): the exits' values, then the next stage's."""
        return per_head[self.leaves_at, np.arange(len(self.leaves_at))]

    def mean_cost(self, costs: Sequence[float]) -> float:
        """Mean cost per sample, given ``costs`` (num_exits + 1,) of leaving at each exit, then of going on."""
        return float(np.asarray(costs, dtype=np.float64)[self.leaves_at].mean())


def walk(confidences: np.ndarray, thresholds: Sequence[float], score: str) -> WalkResult:
    """Walk exits cheapest first on their confidences (E, n), one threshold per exit.

    Only the exits a sample reaches are read: entries after the one it
    leaves at may hold anything (the edge never computes them).
    """
    confidences = np.asarray(confidences)
    num_exits, n = len(thresholds), confidences.shape[-1]
    if len(confidences) != num_exits:
        raise ValueError(f"{len(thresholds)} thresholds for {len(confidences)} exits")
    higher = higher_is_confident(score)
    leaves_at = np.full(n, num_exits)
    best = np.full(n, -1)
    best_confidence = np.full(n, least_confident(score), dtype=confidences.dtype)
    for k, (confidence, threshold) in enumerate(zip(confidences, thresholds)):
        walking = leaves_at == num_exits
        if not walking.any():  # every sample has left: the exits after this one are never read
            break
        surer = walking & (confidence > best_confidence if higher else confidence < best_confidence)
        best[surer], best_confidence[surer] = k, confidence[surer]
        leaves_at[walking & passes(confidence, threshold, score)] = k
    return WalkResult(num_exits, leaves_at, best)


def answer_costs(exits: Sequence[ExitConfig], exit_costs: Sequence[float], visual_cost: Callable[[int], float],
                 audio_cost: float = 0) -> list[float]:
    """What answering at each exit of a walk costs: every exit tried on the way, the visual blocks up to
    the deepest visual exit so far, and the audio encoder once an exit so far needed audio tokens (the
    edge computes neither before an exit needs it; an audio-only first exit costs no visual block).

    ``visual_cost(p)``: the stem and blocks ``[0, p)``.
    """
    costs, spent, visual_at, heard = [], 0, None, False
    for e, cost in zip(exits, exit_costs, strict=True):
        spent += cost
        if e.uses_visual:
            visual_at = e.position
        heard = heard or e.uses_audio
        costs.append((audio_cost if heard else 0) + (0 if visual_at is None else visual_cost(visual_at)) + spent)
    return costs


def edge_exit_ids(exits: Sequence[ExitConfig], split_block: int, names: Sequence[str] | None = None) -> list[int]:
    """Indices into ``exits`` of those an edge split after ``split_block`` runs: all up to the split, or
    the named subset.

    A checkpoint may hold several exit types at one position (to compare
    them); a deployment runs only the ones worth their cost.
    """
    before = [i for i, e in enumerate(exits) if e.position <= split_block]
    if names is None:
        return before
    by_name = {exits[i].name: i for i in before}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"no exit {', '.join(unknown)} up to block {split_block}; "
                         f"the checkpoint has {', '.join(by_name) or 'none there'}")
    if len(set(names)) != len(names):
        raise ValueError(f"exits listed twice in {', '.join(names)}")
    return sorted(by_name[n] for n in names)


def exits_up_to(exits: Sequence[ExitConfig], names: Sequence[str] | None, split_block: int) -> list[str] | None:
    """Of the exits an edge runs (``names``; None: every one), those it can run when split after
    ``split_block``: an edge with several split blocks runs fewer exits at the earlier ones."""
    if names is None:
        return None
    position = {e.name: e.position for e in exits}
    return [n for n in names if position.get(n, split_block + 1) <= split_block]

