"""Training, checkpoints and the train/eval/bench commands, end to end on real data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from offramp.core.checkpoint import CARD, WEIGHTS, load_checkpoint
from offramp.cli import main
from offramp.core.data import load_data
from offramp.core.errors import CheckpointError
from offramp.training.pipeline import TrainJob, build_model
from offramp.training.train import TrainConfig, evaluate, train_backbone, train_exits

ROOT = Path(__file__).resolve().parents[1]


def offramp(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offramp.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "digits"
    code = main(["train", "--data", "digits", "--model", "vit_micro_32", "--exits", "mlp@2,slvit@2,slvit@4",
                 "--out", str(out), "--epochs", "2", "--exit-epochs", "1", "--copycat", "--copycat-epochs", "1",
                 "--limit", "400", "--no-progress"])
    assert code == 0
    return out


def test_train_writes_safetensors_and_card(trained: Path) -> None:
    assert (trained / WEIGHTS).is_file()
    card = json.loads((trained / CARD).read_text())
    assert len(card["fingerprint"]) == 64
    assert card["label_names"] == [str(i) for i in range(10)]
    assert card["split_block"] == 4 and card["modality"] == "image" and card["input_shape"] == [1, 32, 32]
    assert [e["type"] for e in card["config"]["exits"]] == ["mlp", "slvit", "slvit"]
    assert {"exits", "copycat", "training", "backbone"} <= set(card["metrics"])
    assert card["metrics"]["training"]["epochs"] == 2 and "--copycat" in card["metrics"]["training"]["command"]
    assert set(card["metrics"]["copycat"]) == {"mlp@2", "slvit@2", "slvit@4", "final"}
    model, loaded = load_checkpoint(trained)
    assert loaded.fingerprint == card["fingerprint"] and model.exit_names == ["mlp@2", "slvit@2", "slvit@4"]


def test_eval_json_reports_every_head_with_costs_and_shares(trained: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(trained), "--json", "--thresholds", "0.0,0.6,1.01"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [h["name"] for h in report["heads"]]
    assert names == ["mlp@2", "slvit@2", "slvit@4", "final"]
    for h in report["heads"]:
        assert 0.0 <= h["accuracy"] <= 1.0 and h["params"] > 0 and h["macs"] > 0
    assert report["heads"][-1]["macs"] > report["heads"][0]["macs_to_answer"]
    lo, _, hi = report["cascade"]
    assert lo["shares"][0] == 1.0  # threshold 0: the first exit takes everything
    assert hi["shares"][-1] == 1.0 and hi["accuracy"] == report["heads"][-1]["accuracy"]
    assert all(abs(sum(r["shares"]) - 1) < 1e-9 for r in report["cascade"])


def test_eval_prints_tables(trained: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(trained)]) == 0
    out = capsys.readouterr().out
    assert "slvit@4" in out and "MACs" in out and "final/cloud" in out


def test_training_learns_and_copycat_imitates_the_backbone() -> None:
    data = load_data("digits", seed=0)
    model, _ = build_model(TrainJob(model="resnet_tiny_32", exits="slvit@1"), data)
    cfg = TrainConfig(epochs=2, exit_epochs=2, batch_size=64, flip=False, progress=False)
    torch.manual_seed(0)
    train_backbone(model, data.train, cfg)
    train_exits(model, data.train, cfg)
    before = evaluate(model, data.val)
    assert before[-1].summary()["accuracy"] > 0.5  # far above chance (0.1) after two epochs
    train_exits(model, data.train, cfg, targets="hard", epochs=3)
    after = evaluate(model, data.val)
    agree = lambda res: (res[0].pred == res[-1].pred).mean()  # noqa: E731
    assert agree(after) >= agree(before) - 0.02


def test_tampered_weights_are_refused(trained: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / CARD).write_text((trained / CARD).read_text())
    state = load_file(trained / WEIGHTS)
    state["backbone.head_fc.bias"] = state["backbone.head_fc.bias"] + 1.0
    save_file(state, copy / WEIGHTS)
    with pytest.raises(CheckpointError, match="fingerprint mismatch"):
        load_checkpoint(copy)


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "imagefolder:/no/such/dir", "--out", "x"], "does not exist"),
    (["train", "--data", "bogus", "--out", "x"], "unknown data spec 'bogus'"),
    (["train", "--model", "vit_huge", "--out", "x", "--limit", "50"], "unknown model variant 'vit_huge'"),
    (["train", "--exits", "conv@2", "--out", "x", "--limit", "50"], "unknown exit type 'conv'"),
    (["eval", "/no/such/checkpoint"], "does not exist"),
])
def test_user_errors_are_one_line_without_traceback(args: list[str], message: str, tmp_path: Path) -> None:
    result = offramp(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([ln for ln in result.stderr.splitlines() if ln.startswith("offramp: error")]) == 1


def test_corrupt_image_and_wrong_checkpoint_are_named(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "cat" / "broken.png").write_bytes(b"not a png at all")
    result = offramp("train", "--data", f"imagefolder:{tmp_path / 'imgs'}", "--out", "x", cwd=tmp_path)
    assert result.returncode == 2 and "broken.png" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "notackpt").mkdir()
    (tmp_path / "notackpt" / CARD).write_text("{ not json")
    result = offramp("eval", "notackpt", cwd=tmp_path)
    assert result.returncode == 2 and "not a valid model card" in result.stderr


def test_exits_benchmark_quick_runs(tmp_path: Path) -> None:
    out = tmp_path / "exits.json"
    result = subprocess.run([sys.executable, "-m", "bench.exits", "--quick", "--out", str(out),
                             "--checkpoints", ""], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**__import__("os").environ, "OFFRAMP_DATA": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = data["results"][0]["rows"]
    assert {r["exit"] for r in rows} >= {"MLP", "CNN", "SL-ViT", "CC-SL-ViT"}
    assert "position" in result.stdout and "CC-SL-ViT" in result.stdout
    assert out.with_suffix(".png").is_file()
    claims = next(iter(data["results"][0]["verdict"].values()))
    beats = claims["slvit_beats_cnn"]  # a verdict with its paired standard error, not a bare comparison
    assert beats["verdict"] in ("yes", "no", "tie") and beats["paired"] is True and beats["se_points"] >= 0
    assert "soft_copycat_helps" in claims and "+-" in result.stdout


def test_version_and_verbose_anywhere(capsys: pytest.CaptureFixture) -> None:
    from offramp import __version__
    from offramp.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out
    assert build_parser().parse_args(["models", "-v"]).verbose is True
    assert build_parser().parse_args(["-v", "models"]).verbose is True
    assert build_parser().parse_args(["models"]).verbose is False
    assert build_parser().parse_args(["policy", "get", "--edge", "h:1", "-v"]).verbose is True
