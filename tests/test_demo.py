"""The README's main job: the split with exits over an emulated link beside cloud-only and edge-only, real
processes on loopback, one answer per input each way."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from offramp.cli import main


def test_demo_offloads_over_a_link_and_compares_with_the_baselines(tiny_checkpoint: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    shutil.copytree(tiny_checkpoint, tmp_path / "model")  # reuse: the demo trains only when no model is there
    assert main(["demo", "--workdir", str(tmp_path), "--rate", "100"]) == 0
    out = capsys.readouterr().out
    assert "20 requests / 20 answers each" in out
    rows = {m.group(1): m.group(2).split() for m in re.finditer(r"^(edge-only|split with exits|cloud-only)\s+(.*)$",
                                                                out, re.M)}
    assert set(rows) == {"edge-only", "split with exits", "cloud-only"}
    edge, cloud = int(rows["split with exits"][0]), int(rows["split with exits"][1])
    assert edge + cloud == 20 and cloud > 0 and rows["split with exits"][6] != "n/a"  # bytes per offload
    assert rows["edge-only"][:2] == ["20", "0"] and rows["cloud-only"][:2] == ["0", "20"]
    assert "cloud stopped (status 0)" in out and (tmp_path / "demo.png").is_file()
    config = (tmp_path / "edge.toml").read_text()
    assert "thresholds" in config and "[input_route]" in config
