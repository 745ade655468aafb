"""Decoded datasets cached on disk, so 50,000 JPEGs are decoded once, not every run.

The cache is a plain ``.npy`` array of uint8 pixels (loaded without pickle),
named after a checksum of the archive and the decoded shape: a changed
archive or another input size is a different file, never a stale one.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$OFFRAMP_CACHE``, else ``~/.cache/offramp``."""
    return Path(os.environ.get("OFFRAMP_CACHE") or Path.home() / ".cache" / "offramp")


def source_checksum(path: Path, names: list[str]) -> str:
    """SHA-256 of an archive's bytes, or of a folder's names, sizes and mtimes (hashing a folder's
    every file would cost as much as decoding it)."""
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    else:
        for name in names:
            st = (path / name).stat()
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cached_array(key: str, build: Callable[[], np.ndarray]) -> np.ndarray:
    """The array stored under ``key``, built and stored on first use.

    Written to a temporary name and renamed, so an interrupted run never
    leaves a truncated cache behind; an unwritable cache only costs speed.
    """
    path = cache_dir() / f"{key}.npy"
    if path.exists():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable cache %s: %s", path, e)
    array = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
        log.info("cached %s (%.0f MB)", path, array.nbytes / 1e6)
    except OSError as e:
        log.warning("cannot write the data cache %s: %s", path, e)
    return array


def cache_exists(key: str) -> bool:
    return (cache_dir() / f"{key}.npy").exists()
