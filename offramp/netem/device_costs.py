"""The emulated device's cost of the edge walk: measured once, then charged alike in every process.

An edge slowed by ``slowdown`` x its own CPU time carries the host's noise into the emulated device: fresh
processes doing the same work differ by up to 15% here, and a study that starts a daemon per point compares
its policies through that noise. A cost table holds, per split and per segment of the walk (the blocks and
the head of each exit, then the blocks to the split), the CPU milliseconds it took for each batch size, on
the host where it was measured. A batch is then charged the segments its samples reached, at the number of
samples that reached each: the same work costs the same device time in every process that loads the table.

The edge-only baseline (the whole model on the same emulated device) is charged by the same table: its
``whole_ms`` row holds the whole model's milliseconds by batch size. Each part is measured by the first
process that needs it (an edge daemon its splits, the baseline the whole model) and added to the file.

The table is JSON (never a pickle): ``{"fingerprint", "cpu", "max_batch", "splits": {split: {"exits",
"segments_ms": [[ms at batch 1, 2, ...] per segment]}}, "whole_ms": [ms at batch 1, 2, ...]}``.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offramp.core.errors import OfframpError
from offramp.core.exit_rule import always_leave, never_leave
from offramp.core.halves import EdgeResult, EdgeWalk
from offramp.core.hostinfo import cpu_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceCosts:
    """Per split: the exits it walks and each segment's milliseconds by batch size (index 0: batch 1)."""

    fingerprint: str
    cpu: str
    max_batch: int
    splits: dict[int, tuple[tuple[str, ...], tuple[tuple[float, ...], ...]]]
    whole_ms: tuple[float, ...] | None = None  # the whole model by batch size, for the edge-only baseline

    def batch_s(self, split: int, result: EdgeResult) -> float:
        """Seconds the measured host took for the walk ``result`` came from: each segment at the number of
        samples that entered it."""
        exits, segments = self.splits[split]
        return sum(self._segment_ms(segments[k], b) for k, b in enumerate(entering(result.exit_index, len(exits)))
                   if b) / 1e3

    def whole_s(self, batch: int) -> float:
        """Seconds the measured host took for the whole model on ``batch`` samples."""
        if self.whole_ms is None:
            raise OfframpError("device costs hold no time for the whole model")
        return self._segment_ms(self.whole_ms, batch) / 1e3

    def _segment_ms(self, by_batch: Sequence[float], b: int) -> float:
        if b <= len(by_batch):
            return by_batch[b - 1]
        return by_batch[-1] * b / len(by_batch)  # beyond the table: as its largest batch, per sample

    def check(self, fingerprint: str, exits: dict[int, Sequence[str]]) -> None:
        """Refuse a table measured for another checkpoint, or for other exits at a split than the edge runs
        (splits it holds nothing for are measured and added)."""
        if fingerprint != self.fingerprint:
            raise OfframpError(f"device costs were measured on another checkpoint (fingerprint "
                               f"{self.fingerprint[:12]}, this one is {fingerprint[:12]}): remove the file to measure "
                               "again")
        for split, names in exits.items():
            if split in self.splits and tuple(self.splits[split][0]) != tuple(names):
                raise OfframpError(f"device costs hold split {split} with exits "
                                   f"{', '.join(self.splits[split][0])}, not {', '.join(names)}: remove the file to "
                                   "measure again")

    def to_json(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "cpu": self.cpu, "max_batch": self.max_batch,
                "splits": {str(s): {"exits": list(e), "segments_ms": [list(r) for r in seg]}
                           for s, (e, seg) in self.splits.items()},
                **({} if self.whole_ms is None else {"whole_ms": list(self.whole_ms)})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceCosts:
        try:
            splits = {int(s): (tuple(str(n) for n in v["exits"]),
                               tuple(tuple(float(ms) for ms in row) for row in v["segments_ms"]))
                      for s, v in data["splits"].items()}
            whole = data.get("whole_ms")
            whole = None if whole is None else tuple(float(ms) for ms in whole)
            costs = cls(str(data["fingerprint"]), str(data.get("cpu", "")), int(data["max_batch"]), splits, whole)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise OfframpError(f"device costs: not a cost table ({type(e).__name__}: {e})") from None
        for split, (exits, segments) in splits.items():
            if len(segments) != len(exits) + 1 or any(not row or min(row) < 0 for row in segments):
                raise OfframpError(f"device costs: split {split} needs {len(exits) + 1} segments of "
                                   "non-negative milliseconds")
        if whole is not None and (not whole or min(whole) < 0):
            raise OfframpError("device costs: whole_ms needs non-negative milliseconds by batch size")
        return costs


def entering(exit_index: torch.Tensor | Sequence[int], num_exits: int) -> list[int]:
    """How many samples entered each segment: all the first; each next one, those no earlier exit answered
    (``exit_index`` -1: went on to the split)."""
    left = np.asarray(exit_index)
    going_on = np.where(left < 0, num_exits, left)  # the last segment a sample entered
    return [int((going_on >= k).sum()) for k in range(num_exits + 1)]


def measure(halves: Sequence[EdgeWalk], fingerprint: str, input_shape: Sequence[int], score: str,
            max_batch: int, with_scores: bool = False, audio_shape: Sequence[int] | None = None,
            repeats: int = 5) -> DeviceCosts:
    """Time, for each split and batch size, the walk with every sample answered by exit k (then with every
    sample going on to the split); segment k is the difference between stage k and stage k - 1. CPU time of
    this thread, the median of ``repeats``."""
    splits = {}
    for half in halves:
        n = half.num_exits
        stage_ms = np.zeros((n + 1, max_batch))
        for b in range(1, max_batch + 1):
            x = torch.zeros(b, *input_shape)
            audio = None if audio_shape is None else torch.zeros(b, *audio_shape)
            for stage in range(n + 1):
                thresholds = [always_leave(score) if k == stage else never_leave(score) for k in range(n)]
                stage_ms[stage, b - 1] = _median_ms(repeats, half.run, x, thresholds, score,
                                                    with_scores=with_scores, audio=audio)
        segments = np.maximum(np.diff(stage_ms, axis=0, prepend=0.0), 0.0)
        splits[half.split_block] = (tuple(half.exit_names), tuple(tuple(round(float(v), 4) for v in row)
                                                                   for row in segments))
    return DeviceCosts(fingerprint, cpu_name(), max_batch, splits)


def measure_whole(run: Callable[[torch.Tensor, torch.Tensor | None], Any], input_shape: Sequence[int],
                  max_batch: int, audio_shape: Sequence[int] | None = None, repeats: int = 5) -> tuple[float, ...]:
    """Milliseconds of ``run(x, audio)`` (the whole model) for each batch size, timed as ``measure`` times the
    walk: CPU time of this thread, the median of ``repeats`` after a warm run."""
    by_batch = []
    for b in range(1, max_batch + 1):
        x = torch.zeros(b, *input_shape)
        audio = None if audio_shape is None else torch.zeros(b, *audio_shape)
        by_batch.append(round(_median_ms(repeats, run, x, audio), 4))
    return tuple(by_batch)


def _median_ms(repeats: int, work: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """CPU milliseconds of this thread for ``work(*args, **kwargs)``, the median of ``repeats`` after one that
    warms it."""
    runs = []
    for _ in range(repeats + 1):
        t0 = time.thread_time()
        work(*args, **kwargs)
        runs.append((time.thread_time() - t0) * 1e3)
    return statistics.median(runs[1:])


def load_or_measure(path: str | Path, halves: Sequence[EdgeWalk], fingerprint: str, input_shape: Sequence[int],
                    score: str, max_batch: int, with_scores: bool = False,
                    audio_shape: Sequence[int] | None = None) -> DeviceCosts:
    """The table at ``path``, checked against this edge; the splits it holds nothing for are measured here and
    added (the first daemon of an experiment measures them, the others charge by them)."""
    costs = _load(path, fingerprint)
    exits = {h.split_block: h.exit_names for h in halves}
    if costs is not None:
        costs.check(fingerprint, exits)
        missing = [h for h in halves if h.split_block not in costs.splits]
        if not missing:
            log.info("device costs from %s (measured on %s)", path, costs.cpu or "an unnamed CPU")
            return costs
    else:
        missing = list(halves)
    log.info("measuring the device costs of split%s %s into %s (%d batch sizes)", "s" if len(missing) > 1 else "",
             ", ".join(str(h.split_block) for h in missing), path, max_batch)
    measured = measure(missing, fingerprint, input_shape, score, max_batch, with_scores, audio_shape)
    if costs is not None:
        measured = replace(costs, splits={**costs.splits, **measured.splits})
    _write(path, measured)
    return measured


def load_or_measure_whole(path: str | Path, run: Callable[[torch.Tensor, torch.Tensor | None], Any],
                          fingerprint: str, input_shape: Sequence[int], max_batch: int,
                          audio_shape: Sequence[int] | None = None) -> DeviceCosts:
    """The table at ``path`` with the whole model's row (``run(x, audio)``), measured here and added if it has
    none: the edge-only baseline is charged by the table its experiment's edges are."""
    costs = _load(path, fingerprint)
    if costs is not None and costs.whole_ms is not None:
        log.info("device costs of the whole model from %s (measured on %s)", path, costs.cpu or "an unnamed CPU")
        return costs
    log.info("measuring the whole model's device costs into %s (%d batch sizes)", path, max_batch)
    whole = measure_whole(run, input_shape, max_batch, audio_shape)
    costs = (DeviceCosts(fingerprint, cpu_name(), max_batch, {}, whole) if costs is None
             else replace(costs, whole_ms=whole))
    _write(path, costs)
    return costs


def _load(path: str | Path, fingerprint: str) -> DeviceCosts | None:
    """The table at ``path``, None if there is none; refused if unreadable or from another checkpoint."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OfframpError(f"device costs {path}: cannot read it ({e})") from None
    costs = DeviceCosts.from_json(data)
    costs.check(fingerprint, {})
    return costs


def _write(path: str | Path, costs: DeviceCosts) -> None:
    """Atomically: a daemon reading the file never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(costs.to_json(), indent=1) + "\n")
    tmp.replace(path)
