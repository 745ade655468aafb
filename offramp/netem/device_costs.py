"""The emulated device's cost of the edge walk: measured once, then charged alike in every process.

An edge slowed by ``slowdown`` x its own CPU time carries the host's noise into the emulated device: fresh
processes doing the same work differ by up to 15% here, and a study that starts a daemon per point compares
its policies through that noise. A cost table holds, per split and per segment of the walk (the blocks and
the head of each exit, then the blocks to the split), the CPU milliseconds it took for each batch size, on
the host where it was measured. A batch is then charged the segments its samples reached, at the number of
samples that reached each: the same work costs the same device time in every process that loads the table.

The table is JSON (never a pickle): ``{"fingerprint", "cpu", "max_batch", "splits": {split: {"exits",
"segments_ms": [[ms at batch 1, 2, ...] per segment]}}}``.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
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

    def batch_s(self, split: int, result: EdgeResult) -> float:
        """Seconds the measured host took for the walk ``result`` came from: each segment at the number of
        samples that entered it."""
        exits, segments = self.splits[split]
        return sum(self._segment_ms(segments[k], b) for k, b in enumerate(entering(result.exit_index, len(exits)))
                   if b) / 1e3

    def _segment_ms(self, by_batch: Sequence[float], b: int) -> float:
        if b <= len(by_batch):
            return by_batch[b - 1]
        return by_batch[-1] * b / len(by_batch)  # beyond the table: as its largest batch, per sample

    def check(self, fingerprint: str, exits: dict[int, Sequence[str]]) -> None:
        """Refuse a table measured for another checkpoint, or for other splits or exits than the edge runs."""
        if fingerprint != self.fingerprint:
            raise OfframpError(f"device costs were measured on another checkpoint (fingerprint "
                               f"{self.fingerprint[:12]}, this one is {fingerprint[:12]}): remove the file to measure "
                               "again")
        for split, names in exits.items():
            if split not in self.splits or tuple(self.splits[split][0]) != tuple(names):
                raise OfframpError(f"device costs hold no table for split {split} with exits {', '.join(names)}: "
                                   "remove the file to measure again")

    def to_json(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "cpu": self.cpu, "max_batch": self.max_batch,
                "splits": {str(s): {"exits": list(e), "segments_ms": [list(r) for r in seg]}
                           for s, (e, seg) in self.splits.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceCosts:
        try:
            splits = {int(s): (tuple(str(n) for n in v["exits"]),
                               tuple(tuple(float(ms) for ms in row) for row in v["segments_ms"]))
                      for s, v in data["splits"].items()}
            costs = cls(str(data["fingerprint"]), str(data.get("cpu", "")), int(data["max_batch"]), splits)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise OfframpError(f"device costs: not a cost table ({type(e).__name__}: {e})") from None
        for split, (exits, segments) in splits.items():
            if len(segments) != len(exits) + 1 or any(not row or min(row) < 0 for row in segments):
                raise OfframpError(f"device costs: split {split} needs {len(exits) + 1} segments of "
                                   "non-negative milliseconds")
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
                runs = []
                for _ in range(repeats + 1):  # the first of each shape warms it
                    t0 = time.thread_time()
                    half.run(x, thresholds, score, with_scores=with_scores, audio=audio)
                    runs.append((time.thread_time() - t0) * 1e3)
                stage_ms[stage, b - 1] = statistics.median(runs[1:])
        segments = np.maximum(np.diff(stage_ms, axis=0, prepend=0.0), 0.0)
        splits[half.split_block] = (tuple(half.exit_names), tuple(tuple(round(float(v), 4) for v in row)
                                                                   for row in segments))
    return DeviceCosts(fingerprint, cpu_name(), max_batch, splits)


def load_or_measure(path: str | Path, halves: Sequence[EdgeWalk], fingerprint: str, input_shape: Sequence[int],
                    score: str, max_batch: int, with_scores: bool = False,
                    audio_shape: Sequence[int] | None = None) -> DeviceCosts:
    """The table at ``path``, checked against this edge; measured here and written there when there is none
    (the first daemon of an experiment measures it, the others charge by it)."""
    path = Path(path)
    exits = {h.split_block: h.exit_names for h in halves}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise OfframpError(f"device costs {path}: cannot read it ({e})") from None
        costs = DeviceCosts.from_json(data)
        costs.check(fingerprint, exits)
        log.info("device costs from %s (measured on %s)", path, costs.cpu or "an unnamed CPU")
        return costs
    log.info("measuring the device costs into %s (%d batch sizes)", path, max_batch)
    costs = measure(halves, fingerprint, input_shape, score, max_batch, with_scores, audio_shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(costs.to_json(), indent=1) + "\n")
    tmp.replace(path)
    return costs
