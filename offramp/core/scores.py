"""Confidence scores for exit decisions, shared by evaluation, calibration and the edge.

A score is computed here from a head's output; which way it points (whether
higher means surer) and how thresholds apply to it is ``offramp.core.exit_rule``'s.
"""
from __future__ import annotations

import torch

CLASSIFICATION_SCORES = ("max_prob", "entropy", "margin")
REGRESSION_SCORES = ("std",)
SCORES = (*CLASSIFICATION_SCORES, *REGRESSION_SCORES)


def check_score(score: str, task: str) -> None:
    allowed = CLASSIFICATION_SCORES if task == "classification" else REGRESSION_SCORES
    if score not in allowed:
        raise ValueError(f"score {score!r} does not apply to {task}; choose from {', '.join(allowed)}")


def default_score(task: str) -> str:
    return "max_prob" if task == "classification" else "std"


def confidence(output: torch.Tensor, score: str) -> torch.Tensor:
    """The score of each sample of a (B, num_outputs) head output, shape (B,)."""
    if score == "std":
        return torch.exp(0.5 * output[:, 1])
    probs = output.float().softmax(dim=-1)
    if score == "max_prob":
        return probs.max(dim=-1).values
    if score == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if score == "entropy":
        return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
    raise ValueError(f"unknown score {score!r}; choose from {', '.join(SCORES)}")


def prediction(output: torch.Tensor, task: str) -> torch.Tensor:
    """Class index (classification) or predicted value (regression), shape (B,)."""
    return output.argmax(dim=-1) if task == "classification" else output[:, 0]
