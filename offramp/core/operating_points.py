"""Operating points of the exit rule on one checkpoint: thresholds and what they did on held-out data.

Calibration finds them offline, edge configs record them, and the edge's controller chooses among them
at run time. Plain data, light to import (the command line builds its flags from settings that name them).
"""
from __future__ import annotations

from dataclasses import dataclass


# Thresholds of `offramp eval`'s exit-share table when none are given (bounded scores).
DEFAULT_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class CalibrationPoint:
    """One operating point: thresholds, and what they did on the validation data."""

    thresholds: tuple[float, ...]  # one per edge exit, cheapest first
    accuracy: float  # of the answers (accuracy, or -MAE for regression: higher is better)
    offload: float  # share of the samples sent to the cloud
    shares: tuple[float, ...]  # share answered by each edge exit, then by the cloud


@dataclass(frozen=True)
class CalibrationTable:
    """The operating points `offramp calibrate` found for one split of one checkpoint: the most accurate
    thresholds at each of a range of offload shares. The edge's latency controller chooses among them."""

    fingerprint: str  # of the checkpoint they were measured on: another model's table means nothing
    split_block: int
    score: str
    exits: tuple[str, ...]
    samples: int  # validation samples behind each number
    points: tuple[CalibrationPoint, ...]

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a calibration table needs at least one point")
        for p in self.points:
            if len(p.thresholds) != len(self.exits) or len(p.shares) != len(self.exits) + 1:
                raise ValueError(f"calibration points need one threshold per exit ({', '.join(self.exits)}) and "
                                 "one share per exit plus the cloud's")


@dataclass(frozen=True)
class InputRouteCalibration:
    """The input route on one checkpoint, measured like the operating points: the whole model's accuracy on
    inputs as the cloud receives them (images re-encoded as JPEG at ``quality``, so its loss is counted),
    and the bytes each request sends. The edge's controller weighs it against the split and local routes."""

    fingerprint: str
    quality: int  # JPEG quality of images sent as tensors
    accuracy: float
    bytes_per_request: float  # mean size of the input as sent
    samples: int
