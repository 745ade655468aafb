"""Early-exit branches. Every exit takes the backbone's representation after
its position as a (B, C, H, W) grid and returns (B, num_outputs).

``SLViTExit`` is the paper's branch (Bakhtiarnia et al., 2022): a vision
transformer with a single encoder layer. ``MLPExit`` and ``CNNExit`` are the
conventional baselines it is measured against.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from offramp.core.models.backbone import FeatureSpec
from offramp.core.models.layers import Block, init_weights


def auto_patch_size(grid: tuple[int, int], max_tokens: int = 64) -> int:
    """Smallest patch size (dividing the grid) that leaves at most ``max_tokens`` tokens."""
    h, w = grid
    for p in range(1, min(h, w) + 1):
        if h % p == 0 and w % p == 0 and (h // p) * (w // p) <= max_tokens:
            return p
    return math.gcd(h, w)


MODALITIES = ("visual", "audio", "fused")


class SLViTExit(nn.Module):
    """Single-layer ViT exit: patchify + project, own class token and position
    embedding, one pre-norm encoder layer, answer read from the class token.

    ``modality`` picks what it attends over: the backbone's visual
    representation, the audio encoder's tokens (``audio_spec`` = their
    (count, width)), or both, each projected to the exit's width and tagged
    with a learned modality embedding so the layer knows which is which.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        num_outputs: int,
        dim: int = 64,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        patch_size: int | None = None,
        modality: str = "visual",
        audio_spec: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"unknown exit modality {modality!r}; choose from {', '.join(MODALITIES)}")
        self.modality = modality
        num_tokens = 0
        self.proj: nn.Conv2d | None = None
        if modality != "audio":
            p = patch_size or auto_patch_size(spec.grid)
            if spec.grid[0] % p or spec.grid[1] % p:
                raise ValueError(f"exit patch size {p} does not divide the feature grid {spec.grid}")
            self.patch_size = p
            num_tokens += (spec.grid[0] // p) * (spec.grid[1] // p)
            # A p x p patch of the feature map, flattened and projected == conv with kernel = stride = p.
            self.proj = nn.Conv2d(spec.channels, dim, kernel_size=p, stride=p)
        self.audio_proj: nn.Linear | None = None
        if modality != "visual":
            if audio_spec is None:
                raise ValueError(f"a {modality} exit needs audio tokens: the model has no audio encoder")
            num_audio, audio_dim = audio_spec
            num_tokens += num_audio
            self.audio_proj = nn.Linear(audio_dim, dim)
        self.modality_embed = nn.Parameter(torch.zeros(2, dim)) if modality == "fused" else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens + 1, dim))
        self.block = Block(dim, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_outputs)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.modality_embed is not None:
            nn.init.trunc_normal_(self.modality_embed, std=0.02)
        self.apply(init_weights)

    def forward(self, grid: torch.Tensor | None, audio: torch.Tensor | None = None) -> torch.Tensor:
        """``grid`` (B, C, H, W) for visual and fused exits, ``audio`` (B, N, D) tokens for audio and fused."""
        parts = []
        if self.proj is not None:
            parts.append(self.proj(grid).flatten(2).transpose(1, 2))  # (B, N, dim)
        if self.audio_proj is not None:
            parts.append(self.audio_proj(audio))
        if self.modality_embed is not None:
            parts = [part + self.modality_embed[m] for m, part in enumerate(parts)]
        x = torch.cat([self.cls_token.expand(parts[0].shape[0], -1, -1), *parts], dim=1) + self.pos_embed
        return self.head(self.norm(self.block.forward_class_token(x))[:, 0])  # only the class token is read


class MLPExit(nn.Module):
    """Conventional baseline: global average pool, then two linear layers."""

    def __init__(self, spec: FeatureSpec, num_outputs: int, hidden: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(spec.channels), nn.Linear(spec.channels, hidden), nn.GELU(), nn.Linear(hidden, num_outputs)
        )

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.mlp(grid.mean(dim=(2, 3)))


class CNNExit(nn.Module):
    """Conventional baseline: two 3x3 convolutions (the second strided), pool, linear."""

    def __init__(self, spec: FeatureSpec, num_outputs: int, hidden: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(spec.channels, hidden, 3, 1, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, 2, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(hidden, num_outputs)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(grid))


EXIT_TYPES: dict[str, type[nn.Module]] = {"slvit": SLViTExit, "mlp": MLPExit, "cnn": CNNExit}


def create_exit(kind: str, spec: FeatureSpec, num_outputs: int, **kwargs) -> nn.Module:
    """Resolve an exit type name once, at construction."""
    try:
        cls = EXIT_TYPES[kind]
    except KeyError:
        raise ValueError(f"unknown exit type {kind!r}; choose from {', '.join(EXIT_TYPES)}") from None
    return cls(spec, num_outputs, **kwargs)
