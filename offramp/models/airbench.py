"""An airbench-style CNN (Jordan, *94% on CIFAR-10 in 3.29 seconds on a single GPU*, 2024).

A frozen 2x2 patch-whitening stem, then conv groups of (conv, max-pool, BN,
GELU, conv, BN, GELU). Every conv layer is a block here, so exits and the
split may sit after any of them, including the large, shallow maps early on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import FeatureSpec, SplittableBackbone, Task, head_outputs


class FrozenScaleBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose scale stays 1 (only the shift trains), with fast-moving statistics."""

    def __init__(self, channels: int, momentum: float = 0.4, eps: float = 1e-12) -> None:
        super().__init__(channels, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)


def dirac_conv(in_ch: int, out_ch: int) -> nn.Conv2d:
    """3x3 conv initialised so its first ``in_ch`` filters pass their input through (an identity start)."""
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(in_ch, out_ch)])
    return conv


class ConvLayer(nn.Module):
    """conv -> [2x2 max-pool] -> BN -> GELU: one block of the staged contract."""

    def __init__(self, in_ch: int, out_ch: int, pool: bool) -> None:
        super().__init__()
        self.conv = dirac_conv(in_ch, out_ch)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.norm = FrozenScaleBatchNorm(out_ch)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.pool(self.conv(x))))


class AirbenchCNN(SplittableBackbone):
    """Whitening stem, then ``len(widths)`` groups of two conv layers; each group halves the grid."""

    def __init__(
        self,
        img_size: tuple[int, int] = (32, 32),
        in_chans: int = 3,
        num_classes: int = 10,
        widths: tuple[int, ...] = (64, 256, 256),
        whiten_kernel: int = 2,
        whiten_bias_epochs: int = 3,
        logit_scale: float = 1 / 9,
        task: Task = "classification",
    ) -> None:
        super().__init__()
        self.task = task
        self.whiten_bias_epochs = whiten_bias_epochs
        self.logit_scale = logit_scale
        whiten_width = 2 * in_chans * whiten_kernel ** 2  # each eigen-filter and its negation
        self.whiten = nn.Conv2d(in_chans, whiten_width, whiten_kernel, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data's patch covariance, then fixed
        nn.init.zeros_(self.whiten.bias)
        blocks, specs = [], [FeatureSpec("map", whiten_width, tuple(img_size))]
        in_ch, (h, w) = whiten_width, tuple(img_size)
        for width in widths:
            h, w = h // 2, w // 2
            blocks += [ConvLayer(in_ch, width, pool=True), ConvLayer(width, width, pool=False)]
            specs += [FeatureSpec("map", width, (h, w))] * 2
            in_ch = width
        self.blocks = nn.ModuleList(blocks)
        self.num_blocks = len(blocks)
        self._specs = specs
        self.head_fc = nn.Linear(in_ch, head_outputs(task, num_classes), bias=False)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Whitening filters: eigenvectors of the training patches' covariance, scaled to unit variance."""
        k = self.whiten.kernel_size[0]
        c = x.shape[1]
        patches = x.float().unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).flip(0).reshape(-1, c, k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))

    def start_epoch(self, epoch: int) -> None:
        """The whitening bias learns in the first epochs only, then stays put (airbench's schedule)."""
        self.whiten.bias.requires_grad_(epoch < self.whiten_bias_epochs)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        k = self.whiten.kernel_size[0] - 1
        return F.gelu(self.whiten(F.pad(x, (0, k, 0, k))))  # (B, 2*C*k*k, H, W): padded to keep the grid

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head_fc(feats.amax(dim=(2, 3))) * self.logit_scale

    def feature_spec(self, position: int) -> FeatureSpec:
        self.check_position(position)
        return self._specs[position]
