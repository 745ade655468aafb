"""Codec for the tensors at the split: token selection, quantization, zstd, bounded decoding."""
from .tensor_codec import CodecConfig, CodecError, DecodeLimits, decode, decode_indices, encode

__all__ = ["CodecConfig", "CodecError", "DecodeLimits", "decode", "decode_indices", "encode"]
