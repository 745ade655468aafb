"""Transformer building blocks shared by the backbone ViT and the SL-ViT exits.

Written in the style of timm's ``vision_transformer.py``: pre-norm blocks,
fused qkv projection, ``scaled_dot_product_attention``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim: int, num_heads: int = 4, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        """(B, N, C) -> (B, N, C); with ``num_queries`` only the first tokens ask, (B, num_queries, C)."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, Dh)
        if num_queries is not None:
            q, N = q[:, :, :num_queries], num_queries
        if x.device.type == "cpu" and torch.is_grad_enabled():
            # Training on CPU: for sequences this short the plain kernel's backward is ~1.5x faster
            # than the flash kernel's (measured on 65 tokens, bf16).
            with sdpa_kernel(SDPBackend.MATH):
                x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """Two linear layers with GELU, as in every ViT."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer encoder layer: x + MHA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def forward_class_token(self, x: torch.Tensor) -> torch.Tensor:
        """What ``forward`` makes of the first token alone, (B, 1, C): a last layer read only at its class
        token needs every token's keys and values, but the query, projection and MLP of that one token only."""
        cls = x[:, :1] + self.attn(self.norm1(x), num_queries=1)
        return cls + self.mlp(self.norm2(cls))


def token_grid(img_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """The (h, w) grid of tokens a stem of this total stride cuts the input into; it must tile exactly."""
    h, w = img_size
    if h % stride or w % stride:
        raise ValueError(f"input size {img_size} is not a multiple of the stem's stride {stride}")
    return h // stride, w // stride


class PatchEmbed(nn.Module):
    """Cut an image (or spectrogram) into non-overlapping patches and project them."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.img_size = tuple(img_size)
        self.grid_size = token_grid(img_size, patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"expected input of size {self.img_size}, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class ConvTokenizer(nn.Module):
    """Compact Convolutional Transformer tokenizer (Hassani et al., 2021): conv stages, each
    conv -> BN -> GELU -> 2x2 max-pool, the last one ``dim`` wide; its grid cells are the tokens.

    Convolutions give the transformer locality for free, which is what lets it
    learn from 50,000 images rather than millions.
    """

    def __init__(self, img_size: tuple[int, int], in_chans: int, dim: int, widths: tuple[int, ...] = (64,)) -> None:
        super().__init__()
        stages, c = [], in_chans
        for width in (*widths, dim):
            stages += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.GELU(), nn.MaxPool2d(2)]
            c = width
        self.convs = nn.Sequential(*stages)
        self.img_size = tuple(img_size)
        self.grid_size = token_grid(img_size, 2 ** (len(widths) + 1))
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"expected input of size {self.img_size}, got {tuple(x.shape[-2:])}")
        return self.convs(x).flatten(2).transpose(1, 2)  # (B, N, D)


def init_weights(module: nn.Module) -> None:
    """timm-like init: truncated normal linears, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
