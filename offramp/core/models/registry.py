"""Named backbone variants: small factory functions, as timm registers models.

Every factory takes the data-derived arguments (input size, channels, number
of classes, task) plus keyword overrides, and returns a ``SplittableBackbone``.
"""
from __future__ import annotations

from typing import Callable

import torch

from offramp.core.models.airbench import AirbenchCNN
from offramp.core.models.backbone import SplittableBackbone
from offramp.core.models.resnet import ResNet
from offramp.core.models.timm_vit import TIMM_PREFIX, TimmViT
from offramp.core.models.vit import StagedHybridViT, VisionTransformer

BackboneFactory = Callable[..., SplittableBackbone]
_VARIANTS: dict[str, BackboneFactory] = {}


def register(fn: BackboneFactory) -> BackboneFactory:
    _VARIANTS[fn.__name__] = fn
    return fn


def variant_names() -> list[str]:
    return sorted(_VARIANTS)


def is_variant(name: str) -> bool:
    """A registered variant, or ``timm:NAME`` (any timm VisionTransformer, checked when built)."""
    return name in _VARIANTS or (name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX))


def create_backbone(name: str, **kwargs) -> SplittableBackbone:
    if name.startswith(TIMM_PREFIX):
        return TimmViT(model_name=name[len(TIMM_PREFIX):], native=True, **kwargs)
    try:
        factory = _VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown model variant {name!r}; choose from {', '.join(variant_names())}") from None
    return factory(**kwargs)


def create_backbone_depth(variant: str) -> int:
    """Number of blocks of a variant (built once on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return create_backbone(variant).num_blocks


@register
def vit_tiny_32(**kw) -> SplittableBackbone:
    """6-block ViT for 32x32 images: 4x4 patches, 64 tokens + class token, width 128."""
    args = dict(img_size=(32, 32), patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0)
    return VisionTransformer(**{**args, **kw})


@register
def vit_micro_32(**kw) -> SplittableBackbone:
    """Quick 6-block ViT for 32x32 inputs: 8x8 patches (16 tokens), width 96. The demo's default."""
    args = dict(img_size=(32, 32), patch_size=8, embed_dim=96, depth=6, num_heads=4, mlp_ratio=2.0)
    return VisionTransformer(**{**args, **kw})


@register
def vit_tiny_spec(**kw) -> SplittableBackbone:
    """6-block ViT for 64x64 log-mel spectrograms (mels x frames), 8x8 patches."""
    args = dict(img_size=(64, 64), patch_size=8, in_chans=1, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0)
    return VisionTransformer(**{**args, **kw})


@register
def resnet_tiny_32(**kw) -> SplittableBackbone:
    """6-block ResNet for 32x32 images, widths 32/64/128."""
    args = dict(img_size=(32, 32), widths=(32, 64, 128), blocks_per_stage=2)
    return ResNet(**{**args, **kw})


@register
def airbench_c10(**kw) -> SplittableBackbone:
    """airbench-style CNN for 32x32 images: whitening stem, 6 conv layers (64/256/256 wide); 90.7% on CIFAR-10 here."""
    args = dict(img_size=(32, 32), widths=(64, 256, 256))
    return AirbenchCNN(**{**args, **kw})


@register
def cct_c10(**kw) -> SplittableBackbone:
    """Compact Convolutional Transformer (CCT-4/3x2-like): 2-conv tokenizer to 8x8 tokens, 4 blocks of width 128."""
    args = dict(img_size=(32, 32), conv_tokenizer=(64,), embed_dim=128, depth=4, num_heads=2, mlp_ratio=2.0)
    return VisionTransformer(**{**args, **kw})


@register
def hybrid_c10(**kw) -> SplittableBackbone:
    """Hybrid ViT: airbench_c10's stem and first two conv groups as tokenizer (8x8 tokens of 256), 4 blocks of
    width 192. Its recipe starts the tokenizer from the airbench teacher's weights."""
    args = dict(img_size=(32, 32), airbench_tokenizer=(64, 256), embed_dim=192, depth=4, num_heads=3, mlp_ratio=2.0)
    return VisionTransformer(**{**args, **kw})


@register
def edge_c10(**kw) -> SplittableBackbone:
    """Edge-first hybrid ViT: hybrid_c10's conv tokenizer with each conv layer a block of its own (exits after
    2 of them cost 12% of the model), then 6 transformer blocks of width 192. Its recipe trains the exits with
    the backbone."""
    args = dict(img_size=(32, 32), airbench_tokenizer=(64, 256), embed_dim=192, depth=6, num_heads=3, mlp_ratio=2.0)
    return StagedHybridViT(**{**args, **kw})


@register
def timm_vit_tiny_32(**kw) -> SplittableBackbone:
    """timm's ViT (random init) shaped like ``vit_tiny_32``, through the adapter."""
    args = dict(model_name="vit_tiny_patch16_224", img_size=(32, 32), patch_size=4, embed_dim=128, depth=6, num_heads=4)
    return TimmViT(**{**args, **kw})
