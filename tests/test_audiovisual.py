"""Audiovisual crowd counting end to end: regression exits over visual, audio and fused tokens,
the edge walking the modality ladder, the cloud fusing the audio tokens it is sent."""
from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import scipy.io.wavfile
import torch
from helpers import CloudFactory, LoopThread, edge_servers, wait_for
from PIL import Image

from edge_node.server import EdgeServer
from offramp.core.checkpoint import load_checkpoint, read_card
from offramp.cli import main
from offramp.core.codec import CodecConfig, encode
from offramp.core.data.crowd import LIGHTING_NAMES, load_crowd, save_crowd_samples
from offramp.core.models import AudioConfig, ModelConfig, MultiExitModel, parse_exits
from offramp.core.halves import CloudHalf, EdgeHalf
from offramp.training.train import evaluate
from offramp.core.wire import pb, pb_grpc

LADDER = ["slvit@0:audio", "slvit@2", "slvit@2:fused", "slvit@4:fused"]
NEVER, ALWAYS = -math.inf, math.inf  # std thresholds: an exit answers when its predicted std is at most this
SCENES = 1500


@pytest.fixture(scope="module")
def av_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small audiovisual counting model: the modality ladder on vit_micro_32, split (and fusion) after block 4."""
    from offramp.training.pipeline import TrainJob, run_training
    from offramp.training.train import TrainConfig

    out = tmp_path_factory.mktemp("av") / "checkpoint"
    job = TrainJob(data=f"crowd-av:{SCENES}", exits=",".join(LADDER), out=str(out))
    # Half the backbone's batches without audio: its visual pathway then learns to count on its own.
    run_training(job, TrainConfig(epochs=10, exit_epochs=10, batch_size=64, modality_dropout=0.5, progress=False))
    return out


@pytest.fixture(scope="module")
def crowd_test() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Test-split scenes of the fixture's data: (images, spectrograms, counts, lighting)."""
    return load_crowd(SCENES, seed=0).test.tensors


def tiny_av_model(**changes: Any) -> MultiExitModel:
    config = dict(backbone="vit_micro_32", img_size=(32, 32), in_chans=3, num_classes=1, task="regression",
                  exits=parse_exits(",".join(LADDER)), audio=AudioConfig((1, 64, 64), fuse_at=4),
                  target_stats=(30.0, 17.0))
    torch.manual_seed(0)
    return MultiExitModel(ModelConfig(**{**config, **changes})).eval()


# --- the model ---------------------------------------------------------------------------------


def test_exit_names_parse_with_their_modality() -> None:
    exits = parse_exits("slvit@0:audio,slvit@2,slvit@2:fused")
    assert [e.name for e in exits] == ["slvit@0:audio", "slvit@2", "slvit@2:fused"]
    assert [e.modality for e in exits] == ["audio", "visual", "fused"]
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        parse_exits("slvit@2:smell")


@pytest.mark.parametrize(("exits", "audio", "message"), [
    ("cnn@2:fused", AudioConfig((1, 64, 64), 4), "only slvit exits can attend over audio"),
    ("slvit@2:fused", None, "attends over audio, but the model is not audiovisual"),
    ("slvit@0", AudioConfig((1, 64, 64), 4), r"position must be in 1\.\.6"),
    ("slvit@5", AudioConfig((1, 64, 64), 4), "audiovisual exits must come before the fusion point"),
    ("slvit@2", AudioConfig((1, 64, 64), 6), r"fuse_at in 0\.\.5"),
    ("slvit@2", AudioConfig((1, 64, 60), 4), "does not divide the spectrogram"),
])
def test_impossible_audiovisual_models_are_refused(exits: str, audio: AudioConfig | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_av_model(exits=parse_exits(exits), audio=audio)


def test_visual_models_keep_their_stored_config_and_thus_their_fingerprint() -> None:
    config = ModelConfig("vit_micro_32", (32, 32), 3, 10, exits=parse_exits("slvit@2,cnn@4"))
    stored = config.to_dict()
    assert "audio" not in stored and "target_stats" not in stored
    assert all("modality" not in e for e in stored["exits"])
    assert ModelConfig.from_dict(stored) == config
    av = tiny_av_model().config
    assert ModelConfig.from_dict(av.to_dict()) == av


@pytest.mark.parametrize("split", [2, 4])
def test_edge_and_cloud_halves_equal_one_fused_pass(split: int) -> None:
    model = tiny_av_model()
    x, audio = torch.randn(5, 3, 32, 32), torch.randn(5, 1, 64, 64)
    with torch.no_grad():
        exit_outs, final = model(x, audio)
    edge = EdgeHalf(model, split, exits=[n for n in LADDER if int(n.split("@")[1][0]) <= split])
    result = edge.run(x, [NEVER] * edge.num_exits, "std", audio=audio)
    assert result.offload.tolist() == list(range(5)) and result.audio_tokens.shape == (5, 16, 96)
    cloud = CloudHalf(model, split)
    out = cloud.run(result.tokens, result.audio_tokens)
    torch.testing.assert_close(out, final, atol=1e-5, rtol=1e-5)
    # The best-exit fallback of every sample is one of the ladder's exits, with that exit's own output.
    for i, k in enumerate(result.best_exit.tolist()):
        torch.testing.assert_close(result.output[i], exit_outs[edge.exit_ids[k]][i], atol=1e-5, rtol=1e-5)


def test_a_sample_gets_the_answer_of_the_exit_that_took_it() -> None:
    """Even when an earlier exit (with a stricter threshold) was surer of it."""
    model = tiny_av_model()
    x, audio = torch.randn(6, 3, 32, 32), torch.randn(6, 1, 64, 64)
    with torch.no_grad():
        exit_outs, _ = model(x, audio)
    result = EdgeHalf(model, 4).run(x, [NEVER, NEVER, ALWAYS, NEVER], "std", audio=audio)
    assert result.exit_index.tolist() == [2] * 6
    torch.testing.assert_close(result.output, exit_outs[2], atol=1e-5, rtol=1e-5)


def test_an_audio_only_answer_costs_no_visual_compute() -> None:
    """NaN pictures would poison any visual block; the audio exit answering everything never touches them."""
    model = tiny_av_model()
    edge = EdgeHalf(model, 4)
    x, audio = torch.full((4, 3, 32, 32), float("nan")), torch.randn(4, 1, 64, 64)
    result = edge.run(x, [ALWAYS, NEVER, NEVER, NEVER], "std", audio=audio)
    assert result.exit_index.tolist() == [0] * 4 and len(result.offload) == 0
    assert torch.isfinite(result.output).all()
    with pytest.raises(ValueError, match="needs the audio input"):
        edge.run(x, [NEVER] * 4, "std")


def test_an_audiovisual_edge_cannot_split_after_the_fusion_point() -> None:
    with pytest.raises(ValueError, match="must split there or earlier"):
        EdgeHalf(tiny_av_model(), 5)


# --- training on the synthetic crowd ---------------------------------------------------------


def test_counts_are_learned_in_count_units_with_mae_and_rmse(av_checkpoint: Path, crowd_test: tuple) -> None:
    model, card = load_checkpoint(av_checkpoint)
    assert card.modality == "audiovisual" and card.config.task == "regression" and card.label_names == ["count"]
    x, audio, count, _ = crowd_test
    results = {r.name: r for r in evaluate(model, torch.utils.data.TensorDataset(x, audio, count))}
    guess_mean = float((count - count.mean()).abs().mean())  # MAE of always answering the mean count
    assert results["final"].summary()["mae"] < 0.6 * guess_mean
    assert {"mae", "rmse"} == set(results["slvit@2:fused"].summary())


def test_a_visual_exit_is_less_sure_of_dark_scenes_than_of_bright_ones(av_checkpoint: Path,
                                                                        crowd_test: tuple) -> None:
    model, _ = load_checkpoint(av_checkpoint)
    x, audio, count, lighting = crowd_test
    results = {r.name: r for r in evaluate(model, torch.utils.data.TensorDataset(x, audio, count))}
    std = results["slvit@2"].confidence  # the predicted standard deviation
    dark, bright = lighting.numpy() == LIGHTING_NAMES.index("dark"), lighting.numpy() == LIGHTING_NAMES.index("bright")
    assert std[dark].mean() > 1.1 * std[bright].mean()
    # ... and rightly so: its errors are larger there too.
    error = results["slvit@2"].error
    assert error[dark].mean() > error[bright].mean()


def test_train_and_eval_commands_report_mae_per_exit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model"
    assert main(["train", "--data", "crowd-av:120", "--epochs", "1", "--exit-epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mae" in text and "rmse" in text
    for name in LADDER:
        assert name in text


# --- serving over gRPC -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def av_cloud(av_checkpoint: Path) -> Iterator[tuple[str, Any]]:
    with CloudFactory(av_checkpoint, {"max_batch": 8, "grace_s": 2.0}) as start:
        yield start()


@pytest.fixture
def start_av_edge(av_checkpoint: Path, loop: LoopThread) -> Iterator[Callable[..., EdgeServer]]:
    with edge_servers(loop, av_checkpoint, {"score": "std", "grace_s": 1.0}) as start:
        yield start


def png(image: torch.Tensor) -> bytes:
    pixels = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def scene_requests(folder: Path, n: int) -> list[pb.InferRequest]:
    """Scenes as files, as a camera with a microphone would send them: a PNG and a float32 WAV."""
    return [pb.InferRequest(request_id=i, encoded_file=image.read_bytes(), audio=wav.read_bytes())
            for i, (image, wav) in enumerate(save_crowd_samples(folder, n))]


def test_fused_exit_answers_when_sure_and_offloads_otherwise(
        av_checkpoint: Path, av_cloud: tuple[str, Any], start_av_edge: Callable[..., EdgeServer],
        tmp_path: Path) -> None:
    requests = scene_requests(tmp_path, 12)
    # What the fused exit at block 2 thinks of these very files, offline.
    from offramp.serving.inputs import request_inputs
    model, card = load_checkpoint(av_checkpoint)
    pairs = [request_inputs(r, card.modality, card.input_shape, card.config.audio.input_shape) for r in requests]
    x, audio = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    with torch.no_grad():
        outs, final = model(x, audio)
    fused = LADDER.index("slvit@2:fused")
    fused_std = outs[fused][:, 1].mul(0.5).exp()
    threshold = float(fused_std.median())

    address, _ = av_cloud
    edge = start_av_edge(cloud=(address,), codec="float32", thresholds=(NEVER, NEVER, threshold, NEVER))
    wait_for(lambda: edge.engine.offload.connected_to == address, 10, what="the edge to pair with the cloud")
    with grpc.insecure_channel(edge.address) as channel:
        replies = sorted(pb_grpc.EdgeStub(channel).InferStream(iter(requests), timeout=60),
                         key=lambda r: r.request_id)
    assert [r.status.code for r in replies] == [0] * len(requests)
    sure = (fused_std <= threshold).tolist()
    assert 0 < sum(sure) < len(sure)
    for reply, is_sure, i in zip(replies, sure, range(len(requests))):
        assert not reply.degraded
        if is_sure:
            assert reply.decided_by == "exit:slvit@2:fused" and reply.bytes_sent == 0
            assert reply.value == pytest.approx(float(outs[fused][i, 0]), abs=1e-3)
        else:  # the cloud fused the audio tokens it was sent: the full model's count
            assert reply.decided_by == "cloud" and reply.bytes_sent > 0
            assert reply.value == pytest.approx(float(final[i, 0]), abs=1e-3)
        assert reply.confidence > 0  # the std of whoever answered


def test_a_request_without_the_audio_an_audiovisual_model_needs_is_invalid(
        av_cloud: tuple[str, Any], start_av_edge: Callable[..., EdgeServer], tmp_path: Path) -> None:
    edge = start_av_edge(cloud=(av_cloud[0],))
    request = scene_requests(tmp_path, 1)[0]
    picture_only = pb.InferRequest(request_id=1, encoded_file=request.encoded_file)
    sound_only = pb.InferRequest(request_id=2, audio=request.audio)
    swapped = pb.InferRequest(request_id=3, encoded_file=request.encoded_file, audio=request.encoded_file)
    with grpc.insecure_channel(edge.address) as channel:
        stub = pb_grpc.EdgeStub(channel)
        for bad, message in [(picture_only, "set audio to a WAV clip"), (sound_only, "set encoded_file"),
                             (swapped, "audio must be a WAV file, got a PNG image")]:
            with pytest.raises(grpc.RpcError) as e:
                stub.Infer(bad, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
        assert stub.Infer(request, timeout=30).status.code == 0  # and the edge keeps serving


def test_a_wav_at_another_rate_is_resampled_and_a_bad_rate_refused(
        av_cloud: tuple[str, Any], start_av_edge: Callable[..., EdgeServer], tmp_path: Path) -> None:
    edge = start_av_edge(cloud=(av_cloud[0],))
    request = scene_requests(tmp_path, 1)[0]
    rate, clip = scipy.io.wavfile.read(io.BytesIO(request.audio))
    for new_rate, ok in [(16000, True), (1000, False)]:
        n = int(len(clip) * new_rate / rate)
        resampled = np.interp(np.linspace(0, len(clip) - 1, n), np.arange(len(clip)), clip).astype(np.float32)
        buf = io.BytesIO()
        scipy.io.wavfile.write(buf, new_rate, resampled)
        other = pb.InferRequest(request_id=5, encoded_file=request.encoded_file, audio=buf.getvalue())
        with grpc.insecure_channel(edge.address) as channel:
            stub = pb_grpc.EdgeStub(channel)
            if ok:
                assert stub.Infer(other, timeout=30).status.code == 0
            else:
                with pytest.raises(grpc.RpcError) as e:
                    stub.Infer(other, timeout=10)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sample rate of 1000 Hz" in e.value.details()


def test_the_cloud_refuses_offloads_missing_or_mismatching_audio_tokens(
        av_checkpoint: Path, av_cloud: tuple[str, Any]) -> None:
    address, _ = av_cloud
    card = read_card(av_checkpoint)
    model, _ = load_checkpoint(av_checkpoint)
    result = EdgeHalf(model, card.split_block).run(torch.randn(2, 3, 32, 32), [NEVER] * 4, "std",
                                                   audio=torch.randn(2, 1, 64, 64))
    codec = CodecConfig("float32")
    tokens, audio_tokens = encode(result.tokens, codec), encode(result.audio_tokens, codec)
    base = dict(model_fingerprint=card.fingerprint, split_block=card.split_block, tokens=tokens)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.OffloadStub(channel)
        assert list(stub.Describe(pb.DescribeRequest(), timeout=10).modalities) == ["visual", "audio"]
        cases = [
            (pb.OffloadRequest(request_id=1, **base), "carries no audio_tokens"),
            (pb.OffloadRequest(request_id=2, audio_tokens=encode(result.audio_tokens[:1], codec), **base),
             "2 samples of visual tokens but 1 of audio tokens"),
            (pb.OffloadRequest(request_id=3, audio_tokens=encode(result.tokens, codec), **base), "audio_tokens:"),
            (pb.OffloadRequest(request_id=4, audio_tokens=audio_tokens, modalities=["visual", "smell"], **base),
             "unknown modality 'smell'"),
            (pb.OffloadRequest(request_id=5, audio_tokens=audio_tokens, modalities=["visual", "audio"], **base), ""),
        ]
        replies = {r.request_id: r for r in stub.Infer(iter([c[0] for c in cases]), timeout=30)}
    for request, message in cases:
        reply = replies[request.request_id]
        if message:
            assert reply.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], reply
            assert message in reply.status.message
        else:  # the good one after the bad ones, on the same stream
            assert reply.status.code == 0 and list(reply.output_shape) == [2, 2]


def test_infer_command_sends_each_picture_with_its_clip(
        av_cloud: tuple[str, Any], start_av_edge: Callable[..., EdgeServer], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    edge = start_av_edge(cloud=(av_cloud[0],))
    files = save_crowd_samples(tmp_path, 2)
    images, clips = [str(p) for p, _ in files], [str(w) for _, w in files]
    assert main(["infer", "--edge", edge.address, *images, "--audio", *clips]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(" by cloud, confidence " in line for line in lines)
    assert main(["infer", "--edge", edge.address, *images, "--audio", clips[0]]) != 0
    assert "give one per file" in capsys.readouterr().err
    pictures, sounds = tmp_path / "pictures", tmp_path / "sounds"  # folders: their files in name order
    pictures.mkdir(), sounds.mkdir()
    for (image, clip), i in zip(files, "ab"):
        image.rename(pictures / f"{i}.png"), clip.rename(sounds / f"{i}.wav")
    assert main(["infer", "--edge", edge.address, str(pictures), "--audio", str(sounds), "--json"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert main(["infer", "--edge", edge.address, str(tmp_path / "pictures"), "--audio", str(tmp_path)]) != 0
    assert "holds no image or WAV files" in capsys.readouterr().err
