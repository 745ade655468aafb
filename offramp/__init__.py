"""Offramp: edge-cloud split inference for vision transformers with SL-ViT early exits."""

__version__ = "0.1.0"
