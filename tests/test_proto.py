"""Wire contract: the committed generated code matches the protos, and the messages and stubs work."""
from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import grpc
import pytest
from google.protobuf.message import Message

from offramp.core.wire import EDGE_SERVICE, OFFLOAD_SERVICE, make_status, pb, pb_grpc, status_code

ROOT = Path(__file__).resolve().parent.parent


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_has_not_drifted() -> None:
    pytest.importorskip("grpc_tools")
    problems = load_generator().drift()
    assert problems == [], "run `python proto/generate.py`:\n" + "\n".join(problems)


def test_drift_check_spots_edits_and_stale_files(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    generator = load_generator()
    out = tmp_path / "out"
    assert generator.write(out)  # a fresh directory: everything is written
    assert generator.drift(out) == []
    (out / "offramp" / "v1" / "offramp_pb2.py").write_text("# edited\n")
    (out / "offramp" / "v1" / "gone_pb2.py").write_text("")
    assert sorted(generator.drift(out)) == [
        f"{out}/offramp/v1/gone_pb2.py: stale (no proto generates it)",
        f"{out}/offramp/v1/offramp_pb2.py: differs",
    ]


def test_generated_modules_live_in_the_offramp_package() -> None:
    assert pb.__name__ == "offramp.proto.offramp.v1.offramp_pb2"
    assert pb.OffloadRequest.__module__ == pb.__name__
    assert pb.DESCRIPTOR.name == "offramp/v1/offramp.proto"  # what reflection and other languages see
    assert pb.DESCRIPTOR.package == "offramp.v1"
    assert (OFFLOAD_SERVICE, EDGE_SERVICE) == ("offramp.v1.Offload", "offramp.v1.Edge")


def test_services_have_the_documented_shape() -> None:
    def methods(service: str) -> dict[str, tuple[bool, bool]]:
        desc = pb.DESCRIPTOR.services_by_name[service]
        return {m.name: (m.client_streaming, m.server_streaming) for m in desc.methods}

    assert methods("Offload") == {"Infer": (True, True), "Describe": (False, False)}
    assert methods("Edge") == {
        "Infer": (False, False),
        "InferStream": (True, True),
        "GetPolicy": (False, False),
        "SetPolicy": (False, False),
    }


M = TypeVar("M", bound=Message)


def round_trip(message: M) -> M:
    return type(message).FromString(message.SerializeToString())


def test_offload_messages_round_trip() -> None:
    tokens = pb.EncodedTensor(
        shape=[2, 197, 192],
        dtype=pb.EncodedTensor.DTYPE_INT8,
        scales=[0.5] * (2 * 50),
        token_indices=list(range(49)) * 2,
        kept_tokens=49,
        num_prefix=1,
        compression=pb.EncodedTensor.COMPRESSION_ZSTD,
        raw_size=2 * 50 * 192,
        payload=b"\x28\xb5\x2f\xfd" + bytes(100),
        crc32=0xDEADBEEF,
    )
    request = pb.OffloadRequest(
        request_id=2**63 + 5,
        model_fingerprint="ab" * 32,
        split_block=6,
        tokens=tokens,
        modalities=["visual"],
        deadline_ms=250,
        edge_stage_ms={"head": 3.5, "encode": 0.25},
    )
    assert round_trip(request) == request
    assert not request.HasField("audio_tokens")
    request.audio_tokens.CopyFrom(tokens)
    assert round_trip(request).HasField("audio_tokens")

    reply = pb.OffloadReply(
        request_id=request.request_id,
        status=make_status(),
        output=[0.25, -1.5, 3.0, 0.0],
        output_shape=[2, 2],
        timings=pb.Timings(decode_ms=0.5, queue_ms=1.0, compute_ms=4.0, total_ms=6.0),
        batch_size=8,
    )
    assert round_trip(reply) == reply
    failed = pb.OffloadReply(request_id=9, status=make_status(grpc.StatusCode.FAILED_PRECONDITION, "fingerprint"))
    assert status_code(round_trip(failed).status) is grpc.StatusCode.FAILED_PRECONDITION

    describe = pb.DescribeReply(
        card_json='{"arch": "vit_tiny_c10"}',
        fingerprint="ab" * 32,
        split_block=6,
        token_shape=[197, 192],
        max_batch_size=64,
        max_message_bytes=64 << 20,
        modalities=["visual"],
    )
    assert round_trip(describe) == describe


def test_edge_messages_round_trip() -> None:
    by_file = pb.InferRequest(request_id=1, encoded_file=b"\x89PNG...")
    assert round_trip(by_file).WhichOneof("input") == "encoded_file"
    assert not by_file.HasField("audio")
    by_tensor = pb.InferRequest(request_id=2, tensor=pb.RawTensor(shape=[3, 32, 32], data=bytes(12288)), audio=b"RIFF")
    back = round_trip(by_tensor)
    assert back.WhichOneof("input") == "tensor" and back.HasField("audio") and back == by_tensor
    by_tensor.encoded_file = b"x"  # a oneof holds one input at a time
    assert by_tensor.WhichOneof("input") == "encoded_file"

    reply = pb.InferReply(
        request_id=2,
        prediction=-1,
        value=12.5,
        confidence=0.75,
        decided_by="cloud",
        exit_index=-1,
        degraded=True,
        degraded_reason="deadline",
        output=[12.5, -0.5],
        stage_ms={"total": 12.0},
        bytes_sent=4096,
    )
    assert round_trip(reply) == reply
    policy = pb.Policy(thresholds=[0.5, 0.75], score="entropy", offload_enabled=True)
    assert round_trip(policy) == policy


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_status_codes_round_trip(code: grpc.StatusCode) -> None:
    assert status_code(round_trip(make_status(code, "why"))) is code


def test_unknown_status_number_reads_as_unknown() -> None:
    assert status_code(pb.Status(code=1234)) is grpc.StatusCode.UNKNOWN


class EchoOffload(pb_grpc.OffloadServicer):
    """Answers every request on the stream with its own id, as the cloud will."""

    def Infer(self, request_iterator: Iterator[pb.OffloadRequest], context: grpc.ServicerContext) -> Iterator[pb.OffloadReply]:
        for request in request_iterator:
            yield pb.OffloadReply(request_id=request.request_id, status=make_status(), batch_size=1)

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeReply:
        return pb.DescribeReply(fingerprint="f" * 64, split_block=3)


@pytest.fixture
def offload_server() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_OffloadServicer_to_server(EchoOffload(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_generated_stubs_talk_to_a_real_server(offload_server: str) -> None:
    with grpc.insecure_channel(offload_server) as channel:
        stub = pb_grpc.OffloadStub(channel)
        assert stub.Describe(pb.DescribeRequest(), timeout=10).split_block == 3
        requests = (pb.OffloadRequest(request_id=i) for i in range(5))
        replies = list(stub.Infer(requests, timeout=10))
    assert [r.request_id for r in replies] == list(range(5))
