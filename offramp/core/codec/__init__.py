"""Codec for the tensors at the split: token selection, quantization, zstd, bounded decoding.

The names below load the codec (numpy, zstandard, torch) on first use, so that ``codec.names`` (the
format names settings refer to) stays light to import.
"""
from importlib import import_module
from typing import Any

__all__ = ["CodecConfig", "CodecName", "CodecError", "DecodeLimits", "decode", "decode_indices", "encode", "encode_code",
           "zstd_dictionary"]


def __getattr__(name: str) -> Any:
    if name == "CodecName":
        from offramp.core.codec.names import CodecName
        return CodecName
    if name in __all__:
        return getattr(import_module("offramp.core.codec.tensor_codec"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
