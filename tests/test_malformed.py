"""Messages that do not parse: INVALID_ARGUMENT with a reason, a counter, one log line, and the daemon serves on."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers import IDENTITY, CloudFactory, LoopThread, edge_servers, serving

from offramp.core.wire import pb

# A truncated varint, a length-delimited field longer than the message, a field with wire type 7.
MALFORMED = [b"\x08", b"\x0a\x05abc", b"\x0f\x00"]


def counted(registry, name: str) -> float:
    return sum(s.value for m in registry.collect() if m.name == name for s in m.samples if s.name.endswith("_total"))


@pytest.fixture
def edge(tiny_checkpoint: Path) -> Iterator:
    with LoopThread() as loop, edge_servers(loop, tiny_checkpoint, {"grace_s": 1.0}) as start:
        yield start()


def test_the_cloud_refuses_unparsable_messages_on_every_rpc_and_logs_one_line(
        start_cloud: CloudFactory, caplog: pytest.LogCaptureFixture) -> None:
    address, server = start_cloud()
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(address) as channel:
        describe = channel.unary_unary("/offramp.v1.Offload/Describe", **IDENTITY)
        for raw in MALFORMED * 10:
            with pytest.raises(grpc.RpcError) as e:
                describe(raw, timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid DescribeRequest" in e.value.details()
        infer = channel.stream_stream("/offramp.v1.Offload/Infer", **IDENTITY)
        ok = pb.OffloadRequest(request_id=7).SerializeToString()  # parses; refused by the handler, answered
        call = infer(iter([ok, MALFORMED[1]]), timeout=10)
        replies = []
        with pytest.raises(grpc.RpcError) as e:
            for reply in call:
                replies.append(pb.OffloadReply.FromString(reply))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid OffloadRequest" in e.value.details()
        assert [r.request_id for r in replies] == [7]  # what came before the bad message got its answer
    assert serving(address)
    assert counted(server.metrics.registry, "offramp_cloud_malformed_messages") == 31
    guard_lines = [r for r in caplog.records if r.name == "offramp.serving.guard"]
    assert len(guard_lines) == 1 and len(guard_lines[0].getMessage()) < 300
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no tracebacks


def test_the_edge_refuses_unparsable_messages_on_every_rpc(edge, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(edge.address) as channel:
        for method in ("Infer", "GetPolicy", "SetPolicy"):
            call = channel.unary_unary(f"/offramp.v1.Edge/{method}", **IDENTITY)
            for raw in MALFORMED:
                with pytest.raises(grpc.RpcError) as e:
                    call(raw, timeout=5)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        stream = channel.stream_stream("/offramp.v1.Edge/InferStream", **IDENTITY)
        with pytest.raises(grpc.RpcError) as e:
            list(stream(iter([MALFORMED[0]]), timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert serving(edge.address)
    assert counted(edge.engine.metrics.registry, "offramp_edge_malformed_messages") == 10
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_oversized_messages_are_refused_and_counted_too(start_cloud: CloudFactory) -> None:
    address, server = start_cloud()  # max_message_mb = 1
    limit = server.config.max_message_bytes
    big = pb.OffloadRequest(request_id=1, tokens=pb.EncodedTensor(payload=bytes(limit + 1000))).SerializeToString()
    options = [("grpc.max_send_message_length", 4 * limit)]
    with grpc.insecure_channel(address, options=options) as channel:
        describe = channel.unary_unary("/offramp.v1.Offload/Describe", **IDENTITY)
        with pytest.raises(grpc.RpcError) as e:
            describe(bytes(limit + 1), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "byte limit" in e.value.details()
        infer = channel.stream_stream("/offramp.v1.Offload/Infer", **IDENTITY)
        with pytest.raises(grpc.RpcError) as e:
            list(infer(iter([big]), timeout=10))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "exceeds" in e.value.details()
    assert serving(address)
    by_reason = {(s.labels["method"], s.labels["reason"]): s.value for m in server.metrics.registry.collect()
                 if m.name == "offramp_cloud_malformed_messages" for s in m.samples if s.name.endswith("_total")}
    assert by_reason == {("Describe", "oversized"): 1, ("Infer", "oversized"): 1}
