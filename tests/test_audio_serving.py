"""Spoken digits end to end: the FSDD spectrogram ViT served by a real edge and cloud over gRPC.

The edge decodes WAV bytes with the very front end training used, so what it
serves equals offline inference on ``preprocess_bytes``; odd rates are
resampled, unusable files and images are refused with the reason.
"""
from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import scipy.io.wavfile
import scipy.signal
import torch
from helpers import CloudFactory, LoopThread, wait_for
from PIL import Image

from edge_node.server import EdgeServer, serve
from offramp.core.checkpoint import load_checkpoint
from offramp.cli import main
from offramp.serving.config import EdgeConfig, replace_settings
from offramp.core.data import preprocess_bytes
from offramp.training.pipeline import TrainJob, run_training
from offramp.training.train import TrainConfig
from offramp.core.wire import pb, pb_grpc

ROOT = Path(__file__).resolve().parents[1]
NEVER, ALWAYS = [2.0, 2.0], [0.0, 0.0]  # max_prob thresholds: every sample to the cloud / the first exit answers
N_CLIPS = 10


@pytest.fixture(scope="module")
def archive(shared_data: Path) -> Path:
    path = shared_data / "fsdd-train.zip"
    if not path.is_file():
        pytest.skip(f"fsdd-train.zip not present in {shared_data}")
    return path


@pytest.fixture(scope="module")
def audio_checkpoint(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vit_tiny_spec with SL-ViT exits at blocks 2 and 4, briefly trained on 300 FSDD clips."""
    out = tmp_path_factory.mktemp("audio") / "checkpoint"
    job = TrainJob(data=f"fsdd:{archive}", model="vit_tiny_spec", exits="slvit@2,slvit@4", out=str(out), limit=300)
    run_training(job, TrainConfig(epochs=2, exit_epochs=1, progress=False))
    return out


@pytest.fixture(scope="module")
def clips(archive: Path) -> dict[str, bytes]:
    """``N_CLIPS`` real WAV files (8 kHz), spread over the digits and speakers."""
    with zipfile.ZipFile(archive) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".wav"))
        step = len(names) // N_CLIPS
        return {name: z.read(name) for name in names[::step][:N_CLIPS]}


@pytest.fixture(scope="module")
def servers(audio_checkpoint: Path) -> Iterator[tuple[str, EdgeServer]]:
    """A cloud and an edge serving the audio checkpoint, as ``(edge address, edge)``; float32 on the wire."""
    with CloudFactory(audio_checkpoint, {"grace_s": 1.0}) as start_cloud, LoopThread() as loop:
        cloud_address, _ = start_cloud()
        edge = loop.run(serve(replace_settings(
            EdgeConfig(checkpoint=str(audio_checkpoint)), cloud=(cloud_address,), codec="float32",
            thresholds=tuple(NEVER), reconnect_initial_s=0.05, reconnect_max_s=0.5, grace_s=1.0)))
        try:
            wait_for(lambda: edge.engine.offload.connected_to == cloud_address, 20,
                     what="the edge to pair with the cloud")
            yield edge.address, edge
        finally:
            loop.run(edge.stop())


@contextmanager
def edge_stub(address: str, thresholds: list[float] | None = None) -> Iterator[pb_grpc.EdgeStub]:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.EdgeStub(channel)
        if thresholds is not None:
            stub.SetPolicy(pb.Policy(thresholds=thresholds, score="max_prob", offload_enabled=True), timeout=10)
        yield stub


def wav(rate: int, samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    scipy.io.wavfile.write(buffer, rate, samples)
    return buffer.getvalue()


def at_16khz(data: bytes) -> bytes:
    """A real 8 kHz clip as it would have been recorded at 16 kHz."""
    rate, samples = scipy.io.wavfile.read(io.BytesIO(data))
    assert rate == 8000
    up = scipy.signal.resample_poly(samples.astype(np.float64), 2, 1)
    return wav(16000, np.clip(np.round(up), -32768, 32767).astype(np.int16))


def offline(checkpoint: Path, files: list[bytes]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Exit outputs and final outputs of the checkpoint for WAV files, decoded as training decodes them."""
    model, card = load_checkpoint(checkpoint)
    model.eval()
    x = torch.stack([preprocess_bytes(f, card.modality, card.input_shape) for f in files])
    with torch.no_grad():
        return model(x)


def outputs(replies: list[pb.InferReply]) -> torch.Tensor:
    return torch.tensor([list(r.output) for r in replies])


def infer_all(stub: pb_grpc.EdgeStub, files: list[bytes]) -> list[pb.InferReply]:
    stream = (pb.InferRequest(request_id=i, encoded_file=f) for i, f in enumerate(files))
    replies = sorted(stub.InferStream(stream, timeout=60), key=lambda r: r.request_id)
    assert [r.request_id for r in replies] == list(range(len(files)))
    assert all(r.status.code == 0 and not r.degraded for r in replies), [r.status.message for r in replies]
    return replies


def test_served_answers_equal_offline_inference(
        servers: tuple[str, EdgeServer], clips: dict[str, bytes], audio_checkpoint: Path) -> None:
    address, _ = servers
    files = list(clips.values())
    exits, final = offline(audio_checkpoint, files)
    with edge_stub(address, NEVER) as stub:
        cloud = infer_all(stub, files)
        assert all(r.decided_by == "cloud" and r.exit_index == -1 and r.bytes_sent > 0 for r in cloud)
        torch.testing.assert_close(outputs(cloud), final, atol=1e-4, rtol=1e-4)  # float32 codec: the full model
        assert [r.prediction for r in cloud] == final.argmax(-1).tolist()
        assert [r.label for r in cloud] == [str(p) for p in final.argmax(-1).tolist()]  # FSDD labels are the digits

        stub.SetPolicy(pb.Policy(thresholds=ALWAYS, score="max_prob", offload_enabled=True), timeout=10)
        local = infer_all(stub, files)
        assert all(r.decided_by == "exit:slvit@2" and r.exit_index == 0 and r.bytes_sent == 0 for r in local)
        torch.testing.assert_close(outputs(local), exits[0], atol=1e-4, rtol=1e-4)
        assert [r.prediction for r in local] == exits[0].argmax(-1).tolist()


def test_infer_command_prints_the_answer_and_where_it_was_decided(
        servers: tuple[str, EdgeServer], clips: dict[str, bytes], audio_checkpoint: Path, tmp_path: Path) -> None:
    address, _ = servers
    name, data = next(iter(clips.items()))
    clip = tmp_path / name
    clip.write_bytes(data)
    _, final = offline(audio_checkpoint, [data])
    digit = int(final.argmax())
    with edge_stub(address, NEVER):
        result = subprocess.run([sys.executable, "-m", "offramp.cli", "infer", "--edge", address, str(clip)],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf'{re.escape(str(clip))}: {digit} \("{digit}"\) by cloud, confidence [0-9.]+, '
                        r'[0-9.]+ ms\n', result.stdout), result.stdout


def test_a_16khz_clip_is_resampled_and_answered(
        servers: tuple[str, EdgeServer], clips: dict[str, bytes], audio_checkpoint: Path) -> None:
    address, _ = servers
    native = list(clips.values())[:3]
    wide = [at_16khz(f) for f in native]
    assert all(scipy.io.wavfile.read(io.BytesIO(f))[0] == 16000 for f in wide)
    x8 = torch.stack([preprocess_bytes(f, "audio", (1, 64, 64)) for f in native])
    x16 = torch.stack([preprocess_bytes(f, "audio", (1, 64, 64)) for f in wide])
    assert (x8 - x16).abs().mean() < 0.05  # the same spectrogram, up to resampling error
    _, final = offline(audio_checkpoint, wide)
    with edge_stub(address, NEVER) as stub:
        replies = infer_all(stub, wide)
    torch.testing.assert_close(outputs(replies), final, atol=1e-4, rtol=1e-4)


def png(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


BAD_AUDIO: dict[str, tuple[bytes, str]] = {
    "100 Hz": (wav(100, np.zeros(100, np.int16)), "has a sample rate of 100 Hz; clips must be recorded at 4000"),
    "2 MHz": (wav(2_000_000, np.zeros(2000, np.int16)), "has a sample rate of 2000000 Hz"),
    "no samples": (wav(8000, np.zeros(0, np.int16)), "has no samples"),
    "no channels": (wav(8000, np.zeros((100, 0), np.int16)), "declares 0 channels"),
    "NaN samples": (wav(8000, np.full(800, np.nan, np.float32)), "contains NaN or infinite samples"),
    "not a WAV": (b"RIFF\x00\x00garbage", "cannot decode encoded_file as audio: corrupt WAV file"),
    "a PNG image": (png(), "the model takes audio, expected a WAV file but got a PNG image"),
    "a JPEG image": (jpeg(), "the model takes audio, expected a WAV file but got a JPEG image"),
}


def test_unusable_files_are_refused_with_the_reason_and_the_edge_keeps_serving(
        servers: tuple[str, EdgeServer], clips: dict[str, bytes]) -> None:
    address, _ = servers
    good = next(iter(clips.values()))
    with edge_stub(address, ALWAYS) as stub:
        for what, (data, message) in BAD_AUDIO.items():
            with pytest.raises(grpc.RpcError) as error:
                stub.Infer(pb.InferRequest(encoded_file=data), timeout=10)
            assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT, what
            assert message in error.value.details(), (what, error.value.details())

        stream = [pb.InferRequest(request_id=i, encoded_file=data if i % 2 else good)
                  for i, (data, _) in enumerate(BAD_AUDIO.values())]
        replies = {r.request_id: r for r in stub.InferStream(iter(stream), timeout=30)}
    assert sorted(replies) == list(range(len(stream)))
    for i, reply in replies.items():
        expected = grpc.StatusCode.INVALID_ARGUMENT if i % 2 else grpc.StatusCode.OK
        assert reply.status.code == expected.value[0], (i, reply.status.message)


def test_demo_serves_the_audio_model(audio_checkpoint: Path, archive: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    shutil.copytree(audio_checkpoint, tmp_path / "model")  # the card names the same data spec: no retraining
    assert main(["demo", "--workdir", str(tmp_path), "--data", f"fsdd:{archive}"]) == 0
    out = capsys.readouterr().out
    assert "training the demo model" not in out
    assert "30 requests / 30 answers each" in out  # the card's validation split: 10% of 300 clips, three ways
    assert re.search(r"^split with exits\s+\d+\s+\d+", out, re.M) and "cloud stopped (status 0)" in out


def test_demo_retrains_a_checkpoint_trained_on_other_data(audio_checkpoint: Path, archive: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from offramp.cli import demo

    spec = f"fsdd:{archive}"
    assert demo._stale_reason(audio_checkpoint, spec, None) is None
    assert demo._stale_reason(audio_checkpoint, spec, "vit_tiny_spec") is None
    assert f"trained on '{spec}', not 'digits'" in demo._stale_reason(audio_checkpoint, "digits", None)
    assert "is a vit_tiny_spec, not a vit_micro_32" in demo._stale_reason(audio_checkpoint, spec, "vit_micro_32")
    assert demo._stale_reason(tmp_path / "model", spec, None) == "no checkpoint yet"

    trained: list[Any] = []
    monkeypatch.setattr(demo, "run_training", lambda job, cfg, data=None: trained.append((job, cfg)))
    monkeypatch.setattr(demo, "load_data", lambda spec, **kw: type("Splits", (), {"modality": "audio", "train": []}))
    assert demo.ensure_demo_model(tmp_path, data=spec) == tmp_path / "model"
    (job, cfg), = trained
    assert (job.data, job.model, job.exits, job.out) == (spec, None, "slvit@2,slvit@4", str(tmp_path / "model"))
    assert (cfg.epochs, cfg.exit_epochs, cfg.copycat) == (15, 5, "hard")  # None: vit_tiny_spec, by modality


def test_a_wav_for_an_image_model_is_named_as_such() -> None:
    from offramp.serving.inputs import InputError, request_tensor

    with pytest.raises(InputError, match="the model takes images, expected an image file but got a WAV file"):
        request_tensor(pb.InferRequest(encoded_file=wav(8000, np.zeros(800, np.int16))), "image", (1, 32, 32))
    assert request_tensor(pb.InferRequest(encoded_file=png(32)), "image", (1, 32, 32)).shape == (1, 32, 32)
