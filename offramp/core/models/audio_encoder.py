"""The edge's audio encoder for audiovisual models: a log-mel spectrogram in, audio tokens out.

Cheap on purpose (few, large patches and one encoder layer): it runs on the
edge for every request, before any exit, so that an audio-only exit can
answer without a single visual block, and fused exits and the cloud's tail
can attend over the same tokens. Its width is the backbone's, so the tail
can append the tokens to the visual sequence as they are.
"""
from __future__ import annotations

import torch
from torch import nn

from offramp.core.models.layers import Block, PatchEmbed, init_weights


class AudioEncoder(nn.Module):
    """Spectrogram patches, projected, with learned positions, through ``depth`` pre-norm blocks."""

    def __init__(self, input_shape: tuple[int, int, int], dim: int, patch_size: int = 16, depth: int = 1,
                 num_heads: int = 4, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        chans, mels, frames = input_shape
        if mels % patch_size or frames % patch_size:
            raise ValueError(f"audio patch size {patch_size} does not divide the spectrogram {mels}x{frames}")
        self.input_shape = tuple(input_shape)
        self.patch_embed = PatchEmbed((mels, frames), patch_size, chans, dim)
        self.num_tokens = self.patch_embed.num_patches
        self.dim = dim
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        self.blocks = nn.Sequential(*(Block(dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_weights)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """(B, 1, mels, frames) -> (B, num_tokens, dim)."""
        return self.norm(self.blocks(self.patch_embed(spectrogram) + self.pos_embed))
