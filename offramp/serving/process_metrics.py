"""What every daemon's metrics say about the process itself: its build, and the process and platform collectors.

The daemons keep a registry each (several may share a process in tests), so prometheus_client's default
process metrics (``process_resident_memory_bytes``, CPU seconds, open fds) are added to each explicitly.
"""
from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Info, PlatformCollector, ProcessCollector

from offramp import __version__


def add_process_metrics(registry: CollectorRegistry, role: str, model: str = "", fingerprint: str = "") -> None:
    """``offramp_build_info{version, role, model, fingerprint, python, torch}`` plus the process and Python
    platform collectors: which build serves which model, so a dashboard can tell replicas apart."""
    import torch

    Info("offramp_build", "The build serving: Offramp's version, the daemon's role, the model (its name and "
         "checkpoint fingerprint), Python and PyTorch versions.", registry=registry).info(
        {"version": __version__, "role": role, "model": model, "fingerprint": fingerprint,
         "python": platform.python_version(), "torch": torch.__version__})
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
