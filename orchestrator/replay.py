"""Accuracy judged from what was answered: the route and thresholds in force for each request, replayed over
the whole validation split.

A phase of a study holds a few hundred requests, which measure accuracy only to a few points; the
calibration's own figure for an adaptive edge (its ``expected_accuracy``) is what it planned with, so
judging it by that would hold "as accurate as planned" by construction. So each request is credited with
what the route and thresholds in force when it was sent (the point's own for fixed points; for adaptive
ones the edge's policy polled just before) score on every validation sample, by their true labels: the
cascade of the exits at that split, or for the input route the whole model on the inputs as the cloud
receives them (JPEG at the baselines' quality).
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

Record = dict[str, Any]


class Replay:
    """What each request's route and thresholds are worth on the validation split (``accuracy``)."""

    def __init__(self, config: Any, polls: Sequence[dict[str, Any]], fixed: dict[int, tuple[float, ...]]) -> None:
        """``polls``: the edges' policy, polled once a second (``point``, ``t_s``, ``thresholds``, ``route``,
        ``split_block``); ``fixed``: the thresholds each fixed point ran with, by point index."""
        from offramp.core.checkpoint import load_checkpoint
        from offramp.core.data.card_data import load_validation
        from offramp.core.exit_rule import edge_exit_ids, exits_up_to
        from offramp.core.scores import default_score
        from offramp.training.calibrate import calibrate_input_route, operating_point
        from offramp.training.train import evaluate

        model, card = load_checkpoint(config.checkpoint)
        e = config.edge
        self.score = e.score or default_score(card.config.task)
        default_split = e.split_block if e.split_block is not None else card.split_block
        val, _ = load_validation(card, config.workload.data)
        results = evaluate(model, val, score=self.score)
        self.samples = len(val)
        self.full = float(np.mean(results[-1].correct))
        self.polls: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for p in sorted(polls, key=lambda p: p["t_s"]):
            self.polls[p["point"]].append(p)
        self.fixed = fixed
        wanted = {(default_split, tuple(t)) for t in fixed.values()}
        wanted |= {(p.get("split_block") or default_split, tuple(p["thresholds"]))
                   for p in polls if p.get("route", "split") != "input"}
        self._cascades: dict[tuple[int, tuple[float, ...]], float] = {}
        for split, thresholds in wanted:
            ids = edge_exit_ids(model.exit_configs, split, exits_up_to(model.exit_configs, e.exits, split))
            point = operating_point([results[i] for i in ids], results[-1], self.score, thresholds)
            self._cascades[(split, thresholds)] = point.quality
        self.default_split = default_split
        self.input_route = (calibrate_input_route(config.checkpoint, config.baselines.jpeg_quality,
                                                  data=config.workload.data).accuracy
                            if any(p.get("route") == "input" for p in polls) or "cloud_only" in config.baselines.run
                            else math.nan)  # evaluating the model on JPEG inputs only where something used them

    def accuracy(self, point: int, variant: str, record: Record) -> float:
        """The validation accuracy of what answered ``record`` (NaN: unknown)."""
        if variant in ("edge_only", "fixed_split"):
            return self.full  # the whole model (the split's int8 tokens change no answer that matters)
        if variant == "cloud_only":
            return self.input_route
        if point in self.fixed:
            return self._cascades.get((self.default_split, tuple(self.fixed[point])), math.nan)
        polls = self.polls.get(point, [])
        before = [p for p in polls if p["t_s"] <= record["sent_s"]] or polls[:1]  # before a decision: the start
        if not before:
            return math.nan
        p = before[-1]
        if p.get("route") == "input":
            return self.input_route
        return self._cascades.get((p.get("split_block") or self.default_split, tuple(p["thresholds"])), math.nan)

    def per_point(self, records: Sequence[Record]) -> dict[int, float]:
        """Per point, the mean over its requests."""
        by_point: dict[int, list[Record]] = defaultdict(list)
        for r in records:
            by_point[r["point"]].append(r)
        return {point: float(np.nanmean([self.accuracy(point, rows[0]["variant"], r) for r in rows]))
                for point, rows in by_point.items()}


def interval(values: Sequence[float], n: int) -> float:
    """Half-width of a 95% interval for an accuracy ``mean(values)`` measured on ``n`` samples (binomial)."""
    acc = float(np.nanmean(values)) if len(values) else math.nan
    return 1.96 * math.sqrt(acc * (1 - acc) / n) if n and not math.isnan(acc) else math.nan
