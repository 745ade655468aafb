"""A small, self-contained Vision Transformer with a splittable forward pass.

The same model serves images (patches of pixels) and audio (patches of a
log-mel spectrogram): only ``img_size``, ``patch_size`` and ``in_chans`` differ.
"""
from __future__ import annotations

import torch
from torch import nn

from offramp.core.models.airbench import AirbenchTokenizer
from offramp.core.models.backbone import FeatureSpec, SplittableBackbone, Task, head_outputs
from offramp.core.models.layers import Block, ConvTokenizer, PatchEmbed, init_weights


class VisionTransformer(SplittableBackbone):
    """ViT: patch embedding, class token, learned position embedding, pre-norm blocks.

    ``conv_tokenizer`` (a tuple of widths) replaces the linear patch embedding
    with CCT's convolutional tokenizer, ``airbench_tokenizer`` (the widths of
    its conv groups) with an airbench CNN's first layers (a hybrid ViT);
    ``patch_size`` is then unused.
    """

    def __init__(
        self,
        img_size: tuple[int, int] = (32, 32),
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 10,
        embed_dim: int = 128,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        task: Task = "classification",
        conv_tokenizer: tuple[int, ...] | None = None,
        airbench_tokenizer: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.task = task
        self.num_blocks = depth
        self.embed_dim = embed_dim
        if conv_tokenizer is not None and airbench_tokenizer is not None:
            raise ValueError("choose one of conv_tokenizer and airbench_tokenizer")
        if conv_tokenizer is not None:
            self.patch_embed = ConvTokenizer(tuple(img_size), in_chans, embed_dim, tuple(conv_tokenizer))
        elif airbench_tokenizer is not None:
            self.patch_embed = AirbenchTokenizer(tuple(img_size), in_chans, embed_dim, tuple(airbench_tokenizer))
        else:
            self.patch_embed = PatchEmbed(tuple(img_size), patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_fc = nn.Linear(embed_dim, head_outputs(task, num_classes))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_weights)

    def init_from_data(self, x: torch.Tensor) -> None:
        if isinstance(self.patch_embed, AirbenchTokenizer):
            self.patch_embed.init_from_data(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed  # (B, 1 + N, D)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head_fc(self.norm(feats)[:, 0])

    def feature_spec(self, position: int) -> FeatureSpec:
        self.check_position(position)
        return FeatureSpec("tokens", self.embed_dim, self.patch_embed.grid_size, num_prefix=1)


class StagedHybridViT(VisionTransformer):
    """A hybrid ViT whose tokenizer's conv layers are blocks of their own, so exits and splits can sit
    inside the tokenizer: early in *compute*, not only early in transformer depth.

    Blocks ``0 .. C-1`` are the airbench conv layers (feature maps), block ``C``
    turns the last map into tokens (projection, class token, position
    embedding) and runs the first transformer block, blocks ``C+1 ..`` are the
    remaining transformer blocks. Parameter names are ``VisionTransformer``'s,
    so the tokenizer still loads from an airbench teacher.
    """

    def __init__(self, airbench_tokenizer: tuple[int, ...] = (64, 256), **kwargs) -> None:
        super().__init__(airbench_tokenizer=airbench_tokenizer, **kwargs)
        tokenizer = self.patch_embed
        self.num_conv = len(tokenizer.blocks)
        self.num_blocks = self.num_conv + len(self.blocks)
        h, w = tokenizer.img_size
        specs = [FeatureSpec("map", tokenizer.whiten.out_channels, (h, w))]
        for width in airbench_tokenizer:
            h, w = h // 2, w // 2
            specs += [FeatureSpec("map", width, (h, w))] * 2
        self._map_specs = specs

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.patch_embed.img_size:
            raise ValueError(f"expected input of size {self.patch_embed.img_size}, got {tuple(x.shape[-2:])}")
        return self.patch_embed.whiten(x)  # (B, C, H, W)

    def to_tokens(self, grid: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(grid.flatten(2).transpose(1, 2))  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed  # (B, 1 + N, D)

    def run_block(self, i: int, feats: torch.Tensor) -> torch.Tensor:
        if i < self.num_conv:
            return self.patch_embed.blocks[i](feats)
        if i == self.num_conv:
            feats = self.to_tokens(feats)
        return self.blocks[i - self.num_conv](feats)

    def transformer_block(self, i: int) -> torch.nn.Module:
        """The transformer block that block index ``i`` runs (top-k selection reads its attention)."""
        if i < self.num_conv:
            raise ValueError(f"block {i} is a conv layer of the tokenizer, not a transformer block")
        return self.blocks[i - self.num_conv]

    def feature_spec(self, position: int) -> FeatureSpec:
        self.check_position(position)
        if position <= self.num_conv:
            return self._map_specs[position]
        return FeatureSpec("tokens", self.embed_dim, self.patch_embed.grid_size, num_prefix=1)
