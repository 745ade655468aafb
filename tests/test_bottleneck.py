"""Learned bottleneck: trained for a few steps on tiny data, carried by real daemons, refused when foreign."""
from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import zstandard
from conftest import CLOUD_TEST_SETTINGS
from helpers import CloudFactory, LoopThread, edge_servers, wait_for
from safetensors.torch import load_file

from offramp.core.checkpoint import Card, bottleneck_id, load_checkpoint, read_card
from offramp.cli import main
from offramp.core.codec import CodecConfig, CodecError, DecodeLimits, decode, encode, encode_code, zstd_dictionary
from offramp.serving.config import EdgeConfig, replace_settings
from offramp.core.errors import OfframpError
from offramp.core.models.bottleneck import BottleneckConfig
from offramp.core.data.card_data import load_validation
from offramp.core.halves import CloudHalf, EdgeHalf
from offramp.training.train_bottleneck import BottleneckJob, add_bottleneck
from offramp.core.wire import pb, pb_grpc

NEVER = [2.0, 2.0]  # max_prob thresholds no exit meets: every sample goes to the cloud


def _train(tiny: Path, out: Path, channels: int, seed: int = 0) -> Path:
    [metrics] = add_bottleneck(BottleneckJob(checkpoint=str(tiny), out=str(out), channels=channels, epochs=2,
                                             views=1, batch_size=64, precision="fp32", device="cpu", seed=seed,
                                             progress=False))
    assert metrics["out"] == str(out)
    return out


@pytest.fixture(scope="module")
def with_bottleneck(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tiny_checkpoint, tmp_path_factory.mktemp("bn") / "c4", channels=4)


@pytest.fixture(scope="module")
def other_bottleneck(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tiny_checkpoint, tmp_path_factory.mktemp("bn") / "c4-other", channels=4, seed=1)


@pytest.fixture(scope="module")
def inputs(tiny_checkpoint: Path) -> torch.Tensor:
    val, _ = load_validation(read_card(tiny_checkpoint))
    return val.tensors[0][:6]


def test_the_checkpoint_holds_it_and_changes_nothing_else(tiny_checkpoint: Path, with_bottleneck: Path) -> None:
    model, card = load_checkpoint(with_bottleneck)  # verifies the fingerprint over every weight
    before, old = load_checkpoint(tiny_checkpoint)
    assert card.config.bottleneck == BottleneckConfig(position=old.split_block, channels=4,
                                                      dictionary_bytes=card.config.bottleneck.dictionary_bytes)
    assert card.fingerprint != old.fingerprint  # the bottleneck is part of what edge and cloud must share
    stored = card.metrics["bottleneck"]
    assert stored["id"] == bottleneck_id(model) and stored["id"].startswith(f"c4b4@{old.split_block}:")
    assert 0 < stored["bytes_per_offload"] and 0 <= stored["accuracy"] <= 1
    weights = load_file(Path(with_bottleneck) / "model.safetensors")
    assert any(k.startswith("bottleneck.encoder.") for k in weights)
    assert stored["dictionary_bytes"] == card.config.bottleneck.dictionary_bytes == weights[
        "bottleneck.zstd_dictionary"].numel()
    for name, tensor in before.state_dict().items():  # backbone and exits untouched
        assert torch.equal(tensor, weights[name]), name


def test_code_round_trips_through_the_codec_bounded_and_labelled() -> None:
    code = torch.randint(-7, 8, (2, 5, 4), dtype=torch.int8)
    msg = encode_code(code, "c4b4@2:abc")
    assert msg.bottleneck == "c4b4@2:abc" and not msg.scales
    limits = DecodeLimits(max_raw_bytes=40, expected_shape=(None, 5, 4))
    assert np.array_equal(decode(msg, limits), code.numpy().astype(np.float32))
    with pytest.raises(CodecError, match="expected"):
        decode(msg, DecodeLimits(expected_shape=(None, 5, 8)))
    msg.scales.append(1.0)
    with pytest.raises(CodecError, match="without scales"):
        decode(msg)
    with pytest.raises(ValueError, match="encode_code"):
        encode(code.float(), CodecConfig(dtype="bottleneck"))
    with pytest.raises(ValueError, match="top_k"):
        CodecConfig(dtype="bottleneck", top_k=4)


def test_a_dictionary_shrinks_codes_and_only_its_holder_decodes_them() -> None:
    g = torch.Generator().manual_seed(0)
    codes = [(torch.randn(1, 65, 8, generator=g) * 1.2).round().clamp(-7, 7).to(torch.int8) for _ in range(400)]
    data = zstandard.train_dictionary(1024, [c.numpy().tobytes() for c in codes[:300]]).as_bytes()
    dictionary = zstd_dictionary(data)
    plain = [encode_code(c, "c8b4@2:x") for c in codes[300:]]
    small = [encode_code(c, "c8b4@2:x", dictionary=dictionary) for c in codes[300:]]
    assert np.mean([m.ByteSize() for m in small]) < np.mean([m.ByteSize() for m in plain])
    assert np.array_equal(decode(small[0], dictionary=dictionary), codes[300].numpy().astype(np.float32))
    with pytest.raises(CodecError, match="needs dictionary"):
        decode(small[0])
    other = zstd_dictionary(zstandard.train_dictionary(1024, [c.numpy().tobytes() for c in codes[100:300]]).as_bytes())
    with pytest.raises(CodecError, match="needs dictionary"):
        decode(small[0], dictionary=other)


def test_edge_and_cloud_carry_the_code_and_answer_as_the_model_does(
        with_bottleneck: Path, inputs: torch.Tensor, loop: LoopThread) -> None:
    model, card = load_checkpoint(with_bottleneck)
    edge, cloud = EdgeHalf(model, card.split_block), CloudHalf(model, card.split_block)
    # One sample at a time, as the daemons will see them (the edge's requests go one by one).
    expected = torch.cat([cloud.run(cloud.from_code(edge.to_code(edge.run(x[None], NEVER, "max_prob").tokens).float()))
                          for x in inputs])
    with CloudFactory(with_bottleneck, CLOUD_TEST_SETTINGS) as start_cloud, \
            edge_servers(loop, with_bottleneck, {"grace_s": 2.0}) as start_edge:
        address, _ = start_cloud()
        edge_server = start_edge(cloud=(address,), thresholds=tuple(NEVER), codec="bottleneck")
        wait_for(lambda: edge_server.engine.offload.connected_to == address, 10, what="the edge to pair")
        with grpc.insecure_channel(edge_server.address) as channel:
            stub = pb_grpc.EdgeStub(channel)
            replies = [stub.Infer(pb.InferRequest(request_id=i, tensor=pb.RawTensor(
                shape=list(x.shape), data=x.numpy().astype("<f4").tobytes())), timeout=30)
                for i, x in enumerate(inputs)]
    assert all(r.decided_by == "cloud" and not r.degraded for r in replies), [r.degraded_reason for r in replies]
    assert [r.prediction for r in replies] == expected.argmax(-1).tolist()
    raw = int(np.prod(edge.spec.shape)) * 4
    assert all(0 < r.bytes_sent < raw / 8 for r in replies)  # far below float32 tokens
    # A small envelope: the stream carries the fingerprint once, and no stage timings ride along. With gRPC's
    # 5-byte message prefix it adds at most 64 bytes to the code's own, so a code of 128 bytes or more (the
    # hybrid's is ~200) travels in at most 1.5x its size; this toy model's codes are ~35 bytes.
    dictionary = zstd_dictionary(edge.code_dictionary)
    codes = [len(encode_code(edge.to_code(edge.run(x[None], NEVER, "max_prob").tokens), edge.bottleneck_id, 3,
                             dictionary).payload) for x in inputs]
    assert all(r.bytes_sent + 5 - code <= 64 for r, code in zip(replies, codes))


def _request(card: Card, code: pb.EncodedTensor) -> pb.OffloadRequest:
    return pb.OffloadRequest(request_id=1, model_fingerprint=card.fingerprint, split_block=card.split_block,
                             tokens=code)


def test_the_cloud_refuses_foreign_and_inconsistent_codes(
        with_bottleneck: Path, other_bottleneck: Path, tiny_checkpoint: Path, inputs: torch.Tensor) -> None:
    model, card = load_checkpoint(with_bottleneck)
    other, _ = load_checkpoint(other_bottleneck)
    edge = EdgeHalf(model, card.split_block)
    tokens = edge.run(inputs[:1], NEVER, "max_prob").tokens
    good = encode_code(edge.to_code(tokens), bottleneck_id(model))
    foreign = encode_code(edge.to_code(tokens), bottleneck_id(other))
    assert foreign.bottleneck != good.bottleneck
    wider = encode_code(torch.zeros(1, tokens.shape[1], 5, dtype=torch.int8), bottleneck_id(model))
    out_of_range = encode_code(torch.full((1, tokens.shape[1], 4), 100, dtype=torch.int8), bottleneck_id(model))
    lying = encode_code(edge.to_code(tokens), bottleneck_id(model))
    lying.raw_size += 4
    _, plain_card = load_checkpoint(tiny_checkpoint)
    with CloudFactory(with_bottleneck, CLOUD_TEST_SETTINGS) as start_cloud, \
            CloudFactory(tiny_checkpoint, CLOUD_TEST_SETTINGS) as start_plain:
        address, _ = start_cloud()
        plain, _ = start_plain()
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.OffloadStub(channel)
            codes = [good, foreign, wider, out_of_range, lying]
            replies = list(stub.Infer(iter([_request(card, c) for c in codes]), timeout=30))
            # plain tokens still work on a cloud with a bottleneck
            plain_tokens = encode(tokens, CodecConfig(dtype="float32"))
            replies += list(stub.Infer(iter([_request(card, plain_tokens)]), timeout=30))
        with grpc.insecure_channel(plain) as channel:
            no_bottleneck = list(pb_grpc.OffloadStub(channel).Infer(iter([_request(plain_card, good)]), timeout=30))
    ok, precondition, invalid = 0, grpc.StatusCode.FAILED_PRECONDITION.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [r.status.code for r in replies] == [ok, precondition, invalid, invalid, invalid, ok], \
        [r.status.message for r in replies]
    assert "bottleneck" in replies[1].status.message and "beyond" in replies[3].status.message
    assert no_bottleneck[0].status.code == precondition and "no codes" in no_bottleneck[0].status.message


def test_bad_requests_for_a_bottleneck_get_one_line_errors(
        tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], loop: LoopThread) -> None:
    assert main(["bottleneck", str(tiny_checkpoint), "--out", str(tmp_path / "x"), "--channels", "4",
                 "--bits", "9"]) == 2
    assert "bits must be in 2..8" in capsys.readouterr().err
    assert main(["bottleneck", str(tiny_checkpoint), "--out", str(tmp_path / "x"), "--channels", "4",
                 "--split-block", "99"]) == 2
    assert "position" in capsys.readouterr().err
    assert main(["bottleneck", str(tiny_checkpoint), "--out", str(tmp_path / "x"), "--channels", "4,8"]) == 2
    assert "{channels}" in capsys.readouterr().err
    from edge_node.server import build_engine

    with pytest.raises(OfframpError, match="offramp bottleneck"):
        build_engine(replace_settings(EdgeConfig(checkpoint=str(tiny_checkpoint)), codec="bottleneck"))
