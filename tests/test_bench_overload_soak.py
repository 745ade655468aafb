"""The overload and soak benchmarks run end to end on a small checkpoint, for seconds (their figures are
not asserted beyond what must hold however fast the machine is)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from bench import overload, soak


def test_overload_benchmark_refuses_what_it_cannot_serve_and_recovers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "overload.json"
    cores = os.sched_getaffinity(0)
    assert overload.main(["--checkpoint", str(tiny_checkpoint), "--seconds", "3", "--probe-seconds", "1",
                          "--recovery-seconds", "2", "--deadline-ms", "200", "--out", str(out)]) == 0
    assert os.sched_getaffinity(0) == cores
    result = json.loads(out.read_text())
    over = result["overload"]
    assert over["offered"] == sum(over["outcomes"].values()) > 0  # every request got exactly one outcome
    assert over["outcomes"].get("OK", 0) > 0
    assert over["answered_waited_past_deadline"] == 0  # no batch slot for a request already expired
    assert len(result["recovery"]["rps_per_bin"]) == 20


def test_recovery_is_timed_from_the_end_of_the_overload() -> None:
    """The arithmetic behind the headline: answers binned from the moment the overload stopped, recovery at the
    start of the first half-second window at 90% of capacity (no window-length floor)."""
    capacity = 100.0  # answers per second: 10 per 100-ms bin
    at_once = [b * overload.BIN_S + k / 100 + 0.001 for b in range(20) for k in range(10)]
    assert overload.recovered(at_once, 2.0, capacity)["recovered_after_s"] == 0.0
    late = [t + 0.7 for t in at_once if t < 1.3]  # nothing for the first 0.7 s, then full rate (10 per bin)
    result = overload.recovered(late, 2.0, capacity)
    assert result["rps_per_bin"][:7] == [0.0] * 7 and result["rps_per_bin"][7] == 100.0
    assert abs(result["recovered_after_s"] - 0.7) < 1e-9
    assert overload.recovered(late[:5], 2.0, capacity)["recovered_after_s"] is None  # never back


def test_soak_benchmark_watches_memory_errors_and_latency(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    assert soak.main(["--checkpoint", str(tiny_checkpoint), "--minutes", "0.1", "--probe-seconds", "1",
                      "--load", "0.3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["requests"] > 0 and result["errors"] == 0
    assert len(result["latency_ms_by_part"]) == 10 and result["rss_mb"]["edge"]["end"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
