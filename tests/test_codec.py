"""Token codec: property-based round-trips, and a decoder that refuses hostile messages precisely."""
from __future__ import annotations

import struct
import tracemalloc
import zlib
from collections.abc import Callable

import grpc
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, assume, given, settings
from google.protobuf.message import DecodeError
from hypothesis import strategies as st

from offramp.core.codec import CodecConfig, CodecError, DecodeLimits, decode, decode_indices, encode
from offramp.core.wire import pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.one_of(
    hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=12),  # (B, N, D) tokens
    hnp.array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=6),  # (B, C, H, W) map
)
levels = st.sampled_from([0, 1, 3, -1])


def float_arrays(limit: float) -> st.SearchStrategy[np.ndarray]:
    bound = float(np.float32(limit))
    elements = st.floats(-bound, bound, width=32, allow_subnormal=False)
    return shapes.flatmap(lambda shape: hnp.arrays(np.float32, shape, elements=elements))


def expect_error(msg: pb.EncodedTensor, code: grpc.StatusCode, match: str, limits: DecodeLimits = DecodeLimits()) -> None:
    with pytest.raises(CodecError, match=match) as info:
        decode(msg, limits)
    assert info.value.code == code


def sample(dtype: str = "float32", level: int = 3, shape: tuple[int, ...] = (2, 5, 4)) -> pb.EncodedTensor:
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) - 7.5
    return encode(x, CodecConfig(dtype=dtype, zstd_level=level))


# --------------------------------------------------------------------------- round-trips


@PROPERTY
@given(x=float_arrays(3.0e38), level=levels)
def test_float32_round_trip_is_exact(x: np.ndarray, level: int) -> None:
    msg = encode(x, CodecConfig(dtype="float32", zstd_level=level))
    wire = pb.EncodedTensor.FromString(msg.SerializeToString())
    y = decode(wire, DecodeLimits(expected_shape=(None, *x.shape[1:])))
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y, x)
    assert decode_indices(wire) is None


@PROPERTY
@given(x=float_arrays(60000.0), level=levels)
def test_float16_round_trip_within_half_precision(x: np.ndarray, level: int) -> None:
    y = decode(encode(x, CodecConfig(dtype="float16", zstd_level=level)))
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(y, x, rtol=2.0**-11, atol=2.0**-24)


@PROPERTY
@given(x=float_arrays(1.0e6), level=levels)
def test_int8_error_is_at_most_half_a_step(x: np.ndarray, level: int) -> None:
    msg = encode(x, CodecConfig(dtype="int8", zstd_level=level))
    y = decode(pb.EncodedTensor.FromString(msg.SerializeToString()))
    assert y.dtype == np.float32 and y.shape == x.shape
    rows = x.shape[0] * x.shape[1]  # one scale per token (or channel) of each sample
    scales = np.asarray(msg.scales, dtype=np.float32)
    assert scales.shape == (rows,)
    error = np.abs(y - x).reshape(rows, -1)
    assert (error <= scales[:, None] * (0.5 + 1e-4) + 1e-30).all()


@PROPERTY
@given(x=shapes.flatmap(lambda shape: hnp.arrays(np.float32, shape, elements=st.floats(
    width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True))))
def test_int8_codes_stay_within_127_over_all_of_float32(x: np.ndarray) -> None:
    # Scales are rounded up rather than codes clipped: a code of 128 would wrap to -128 silently.
    msg = encode(x, CodecConfig(dtype="int8", zstd_level=0))
    codes = np.frombuffer(msg.payload, dtype=np.int8)
    assert codes.min() >= -127 and codes.max() <= 127
    y = decode(msg)
    rows = x.shape[0] * x.shape[1]
    error = np.abs(y.astype(np.float64) - x).reshape(rows, -1)
    assert (error <= np.asarray(msg.scales, dtype=np.float64)[:, None] * (0.5 + 1e-4) + 1e-44).all()


@st.composite
def selections(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, int]:
    batch = draw(st.integers(1, 4))
    num_prefix = draw(st.integers(0, 2))
    num_patches = draw(st.integers(1, 20))
    dim = draw(st.integers(1, 6))
    k = draw(st.integers(1, num_patches))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, num_prefix + num_patches, dim), dtype=np.float32)
    scores = np.stack([rng.permutation(num_patches) for _ in range(batch)]).astype(np.float32)  # no ties
    return x, scores, num_prefix, k


@PROPERTY
@given(case=selections(), dtype=st.sampled_from(["float32", "float16", "int8"]))
def test_top_k_keeps_exactly_the_best_tokens(case: tuple[np.ndarray, np.ndarray, int, int], dtype: str) -> None:
    x, scores, num_prefix, k = case
    msg = pb.EncodedTensor.FromString(
        encode(x, CodecConfig(dtype=dtype, top_k=k), scores=scores, num_prefix=num_prefix).SerializeToString()
    )
    indices = decode_indices(msg)
    expected = np.sort(np.argsort(-scores, axis=1)[:, :k], axis=1)
    np.testing.assert_array_equal(indices, expected)
    assert tuple(msg.shape) == x.shape  # the dense shape travels, the sent one is implied

    y = decode(msg, DecodeLimits(expected_shape=(None, x.shape[1], x.shape[2])))
    kept = np.concatenate([x[:, :num_prefix], np.take_along_axis(x[:, num_prefix:], expected[:, :, None], 1)], 1)
    assert y.shape == (x.shape[0], num_prefix + k, x.shape[2])
    if dtype == "float32":
        np.testing.assert_array_equal(y, kept)
    else:
        np.testing.assert_allclose(y, kept, rtol=0.01, atol=0.05)


def test_top_k_breaks_ties_towards_lower_indices() -> None:
    x = np.zeros((1, 6, 2), dtype=np.float32)
    msg = encode(x, CodecConfig(top_k=2), scores=np.array([[1, 5, 5, 5, 0]], dtype=np.float32), num_prefix=1)
    np.testing.assert_array_equal(decode_indices(msg), [[1, 2]])


def test_torch_input_and_feature_map_scales() -> None:
    x = torch.randn(3, 8, 4, 5, dtype=torch.bfloat16)
    msg = encode(x, CodecConfig(dtype="int8"))
    assert len(msg.scales) == 3 * 8  # one per (sample, channel)
    y = decode(msg)
    assert y.shape == (3, 8, 4, 5)
    np.testing.assert_allclose(y, x.float().numpy(), atol=float(np.max(msg.scales)))


def test_zero_rows_and_compression_recorded() -> None:
    x = np.zeros((2, 3, 4), dtype=np.float32)
    msg = encode(x, CodecConfig(dtype="int8", zstd_level=3))
    assert msg.compression == pb.EncodedTensor.COMPRESSION_ZSTD
    assert list(msg.scales) == [0.0] * 6
    assert zstandard.frame_content_size(msg.payload) == msg.raw_size == 24
    assert zstandard.get_frame_parameters(msg.payload).has_checksum
    np.testing.assert_array_equal(decode(msg), x)
    assert encode(x, CodecConfig(zstd_level=0)).compression == pb.EncodedTensor.COMPRESSION_NONE


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "int4"}, "codec must be one of"),
        ({"top_k": 0}, "top_k"),
        ({"zstd_level": 99}, "zstd_level"),
    ],
)
def test_config_is_checked(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CodecConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("x", "config", "scores", "num_prefix", "match"),
    [
        (np.ones((2, 5, 3)), CodecConfig(top_k=2), None, 1, "no scores"),
        (np.ones((2, 5, 3, 3)), CodecConfig(top_k=2), np.ones((2, 5)), 0, r"\(B, N, D\)"),
        (np.ones((2, 5, 3)), CodecConfig(top_k=5), np.ones((2, 4)), 1, "exceeds"),
        (np.ones((2, 5, 3)), CodecConfig(top_k=2), np.ones((2, 5)), 1, "scores must have shape"),
        (np.ones((2, 5, 3)), CodecConfig(top_k=2), np.full((2, 4), np.nan), 1, "NaN"),
        (np.ones((2, 5)), CodecConfig(), None, 0, "shape"),
        (np.ones((0, 5, 3)), CodecConfig(), None, 0, "empty"),
        (np.full((1, 2, 3), 1e5), CodecConfig(dtype="float16"), None, 0, "overflow float16"),
        (np.full((1, 2, 3), np.inf), CodecConfig(dtype="int8"), None, 0, "NaN or infinity"),
    ],
)
def test_encode_refuses_what_it_cannot_represent(
    x: np.ndarray, config: CodecConfig, scores: np.ndarray | None, num_prefix: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        encode(x, config, scores=scores, num_prefix=num_prefix)


# --------------------------------------------------------------------------- hostile messages


@pytest.mark.parametrize("level", [0, 3])
def test_truncated_payload(level: int) -> None:
    msg = sample(level=level)
    msg.payload = msg.payload[:-5]
    expect_error(msg, INVALID, "raw_size says|corrupt zstd")


def test_payload_that_is_not_a_frame() -> None:
    msg = sample()
    msg.payload = b"\x00\x01"
    expect_error(msg, INVALID, "not a zstd frame")


def test_trailing_data_after_the_frame() -> None:
    msg = sample()
    msg.payload += b"junk"
    expect_error(msg, INVALID, "corrupt zstd")


def test_frame_without_content_size() -> None:
    msg = sample()
    raw = np.zeros(msg.raw_size, np.uint8).tobytes()
    msg.payload = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    expect_error(msg, INVALID, "does not declare its content size")


def test_raw_size_lie() -> None:
    msg = sample()
    msg.raw_size += 4
    expect_error(msg, INVALID, "implied by")


def test_raw_size_over_the_limit() -> None:
    msg = sample(shape=(1, 256, 256))  # 256 KiB raw
    expect_error(msg, EXHAUSTED, "declared raw size", DecodeLimits(max_raw_bytes=64 << 10))


def test_frame_and_raw_size_disagree() -> None:
    msg = sample()
    msg.payload = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * (msg.raw_size + 8))
    expect_error(msg, INVALID, "frame declares")


def test_hand_made_frame_claiming_four_gib_is_refused_before_allocating() -> None:
    msg = sample()  # honest shape, dtype and raw_size: only the frame lies
    header = struct.pack("<IB", 0xFD2FB528, 0b1110_0100) + struct.pack("<Q", 4 << 30)  # 8-byte content size
    msg.payload = header + b"\x01\x00\x00" * 4
    assert zstandard.frame_content_size(msg.payload) == 4 << 30
    expect_error(msg, EXHAUSTED, "frame declares 4294967296 bytes")


def test_real_zstd_bomb_is_refused_without_inflating_it() -> None:
    bomb = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(bytes(32 << 20))  # 32 MiB of zeros
    assert len(bomb) < 4096
    msg = sample()
    msg.payload = bomb
    tracemalloc.start()
    try:
        expect_error(msg, EXHAUSTED, "frame declares", DecodeLimits(max_raw_bytes=1 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_oversize_payload() -> None:
    msg = sample(dtype="float32", level=0, shape=(1, 64, 64))
    expect_error(msg, EXHAUSTED, "payload of 16384 bytes", DecodeLimits(max_payload_bytes=16383))


def test_checksum_mismatch() -> None:
    msg = sample(level=0)
    raw = bytearray(msg.payload)
    raw[3] ^= 0xFF
    msg.payload = bytes(raw)
    expect_error(msg, INVALID, "CRC-32")


@pytest.mark.parametrize(
    ("expected", "shape"),
    [((None, 5, 8), (2, 5, 4)), ((2, 5), (2, 5, 4)), ((3, None, None), (2, 5, 4))],
)
def test_shape_mismatch(expected: tuple[int | None, ...], shape: tuple[int, ...]) -> None:
    expect_error(sample(shape=shape), INVALID, "does not match the expected", DecodeLimits(expected_shape=expected))


@pytest.mark.parametrize(("shape", "match"), [([2, 40], "rank 2"), ([2, 0, 4], "empty dimension"), ([1] * 9, "rank 9")])
def test_malformed_shape(shape: list[int], match: str) -> None:
    msg = sample()
    del msg.shape[:]
    msg.shape.extend(shape)
    expect_error(msg, INVALID, match)


@pytest.mark.parametrize("dtype", [pb.EncodedTensor.DTYPE_UNSPECIFIED, 99])
def test_wrong_dtype_enum(dtype: int) -> None:
    msg = sample()
    msg.dtype = dtype
    expect_error(msg, INVALID, f"unsupported dtype enum {dtype}")


def test_dtype_swapped_for_another_valid_one() -> None:
    msg = sample(dtype="float32")
    msg.dtype = pb.EncodedTensor.DTYPE_FLOAT16  # half the bytes the payload holds
    expect_error(msg, INVALID, "implied by")


def test_unknown_compression() -> None:
    msg = sample()
    msg.compression = 7
    expect_error(msg, INVALID, "unknown compression 7")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.scales.pop(), "scales given; int8 needs one per row"),
        (lambda m: m.scales.append(1.0), "scales given; int8 needs one per row"),
        (lambda m: m.scales.__setitem__(0, float("nan")), "NaN or infinity"),
        (lambda m: m.scales.__setitem__(1, float("inf")), "NaN or infinity"),
        (lambda m: m.scales.__setitem__(2, -1.0), "negative"),
    ],
)
def test_bad_int8_scales(edit: Callable[[pb.EncodedTensor], object], match: str) -> None:
    msg = sample(dtype="int8")
    edit(msg)
    expect_error(msg, INVALID, match)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_non_finite_float_payload(dtype: str) -> None:
    x = np.ones((1, 3, 4), dtype=np.float32)
    x[0, 1, 2] = np.nan
    msg = encode(np.ones((1, 3, 4), dtype=np.float32), CodecConfig(dtype=dtype, zstd_level=0))
    raw = x.astype(dtype).tobytes()
    msg.payload, msg.crc32 = raw, zlib.crc32(raw)
    expect_error(msg, INVALID, "decoded values contain NaN or infinity")


def test_int8_scale_that_overflows() -> None:
    msg = sample(dtype="int8")
    msg.scales[0] = 3e38  # finite, but 3e38 x 127 is not
    expect_error(msg, INVALID, "overflows float32")


def test_scales_on_a_float_payload() -> None:
    msg = sample(dtype="float16")
    msg.scales.append(1.0)
    expect_error(msg, INVALID, "takes none")


def selected() -> pb.EncodedTensor:
    x = np.ones((2, 7, 3), dtype=np.float32)
    scores = np.arange(12, dtype=np.float32).reshape(2, 6)
    return encode(x, CodecConfig(dtype="float32", top_k=3), scores=scores, num_prefix=1)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.token_indices.__setitem__(2, 6), "out of range"),
        (lambda m: m.token_indices.__setitem__(1, 5), "strictly ascending"),
        (lambda m: m.token_indices.__setitem__(0, 4), "strictly ascending"),  # duplicate
        (lambda m: m.token_indices.pop(), "token indices given; expected 2 × 3"),
        (lambda m: setattr(m, "kept_tokens", 7), "exceeds the 6 patch tokens"),
        (lambda m: setattr(m, "num_prefix", 8), "num_prefix 8 exceeds"),
        (lambda m: setattr(m, "kept_tokens", 0), "kept_tokens is 0"),
    ],
)
def test_bad_token_selection(edit: Callable[[pb.EncodedTensor], object], match: str) -> None:
    msg = selected()
    np.testing.assert_array_equal(decode_indices(msg), [[3, 4, 5], [3, 4, 5]])
    edit(msg)
    expect_error(msg, INVALID, match)
    with pytest.raises(CodecError, match=match):
        decode_indices(msg)


def test_selection_on_a_feature_map_shape() -> None:
    msg = selected()
    msg.shape.append(1)
    expect_error(msg, INVALID, r"needs a \(B, N, D\) shape")


BASES: dict[str, Callable[[], pb.EncodedTensor]] = {
    "float32": lambda: sample("float32", level=0),
    "float16": lambda: sample("float16", level=3),
    "int8": lambda: sample("int8", level=3),
    "top_k": selected,
}


@settings(max_examples=300, deadline=None)
@given(data=st.data(), base=st.sampled_from(sorted(BASES)))
def test_mutated_messages_decode_or_raise_codec_error(data: st.DataObject, base: str) -> None:
    """Whatever the network does to the bytes, the decoder answers with a tensor or a CodecError."""
    wire = bytearray(BASES[base]().SerializeToString())
    for _ in range(data.draw(st.integers(1, 4))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    try:
        msg = pb.EncodedTensor.FromString(bytes(wire))
    except DecodeError:  # gRPC refuses unparsable messages before the codec sees them
        assume(False)
        return
    try:
        out = decode(msg, DecodeLimits(max_raw_bytes=1 << 20))
    except CodecError as exc:
        assert exc.code in (INVALID, EXHAUSTED)
    else:
        assert out.dtype == np.float32 and out.ndim >= 3
