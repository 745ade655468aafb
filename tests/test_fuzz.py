"""Hostile bytes against real daemons over real sockets: every answer is a precise status, never UNKNOWN or
INTERNAL; the daemon stays SERVING; the log stays short."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from helpers import IDENTITY, CloudFactory, LoopThread, edge_servers, serving
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offramp.core.checkpoint import load_checkpoint
from offramp.core.codec import CodecConfig, encode
from offramp.core.exit_rule import never_leave
from offramp.core.halves import EdgeHalf
from offramp.core.wire import pb, status_code

IMPRECISE = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` truncated, bit-flipped, spliced with random bytes, or replaced by them (hostile lengths too)."""
    kind = draw(st.sampled_from(["truncate", "flip", "splice", "random", "huge_length"]))
    if kind == "truncate":
        return valid[:draw(st.integers(0, len(valid) - 1))]
    if kind == "flip":
        out = bytearray(valid)
        for i in draw(st.lists(st.integers(0, len(valid) - 1), min_size=1, max_size=8)):
            out[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if kind == "splice":
        at = draw(st.integers(0, len(valid)))
        return valid[:at] + draw(st.binary(min_size=1, max_size=64)) + valid[at:]
    if kind == "huge_length":  # field 1, length-delimited, claiming ~2^35 bytes
        return b"\x0a\xff\xff\xff\xff\x7f" + valid
    return draw(st.binary(max_size=2048))


@pytest.fixture(scope="module")
def offload_bytes(tiny_checkpoint: Path) -> bytes:
    model, card = load_checkpoint(tiny_checkpoint)
    edge = EdgeHalf(model, card.split_block)
    with torch.no_grad():
        tokens = edge.run(torch.zeros(1, *card.input_shape), [never_leave("max_prob")] * edge.num_exits,
                          "max_prob").tokens
    return pb.OffloadRequest(request_id=1, model_fingerprint=card.fingerprint, split_block=card.split_block,
                             tokens=encode(tokens, CodecConfig("int8", zstd_level=3))).SerializeToString()


@pytest.fixture(scope="module")
def cloud(tiny_checkpoint: Path) -> Iterator[str]:
    with CloudFactory(tiny_checkpoint, {"max_batch": 8, "max_queue": 64, "max_message_mb": 1, "grace_s": 1.0}) as start:
        yield start()[0]


def outcome(call) -> list[grpc.StatusCode]:
    """The status of every reply of a call, and of the call itself."""
    codes = []
    try:
        for raw in call:
            codes.append(status_code(pb.OffloadReply.FromString(raw).status))
    except grpc.RpcError as e:
        codes.append(e.code())
    return codes


@FUZZ
@given(data=st.data())
def test_mutated_offloads_get_precise_statuses(cloud: str, offload_bytes: bytes, data: st.DataObject) -> None:
    address = cloud
    raw = data.draw(mutated(offload_bytes))
    with grpc.insecure_channel(address) as channel:
        infer = channel.stream_stream("/offramp.v1.Offload/Infer", **IDENTITY)
        describe = channel.unary_unary("/offramp.v1.Offload/Describe", **IDENTITY)
        codes = outcome(infer(iter([raw]), timeout=10))
        try:
            describe(raw, timeout=5)
        except grpc.RpcError as e:
            codes.append(e.code())
    assert not IMPRECISE & set(codes), (raw[:64], codes)


@pytest.fixture(scope="module")
def edge(tiny_checkpoint: Path) -> Iterator:
    with LoopThread() as loop, edge_servers(loop, tiny_checkpoint, {"grace_s": 1.0}) as start:
        yield start()


@FUZZ
@given(data=st.data())
def test_mutated_edge_requests_get_precise_statuses(edge, tiny_checkpoint: Path, data: st.DataObject) -> None:
    shape = [1, 32, 32]
    valid = pb.InferRequest(request_id=3, tensor=pb.RawTensor(
        shape=shape, data=np.zeros(shape, np.float32).tobytes())).SerializeToString()
    raw = data.draw(mutated(valid))
    codes = []
    with grpc.insecure_channel(edge.address) as channel:
        for method in ("Infer", "SetPolicy"):
            try:
                channel.unary_unary(f"/offramp.v1.Edge/{method}", **IDENTITY)(raw, timeout=10)
            except grpc.RpcError as e:
                codes.append(e.code())
        stream = channel.stream_stream("/offramp.v1.Edge/InferStream", request_serializer=None,
                                       response_deserializer=pb.InferReply.FromString)
        try:
            codes += [status_code(r.status) for r in stream(iter([raw]), timeout=10)]
        except grpc.RpcError as e:
            codes.append(e.code())
    assert not IMPRECISE & set(codes), (raw[:64], codes)


def test_after_the_fuzz_the_daemons_serve_and_the_log_is_short(
        cloud: str, caplog: pytest.LogCaptureFixture) -> None:
    address = cloud
    caplog.set_level(logging.INFO)
    rng = np.random.default_rng(0)
    with grpc.insecure_channel(address) as channel:
        describe = channel.unary_unary("/offramp.v1.Offload/Describe", **IDENTITY)
        for _ in range(300):
            try:
                describe(b"\x0a\xff\xff" + rng.bytes(int(rng.integers(0, 512))), timeout=5)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert serving(address)
    logged = sum(len(r.getMessage()) for r in caplog.records)
    assert logged / 300 <= 50, f"{logged} bytes of log for 300 malformed messages"
