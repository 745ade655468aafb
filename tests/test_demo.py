"""The README's main job: cloud and edge as real processes on loopback, one answer per input."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from offramp.cli import main


def test_demo_runs_edge_and_cloud_and_answers_every_input(tiny_checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    shutil.copytree(tiny_checkpoint, tmp_path / "model")  # reuse: the demo trains only when no model is there
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    sent, answered = map(int, re.search(r"requests / answers\s+(\d+) / (\d+)", out).groups())
    assert sent == answered == 20
    assert "offload rate" in out and "bytes per offload" in out
    assert "edge stopped (status 0); cloud stopped (status 0)" in out
    assert (tmp_path / "edge.toml").is_file() and "thresholds" in (tmp_path / "edge.toml").read_text()
