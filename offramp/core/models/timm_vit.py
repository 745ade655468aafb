"""Adapter that gives a timm ``VisionTransformer`` Offramp's staged split API.

Users who hold weights for a real model (DeiT, ViT) wrap it here; nothing is
downloaded: models are created with ``pretrained=False`` and weights, if any,
are loaded from a local safetensors file by the caller.
"""
from __future__ import annotations

import torch

from offramp.core.models.backbone import FeatureSpec, SplittableBackbone, Task, head_outputs


TIMM_PREFIX = "timm:"  # ``--model timm:NAME``: any timm VisionTransformer by its own name, at its own input size


class TimmViT(SplittableBackbone):
    """Wraps ``timm.models.vision_transformer.VisionTransformer`` (or a model built by name).

    ``native=True`` keeps the architecture exactly as timm defines ``model_name`` (its input size and patch
    size, as its pretrained weights expect); inputs of another size (``img_size``, the data's) are resized
    to it in ``embed``, as one fine-tunes an ImageNet ViT on CIFAR.
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        img_size: tuple[int, int] = (32, 32),
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 10,
        task: Task = "classification",
        native: bool = False,
        **timm_kwargs,
    ) -> None:
        super().__init__()
        try:
            import timm
            from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
        except ImportError as e:  # optional extra
            raise ImportError("timm backbones need the 'timm' extra: pip install 'offramp[timm]'") from e
        self.task = task
        if native and not timm.is_model(model_name):
            raise ValueError(f"timm has no model {model_name!r} (timm.list_models('*vit*') lists its ViTs)")
        shape = {} if native else {"img_size": tuple(img_size), "patch_size": patch_size}
        self.model = timm.create_model(model_name, pretrained=False, in_chans=in_chans,
                                       num_classes=head_outputs(task, num_classes), **shape, **timm_kwargs)
        if not isinstance(self.model, TimmVisionTransformer):
            raise ValueError(f"timm model {model_name!r} is not a VisionTransformer ({type(self.model).__name__}); "
                             "the split adapter takes the VisionTransformer family (ViT, DeiT, ...)")
        self.num_blocks = len(self.model.blocks)
        model_size = tuple(self.model.patch_embed.img_size)
        self.resize_to = model_size if tuple(img_size) != model_size else None

    @property
    def blocks(self) -> torch.nn.Sequential:
        return self.model.blocks

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.resize_to is not None and tuple(x.shape[-2:]) != self.resize_to:
            x = torch.nn.functional.interpolate(x, size=self.resize_to, mode="bilinear", align_corners=False)
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(feats))

    def feature_spec(self, position: int) -> FeatureSpec:
        self.check_position(position)
        m = self.model
        return FeatureSpec("tokens", m.embed_dim, tuple(m.patch_embed.grid_size), num_prefix=m.num_prefix_tokens)
