"""The Ray Serve baseline answers like CloudHalf itself, under load (throughput is not asserted: timing is noisy)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (the 'serve' extra)")


def test_ray_serve_baseline_answers_like_cloud_half(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.ray_serve import run_ray_serve_baseline

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a private cluster on this machine, for the test's length only
    cores = sorted(os.sched_getaffinity(0))
    result = run_ray_serve_baseline(tiny_checkpoint, seconds=2.0, edges=4, window=2,
                                    server_cores=cores[:1], client_cores=cores[1:2] or cores[:1])
    assert result["requests"] > 0
    assert result["errors"] == 0, result["first_error"]
    assert result["wrong"] == 0 and result["max_abs_error"] < 1e-3  # every reply checked against CloudHalf.run
    assert result["mean_batch"] >= 1
    assert result["pinning"] and all(set(p["cores"]) <= set(cores[:1]) for p in result["pinning"])
