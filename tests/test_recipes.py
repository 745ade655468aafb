"""Fast training: augmented views, the airbench CNN and CCT backbones, recipes, teachers,
cached exit features, --init, and the one-line errors around them. Tiny data, real training."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from offramp.core import precision
from offramp.cli import main
from offramp.core.checkpoint import load_checkpoint
from offramp.core.data import load_data
from offramp.core.models import create_backbone
from offramp.training.pipeline import TrainJob, build_model
from offramp.training.recipes import RECIPES, recipe_for
from offramp.training.train import (Lookahead, TrainConfig, apply_views, cache_features, epoch_views, evaluate,
                           train_backbone, train_exits)

def test_views_flip_and_shift_each_sample_its_own_way() -> None:
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5)
    out = apply_views(x, torch.tensor([True, False]), torch.tensor([[0, 0], [1, -2]]), pad=2)
    assert torch.equal(out[0], x[0].flip(-1))
    padded = torch.nn.functional.pad(x[1:], (2, 2, 2, 2), mode="reflect")[0]
    assert torch.equal(out[1], padded[:, 3:8, 0:5])  # down one row, left two columns, borders reflected


def test_flips_alternate_between_epochs_and_shifts_change() -> None:
    cfg = TrainConfig(translate=2)
    a, b, c = (epoch_views(1000, e, cfg) for e in range(3))
    assert bool((a.flip ^ b.flip).all()) and torch.equal(a.flip, c.flip)
    assert not torch.equal(a.shift, b.shift) and int(a.shift.abs().max()) == 2


@pytest.mark.parametrize("variant", ["airbench_c10", "cct_c10", "hybrid_c10"])
def test_new_backbones_split_anywhere_bit_identically(variant: str) -> None:
    torch.manual_seed(0)
    bb = create_backbone(variant).eval()
    x = torch.randn(3, 3, 32, 32)
    full = bb(x)
    for k in range(bb.num_blocks + 1):
        assert torch.equal(bb.tail(bb.head(x, k), k), full)
        assert tuple(bb.head(x, k).shape[1:]) == bb.feature_spec(k).shape
    if variant != "airbench_c10":
        spec = bb.feature_spec(2)
        assert spec.kind == "tokens" and spec.grid == (8, 8) and spec.num_prefix == 1
    else:
        assert [bb.feature_spec(k).grid for k in (1, 3, 5)] == [(16, 16), (8, 8), (4, 4)]


def test_whitening_stem_decorrelates_image_patches() -> None:
    bb = create_backbone("airbench_c10")
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.randn(200, 3, 8, 8), size=32, mode="bilinear")
    x = smooth + 0.2 * torch.randn(200, 3, 32, 32)  # neighbouring pixels strongly correlated
    bb.init_from_data(x)
    k = bb.whiten.kernel_size[0]
    patches = x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k)
    white = patches @ bb.whiten.weight[:12].reshape(12, -1).T
    cov = white.T @ white / len(white)
    assert torch.allclose(cov, torch.eye(12), atol=0.05)


def test_lookahead_ends_on_its_average() -> None:
    lin = torch.nn.Linear(2, 2)
    la = Lookahead(lin, total_steps=10, every=1)
    start = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    la.step(10)  # at the end the average moves slowly (decay 0.95): the weights are pulled back
    assert torch.all(lin.weight < start + 1.0) and torch.all(lin.weight > start)
    la.finish()
    assert torch.equal(lin.weight, la.average["weight"])


def test_recipes_know_their_fields_and_variants() -> None:
    assert recipe_for("airbench_c10")[0] == "airbench_c10" and recipe_for("vit_micro_32")[0] == "default"
    assert RECIPES["cct_c10"].teacher == "airbench_c10"
    cfg = RECIPES["airbench_c10"].config(epochs=3, lr=None)
    assert cfg.epochs == 3 and cfg.optimizer == "sgd" and cfg.averaging == "lookahead"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """airbench_c10 on 400 digits with its recipe (shortened), exits on cached features."""
    out = tmp_path_factory.mktemp("recipes") / "airbench"
    assert main(["train", "--data", "digits", "--model", "airbench_c10", "--exits", "cnn@2,slvit@2",
                 "--epochs", "8", "--exit-epochs", "2", "--limit", "400", "--batch-size", "32", "--out", str(out),
                 "--no-progress"]) == 0
    return out


def test_recipe_training_records_how_it_was_made(teacher: Path) -> None:
    card = json.loads((teacher / "card.json").read_text())
    training = card["metrics"]["training"]
    assert training["recipe"] == "airbench_c10" and training["epochs"] == 8
    assert training["dtype"] in ("bf16", "fp32") and training["wall_s"] > 0 and training["img_per_s"] > 0
    assert "--model airbench_c10" in training["command"]
    assert card["metrics"]["backbone"]["accuracy"] > 0.5  # digits, far above chance after 8 short epochs
    assert "backbone_tta" in card["metrics"]  # the recipe evaluates with test-time augmentation too


def test_student_distills_from_a_teacher_checkpoint(teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "cct"
    assert main(["train", "--data", "digits", "--model", "cct_c10", "--exits", "slvit@1", "--teacher", str(teacher),
                 "--epochs", "1", "--exit-epochs", "1", "--limit", "400", "--out", str(out), "--no-progress"]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["metrics"]["training"]["teacher"]["fingerprint"] == load_checkpoint(teacher)[1].fingerprint


def test_hybrid_tokenizer_starts_as_the_teachers_first_layers(teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "hybrid"
    assert main(["train", "--data", "digits", "--model", "hybrid_c10", "--exits", "slvit@1", "--teacher", str(teacher),
                 "--epochs", "1", "--exit-epochs", "1", "--limit", "400", "--tokenizer-lr-scale", "0",
                 "--out", str(out), "--no-progress"]) == 0
    student, _ = load_checkpoint(out)
    source = load_checkpoint(teacher)[0].backbone.state_dict()
    tokenizer = student.backbone.patch_embed.state_dict()
    shared = [k for k in tokenizer if not k.startswith("proj.")]
    assert len(shared) > 20 and {k.split(".")[1] for k in shared if k.startswith("blocks.")} == {"0", "1", "2", "3"}
    for k in shared:  # frozen (scale 0): weights and BatchNorm statistics exactly the teacher's
        assert torch.equal(tokenizer[k], source[k]), k
    assert not torch.equal(student.backbone.blocks[0].mlp.fc1.weight, create_backbone("hybrid_c10").blocks[0].mlp.fc1.weight)


def test_hybrid_recipe_needs_an_airbench_teacher(in_tmp: Path, teacher: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["train", "--data", "digits", "--limit", "100", "--epochs", "1", "--out", "x", "--no-progress"]
    assert "needs a teacher" in one_line_error(capsys, *base, "--model", "hybrid_c10", "--teacher", "none")
    assert "no airbench tokenizer" in one_line_error(capsys, *base, "--model", "cct_c10", "--recipe", "hybrid_c10",
                                                     "--teacher", str(teacher))


def test_cached_features_are_the_backbones_own() -> None:
    torch.manual_seed(0)
    data = load_data("digits")
    model, _ = build_model(TrainJob(model="resnet_tiny_32", exits="slvit@2,mlp@4"), data)
    cfg = TrainConfig(epochs=2, batch_size=64, precision="fp32", exit_views=2, progress=False)
    train_backbone(model, data.train, cfg)
    cache = cache_features(model, data.train, cfg)
    x = data.train.tensors[0]
    assert set(cache.feats) == {2, 4}  # keyed by block position: one copy per position
    assert cache.feats[2].shape == (2, len(x), 32, 32, 32) and cache.feats[2].dtype == torch.bfloat16
    with torch.no_grad():
        direct = model.backbone.head(x, 2)
        final = model.final(x)
    assert torch.allclose(cache.feats[2][0].float(), direct, atol=0.05, rtol=0.02)
    assert torch.allclose(cache.final[0], final, atol=1e-4)
    assert not torch.equal(cache.feats[2][1], cache.feats[2][0])  # view 1: an augmented copy
    before = evaluate(model, data.val)[0].summary()["accuracy"]
    # 6 epochs: at 3 the SL-ViT exit on this CNN reaches 0.24-0.46 depending on torch's thread count, too
    # close to the bar; at 6, 0.49-0.54.
    train_exits(model, data.train, TrainConfig(exit_epochs=6, batch_size=64, precision="fp32", progress=False),
                cache=cache)
    after = evaluate(model, data.val)
    assert after[0].summary()["accuracy"] > before + 0.2 and after[1].summary()["accuracy"] > 0.5


def test_init_loads_a_checkpoints_backbone(teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    assert main(["train", "--data", "digits", "--model", "airbench_c10", "--exits", "mlp@4", "--init", str(teacher),
                 "--epochs", "0", "--exit-epochs", "1", "--limit", "400", "--out", str(out), "--no-progress"]) == 0
    source, _ = load_checkpoint(teacher)
    loaded, _ = load_checkpoint(out)
    for k, v in source.backbone.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[k], v), k


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def one_line_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    """Run the CLI in-process; it must exit 2 with one 'offramp: error' line and no traceback."""
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("offramp: error")]
    assert len(errors) == 1 and "Traceback" not in err, err[-800:]
    return errors[0]


def test_bad_recipe_init_and_pretrained_are_one_line_errors(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    save_file(create_backbone("vit_micro_32", in_chans=1).state_dict(), in_tmp / "wrong.safetensors")
    state = create_backbone("airbench_c10", in_chans=1).state_dict()
    state["head_fc.weight"] = torch.zeros(7, 256)
    save_file(state, in_tmp / "shaped.safetensors")
    (in_tmp / "junk.safetensors").write_bytes(b"not safetensors")
    base = ["train", "--data", "digits", "--model", "airbench_c10", "--limit", "100", "--out", "x", "--no-progress"]
    for extra, message in [
        (["--recipe", "nope"], "unknown recipe 'nope'"),
        (["--init", "missing.safetensors"], "does not exist"),
        (["--init", "junk.safetensors"], "is not a safetensors file"),
        (["--init", "wrong.safetensors"], "missing"),
        (["--init", "shaped.safetensors"], "head_fc.weight (7, 256) vs (10, 256)"),
        (["--pretrained"], "timm models only"),
    ]:
        assert message in one_line_error(capsys, *base, *extra), extra


def test_pretrained_without_a_hub_says_so(in_tmp: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("timm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_line_error(capsys, "train", "--data", "digits", "--model", "timm_vit_tiny_32", "--pretrained",
                          "--limit", "100", "--out", "x", "--no-progress")
    assert "not reachable" in line and "--init" in line


def test_bf16_where_unsupported_is_refused(in_tmp: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert precision.resolve_precision("auto", "cpu").dtype is None  # auto falls back to float32
    line = one_line_error(capsys, "train", "--data", "digits", "--precision", "bf16", "--device", "cpu",
                          "--limit", "50", "--out", "x", "--no-progress")
    assert "no fast bfloat16 support" in line and "--precision fp32" in line


def test_decoded_images_are_cached_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((32, 32, 3), 40 * i + (c == "b") * 9, np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    monkeypatch.setenv("OFFRAMP_CACHE", str(tmp_path / "cache"))
    first = load_data(f"imagefolder:{tmp_path / 'imgs'}", val_fraction=0.25)
    cached = list((tmp_path / "cache").glob("imagefolder-*.npy"))
    assert len(cached) == 1 and np.load(cached[0]).shape == (8, 3, 32, 32)
    again = load_data(f"imagefolder:{tmp_path / 'imgs'}", val_fraction=0.25)
    assert torch.equal(first.train.tensors[0], again.train.tensors[0])
    cached[0].write_bytes(b"garbage")  # a broken cache is rebuilt, not trusted
    assert torch.equal(load_data(f"imagefolder:{tmp_path / 'imgs'}", val_fraction=0.25).val.tensors[0], first.val.tensors[0])


def test_backbones_table_reads_the_cards(teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bench import backbones

    out = tmp_path / "backbones.json"
    assert backbones.main([str(teacher), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    (entry,) = data["backbones"]
    assert entry["variant"] == "airbench_c10" and entry["family"] == "cnn" and entry["data"] == "digits"
    assert 0.5 < entry["val_accuracy"] <= 1 and entry["epochs"] == 8 and entry["dtype"] in ("bf16", "fp32")
    assert entry["train_wall_s"] > 0 and data["command"].startswith("python -m bench.backbones")
    assert "airbench_c10" in capsys.readouterr().out


def test_a_teacher_that_saw_the_selection_split_is_named() -> None:
    from offramp.training.pipeline import TrainJob, teacher_saw_selection

    job = TrainJob(data="digits", model="vit_micro_32", out="x", selection_fraction=0.05)
    card = {"spec": "digits", "seed": 0, "val_fraction": 0.1, "limit": None}
    assert teacher_saw_selection(card, job)  # trained on everything but validation
    assert not teacher_saw_selection({**card, "selection_fraction": 0.05}, job)  # held the same split out
    assert not teacher_saw_selection({**card, "spec": "imagefolder:other"}, job)  # other data: not ours to judge
    assert not teacher_saw_selection(card, TrainJob(data="digits", model="vit_micro_32", out="x"))
