"""Daemon configuration: TOML, then flags on top, and errors that name the setting and where it came from."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from offramp.config import CloudConfig, load_config, non_defaults, path_field
from offramp.errors import OfframpError


@dataclass(frozen=True)
class Settings:
    model: str = path_field()
    name: str = "x"
    ratio: float = 0.5
    count: int | None = None
    tags: list[str] = field(default_factory=list)
    weights: tuple[float, ...] = ()
    mode: Literal["a", "b"] = "a"
    on: bool = True


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return path


def test_flags_override_the_file_and_types_are_normalised(tmp_path: Path) -> None:
    path = toml(tmp_path, 'model = "ckpt"\nname = "file"\nratio = 1\ncount = 3\ntags = ["a"]\nweights = [1, 0.5]\n')
    settings = load_config(Settings, path, {"name": "flag", "count": None, "mode": "b"})
    assert settings == Settings(model=str(tmp_path / "ckpt"), name="flag", ratio=1.0, count=3, tags=["a"],
                                weights=(1.0, 0.5), mode="b")
    assert isinstance(settings.ratio, float)


def test_paths_are_relative_to_the_file_that_names_them(tmp_path: Path) -> None:
    assert load_config(Settings, toml(tmp_path, 'model = "/abs/ckpt"\n'), {}).model == "/abs/ckpt"
    assert load_config(Settings, toml(tmp_path, 'model = "ckpt"\n'), {"model": "mine"}).model == "mine"
    assert load_config(Settings, None, {"model": "mine"}).model == "mine"


@pytest.mark.parametrize("text, flags, message", [
    ('model = "m"\nmodle = 1\n', {}, r"unknown setting 'modle' \(known: model, name,"),
    ('model = "m"\ncount = "3"\n', {}, r"'count' must be an integer, not str '3'"),
    ('model = "m"\ncount = true\n', {}, r"'count' must be an integer, not bool True"),
    ('model = "m"\non = 1\n', {}, r"'on' must be true or false, not int 1"),
    ('model = "m"\ntags = ["a", 1]\n', {}, r"'tags' must be a list of strings"),
    ('model = "m"\nmode = "c"\n', {}, r"'mode' must be one of 'a', 'b', not str 'c'"),
    ('model = "m"\n[section]\nname = "y"\n', {}, r"unknown setting 'section'"),
    ("name = 'y'\n", {}, r"missing required setting\(s\) model"),
    ("model = \n", {}, r"is not valid TOML"),
])
def test_errors_name_the_setting_and_the_file(tmp_path: Path, text: str, flags: dict[str, Any], message: str) -> None:
    path = toml(tmp_path, text)
    with pytest.raises(OfframpError, match=message) as info:
        load_config(Settings, path, flags)
    assert str(path) in str(info.value)


def test_errors_in_flags_say_so(tmp_path: Path) -> None:
    with pytest.raises(OfframpError, match=r"^the command line: 'ratio' must be a number, not str 'high'$"):
        load_config(Settings, toml(tmp_path, 'model = "m"\n'), {"ratio": "high"})
    with pytest.raises(OfframpError, match="does not exist"):
        load_config(Settings, tmp_path / "missing.toml", {})


@pytest.mark.parametrize("text, message", [
    ("max_batch = 0", "max_batch must be at least 1"),
    ('listen = "50051"', "listen must be HOST:PORT"),
    ("metrics_port = 70000", "metrics_port must be in 0..65535"),
    ('dtype = "float64"', "'dtype' must be one of 'float32', 'float16', 'bfloat16'"),
])
def test_cloud_config_refuses_values_out_of_range(tmp_path: Path, text: str, message: str) -> None:
    path = toml(tmp_path, f'checkpoint = "ckpt"\n{text}\n')
    with pytest.raises(OfframpError, match=message) as info:
        load_config(CloudConfig, path, {})
    assert str(path) in str(info.value)


def test_non_defaults_lists_what_was_set() -> None:
    config = CloudConfig(checkpoint="ckpt", max_batch=4, metrics_port=None)
    assert non_defaults(config) == {"checkpoint": "ckpt", "max_batch": 4}
    assert config.max_message_bytes == 64 << 20
