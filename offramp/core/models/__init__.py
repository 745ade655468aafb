"""Models: splittable backbones, early exits, and the multi-exit wrapper."""
from offramp.core.models.backbone import FeatureSpec, SplittableBackbone, head_outputs
from offramp.core.models.exits import EXIT_TYPES, CNNExit, MLPExit, SLViTExit, create_exit
from offramp.core.models.audio_encoder import AudioEncoder
from offramp.core.models.multi_exit import AudioConfig, ExitConfig, ModelConfig, MultiExitModel, parse_exits
from offramp.core.models.registry import create_backbone, create_backbone_depth, is_variant, variant_names

__all__ = [
    "AudioConfig", "AudioEncoder", "CNNExit", "EXIT_TYPES", "ExitConfig", "FeatureSpec", "MLPExit", "ModelConfig", "MultiExitModel",
    "SLViTExit", "SplittableBackbone", "create_backbone", "create_backbone_depth", "create_exit", "head_outputs", "parse_exits",
    "is_variant", "variant_names",
]
