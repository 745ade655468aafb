"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of development data archives (cifar10-train.zip, fsdd-train.zip).

    Set OFFRAMP_DATA to point elsewhere; by default it is the data folder
    beside the checkout. Tests that need it are skipped where it is absent.
    """
    path = Path(os.environ.get("OFFRAMP_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"development data archives not present at {path} (set OFFRAMP_DATA)")
    return path
