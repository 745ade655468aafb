"""What a dataset loader hands back before any file is decoded.

Listing first and decoding later lets ``limit`` pick its subset from the
names, so a quick run on 500 images does not decode 50,000.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True)
class Listing:
    """Labels of every sample, and a way to decode any subset of them."""

    labels: np.ndarray                              # (N,) int64
    label_names: list[str]
    input_shape: tuple[int, int, int]               # (C, H, W)
    modality: str                                   # "image" or "audio"
    decode: Callable[[np.ndarray], torch.Tensor]    # sorted indices -> (n, C, H, W) float32
