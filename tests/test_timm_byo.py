"""Bring your own model: ``--model timm:NAME`` takes any timm VisionTransformer (here DeiT-Tiny, random
weights written to a safetensors file by the test) at its own input size: split exactness at every block,
exits trained on it and reported by ``offramp eval``, a daemon pair answering; the errors a user meets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import LoopThread, edge_servers, wait_for

from offramp.cli import main
from offramp.core.checkpoint import load_checkpoint
from offramp.core.halves import CloudHalf, EdgeHalf

timm = pytest.importorskip("timm")
NAME = "deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def byo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DeiT-Tiny checkpoint trained briefly on 48 digits from weights in a safetensors file (timm's keys)."""
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("byo")
    weights = tmp / "deit_tiny.safetensors"
    source = timm.create_model(NAME, pretrained=False, in_chans=1, num_classes=10)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    out = tmp / "checkpoint"
    assert main(["train", "--data", "digits", "--model", f"timm:{NAME}", "--init", str(weights),
                 "--exits", "slvit@3,slvit@6", "--epochs", "0", "--exit-epochs", "1", "--batch-size", "16",
                 "--limit", "48", "--out", str(out), "--no-progress"]) == 0
    return out


def test_the_split_is_exact_at_every_block_and_inputs_are_resized(byo: Path) -> None:
    model, card = load_checkpoint(byo)
    assert card.config.backbone == f"timm:{NAME}" and model.backbone.num_blocks == 12
    assert model.backbone.resize_to == (224, 224)  # digits are 32x32: resized to what DeiT was built for
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, full = model(x)
        for split in range(0, 13, 3):
            edge = EdgeHalf(model, split, exits=[])
            tokens = edge.run(x, [], "max_prob").tokens
            assert tokens.shape[1:] == (197, 192)
            torch.testing.assert_close(CloudHalf(model, split).run(tokens), full, atol=1e-4, rtol=1e-4)


def test_exits_trained_on_it_are_reported_by_eval(byo: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(byo), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [h["name"] for h in report["heads"]] == ["slvit@3", "slvit@6", "final"]
    assert all(0 <= h["accuracy"] <= 1 and h["macs"] > 0 for h in report["heads"])
    weights = load_checkpoint(byo)[0].backbone.model.blocks[0].attn.qkv.weight
    assert weights.shape == (576, 192)


def test_a_daemon_pair_serves_it(byo: Path, loop: LoopThread) -> None:
    from helpers import CloudFactory

    from offramp.core.wire import pb, pb_grpc

    with CloudFactory(byo, {"grace_s": 1.0}) as start_cloud, \
            edge_servers(loop, byo, {"thresholds": (2.0, 2.0), "grace_s": 1.0}) as start_edge:
        address, _ = start_cloud()
        edge = start_edge(cloud=(address,))
        wait_for(lambda: edge.engine.offload.connected_to == address, 30, what="the edge to pair")
        import grpc

        x = torch.zeros(1, 32, 32)
        with grpc.insecure_channel(edge.address) as channel:
            reply = pb_grpc.EdgeStub(channel).Infer(pb.InferRequest(request_id=1, tensor=pb.RawTensor(
                shape=list(x.shape), data=x.numpy().astype("<f4").tobytes())), timeout=60)
    assert reply.decided_by == "cloud" and not reply.degraded and 0 <= reply.prediction < 10


@pytest.mark.parametrize(("model", "message"), [
    ("timm:resnet18", "is not a VisionTransformer"),
    ("timm:no_such_vit", "timm has no model 'no_such_vit'"),
])
def test_models_the_adapter_cannot_take_are_named(model: str, message: str, capsys: pytest.CaptureFixture,
                                                   tmp_path: Path) -> None:
    assert main(["train", "--data", "digits", "--model", model, "--limit", "20", "--epochs", "0",
                 "--exit-epochs", "0", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_pretrained_without_a_hub_is_one_clear_line(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    assert main(["train", "--data", "digits", "--model", f"timm:{NAME}", "--pretrained", "--limit", "20",
                 "--epochs", "0", "--exit-epochs", "0", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--pretrained: timm could not load weights" in err and "--init PATH" in err and err.count("\n") == 1

