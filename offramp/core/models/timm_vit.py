"""Adapter that gives a timm ``VisionTransformer`` Offramp's staged split API.

Users who hold weights for a real model (DeiT, ViT) wrap it here; nothing is
downloaded: models are created with ``pretrained=False`` and weights, if any,
are loaded from a local safetensors file by the caller.
"""
from __future__ import annotations

import torch

from offramp.core.models.backbone import FeatureSpec, SplittableBackbone, Task, head_outputs


class TimmViT(SplittableBackbone):
    """Wraps ``timm.models.vision_transformer.VisionTransformer`` (or a model built by name)."""

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        img_size: tuple[int, int] = (32, 32),
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 10,
        task: Task = "classification",
        **timm_kwargs,
    ) -> None:
        super().__init__()
        try:
            import timm
            from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
        except ImportError as e:  # optional extra
            raise ImportError("timm backbones need the 'timm' extra: pip install 'offramp[timm]'") from e
        self.task = task
        self.model = timm.create_model(
            model_name,
            pretrained=False,
            img_size=tuple(img_size),
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=head_outputs(task, num_classes),
            **timm_kwargs,
        )
        if not isinstance(self.model, TimmVisionTransformer):
            raise ValueError(f"timm model {model_name!r} is not a VisionTransformer")
        self.num_blocks = len(self.model.blocks)

    @property
    def blocks(self) -> torch.nn.Sequential:
        return self.model.blocks

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(feats))

    def feature_spec(self, position: int) -> FeatureSpec:
        self.check_position(position)
        m = self.model
        return FeatureSpec("tokens", m.embed_dim, tuple(m.patch_embed.grid_size), num_prefix=m.num_prefix_tokens)
