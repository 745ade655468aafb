"""Daemon configuration: TOML, then flags on top, and errors that name the setting and where it came from."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from offramp.core.codec import CodecConfig
from offramp.core.settings import flat_name
from offramp.serving.config import (CalibrationPoint, CalibrationTable, CloudConfig, EdgeConfig, flat_settings,
                                    flat_values, load_config, non_defaults, replace_settings, setting)
from offramp.serving.config_text import commented_toml, readme_tables, settings_toml
from offramp.serving.flags import add_config_flags, config_from_args, flag_name
from offramp.core.errors import OfframpError


@dataclass(frozen=True)
class Settings:
    model: str = setting("the model's folder", path=True)
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
    ('model = "m"\ntags = "a"\n', {}, r"'tags' must be a list of strings, not str 'a'"),
    ('model = "m"\ntags = ["a", 1]\n', {}, r"'tags\[1\]' must be a string, not int 1"),
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


# -- settings declared once: flags, files and the README come from the fields ---------------------------------------

def test_every_setting_is_a_flag_that_help_explains(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from offramp.cli import build_parser

    monkeypatch.setenv("COLUMNS", "10000")  # no wrapping: each help text is found whole
    for command, cls in (("edge", EdgeConfig), ("cloud", CloudConfig)):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for _, f, _ in flat_settings(cls):  # a group's settings are flags of their own
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            if f.metadata.get("file_only"):  # tables a tool writes into the file
                assert flag_name(f) not in text, f.name
                continue
            assert f"{flag_name(f)} " in text and f.metadata["help"] in text, f.name
        args = build_parser().parse_args([command])  # flags not given stay None: the file or the default decides
        assert all(getattr(args, flat_name(f), None) is None for _, f, _ in flat_settings(cls))


def test_flags_parse_into_the_config() -> None:
    from offramp.cli import build_parser

    args = build_parser().parse_args([
        "-v", "edge", "--checkpoint", "ckpt", "--cloud", "a:1", "b:2", "--cloud", "c:3", "--thresholds=0.5,-inf",
        "--exits", "slvit@2,slvit@4", "--no-offload", "--score", "margin", "--threads", "1", "--slowdown", "2"])
    config = config_from_args(EdgeConfig, args)
    assert config == EdgeConfig(checkpoint="ckpt", cloud=("a:1", "b:2", "c:3"), thresholds=(0.5, -math.inf),
                                exits=("slvit@2", "slvit@4"), offload_enabled=False, score="margin", threads=1,
                                slowdown=2.0, log_level="DEBUG")
    cloud = config_from_args(CloudConfig, build_parser().parse_args(
        ["cloud", "--checkpoint", "ckpt", "--no-reflection", "--threads", "2", "--max-wait-ms", "0.5",
         "--split-blocks", "2,4"]))
    assert (cloud.reflection, cloud.threads, cloud.max_wait_ms, cloud.split_blocks) == (False, 2, 0.5, (2, 4))


def test_a_written_config_reads_back_as_it_was(tmp_path: Path) -> None:
    config = replace_settings(EdgeConfig(checkpoint="ckpt"), cloud=("a:1",), thresholds=(0.5, math.inf),
                              offload_enabled=False, exits=("slvit@2",), cloud_tls_ca="ca.pem", threads=1, top_k=8)
    path = tmp_path / "elsewhere" / "edge.toml"
    path.parent.mkdir()
    path.write_text(settings_toml(config))
    absolute = replace_settings(config, checkpoint=str(Path("ckpt").resolve()),
                                cloud_tls_ca=str(Path("ca.pem").resolve()))
    assert load_config(EdgeConfig, path) == absolute


TABLE = CalibrationTable("ab" * 32, 4, "max_prob", ("slvit@2", "slvit@4"), 100, (
    CalibrationPoint((0.9, -math.inf), 0.9, 0.0, (0.7, 0.3, 0.0)),
    CalibrationPoint((0.95, math.inf), 0.95, 0.25, (0.6, 0.15, 0.25))))


def test_calibration_tables_read_back_and_are_checked(tmp_path: Path) -> None:
    config = replace_settings(EdgeConfig(checkpoint="/ckpt"), latency_slo_ms=80, calibration=(TABLE,))
    path = tmp_path / "edge.toml"
    path.write_text(settings_toml(config))
    assert load_config(EdgeConfig, path) == config
    path.write_text('checkpoint = "c"\n[[calibration]]\nfingerprint = "x"\nsplit_block = 4\nscore = "max_prob"\n'
                    'exits = ["a"]\nsamples = 1\npoints = [{thresholds = [0.5], accuracy = 1, offload = 0}]\n')
    with pytest.raises(OfframpError, match=r"missing required setting\(s\) calibration\[0\].points\[0\].shares"):
        load_config(EdgeConfig, path)
    path.write_text('checkpoint = "c"\ncalibration = [1]\n')
    with pytest.raises(OfframpError, match=r"'calibration\[0\]' must be a table, not int 1"):
        load_config(EdgeConfig, path)
    with pytest.raises(OfframpError, match="one threshold per exit"):
        load_config(EdgeConfig, None, {"checkpoint": "c", "calibration": [
            {**dataclasses.asdict(TABLE), "exits": ["slvit@2"]}]})
    with pytest.raises(OfframpError, match="latency_slo_ms chooses how much to offload: it needs offload on"):
        load_config(EdgeConfig, None, {"checkpoint": "c", "latency_slo_ms": 50, "offload_enabled": False})
    with pytest.raises(OfframpError, match="slo_window_s must be 0"):
        load_config(EdgeConfig, None, {"checkpoint": "c", "latency_slo_ms": 50, "slo_window_s": -1})
    with pytest.raises(OfframpError, match="several split_blocks need latency_slo_ms"):
        load_config(EdgeConfig, None, {"checkpoint": "c", "split_blocks": [2, 4]})
    with pytest.raises(OfframpError, match="split_block must be one of split_blocks"):
        load_config(EdgeConfig, None, {"checkpoint": "c", "split_blocks": [2, 4], "split_block": 3,
                                       "latency_slo_ms": 50})


def test_the_commented_template_holds_every_setting_and_loads(tmp_path: Path) -> None:
    path = toml(tmp_path, commented_toml(CloudConfig, {"checkpoint": "ckpt"}, "Cloud settings."))
    text = path.read_text()
    assert all(f"{f.name} = " in text for f in dataclasses.fields(CloudConfig))
    assert load_config(CloudConfig, path) == CloudConfig(checkpoint=str(tmp_path / "ckpt"))


def test_grouped_settings_read_from_their_tables_or_by_their_flat_names(tmp_path: Path) -> None:
    grouped = toml(tmp_path, 'checkpoint = "m"\ncloud = ["a:1"]\n[codec]\ndtype = "float16"\ntop_k = 8\n'
                   '[controller]\nlatency_slo_ms = 80\n[connection]\nkeepalive_s = 5\n[cloud_tls]\nca = "ca.pem"\n')
    config = load_config(EdgeConfig, grouped)
    assert config.codec == CodecConfig("float16", 8, 3) and config.controller.latency_slo_ms == 80
    assert config.connection.keepalive_s == 5 and config.cloud_tls.ca == str(tmp_path / "ca.pem")
    flat = tmp_path / "flat.toml"  # the keys files had before the groups
    flat.write_text('checkpoint = "m"\ncloud = ["a:1"]\ncodec = "float16"\ntop_k = 8\nlatency_slo_ms = 80\n'
                    'keepalive_s = 5\ncloud_tls_ca = "ca.pem"\n')
    assert load_config(EdgeConfig, flat) == config
    # a flag changes one setting of a group and keeps the file's others
    assert load_config(EdgeConfig, grouped, {"zstd_level": 0}).codec == CodecConfig("float16", 8, 0)
    assert flat_values(config)["top_k"] == 8 and non_defaults(config)["latency_slo_ms"] == 80
    both = toml(tmp_path, 'checkpoint = "m"\ntop_k = 8\n[codec]\ntop_k = 4\n')
    with pytest.raises(OfframpError, match="'top_k' and 'codec.top_k' are the same setting"):
        load_config(EdgeConfig, both)
    with pytest.raises(OfframpError, match="top_k must be at least 1"):
        load_config(EdgeConfig, None, {"checkpoint": "m", "top_k": 0})
    with pytest.raises(OfframpError, match="unknown setting 'codec.topk'"):
        load_config(EdgeConfig, None, {"checkpoint": "m", "codec": {"topk": 1}})
    with pytest.raises(TypeError, match="no setting"):
        replace_settings(config, topk=1)


def test_the_edge_template_holds_every_setting_and_loads(tmp_path: Path) -> None:
    path = toml(tmp_path, commented_toml(EdgeConfig, {"checkpoint": "ckpt"}, "Edge settings."))
    assert load_config(EdgeConfig, path) == EdgeConfig(checkpoint=str(tmp_path / "ckpt"))
    text = path.read_text()
    for table, f, _ in flat_settings(EdgeConfig):
        if not f.metadata.get("file_only"):
            assert f"{f.name} = " in text, f.name
            assert table is None or f"[{table}]" in text


def test_readme_settings_tables_match_the_code() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert readme_tables() in readme, "README's settings tables are stale: paste `python -m offramp.serving.config_text`"


def test_settings_come_from_flags_then_the_environment_then_the_file(tmp_path: Path) -> None:
    import argparse

    from offramp.serving.flags import add_config_flags, config_from_args

    toml = tmp_path / "edge.toml"
    toml.write_text('checkpoint = "model"\nmax_batch = 4\ndeadline_ms = 300\nzstd_level = 5\n')
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_config_flags(parser, EdgeConfig)
    environ = {"OFFRAMP_EDGE_DEADLINE_MS": "700", "OFFRAMP_EDGE_ZSTD_LEVEL": "9", "OFFRAMP_EDGE_OFFLOAD_ENABLED": "off",
               "OFFRAMP_EDGE_CLOUD": "a:1 b:2", "OFFRAMP_EDGE_THRESHOLDS": "0.8,0.9", "OFFRAMP_CLOUD_DEVICE": "cuda",
               "PATH": "/bin"}
    args = parser.parse_args(["--config", str(toml), "--zstd-level", "1"])
    config = config_from_args(EdgeConfig, args, environ)
    assert (config.max_batch, config.deadline_ms, config.codec.zstd_level) == (4, 700, 1)  # file, environment, flag
    assert not config.offload_enabled and config.cloud == ("a:1", "b:2") and config.thresholds == (0.8, 0.9)
    assert Path(config.checkpoint) == tmp_path / "model"
    with pytest.raises(OfframpError, match="unknown setting OFFRAMP_EDGE_MAX_BACH in the environment"):
        config_from_args(EdgeConfig, args, {"OFFRAMP_EDGE_MAX_BACH": "8"})
    with pytest.raises(OfframpError, match="OFFRAMP_EDGE_CODEC='int4': choose one of"):
        config_from_args(EdgeConfig, args, {"OFFRAMP_EDGE_CODEC": "int4"})
    with pytest.raises(OfframpError, match="the environment: .*max_batch must be at least 1|max_batch"):
        config_from_args(EdgeConfig, args, {"OFFRAMP_EDGE_MAX_BATCH": "0"})


def test_every_flag_is_listed_under_a_help_group() -> None:
    import argparse

    for cls in (EdgeConfig, CloudConfig):
        ungrouped = [f.name for _, f, _ in flat_settings(cls) if not f.metadata.get("file_only")
                     and not f.metadata.get("group")]
        assert not ungrouped, f"{cls.__name__}: settings without a --help group: {ungrouped}"
        parser = argparse.ArgumentParser()
        add_config_flags(parser, cls)
        titles = [g.title for g in parser._action_groups]
        assert "clouds" in titles if cls is EdgeConfig else "batching" in titles
