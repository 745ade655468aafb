"""The Open Inference Protocol on the cloud: tritonclient's own client against real daemons on real sockets."""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import IDENTITY, CloudFactory
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc
from tritonclient.utils import InferenceServerException

from offramp.core.checkpoint import Card, load_checkpoint, save_checkpoint
from offramp.core.codec import CodecConfig, decode, encode
from offramp.serving.daemon_proc import DaemonProcess
from offramp.core.models import AudioConfig, ModelConfig, MultiExitModel, parse_exits
from offramp.core.halves import CloudHalf, EdgeHalf
from offramp.core.wire import pb, pb_grpc

MODEL = "tiny"
SETTINGS = {"max_batch": 8, "max_queue": 64, "max_message_mb": 1, "grace_s": 2.0, "model_name": MODEL}
TIMEOUT = 30.0


@dataclass(frozen=True)
class Tail:
    """Tokens at the split of the tiny checkpoint, and the local tail that is the reference."""

    card: Card
    half: CloudHalf
    tokens: torch.Tensor  # (4, N, D)

    def expected(self, tokens: torch.Tensor) -> np.ndarray:
        return self.half.run(tokens).numpy()


@pytest.fixture(scope="module")
def tail(tiny_checkpoint: Path) -> Tail:
    model, card = load_checkpoint(tiny_checkpoint)
    x = torch.randn(4, *card.input_shape, generator=torch.Generator().manual_seed(0))
    edge = EdgeHalf(model, card.split_block)
    result = edge.run(x, thresholds=[2.0] * edge.num_exits, score="max_prob")  # nothing leaves early
    return Tail(card, CloudHalf(model, card.split_block), result.tokens)


@pytest.fixture(scope="module")
def served(tiny_checkpoint: Path) -> Iterator[str]:
    """The address of one in-process cloud serving the tiny checkpoint as ``MODEL``."""
    with CloudFactory(tiny_checkpoint, SETTINGS) as start:
        address, _ = start()
        yield address


@pytest.fixture
def client(served: str) -> Iterator[tc.InferenceServerClient]:
    with tc.InferenceServerClient(served) as c:
        yield c


def tensor(name: str, array: np.ndarray, datatype: str) -> tc.InferInput:
    t = tc.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def int8_tokens(tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, scale, dequantised) exactly as the offramp.v1 codec makes and reads them."""
    msg = encode(tokens, CodecConfig(dtype="int8", zstd_level=0))
    q = np.frombuffer(msg.payload, np.int8).reshape(tokens.shape)
    scale = np.asarray(msg.scales, np.float32).reshape(*tokens.shape[:2], 1)
    return q, scale, decode(msg)


def refused(call, code: grpc.StatusCode, *words: str) -> str:
    """Run ``call``; it must fail with ``code`` and a message naming ``words``; returns the message."""
    with pytest.raises(InferenceServerException) as e:
        call()
    assert e.value.status() == f"StatusCode.{code.name}", e.value
    message = e.value.message()
    for word in words:
        assert word in message, message
    return message


# --- health and metadata ------------------------------------------------------------------------------------


def test_health_and_metadata(client: tc.InferenceServerClient, served: str, tail: Tail) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("resnet50") and not client.is_model_ready(MODEL, "2")  # as Triton answers
    assert client.get_server_metadata().name == "offramp"

    meta = client.get_model_metadata(MODEL)
    n, d = tail.half.spec.shape
    assert (meta.name, list(meta.versions)) == (MODEL, ["1"])
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("TOKENS", "FP32", [-1, n, d]), ("SCALE", "FP32", [-1, n, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("OUTPUT", "FP32", [-1, 10])]

    with grpc.insecure_channel(served) as channel:  # the standard health service knows the new service too
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=TIMEOUT)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_the_model_is_named_after_its_checkpoint_unless_told(tiny_checkpoint: Path) -> None:
    with CloudFactory(tiny_checkpoint, {"grace_s": 1.0}) as start:
        address, _ = start()
        with tc.InferenceServerClient(address) as c:
            assert c.is_model_ready(tiny_checkpoint.name)
            assert c.get_model_metadata(tiny_checkpoint.name).name == tiny_checkpoint.name


# --- inference ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", ["FP32", "FP16"])
def test_float_tokens_give_what_the_tail_gives(client: tc.InferenceServerClient, tail: Tail, datatype: str) -> None:
    tokens = tail.tokens[:3]
    sent = tokens.numpy().astype(np.float32 if datatype == "FP32" else np.float16)
    result = client.infer(MODEL, [tensor("TOKENS", sent, datatype)], outputs=[tc.InferRequestedOutput("OUTPUT")],
                          request_id="r1")
    out = result.as_numpy("OUTPUT")
    assert out.dtype == np.float32 and out.shape == (3, 10)
    np.testing.assert_allclose(out, tail.expected(torch.from_numpy(sent.astype(np.float32))), atol=1e-5, rtol=1e-5)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (MODEL, "1", "r1")
    assert response.parameters["batch_size"].int64_param >= 3


def test_int8_tokens_with_their_scale_read_as_the_codec_reads_them(client: tc.InferenceServerClient,
                                                                   tail: Tail) -> None:
    q, scale, dequantised = int8_tokens(tail.tokens)
    result = client.infer(MODEL, [tensor("TOKENS", q, "INT8"), tensor("SCALE", scale, "FP32")])
    np.testing.assert_allclose(result.as_numpy("OUTPUT"), tail.expected(torch.from_numpy(dequantised)),
                               atol=1e-5, rtol=1e-5)
    # ... and close to the float tokens: int8 costs almost nothing
    np.testing.assert_allclose(result.as_numpy("OUTPUT"), tail.expected(tail.tokens), atol=0.05)


def test_typed_contents_are_accepted_as_well_as_raw(served: str, tail: Tail) -> None:
    q, scale, dequantised = int8_tokens(tail.tokens[:2])
    Input = oip.ModelInferRequest.InferInputTensor
    fp32 = oip.ModelInferRequest(model_name=MODEL, inputs=[Input(
        name="TOKENS", datatype="FP32", shape=list(tail.tokens[:2].shape),
        contents=oip.InferTensorContents(fp32_contents=tail.tokens[:2].reshape(-1).tolist()))])
    int8 = oip.ModelInferRequest(model_name=MODEL, inputs=[
        Input(name="TOKENS", datatype="INT8", shape=list(q.shape),
              contents=oip.InferTensorContents(int_contents=q.reshape(-1).tolist())),
        Input(name="SCALE", datatype="FP32", shape=list(scale.shape),
              contents=oip.InferTensorContents(fp32_contents=scale.reshape(-1).tolist()))])
    with grpc.insecure_channel(served) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        for request, tokens in ((fp32, tail.tokens[:2]), (int8, torch.from_numpy(dequantised))):
            response = stub.ModelInfer(request, timeout=TIMEOUT)
            out = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(tuple(response.outputs[0].shape))
            np.testing.assert_allclose(out, tail.expected(tokens), atol=1e-5, rtol=1e-5)


def test_oip_and_offramp_requests_share_one_batch(tiny_checkpoint: Path, tail: Tail) -> None:
    # A window long enough for both to arrive; a batch of two closes it at once.
    with CloudFactory(tiny_checkpoint, {**SETTINGS, "max_batch": 2, "max_wait_ms": 10_000.0}) as start:
        address, _ = start()
        card = tail.card
        request = pb.OffloadRequest(request_id=1, model_fingerprint=card.fingerprint, split_block=card.split_block,
                                    tokens=encode(tail.tokens[:1], CodecConfig(dtype="float32")))
        replies: list[pb.OffloadReply] = []
        with grpc.insecure_channel(address) as channel:
            stream = threading.Thread(target=lambda: replies.extend(
                pb_grpc.OffloadStub(channel).Infer(iter([request]), timeout=TIMEOUT)))
            stream.start()
            with tc.InferenceServerClient(address) as c:
                result = c.infer(MODEL, [tensor("TOKENS", tail.tokens[1:2].numpy(), "FP32")],
                                 client_timeout=TIMEOUT)
            stream.join(TIMEOUT)
    assert [r.batch_size for r in replies] == [2]  # the offramp.v1 side saw the OIP request in its batch
    assert result.get_response().parameters["batch_size"].int64_param == 2
    np.testing.assert_allclose(result.as_numpy("OUTPUT"), tail.expected(tail.tokens[1:2]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(replies[0].output).reshape(1, -1), tail.expected(tail.tokens[:1]),
                               atol=1e-5, rtol=1e-5)


# --- what a caller gets wrong ------------------------------------------------------------------------------


def test_bad_requests_get_the_protocols_codes_and_the_daemon_serves_on(
        client: tc.InferenceServerClient, served: str, tail: Tail, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    tokens = tail.tokens[:1].numpy()
    good = [tensor("TOKENS", tokens, "FP32")]
    q, scale, _ = int8_tokens(tail.tokens[:1])
    n, d = tail.half.spec.shape
    NOT_FOUND, INVALID = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT

    refused(lambda: client.infer("resnet50", good), NOT_FOUND, "'resnet50'", f"'{MODEL}'")
    refused(lambda: client.infer(MODEL, good, model_version="7"), NOT_FOUND, "version '7'")
    refused(lambda: client.get_model_metadata("resnet50"), NOT_FOUND, "'resnet50'")
    refused(lambda: client.infer(MODEL, [tensor("TOKENS", tokens.astype(np.float64), "FP64")]), INVALID,
            "FP64", "FP32, FP16 or INT8")
    refused(lambda: client.infer(MODEL, [tensor("TOKENS", tokens[:, 1:], "FP32")]), INVALID,
            f"[1, {n - 1}, {d}]", f"[-1, {n}, {d}]")
    refused(lambda: client.infer(MODEL, [tensor("TOKENS", q, "INT8")]), INVALID, "INT8", "SCALE", f"[-1, {n}, 1]")
    refused(lambda: client.infer(MODEL, [tensor("TOKENS", tokens, "FP32"), tensor("SCALE", scale, "FP32")]),
            INVALID, "SCALE goes with INT8")
    refused(lambda: client.infer(MODEL, [tensor("TOKENS", q, "INT8"), tensor("SCALE", scale[:, :-1], "FP32")]),
            INVALID, "SCALE has shape")
    refused(lambda: client.infer(MODEL, [tensor("PIXELS", tokens, "FP32")]), INVALID, "unknown input 'PIXELS'")
    refused(lambda: client.infer(MODEL, good, outputs=[tc.InferRequestedOutput("LOGITS")]), INVALID, "LOGITS")
    refused(lambda: client.infer(MODEL, [tensor("TOKENS", np.full_like(tokens, np.nan), "FP32")]), INVALID, "NaN")
    nine = np.repeat(tokens, 9, axis=0)  # one over the max batch: refused as overload, like the Offload service
    refused(lambda: client.infer(MODEL, [tensor("TOKENS", nine, "FP32")]), grpc.StatusCode.RESOURCE_EXHAUSTED,
            "max batch of 8")

    Input = oip.ModelInferRequest.InferInputTensor
    with grpc.insecure_channel(served) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)

        def code_of(request: oip.ModelInferRequest) -> tuple[grpc.StatusCode, str]:
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(request, timeout=TIMEOUT)
            return e.value.code(), e.value.details()

        # Sizes from the network are checked before anything is allocated: a shape that claims
        # 2**40 samples of a few bytes, and raw contents shorter than the shape needs.
        huge = oip.ModelInferRequest(model_name=MODEL, inputs=[Input(name="TOKENS", datatype="FP32",
                                                                      shape=[2**40, n, d])],
                                     raw_input_contents=[b"\0" * 16])
        assert code_of(huge)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        short = oip.ModelInferRequest(model_name=MODEL, inputs=[Input(name="TOKENS", datatype="FP32",
                                                                       shape=[1, n, d])],
                                      raw_input_contents=[b"\0" * 16])
        code, message = code_of(short)
        assert code == INVALID and f"needs {n * d * 4}" in message
        fp16_typed = oip.ModelInferRequest(model_name=MODEL, inputs=[Input(name="TOKENS", datatype="FP16",
                                                                            shape=[1, n, d])])
        assert code_of(fp16_typed) == (INVALID, "TOKENS: FP16 travels in raw_input_contents only (the protocol "
                                                "has no typed contents for it)")
        # The methods of the service this cloud does not implement answer UNIMPLEMENTED, quietly.
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelConfig(oip.ModelConfigRequest(name=MODEL), timeout=TIMEOUT)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # Bytes that do not parse: refused like on the Offload service (counted, one log line at most).
        with pytest.raises(grpc.RpcError) as e:
            channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", **IDENTITY)(b"\x0a\x05abc",
                                                                                          timeout=TIMEOUT)
        assert e.value.code() == INVALID and "not a valid ModelInferRequest" in e.value.details()

    # ... and the daemon serves on, without a traceback in its log.
    np.testing.assert_allclose(client.infer(MODEL, good).as_numpy("OUTPUT"), tail.expected(tail.tokens[:1]),
                               atol=1e-5, rtol=1e-5)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert all(len(r.getMessage()) < 300 for r in caplog.records)


def test_a_bearer_token_guards_inference_as_it_guards_offloads(tiny_checkpoint: Path, tail: Tail,
                                                               tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token-of-some-length\n")
    with CloudFactory(tiny_checkpoint, {**SETTINGS, "token_file": str(token)}) as start:
        address, _ = start()
        with tc.InferenceServerClient(address) as c:
            inputs = [tensor("TOKENS", tail.tokens[:1].numpy(), "FP32")]
            refused(lambda: c.infer(MODEL, inputs), grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
            result = c.infer(MODEL, inputs, headers={"authorization": "Bearer s3cret-token-of-some-length"})
            assert result.as_numpy("OUTPUT").shape == (1, 10)


# --- a real daemon process, and an audiovisual tail ------------------------------------------------------


def test_the_daemon_serves_oip_under_the_name_its_flag_gives(tiny_checkpoint: Path, tail: Tail) -> None:
    with DaemonProcess("cloud", ["--checkpoint", str(tiny_checkpoint), "--model-name", "digits-tail",
                                 "--threads", "1"]) as cloud:
        with tc.InferenceServerClient(cloud.address) as c:
            assert c.is_server_ready() and c.is_model_ready("digits-tail")
            q, scale, dequantised = int8_tokens(tail.tokens[:2])
            result = c.infer("digits-tail", [tensor("TOKENS", q, "INT8"), tensor("SCALE", scale, "FP32")])
        np.testing.assert_allclose(result.as_numpy("OUTPUT"), tail.expected(torch.from_numpy(dequantised)),
                                   atol=1e-5, rtol=1e-5)
        assert "Open Inference Protocol: model 'digits-tail'" in cloud.log_tail()


@pytest.fixture(scope="module")
def av_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained audiovisual counting model (only the tail's arithmetic matters here), split after block 4."""
    torch.manual_seed(0)
    config = ModelConfig(backbone="vit_micro_32", img_size=(32, 32), in_chans=3, num_classes=1, task="regression",
                         exits=parse_exits("slvit@4:fused"), audio=AudioConfig((1, 64, 64), fuse_at=4),
                         target_stats=(30.0, 17.0))
    out = tmp_path_factory.mktemp("av") / "crowd"
    save_checkpoint(out, MultiExitModel(config).eval(),
                    Card(config, label_names=[], modality="audiovisual", input_shape=(3, 32, 32), split_block=4))
    return out


def test_audiovisual_tails_take_audio_tokens_too(av_checkpoint: Path) -> None:
    model, card = load_checkpoint(av_checkpoint)
    half = CloudHalf(model, card.split_block)
    g = torch.Generator().manual_seed(1)
    tokens, audio = torch.randn(2, *half.spec.shape, generator=g), torch.randn(2, *half.audio_shape, generator=g)
    with CloudFactory(av_checkpoint, {"grace_s": 1.0}) as start:
        address, _ = start()
        with tc.InferenceServerClient(address) as c:
            meta = c.get_model_metadata("crowd")
            assert [t.name for t in meta.inputs] == ["TOKENS", "SCALE", "AUDIO_TOKENS", "AUDIO_SCALE"]
            assert list(meta.inputs[2].shape) == [-1, *half.audio_shape]
            assert [list(t.shape) for t in meta.outputs] == [[-1, 2]]  # regression: mean and log-variance
            refused(lambda: c.infer("crowd", [tensor("TOKENS", tokens.numpy(), "FP32")]),
                    grpc.StatusCode.INVALID_ARGUMENT, "no AUDIO_TOKENS")
            refused(lambda: c.infer("crowd", [tensor("TOKENS", tokens.numpy(), "FP32"),
                                              tensor("AUDIO_TOKENS", audio[:1].numpy(), "FP32")]),
                    grpc.StatusCode.INVALID_ARGUMENT, "2 samples of TOKENS but 1 of AUDIO_TOKENS")
            result = c.infer("crowd", [tensor("TOKENS", tokens.numpy(), "FP32"),
                                       tensor("AUDIO_TOKENS", audio.numpy(), "FP32")])
    np.testing.assert_allclose(result.as_numpy("OUTPUT"), half.run(tokens, audio).numpy(), atol=1e-5, rtol=1e-5)


def test_the_cloud_serves_the_protocol_without_tritonclient() -> None:
    """The core install has no tritonclient: the cloud must not import it (our own copy of the messages)."""
    import subprocess
    import sys

    code = "import sys, cloud_node.server; assert 'tritonclient' not in sys.modules, 'tritonclient imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    from offramp.core.wire import OIP_SERVICE, oip

    assert OIP_SERVICE == tc.service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
    # Our copy and tritonclient's agree on the wire: the same bytes parse to the same fields both ways.
    ours = oip.ModelInferRequest(model_name="m", inputs=[oip.ModelInferRequest.InferInputTensor(
        name="TOKENS", datatype="FP32", shape=[1, 2])], raw_input_contents=[b"\x00" * 8])
    theirs = tc.service_pb2.ModelInferRequest.FromString(ours.SerializeToString())
    assert (theirs.model_name, theirs.inputs[0].shape, theirs.raw_input_contents) == ("m", [1, 2], [b"\x00" * 8])
    assert oip.ModelInferRequest.FromString(theirs.SerializeToString()) == ours
