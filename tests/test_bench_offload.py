"""The offload benchmark runs end to end on a small checkpoint (numbers are not asserted: timing is noisy)."""
from __future__ import annotations

import json
from pathlib import Path

from bench import offload


def test_offload_benchmark_quick(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "offload.json"
    assert offload.main(["--checkpoint", str(tiny_checkpoint), "--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {r["codec"] for r in result["codec"]["rows"]} >= {"float32", "int8+zstd"}
    assert result["end_to_end"]["requests"] > 0
    assert [leg["edges"] for leg in result["offload_leg"]] == [1, 16]
    assert [t["max_batch"] for t in result["throughput"]] == [1, 32]
    assert result["throughput"][1]["mean_batch"] > 1  # cross-stream batching formed real batches
