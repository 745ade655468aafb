"""The staged contract every splittable backbone honours.

A backbone is a sequence of ``num_blocks`` blocks between an input stem
(``embed``) and an output stage (``forward_head``). Split points and exit
positions are block indices: position ``k`` means "after ``k`` blocks", so
``head(x, until=k)`` followed by ``tail(feats, start=k)`` is one
uninterrupted forward pass.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Task = Literal["classification", "regression"]


@dataclass(frozen=True)
class FeatureSpec:
    """Shape of the backbone's representation after a given block (batch excluded).

    ``tokens``: (num_prefix + h*w, channels), the patch tokens lie on an (h, w) grid.
    ``map``: (channels, h, w), a CNN feature map.
    """

    kind: Literal["tokens", "map"]
    channels: int
    grid: tuple[int, int]
    num_prefix: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        if self.kind == "tokens":
            return (self.num_prefix + self.grid[0] * self.grid[1], self.channels)
        return (self.channels, *self.grid)


def head_outputs(task: Task, num_classes: int) -> int:
    """Classification heads emit logits; regression heads emit (mean, log-variance)."""
    return num_classes if task == "classification" else 2


class SplittableBackbone(nn.Module, ABC):
    """Base class: subclasses implement ``embed``, ``blocks`` and ``forward_head``."""

    num_blocks: int
    task: Task

    @abstractmethod
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Input stem: raw input to the representation before block 0."""

    def init_from_data(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation before training (a whitening stem); most backbones need none."""

    def start_epoch(self, epoch: int) -> None:
        """Per-epoch training switches (parts that learn only early on); most backbones have none."""

    def run_block(self, i: int, feats: torch.Tensor) -> torch.Tensor:
        return self.blocks[i](feats)

    def transformer_block(self, i: int) -> nn.Module:
        """The module block ``i`` runs (top-k token selection reads a transformer block's attention)."""
        return self.blocks[i]

    @abstractmethod
    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        """Output stage: representation after the last block to logits / (mean, log-var)."""

    @abstractmethod
    def feature_spec(self, position: int) -> FeatureSpec:
        """Shape of the representation after ``position`` blocks."""

    def to_grid(self, feats: torch.Tensor, position: int) -> torch.Tensor:
        """The representation after ``position`` blocks as a (B, C, H, W) map."""
        spec = self.feature_spec(position)
        if spec.kind == "map":
            return feats
        patches = feats[:, spec.num_prefix:]  # (B, h*w, C)
        return patches.transpose(1, 2).reshape(feats.shape[0], spec.channels, *spec.grid)

    def check_position(self, position: int) -> None:
        if not 0 <= position <= self.num_blocks:
            raise ValueError(f"block position {position} is outside 0..{self.num_blocks}")

    def forward_blocks(self, feats: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run blocks ``[start, stop)`` on the representation after ``start`` blocks."""
        stop = self.num_blocks if stop is None else stop
        self.check_position(start)
        self.check_position(stop)
        for i in range(start, stop):
            feats = self.run_block(i, feats)
        return feats

    def head(self, x: torch.Tensor, until: int) -> torch.Tensor:
        """The edge half: stem plus blocks ``[0, until)``."""
        return self.forward_blocks(self.embed(x), 0, until)

    def tail(self, feats: torch.Tensor, start: int) -> torch.Tensor:
        """The cloud half: blocks ``[start, num_blocks)`` plus the output stage."""
        return self.forward_head(self.forward_blocks(feats, start))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x, until=self.num_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
