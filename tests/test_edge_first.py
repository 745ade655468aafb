"""Edge-first models and the cost-aware cascade: exits inside the tokenizer, joint exit training, mean MACs
per input, calibration to a speed-up, and the selection split."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from offramp.training.calibrate import Target, calibrate, cheapest_within
from offramp.cli import main
from offramp.core.checkpoint import load_checkpoint
from offramp.core.data import load_data
from offramp.core.errors import DataError
from offramp.training.initial import load_tokenizer_from
from offramp.core.models import ModelConfig, MultiExitModel, create_backbone, parse_exits
from offramp.core.models.cost import StepFlops, count_macs
from offramp.training.report import cascade, head_costs
from offramp.training.train import HeadResult, TrainConfig, train_backbone


def head(name: str, confidence: list[float], correct: list[bool]) -> HeadResult:
    return HeadResult(name, np.zeros(len(correct)), np.array(confidence, np.float32), np.array(correct), None)


def edge_model(exits: str = "slvit@2,slvit@3,slvit@5", **backbone_options) -> MultiExitModel:
    options = {"embed_dim": 32, "depth": 2, "num_heads": 2, "airbench_tokenizer": (8, 16), **backbone_options}
    return MultiExitModel(ModelConfig("edge_c10", (32, 32), 3, 10, exits=parse_exits(exits),
                                      backbone_options=options)).eval()


def test_tokenizer_layers_are_blocks_and_the_split_is_exact() -> None:
    model = edge_model()
    bb = model.backbone
    assert bb.num_blocks == 4 + 2
    assert [bb.feature_spec(p).kind for p in range(bb.num_blocks + 1)] == ["map"] * 5 + ["tokens"] * 2
    assert bb.feature_spec(2).shape == (8, 16, 16) and bb.feature_spec(3).shape == (16, 8, 8)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        whole = bb(x)
        for split in range(bb.num_blocks + 1):
            assert torch.equal(bb.tail(bb.head(x, split), split), whole), split
    with pytest.raises(ValueError, match="conv layer of the tokenizer"):
        bb.transformer_block(1)
    assert bb.transformer_block(4) is bb.blocks[0]


def test_tokenizer_still_loads_from_an_airbench_teacher() -> None:
    model = edge_model()
    teacher = create_backbone("airbench_c10", widths=(8, 16, 16))
    load_tokenizer_from(model.backbone, teacher)
    assert torch.equal(model.backbone.patch_embed.blocks[3].conv.weight, teacher.blocks[3].conv.weight)


def test_mean_macs_of_a_cascade_by_hand() -> None:
    """Two exits and the final head on four samples; answering costs 10, 25 (10 + 15) and 100 + 5."""
    results = [head("a", [0.95, 0.5, 0.5, 0.99], [True, True, False, True]),
               head("b", [0.0, 0.95, 0.2, 0.0], [False, True, False, False]),
               head("final", [1.0] * 4, [True] * 4)]
    costs = [{"macs": 4, "macs_to_answer": 10}, {"macs": 1, "macs_to_answer": 25},
             {"macs": 100, "macs_to_answer": 105}]
    (row,) = cascade(results, "max_prob", [0.9], costs)
    # samples 0 and 3 leave at a (10 each), sample 1 at b (25), sample 2 goes on (105)
    assert row["shares"] == [0.5, 0.25, 0.25]
    assert row["mean_macs"] == pytest.approx((10 + 25 + 105 + 10) / 4)
    assert row["macs_speedup"] == pytest.approx(100 / 37.5)
    assert row["accuracy"] == 1.0


def test_head_costs_count_every_exit_tried_on_the_way() -> None:
    model = edge_model()
    costs = head_costs(model, (3, 32, 32))
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        own = [count_macs(lambda f, i=i: model.run_exit(i, f), model.backbone.head(x, e.position))
               for i, e in enumerate(model.exit_configs)]
        to_second = count_macs(lambda t: model.backbone.head(t, 3), x) + own[0] + own[1]
        full = count_macs(model.backbone, x)
    assert costs[1]["macs_to_answer"] == to_second
    assert costs[-1]["macs"] == full and costs[-1]["macs_to_answer"] == full + sum(own)
    with torch.no_grad():  # an exit inside the tokenizer pays for two conv layers, not the whole tokenizer
        assert costs[0]["macs_to_answer"] == count_macs(lambda t: model.backbone.head(t, 2), x) + own[0]


EXITS = [head("a", [0.99, 0.95, 0.6, 0.5], [True, True, False, False]),
         head("b", [0.9, 0.9, 0.97, 0.4], [True, True, True, False])]
FINAL = head("final", [1.0] * 4, [True] * 4)
COSTS = [10.0, 30.0, 110.0]  # leaving at a, at b, going on


@pytest.mark.parametrize("speedup, accuracy, mean_macs", [
    (1.0, 1.0, (10 + 10 + 30 + 110) / 4),  # anything goes: the best accuracy, then the least compute
    (2.5, 1.0, (10 + 10 + 30 + 110) / 4),  # exactly at 40 MACs the full accuracy still fits
    (3.0, 0.75, (10 + 10 + 30 + 30) / 4),  # at most 33.3: nothing may go on, b answers the rest
    (10.0, 0.5, 10.0),  # every sample at the first exit
])
def test_calibration_to_a_speedup(speedup: float, accuracy: float, mean_macs: float) -> None:
    result = calibrate(EXITS, FINAL, "max_prob", Target(min_speedup=speedup), costs=COSTS, full_macs=100.0)
    assert (result.chosen.quality, result.chosen.mean_macs) == (accuracy, mean_macs)
    assert 100.0 / result.chosen.mean_macs >= speedup
    assert "below the full model's" in result.summary()


def test_cheapest_within_an_accuracy_drop() -> None:
    point = cheapest_within(EXITS, FINAL, "max_prob", 25, COSTS)
    assert point.quality == 0.75 and point.mean_macs == (10 + 10 + 30 + 30) / 4


def test_an_unreachable_speedup_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match=r"no threshold setting reaches a 20x speed-up: at most 10.00x"):
        calibrate(EXITS, FINAL, "max_prob", Target(min_speedup=20), costs=COSTS, full_macs=100.0)
    with pytest.raises(ValueError, match="exactly one target"):
        Target(accuracy_drop=1, min_speedup=2)
    with pytest.raises(ValueError, match="positive"):
        Target(min_speedup=0)


def test_cli_speedup_target_and_its_errors(tiny_checkpoint: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    toml = tmp_path / "edge.toml"
    assert main(["calibrate", str(tiny_checkpoint), "--target-speedup", "1.2", "--out", str(toml)]) == 0
    out = capsys.readouterr().out
    assert "mean compute" in out and "below the full model's" in out
    assert main(["calibrate", str(tiny_checkpoint), "--target-speedup", "1000", "--out", str(toml)]) != 0
    err = capsys.readouterr().err.strip()
    assert "no threshold setting reaches a 1000x speed-up" in err and len(err.splitlines()) == 1
    assert main(["calibrate", str(tiny_checkpoint), "--target-speedup", "2", "--on", "selection",
                 "--out", str(toml)]) != 0
    assert "without a selection split" in capsys.readouterr().err


def test_an_unknown_variant_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--model", "edge_c11", "--out", str(tmp_path / "m"), "--limit", "50"]) != 0
    err = capsys.readouterr().err.strip()
    assert "unknown model variant 'edge_c11'" in err and "edge_c10" in err and len(err.splitlines()) == 1


def test_eval_reports_mean_macs_per_row(tiny_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "mean MACs" in out and "speed-up" in out


def test_joint_training_trains_the_exits_with_the_backbone() -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)))
    cfg = TrainConfig(epochs=1, batch_size=32, precision="fp32", progress=False, augment=False)
    for weight, moves in ((0.0, False), (1.0, True)):
        model = edge_model()
        before = [p.detach().clone() for p in model.exits.parameters()]
        timing = train_backbone(model, data, TrainConfig(**{**cfg.__dict__, "exit_loss_weight": weight}))
        moved = any(not torch.equal(a, b) for a, b in zip(before, model.exits.parameters()))
        assert moved == moves
        assert timing["flops_per_sample_step"] > 2 * count_macs(model.backbone, torch.zeros(1, 3, 32, 32))


def test_step_flops_add_up_forward_and_backward() -> None:
    layer = torch.nn.Linear(8, 4)
    counter = StepFlops()
    x = torch.randn(2, 8)
    with counter:
        y = layer(x).sum()
    forward = counter.total
    with counter:
        y.backward()
    assert forward == 2 * 2 * 8 * 4 and counter.total > forward
    assert math.isclose(counter.per_sample(2), counter.total / 2)


def test_selection_split_is_held_out_and_validation_stays_the_same() -> None:
    plain, held = load_data("digits", seed=3), load_data("digits", seed=3, selection_fraction=0.1)
    assert plain.selection is None
    assert torch.equal(plain.val.tensors[0], held.val.tensors[0])
    n = len(plain.train) + len(plain.val)
    assert len(held.selection) == round(0.1 * n) and len(held.train) == len(plain.train) - len(held.selection)
    with pytest.raises(DataError, match="selection fraction"):
        load_data("digits", val_fraction=0.5, selection_fraction=0.5)


def test_bench_writes_the_promised_fields(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from bench import edge_first

    out = tmp_path / "edge_first.json"
    assert edge_first.main(["--model", f"tiny={tiny_checkpoint}", "--no-onnx", "--timing-samples", "3",
                            "--thresholds", "0.5,0.9", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"command", "machine", "models"} <= set(result) and result["machine"]["cpu"]
    (m,) = result["models"]
    assert {"variant", "val_accuracy", "full_macs", "exits", "cascade", "best_within_half_point"} <= set(m)
    assert [set(e) >= {"name", "cumulative_macs", "accuracy"} for e in m["exits"]] == [True, True]
    assert len(m["cascade"]) == 3 and all(set(r) >= {"thresholds", "accuracy", "mean_macs", "mean_edge_ms", "shares"}
                                          for r in m["cascade"])
    assert m["exits"][0]["cumulative_macs"] < m["exits"][1]["cumulative_macs"] < m["full_macs"]
    assert set(m["best_within_half_point"]) >= {"thresholds", "accuracy_loss_points", "macs_speedup", "time_speedup"}
    assert m["chosen_on"].startswith("validation")  # the tiny checkpoint has no selection split, and says so
    assert out.with_suffix(".png").stat().st_size > 0
    assert edge_first.main(["--model", f"tiny={tiny_checkpoint}@slvit@9", "--no-onnx", "--out", str(out)]) == 2


def test_a_margin_in_standard_errors_keeps_the_choice_inside_the_drop() -> None:
    from offramp.training.calibrate import Target, calibrate

    # 100 samples; the full model right on all. The exit is sure of all of them and right on 99: answering
    # everything there loses 1 point with a standard error of 1 point. A 1.5-point drop allows it; with
    # one standard error to spare (1 + 1 > 1.5) the exit may keep only what leaves room.
    n = 100
    correct = np.ones(n, bool)
    correct[0] = False
    exit_ = HeadResult("e", np.zeros(n), np.full(n, 0.99, np.float32), correct, None)
    final = HeadResult("final", np.zeros(n), np.full(n, 0.99, np.float32), np.ones(n, bool), None)
    plain = calibrate([exit_], final, "max_prob", Target(accuracy_drop=1.5))
    assert plain.chosen.offload == 0.0 and plain.chosen.loss_se == pytest.approx(0.01)
    careful = calibrate([exit_], final, "max_prob", Target(accuracy_drop=1.5, margin_se=1.0))
    assert careful.chosen.offload == 1.0  # the only setting with the margin kept: everything to the full model
    with pytest.raises(ValueError, match="applies to an accuracy-drop target"):
        Target(max_offload=0.5, margin_se=1.0)


def test_stage_times_cover_every_stage_and_their_macs_add_up(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from bench.edge_first import main, stage_times

    model, _ = load_checkpoint(tiny_checkpoint)
    rows = stage_times(str(tiny_checkpoint), reps=2, rounds=1)
    names = [r["stage"] for r in rows]
    blocks = model.backbone.num_blocks
    assert names == ["stem", *(f"block {b + 1}" for b in range(blocks)),
                     *(f"exit {e.name}" for e in model.exit_configs), "whole model"]
    assert all(r["ms"] > 0 for r in rows)
    parts = sum(r["macs"] for r in rows if r["stage"] == "stem" or r["stage"].startswith("block"))
    assert parts <= rows[-1]["macs"] <= 1.05 * parts  # the whole model is its stages and the head
    with pytest.raises(SystemExit):
        main(["--stages", str(tiny_checkpoint), "--model", f"x={tiny_checkpoint}"])
