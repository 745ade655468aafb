"""Codec for the tensors at the split: token selection, quantization, zstd, bounded decoding."""
from .tensor_codec import (CodecConfig, CodecError, CodecName, DecodeLimits, decode, decode_indices, encode,
                           encode_code, zstd_dictionary)

__all__ = ["CodecConfig", "CodecName", "CodecError", "DecodeLimits", "decode", "decode_indices", "encode", "encode_code",
           "zstd_dictionary"]
