"""Labelled metric children, looked up once: prometheus-client's ``labels()`` takes a lock and builds a key on
every call, and the serving path would call it a dozen times per request for the same few values."""
from __future__ import annotations

from typing import Any


class Children:
    """``children(*values)`` is ``metric.labels(*values)``, remembered per values (a handful: stages, codes)."""

    def __init__(self, metric: Any) -> None:
        self._labels = metric.labels
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._labels(*values)
        return child
