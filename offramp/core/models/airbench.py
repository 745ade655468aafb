"""An airbench-style CNN (Jordan, *94% on CIFAR-10 in 3.29 seconds on a single GPU*, 2024).

A frozen 2x2 patch-whitening stem, then conv groups of (conv, max-pool, BN,
GELU, conv, BN, GELU). Every conv layer is a block here, so exits and the
split may sit after any of them, including the large, shallow maps early on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from offramp.core.models.backbone import FeatureSpec, SplittableBackbone, Task, head_outputs
from offramp.core.models.layers import token_grid


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


class PatchWhitening(nn.Conv2d):
    """The frozen stem: filters that whiten the data's kxk patches, each beside its negation, then GELU.

    The weights come from the training patches' covariance (``init_from_data``)
    and stay fixed; only the bias learns, in the first epochs.
    """

    def __init__(self, in_chans: int, kernel: int = 2) -> None:
        super().__init__(in_chans, 2 * in_chans * kernel ** 2, kernel, bias=True)
        self.weight.requires_grad_(False)
        nn.init.zeros_(self.bias)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Eigenvectors of the patches' covariance, scaled to unit variance."""
        k, c = self.kernel_size[0], x.shape[1]
        patches = x.float().unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).flip(0).reshape(-1, c, k, k)
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size[0] - 1
        return F.gelu(super().forward(F.pad(x, (0, k, 0, k))))  # (B, 2*C*k*k, H, W): padded to keep the grid


def conv_groups(in_ch: int, widths: tuple[int, ...]) -> nn.ModuleList:
    """``len(widths)`` groups of two conv layers; the first of each halves the grid."""
    layers = []
    for width in widths:
        layers += [ConvLayer(in_ch, width, pool=True), ConvLayer(width, width, pool=False)]
        in_ch = width
    return nn.ModuleList(layers)


class AirbenchTokenizer(nn.Module):
    """airbench's stem and first conv groups as a ViT tokenizer: each cell of the last map is a token.

    Its parameter names are the CNN's (``whiten``, ``blocks.i``), so a trained
    ``AirbenchCNN``'s first layers load into it as they are (a hybrid ViT,
    as in Dosovitskiy et al. 2021's ResNet-stem hybrids).
    """

    def __init__(self, img_size: tuple[int, int], in_chans: int, dim: int, widths: tuple[int, ...] = (64, 256),
                 whiten_kernel: int = 2) -> None:
        super().__init__()
        self.whiten = PatchWhitening(in_chans, whiten_kernel)
        self.blocks = conv_groups(self.whiten.out_channels, widths)
        self.proj = nn.Linear(widths[-1], dim) if widths[-1] != dim else nn.Identity()
        self.img_size = tuple(img_size)
        self.grid_size = token_grid(img_size, 2 ** len(widths))
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def init_from_data(self, x: torch.Tensor) -> None:
        self.whiten.init_from_data(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"expected input of size {self.img_size}, got {tuple(x.shape[-2:])}")
        x = self.whiten(x)
        for block in self.blocks:
            x = block(x)
        return self.proj(x.flatten(2).transpose(1, 2))  # (B, N, D)


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
        self.whiten = PatchWhitening(in_chans, whiten_kernel)
        self.blocks = conv_groups(self.whiten.out_channels, widths)
        specs, (h, w) = [FeatureSpec("map", self.whiten.out_channels, tuple(img_size))], tuple(img_size)
        for width in widths:
            h, w = h // 2, w // 2
            specs += [FeatureSpec("map", width, (h, w))] * 2
        self.num_blocks = len(self.blocks)
        self._specs = specs
        self.head_fc = nn.Linear(widths[-1], head_outputs(task, num_classes), bias=False)

    def init_from_data(self, x: torch.Tensor) -> None:
        self.whiten.init_from_data(x)

    def start_epoch(self, epoch: int) -> None:
        """The whitening bias learns in the first epochs only, then stays put (airbench's schedule)."""
        self.whiten.bias.requires_grad_(epoch < self.whiten_bias_epochs)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.whiten(x)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head_fc(feats.amax(dim=(2, 3))) * self.logit_scale

    def feature_spec(self, position: int) -> FeatureSpec:
        self.check_position(position)
        return self._specs[position]
