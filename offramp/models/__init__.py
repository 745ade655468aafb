"""Models: splittable backbones, early exits, and the multi-exit wrapper."""
from .backbone import FeatureSpec, SplittableBackbone, head_outputs
from .exits import EXIT_TYPES, CNNExit, MLPExit, SLViTExit, create_exit
from .audio_encoder import AudioEncoder
from .multi_exit import AudioConfig, ExitConfig, ModelConfig, MultiExitModel, parse_exits
from .registry import create_backbone, create_backbone_depth, variant_names

__all__ = [
    "AudioConfig", "AudioEncoder", "CNNExit", "EXIT_TYPES", "ExitConfig", "FeatureSpec", "MLPExit", "ModelConfig", "MultiExitModel",
    "SLViTExit", "SplittableBackbone", "create_backbone", "create_backbone_depth", "create_exit", "head_outputs", "parse_exits",
    "variant_names",
]
