"""The offload benchmark runs end to end on a small checkpoint (numbers are not asserted: timing is noisy)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import offload


@pytest.mark.long
def test_offload_benchmark_quick(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "offload.json"
    cores = os.sched_getaffinity(0)
    assert offload.main(["--checkpoint", str(tiny_checkpoint), "--quick", "--no-ray-serve", "--out", str(out)]) == 0
    assert os.sched_getaffinity(0) == cores  # the benchmark gave this process its cores back
    result = json.loads(out.read_text())
    assert {r["codec"] for r in result["codec"]["rows"]} >= {"float32", "int8+zstd"}
    assert result["end_to_end"]["requests"] > 0
    assert result["two_hop_floor"]["requests"] > 0  # the relay edge answered every request from the echo cloud
    runs = {(r["batching"], r["edges"]): r for r in result["offload_runs"]}
    assert set(runs) == {("adaptive", 1), ("adaptive", 16), ("window 2 ms", 1), ("window 2 ms", 16), ("batch 1", 16),
                         (offload.FLOOR, 1), (offload.FLOOR, 16), (offload.FLOOR_WITH_TAIL, 1)}
    assert runs["adaptive", 16]["mean_batch"] > 1  # with no timer, load alone formed real batches
    assert runs["adaptive", 1]["mean_batch"] == 1 and runs["batch 1", 16]["mean_batch"] == 1
    assert {"framework_overhead_p50_ms", "two_hop_floor_p50_ms", "leg_p50_minus_compute_ms",
            "leg_floor_minus_compute_ms", "share_of_tail_best_pinned"} <= set(result["targets"])
