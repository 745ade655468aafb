"""The CNN capacity study: grid points parsed, trained for real on a few hundred digits, merged with CPU speeds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import cnn_capacity


def test_grid_points_name_widths_epochs_and_settings() -> None:
    assert cnn_capacity.parse_point("64,256,256") == ((64, 256, 256), None, {})
    assert cnn_capacity.parse_point("96,384,384:11:lr=x1.4/seed=1") == ((96, 384, 384), 11, {"lr": "x1.4", "seed": "1"})


def test_grid_trains_and_combines_with_cpu_speed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, speed, merged = tmp_path / "run.json", tmp_path / "speed.json", tmp_path / "merged.json"
    assert cnn_capacity.main(["--data", "digits", "--limit", "400", "--device", "cpu", "--out", str(run),
                              "--grid", "16,32,32:6:batch_size=32", "16,32,32:6:batch_size=32/lr=x0"]) == 0
    trained, frozen = json.loads(run.read_text())["points"]
    assert trained["changed"] == {"batch_size": "32"} and trained["epochs"] == 6
    assert trained["val_accuracy"] > 0.4 > frozen["val_accuracy"]  # a zero learning rate learns nothing
    assert 0 <= trained["val_accuracy_tta"] <= 1 and trained["train_wall_s"] > 0
    assert cnn_capacity.main(["--speed-only", "--device", "cpu", "--grid", "16,32,32", "--out", str(speed)]) == 0
    assert json.loads(speed.read_text())["points"][0]["train_img_per_s"] > 0
    assert cnn_capacity.main(["--combine", str(run), "--cpu-speed", str(speed), "--out", str(merged)]) == 0
    data = json.loads(merged.read_text())
    assert len(data["commands"]) == 2 and all(p["cpu_train_s_est"] > 0 for p in data["points"])
    assert "CPU train s" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--combine", "run.json"], "--combine needs --cpu-speed"),
    (["--speed-only", "--grid", "64,x,256"], "expected WIDTHS[:EPOCHS"),
    (["--speed-only", "--grid", "64,256,256:3:lrr=2"], "unknown setting 'lrr'"),
    (["--speed-only", "--grid", "64,256,256:3:lr=fast"], "expected a number or xFACTOR"),
    (["--speed-only", "--grid", "64,256,256:3:optimizer=2"], "not a number"),
])
def test_bad_arguments_are_one_line_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        cnn_capacity.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_point_settings_scale_or_set_the_recipe() -> None:
    recipe = cnn_capacity.RECIPES["airbench_c10"].config()
    settings = cnn_capacity.point_settings(recipe, {"lr": "x2", "seed": "3", "label_smoothing": "0.1"})
    assert settings == {"lr": pytest.approx(2 * recipe.lr), "seed": 3, "label_smoothing": 0.1}
    assert isinstance(settings["seed"], int)
