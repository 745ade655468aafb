"""Token codec: select → quantize → compress on the edge; a decoder that trusts nothing.

Every step is recorded in the ``EncodedTensor`` message, so the receiver needs
no out-of-band agreement. The decoder runs on the cloud, facing bytes from
the network: it checks every declared size against its limits and against
every other declared size *before* allocating anything, and reports each
failure as a ``CodecError`` carrying the gRPC status code to answer with.
"""
from __future__ import annotations

import math
import threading
import zlib
from dataclasses import dataclass

import grpc
import numpy as np
import torch
import zstandard

from offramp.core.codec.names import CodecName
from offramp.core.codec.settings import CodecConfig

from offramp.core.errors import OfframpError
from offramp.core.wire import pb

__all__ = ["CodecName", "CodecConfig", "CodecError", "DecodeLimits", "decode", "decode_indices", "encode", "encode_code",
           "zstd_dictionary"]

_ET = pb.EncodedTensor
_WIRE_DTYPE: dict[str, int] = {"float32": _ET.DTYPE_FLOAT32, "float16": _ET.DTYPE_FLOAT16, "int8": _ET.DTYPE_INT8}
_NUMPY_DTYPE: dict[int, np.dtype] = {
    _ET.DTYPE_FLOAT32: np.dtype("<f4"),
    _ET.DTYPE_FLOAT16: np.dtype("<f2"),
    _ET.DTYPE_INT8: np.dtype("i1"),
}
_COMPRESSIONS = (_ET.COMPRESSION_NONE, _ET.COMPRESSION_ZSTD)
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINIEST = np.float32(np.finfo(np.float32).smallest_subnormal)
_INT8_LEVELS = 127  # symmetric: [-127, 127], so -x always has a code too


def _largest_int8_scale() -> np.float32:
    """The largest float32 scale whose 127 multiple is still a finite float32 (rounded down, not to nearest:
    numpy compares a float32 with a Python float in float32)."""
    scale = np.float32(_FLOAT32_MAX / _INT8_LEVELS)
    while float(scale) * _INT8_LEVELS > _FLOAT32_MAX:
        scale = np.nextafter(scale, np.float32(0))
    return scale


_MAX_INT8_SCALE = _largest_int8_scale()
_MAX_INT8_PEAK = float(_MAX_INT8_SCALE) * _INT8_LEVELS  # |x| above it needs the largest scale, clamped
MAX_RANK = 8  # far above (B, C, H, W); only here to bound work on hostile shapes


_ZSTD = threading.local()  # per thread: zstd contexts are not thread-safe, and making one costs 30-55 us


def _compressor(level: int, dictionary: zstandard.ZstdCompressionDict | None = None) -> zstandard.ZstdCompressor:
    cache = _ZSTD.__dict__.setdefault("compressors", {})
    key = (level, None if dictionary is None else dictionary.dict_id())
    if key not in cache:
        # Content size lets the receiver bound the output before decompressing.
        cache[key] = zstandard.ZstdCompressor(level=level, dict_data=dictionary, write_content_size=True,
                                              write_checksum=True)
    return cache[key]


def _decompressor(dictionary: zstandard.ZstdCompressionDict | None = None) -> zstandard.ZstdDecompressor:
    cache = _ZSTD.__dict__.setdefault("decompressors", {})
    key = None if dictionary is None else dictionary.dict_id()
    if key not in cache:
        cache[key] = zstandard.ZstdDecompressor(dict_data=dictionary)
    return cache[key]


def zstd_dictionary(data: bytes | None) -> zstandard.ZstdCompressionDict | None:
    """A trained zstd dictionary (as a checkpoint stores it) ready for ``encode_code`` and ``decode``."""
    return None if not data else zstandard.ZstdCompressionDict(data)


class CodecError(OfframpError):
    """A tensor message that cannot be decoded safely.

    ``code`` is the gRPC status a server should answer with: INVALID_ARGUMENT for
    malformed, corrupted or inconsistent messages, RESOURCE_EXHAUSTED for ones
    over the limits.
    """

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DecodeLimits:
    """What a receiver accepts; everything beyond is refused before allocation."""

    # Compressed bytes on the wire; gRPC's own message limit should be a bit above.
    max_payload_bytes: int = 64 << 20
    # Bytes after decompression, which is what a zstd bomb inflates.
    max_raw_bytes: int = 256 << 20
    # Dense shape the model expects, e.g. (None, 197, 192): None matches any
    # size (the batch); None as a whole accepts any shape.
    expected_shape: tuple[int | None, ...] | None = None


# --------------------------------------------------------------------------- encode


def encode(
    tokens: torch.Tensor | np.ndarray,
    config: CodecConfig,
    scores: torch.Tensor | np.ndarray | None = None,
    num_prefix: int = 0,
) -> pb.EncodedTensor:
    """Encode tokens (B, N, D) or a feature map (B, C, H, W) for the wire.

    With ``config.top_k``, ``scores`` (B, N - num_prefix) rank the patch tokens
    (typically the attention the class token pays them); the ``num_prefix``
    leading tokens are always kept, then the ``top_k`` best patch tokens of each
    sample in ascending index order.
    """
    if config.dtype == "bottleneck":
        raise ValueError("a bottleneck's code is encoded by encode_code, from the code the model made")
    x = _as_float32(tokens)
    if x.ndim < 3 or x.ndim > MAX_RANK:
        raise ValueError(f"expected (B, N, D) tokens or a (B, C, H, W) map, got shape {x.shape}")
    if 0 in x.shape:
        raise ValueError(f"cannot encode an empty tensor of shape {x.shape}")
    msg = pb.EncodedTensor(shape=x.shape, dtype=_WIRE_DTYPE[config.dtype])

    if config.top_k is not None:
        x, indices = _select_tokens(x, scores, config.top_k, num_prefix)  # (B, num_prefix + k, D)
        msg.kept_tokens = config.top_k
        msg.num_prefix = num_prefix
        msg.token_indices.extend(indices.ravel().tolist())

    raw, scales = _quantize(x, config.dtype)
    if scales is not None:
        msg.scales.extend(scales.tolist())
    msg.raw_size = len(raw)
    msg.crc32 = zlib.crc32(raw)
    if config.zstd_level == 0:
        msg.compression = _ET.COMPRESSION_NONE
        msg.payload = raw
    else:
        msg.compression = _ET.COMPRESSION_ZSTD
        msg.payload = _compressor(config.zstd_level).compress(raw)
    return msg


def encode_code(code: torch.Tensor | np.ndarray, bottleneck: str, zstd_level: int = 3,
                dictionary: zstandard.ZstdCompressionDict | None = None) -> pb.EncodedTensor:
    """Encode a learned bottleneck's integer code (B, N, channels), values within int8, for the wire.

    ``bottleneck`` names the bottleneck that made it, so that no other decodes it; ``dictionary``
    (the bottleneck's own) makes zstd's frames of small codes much smaller.
    """
    if not bottleneck:
        raise ValueError("a code must name the bottleneck that made it")
    x = code.detach().cpu().numpy() if isinstance(code, torch.Tensor) else np.asarray(code)
    if x.ndim != 3 or 0 in x.shape:
        raise ValueError(f"expected a (B, N, channels) code, got shape {x.shape}")
    if np.abs(x).max() > _INT8_LEVELS:
        raise ValueError(f"code values must lie in [-{_INT8_LEVELS}, {_INT8_LEVELS}]")
    raw = x.astype(np.int8).tobytes()
    msg = pb.EncodedTensor(shape=x.shape, dtype=_ET.DTYPE_INT8, bottleneck=bottleneck, raw_size=len(raw),
                           crc32=zlib.crc32(raw))
    msg.compression, msg.payload = ((_ET.COMPRESSION_NONE, raw) if zstd_level == 0 else
                                    (_ET.COMPRESSION_ZSTD, _compressor(zstd_level, dictionary).compress(raw)))
    return msg


def _as_float32(array: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return np.ascontiguousarray(array, dtype=np.float32)


def _select_tokens(
    x: np.ndarray, scores: torch.Tensor | np.ndarray | None, k: int, num_prefix: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the prefix tokens and the k best-scoring patch tokens; returns (tokens, indices (B, k))."""
    if x.ndim != 3:
        raise ValueError(f"token selection needs (B, N, D) tokens, got shape {x.shape}")
    if scores is None:
        raise ValueError("top_k is set but no scores were given to rank the tokens")
    batch, num_tokens, _ = x.shape
    if not 0 <= num_prefix <= num_tokens:
        raise ValueError(f"num_prefix={num_prefix} is outside [0, {num_tokens}]")
    num_patches = num_tokens - num_prefix
    if k > num_patches:
        raise ValueError(f"top_k={k} exceeds the {num_patches} patch tokens")
    s = _as_float32(scores)
    if s.shape != (batch, num_patches):
        raise ValueError(f"scores must have shape {(batch, num_patches)}, got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    # Stable sort on the negated scores: ties go to the lower index, deterministically.
    best = np.argsort(-s, axis=1, kind="stable")[:, :k]
    indices = np.sort(best, axis=1)  # (B, k), ascending
    kept = np.take_along_axis(x[:, num_prefix:], indices[:, :, None], axis=1)  # (B, k, D)
    return np.concatenate([x[:, :num_prefix], kept], axis=1), indices


def _quantize(x: np.ndarray, dtype: str) -> tuple[bytes, np.ndarray | None]:
    """Raw little-endian bytes of ``x`` in ``dtype``, and the int8 row scales."""
    if dtype == "float32":
        return x.astype("<f4", copy=False).tobytes(), None
    if dtype == "float16":
        peak = float(np.abs(x).max())
        if peak > _FLOAT16_MAX:
            raise ValueError(f"values up to {peak:g} overflow float16 (max {_FLOAT16_MAX:g}); use int8 or float32")
        return x.astype("<f2").tobytes(), None
    # Few numpy calls: on the edge this runs right after the model, when each call costs several times more.
    rows = x.reshape(x.shape[0] * x.shape[1], -1)  # one row per token (or channel) of each sample
    absmax = np.abs(rows).max(axis=1)
    peak = float(absmax.max())  # compared in float64: numpy would round the bounds to float32
    if not peak <= _FLOAT32_MAX:  # NaN fails the comparison too
        raise ValueError("cannot quantize NaN or infinity to int8")
    scales = absmax / np.float32(_INT8_LEVELS)
    # Round the scale up where float32 rounded it down, so |x| / scale never exceeds 127.
    np.nextafter(scales, np.float32(np.inf), out=scales, where=scales * np.float64(_INT8_LEVELS) < absmax)
    if peak > _MAX_INT8_PEAK:  # within an ulp of float32's max: the largest scale, whose quotients still round to 127
        np.minimum(scales, _MAX_INT8_SCALE, out=scales)
    # So |x| / scale rounds to at most 127 with no clipping. An all-zero row (scale 0) divides by the
    # smallest float32 instead, which every other scale is at least, and stays 0.
    q = np.divide(rows, np.maximum(scales, _FLOAT32_TINIEST)[:, None])
    return np.rint(q, out=q).astype(np.int8).tobytes(), scales


# --------------------------------------------------------------------------- decode


def decode(msg: pb.EncodedTensor, limits: DecodeLimits = DecodeLimits(),
           dictionary: zstandard.ZstdCompressionDict | None = None) -> np.ndarray:
    """The float32 tensor a message carries, in its sent shape (a bottleneck's code as its integers).

    That is the dense ``shape`` of the message, or (B, num_prefix + k, D) when
    tokens were selected: dropped tokens are not re-inflated, and
    ``decode_indices`` says which patch tokens the rows are. A zstd frame made with a dictionary
    decodes only with that ``dictionary``.
    """
    payload = msg.payload  # read once: each access copies
    if len(payload) > limits.max_payload_bytes:
        raise CodecError(
            f"payload of {len(payload)} bytes exceeds the limit of {limits.max_payload_bytes}",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    dtype = _numpy_dtype(msg.dtype)
    if msg.compression not in _COMPRESSIONS:
        raise CodecError(f"unknown compression {msg.compression}")
    shape = _check_shape(msg, limits.expected_shape)
    sent_shape, _ = _check_selection(msg, shape)
    scales = _check_scales(msg, dtype, rows=sent_shape[0] * sent_shape[1])

    if msg.raw_size > limits.max_raw_bytes:
        raise CodecError(
            f"declared raw size of {msg.raw_size} bytes exceeds the limit of {limits.max_raw_bytes}",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    implied = math.prod(sent_shape) * dtype.itemsize
    if msg.raw_size != implied:
        raise CodecError(f"declared raw size {msg.raw_size} != {implied} bytes implied by {sent_shape} {dtype.name}")

    raw = _decompress(payload, msg.compression, msg.raw_size, limits.max_raw_bytes, dictionary)
    if zlib.crc32(raw) != msg.crc32:
        raise CodecError("CRC-32 of the decoded bytes does not match: payload corrupted")

    values = np.frombuffer(raw, dtype=dtype)
    if scales is not None:  # finite by the scales' bounds
        return np.multiply(values.reshape(len(scales), -1), scales[:, None], dtype=np.float32).reshape(sent_shape)
    out = values.astype(np.float32).reshape(sent_shape)  # a writable copy, also for float32
    # Floats no encoder makes would only turn the tail's answer into NaN (a code's integers are always finite).
    if dtype.kind == "f" and not np.isfinite(out).all():
        raise CodecError("decoded values contain NaN or infinity")
    return out


def decode_indices(msg: pb.EncodedTensor) -> np.ndarray | None:
    """Patch indices (B, k) of the tokens a message kept, or None when it kept them all.

    Index i is patch token i, i.e. token ``num_prefix + i`` of the dense tensor.
    """
    _, indices = _check_selection(msg, _check_shape(msg, None))
    return indices


def _numpy_dtype(wire_dtype: int) -> np.dtype:
    try:
        return _NUMPY_DTYPE[wire_dtype]
    except KeyError:
        raise CodecError(f"unsupported dtype enum {wire_dtype}") from None


def _check_shape(msg: pb.EncodedTensor, expected: tuple[int | None, ...] | None) -> tuple[int, ...]:
    shape = tuple(msg.shape)
    if not 3 <= len(shape) <= MAX_RANK:
        raise CodecError(f"shape {shape} has rank {len(shape)}; expected 3 to {MAX_RANK}")
    if 0 in shape:
        raise CodecError(f"shape {shape} has an empty dimension")
    if expected is not None and (
        len(shape) != len(expected) or any(e is not None and e != s for s, e in zip(shape, expected))
    ):
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise CodecError(f"shape {shape} does not match the expected {want}")
    return shape


def _check_selection(msg: pb.EncodedTensor, shape: tuple[int, ...]) -> tuple[tuple[int, ...], np.ndarray | None]:
    """The sent shape, and the kept patch indices (B, k) if tokens were selected."""
    k = msg.kept_tokens
    count = len(msg.token_indices)
    if k == 0:
        if count:
            raise CodecError(f"{count} token indices given but kept_tokens is 0")
        return shape, None
    if len(shape) != 3:
        raise CodecError(f"token selection needs a (B, N, D) shape, got {shape}")
    batch, num_tokens, dim = shape
    num_prefix = msg.num_prefix
    if num_prefix > num_tokens:
        raise CodecError(f"num_prefix {num_prefix} exceeds the {num_tokens} tokens")
    num_patches = num_tokens - num_prefix
    if k > num_patches:
        raise CodecError(f"kept_tokens {k} exceeds the {num_patches} patch tokens")
    if count != batch * k:
        raise CodecError(f"{count} token indices given; expected {batch} × {k} = {batch * k}")
    indices = np.fromiter(msg.token_indices, dtype=np.int64, count=count).reshape(batch, k)
    if int(indices.max()) >= num_patches:
        raise CodecError(f"token index {int(indices.max())} is out of range [0, {num_patches})")
    if not (np.diff(indices, axis=1) > 0).all():
        raise CodecError("token indices must be strictly ascending within each sample")
    return (batch, num_prefix + k, dim), indices


def _check_scales(msg: pb.EncodedTensor, dtype: np.dtype, rows: int) -> np.ndarray | None:
    count = len(msg.scales)
    if msg.bottleneck:  # a code: its integers are the values, the bottleneck's decoder knows their scale
        if dtype != np.int8 or count or msg.kept_tokens:
            raise CodecError("a bottleneck code is int8 values without scales or token selection")
        return None
    if dtype != np.int8:
        if count:
            raise CodecError(f"{count} scales given for {dtype.name}, which takes none")
        return None
    if count != rows:
        raise CodecError(f"{count} scales given; int8 needs one per row, {rows}")
    scales = np.fromiter(msg.scales, dtype=np.float32, count=count)
    # Two reductions check everything (NaN fails both comparisons): each numpy call costs ~10 us on a
    # core whose caches the model just flushed, so the receiver keeps their number small.
    if not (scales.min() >= 0 and scales.max() <= _MAX_INT8_SCALE):
        if not np.isfinite(scales).all():
            raise CodecError("int8 scales contain NaN or infinity")
        if (scales < 0).any():
            raise CodecError("int8 scales must not be negative")
        raise CodecError(f"int8 scale {scales.max():.3g} overflows float32 (at most {_MAX_INT8_SCALE:.3g})")
    return scales


def _decompress(payload: bytes, compression: int, raw_size: int, max_raw_bytes: int,
                dictionary: zstandard.ZstdCompressionDict | None = None) -> bytes:
    """The raw bytes, after checking every size the frame declares; ``raw_size`` is already bounded."""
    if compression == _ET.COMPRESSION_NONE:
        if len(payload) != raw_size:
            raise CodecError(f"uncompressed payload is {len(payload)} bytes; raw_size says {raw_size}")
        return payload
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as exc:
        raise CodecError(f"payload is not a zstd frame: {exc}") from None
    if declared < 0:
        raise CodecError("zstd frame does not declare its content size")
    if declared > max_raw_bytes:
        raise CodecError(
            f"zstd frame declares {declared} bytes, over the limit of {max_raw_bytes}",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    if declared != raw_size:
        raise CodecError(f"zstd frame declares {declared} bytes; raw_size says {raw_size}")
    needs = zstandard.get_frame_parameters(payload).dict_id
    have = 0 if dictionary is None else dictionary.dict_id()
    if needs and needs != have:  # frames made without a dictionary decode anywhere
        raise CodecError(f"zstd frame needs dictionary {needs}; this receiver has {have or 'none'}")
    try:
        raw = _decompressor(dictionary if needs else None).decompress(payload, max_output_size=raw_size,
                                                                      allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt zstd payload: {exc}") from None
    if len(raw) != raw_size:
        raise CodecError(f"zstd payload decoded to {len(raw)} bytes; raw_size says {raw_size}")
    return raw
