"""The emulated device charged by a measured cost table: the same work, the same device time, in any process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from offramp.core.errors import OfframpError
from offramp.core.halves import EdgeResult
from offramp.netem import profiles
from offramp.netem.device_costs import DeviceCosts, entering, load_or_measure

EXITS = ("slvit@2", "slvit@4")


def result(exit_index: list[int]) -> EdgeResult:
    b = len(exit_index)
    return EdgeResult(torch.tensor(exit_index), torch.zeros(b, dtype=torch.long), torch.zeros(b, 10), torch.zeros(b),
                      torch.tensor([i for i, e in enumerate(exit_index) if e < 0]), torch.empty(0), None)


def table() -> DeviceCosts:
    # segment 0 (blocks to exit 1 and its head), 1 (to exit 2), 2 (to the split), at batch 1, 2, 3
    return DeviceCosts("f" * 64, "cpu", 3, {4: (EXITS, ((10.0, 16.0, 21.0), (4.0, 6.0, 8.0), (1.0, 1.5, 2.0)))})


def test_a_batch_is_charged_each_segment_at_the_samples_that_entered_it() -> None:
    assert entering([0, -1, 1, -1, 0], 2) == [5, 3, 2]  # two left at exit 1, one at exit 2, two went on
    assert entering([0, 0], 2) == [2, 0, 0]
    costs = table()
    assert costs.batch_s(4, result([0])) == pytest.approx(0.010)
    assert costs.batch_s(4, result([1, -1, 0])) == pytest.approx((21.0 + 6.0 + 1.0) / 1e3)
    # beyond the table: its largest batch, per sample
    assert costs.batch_s(4, result([0] * 6)) == pytest.approx(21.0 * 6 / 3 / 1e3)


def test_slowed_by_a_cost_sleeps_for_the_tables_time_not_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(profiles.time, "sleep", slept.append)
    run = profiles.slowed(lambda r: r, 8.0, cpu_clock=True, cost=lambda r: 0.010)
    assert run("answer") == "answer"
    assert 0.080 - 0.05 < slept[0] <= 0.080  # 8 x 10 ms, less the moment the call itself took


def test_a_table_is_measured_once_then_loaded_and_checked(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from offramp.core.checkpoint import load_checkpoint
    from offramp.core.halves import EdgeHalf

    model, card = load_checkpoint(tiny_checkpoint)
    half = EdgeHalf(model, card.split_block, "cpu", "float32", None)
    path = tmp_path / "costs" / "device_costs.json"
    measured = load_or_measure(path, [half], card.fingerprint, card.input_shape, "max_prob", max_batch=3)
    exits, segments = measured.splits[card.split_block]
    assert exits == tuple(half.exit_names) and len(segments) == half.num_exits + 1
    assert all(len(row) == 3 and min(row) >= 0 for row in segments) and sum(segments[0]) > 0
    assert json.loads(path.read_text())["fingerprint"] == card.fingerprint
    assert load_or_measure(path, [half], card.fingerprint, card.input_shape, "max_prob", 3) == measured  # loaded
    with pytest.raises(OfframpError, match="another checkpoint"):
        load_or_measure(path, [half], "0" * 64, card.input_shape, "max_prob", 3)
    path.write_text(json.dumps({"fingerprint": card.fingerprint, "max_batch": 3,
                                "splits": {str(card.split_block): {"exits": list(exits), "segments_ms": [[1.0]]}}}))
    with pytest.raises(OfframpError, match="segments"):
        load_or_measure(path, [half], card.fingerprint, card.input_shape, "max_prob", 3)
    path.write_text("{not json")
    with pytest.raises(OfframpError, match="cannot read"):
        load_or_measure(path, [half], card.fingerprint, card.input_shape, "max_prob", 3)


def test_an_edge_with_device_costs_charges_its_batches_by_the_table(tiny_checkpoint: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_node.server import build_engine
    from offramp.serving.config import EdgeConfig

    costs_path = tmp_path / "device_costs.json"
    engine = build_engine(EdgeConfig(checkpoint=str(tiny_checkpoint), slowdown=4.0, device_costs=str(costs_path),
                                     max_batch=2, threads=1))
    costs = DeviceCosts.from_json(json.loads(costs_path.read_text()))
    slept: list[float] = []
    monkeypatch.setattr(profiles.time, "sleep", slept.append)
    split = engine.half.split_block
    x = torch.zeros(2, *engine.card.input_shape)
    out = engine._run_halves[split](x, [2.0] * engine.half.num_exits, "max_prob")  # no exit answers: all go on
    charged = 4.0 * costs.batch_s(split, out)
    assert charged == pytest.approx(4.0 * sum(row[1] for row in costs.splits[split][1]) / 1e3)
    assert charged - 0.05 < slept[0] <= charged  # the table's time, less the call's own
    with pytest.raises(ValueError, match="slowdown above 1"):
        EdgeConfig(checkpoint=str(tiny_checkpoint), device_costs=str(costs_path))


def test_the_whole_models_row_charges_by_batch_size_and_survives_json() -> None:
    costs = DeviceCosts("f" * 64, "cpu", 3, {}, whole_ms=(12.0, 20.0, 27.0))
    assert costs.whole_s(2) == pytest.approx(0.020)
    assert costs.whole_s(6) == pytest.approx(27.0 * 6 / 3 / 1e3)  # beyond the row: its largest batch, per sample
    assert DeviceCosts.from_json(json.loads(json.dumps(costs.to_json()))) == costs
    with pytest.raises(OfframpError, match="whole model"):
        table().whole_s(1)
    with pytest.raises(OfframpError, match="whole_ms"):
        DeviceCosts.from_json({**costs.to_json(), "whole_ms": [-1.0]})


def test_edges_and_the_edge_only_baseline_add_their_parts_to_one_table(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from offramp.core.checkpoint import load_checkpoint
    from offramp.core.halves import EdgeHalf
    from offramp.netem.device_costs import load_or_measure_whole

    model, card = load_checkpoint(tiny_checkpoint)
    half = EdgeHalf(model, card.split_block, "cpu", "float32", None)
    path = tmp_path / "device_costs.json"
    calls: list[int] = []

    def whole(x: torch.Tensor, audio: torch.Tensor | None) -> torch.Tensor:
        calls.append(x.shape[0])
        return model.final(x)

    # The baseline starts first: it measures the whole model alone ...
    first = load_or_measure_whole(path, whole, card.fingerprint, card.input_shape, 2)
    assert first.splits == {} and len(first.whole_ms) == 2 and calls
    # ... the edge adds its split and keeps the whole model's row ...
    edge = load_or_measure(path, [half], card.fingerprint, card.input_shape, "max_prob", max_batch=2)
    assert card.split_block in edge.splits and edge.whole_ms == first.whole_ms
    # ... and from then on both load it without measuring again.
    calls.clear()
    assert load_or_measure_whole(path, whole, card.fingerprint, card.input_shape, 2) == edge and not calls
    assert load_or_measure(path, [half], card.fingerprint, card.input_shape, "max_prob", 2) == edge
    with pytest.raises(OfframpError, match="another checkpoint"):
        load_or_measure_whole(path, whole, "0" * 64, card.input_shape, 2)


def test_the_edge_only_baseline_charges_the_whole_models_time_from_the_table(
        tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.baselines import FullModelServer

    path = tmp_path / "device_costs.json"
    server = FullModelServer(str(tiny_checkpoint), "edge", slowdown=4.0, max_batch=2, device_costs=str(path))
    costs = DeviceCosts.from_json(json.loads(path.read_text()))
    slept: list[float] = []
    monkeypatch.setattr(profiles.time, "sleep", slept.append)
    server._forward(torch.zeros(2, *server.card.input_shape), None)
    charged = 4.0 * costs.whole_ms[1] / 1e3
    assert charged - 0.05 < slept[0] <= charged
