"""What machine a result came from: results are compared only within one machine (and one run)."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# The CPU features that decide how fast a model runs here (bf16 matrix units, wide vectors).
SPEED_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


def cpu_flags() -> list[str]:
    """Which of ``SPEED_FLAGS`` this CPU has: a model name like "Intel(R) Xeon(R) Processor" says too little."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in SPEED_FLAGS if f in have]
    except OSError:
        pass
    return []


def machine() -> dict[str, Any]:
    """CPU model and its speed-deciding features, core count and the library versions that decide speed."""
    import torch

    info: dict[str, Any] = {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "cpus": os.cpu_count(),
                            "python": platform.python_version(), "torch": torch.__version__}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info
