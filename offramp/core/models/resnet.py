"""A small ResNet-style CNN backbone with the same staged API as the ViT.

The paper attaches SL-ViT exits to CNN backbones too: the exit cuts the
feature map into patches and projects them linearly. This backbone lets the
exits, the split and the offload path work on feature maps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from offramp.core.models.backbone import FeatureSpec, SplittableBackbone, Task, head_outputs


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al., 2016)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        needs_proj = stride != 1 or in_ch != out_ch
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
            if needs_proj
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(SplittableBackbone):
    """Stem, then ``blocks_per_stage`` basic blocks per stage; each later stage halves the grid."""

    def __init__(
        self,
        img_size: tuple[int, int] = (32, 32),
        in_chans: int = 3,
        num_classes: int = 10,
        widths: tuple[int, ...] = (32, 64, 128),
        blocks_per_stage: int = 2,
        task: Task = "classification",
    ) -> None:
        super().__init__()
        self.task = task
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks, specs = [], []
        in_ch, (h, w) = widths[0], tuple(img_size)
        for stage, width in enumerate(widths):
            for j in range(blocks_per_stage):
                stride = 2 if stage > 0 and j == 0 else 1
                blocks.append(BasicBlock(in_ch, width, stride))
                in_ch = width
                h, w = (h + 1) // stride if stride > 1 else h, (w + 1) // stride if stride > 1 else w
                specs.append(FeatureSpec("map", width, (h, w)))
        self.blocks = nn.ModuleList(blocks)
        self.num_blocks = len(blocks)
        self._specs = [FeatureSpec("map", widths[0], tuple(img_size)), *specs]
        self.head_fc = nn.Linear(in_ch, head_outputs(task, num_classes))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)  # (B, C0, H, W)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head_fc(feats.mean(dim=(2, 3)))

    def feature_spec(self, position: int) -> FeatureSpec:
        self.check_position(position)
        return self._specs[position]
