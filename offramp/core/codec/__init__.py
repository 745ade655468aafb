"""Codec for the tensors at the split: token selection, quantization, zstd, bounded decoding.

The names below load the codec (numpy, zstandard, torch) on first use, so that ``codec.names`` and
``codec.settings`` (the format names and the codec's settings a config holds) stay light to import.
"""
from importlib import import_module
from typing import Any

__all__ = ["CodecConfig", "CodecName", "CodecError", "DecodeLimits", "decode", "decode_indices", "encode", "encode_code",
           "zstd_dictionary"]


def __getattr__(name: str) -> Any:
    if name == "CodecName":
        from offramp.core.codec.names import CodecName
        return CodecName
    if name == "CodecConfig":
        from offramp.core.codec.settings import CodecConfig
        return CodecConfig
    if name in __all__:
        return getattr(import_module("offramp.core.codec.tensor_codec"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
