"""The exit rule: score directions, never/always thresholds, the walk (against a plain per-sample loop and
against the edge itself), what answering at each exit costs, and which exits an edge runs by name."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offramp.core.exit_rule import (
    HIGHER_IS_CONFIDENT, always_leave, answer_costs, edge_exit_ids, higher_is_confident, least_confident, never_leave,
    passes, thresholds_to_run, walk,
)
from offramp.core.models import ModelConfig, MultiExitModel, parse_exits
from offramp.core.scores import SCORES, confidence
from offramp.core.halves import EdgeHalf

# A sure and an unsure sample, as each kind of head puts them: peaked vs flat logits; small vs large log-variance.
SURE_THEN_UNSURE = {"classification": torch.tensor([[8.0, 0.0, 0.0], [0.2, 0.1, 0.0]]),
                    "regression": torch.tensor([[3.0, -4.0], [3.0, 4.0]])}


@pytest.mark.parametrize("score", SCORES)
def test_a_sure_sample_passes_where_an_unsure_one_does_not(score: str) -> None:
    out = SURE_THEN_UNSURE["regression" if score == "std" else "classification"]
    sure, unsure = confidence(out, score).tolist()
    assert higher_is_confident(score) == (sure > unsure)
    assert passes(torch.tensor([sure, unsure]), (sure + unsure) / 2, score).tolist() == [True, False]


def test_score_directions_are_the_documented_ones() -> None:
    assert set(HIGHER_IS_CONFIDENT) == set(SCORES)
    assert [s for s in SCORES if higher_is_confident(s)] == ["max_prob", "margin"]
    with pytest.raises(ValueError, match="unknown score 'nope'; choose from max_prob"):
        higher_is_confident("nope")


@pytest.mark.parametrize("score", SCORES)
def test_never_and_always_hold_for_any_confidence(score: str) -> None:
    torch.manual_seed(0)
    out = torch.randn(200, 2 if score == "std" else 10) * 20  # far into the tails
    c = confidence(out, score)
    assert not passes(c, never_leave(score), score).any()
    assert passes(c, always_leave(score), score).all()
    assert math.isinf(never_leave(score)) and never_leave(score) == -always_leave(score)


def test_without_offload_the_last_exit_takes_everyone_left() -> None:
    assert thresholds_to_run([0.9, 0.8], "max_prob", offload_enabled=True) == [0.9, 0.8]
    assert thresholds_to_run([0.9, 0.8], "max_prob", offload_enabled=False) == [0.9, -math.inf]
    assert thresholds_to_run([0.3, 0.2], "entropy", offload_enabled=False) == [0.3, math.inf]
    assert thresholds_to_run([], "std", offload_enabled=False) == []


def naive_walk(confidences: np.ndarray, thresholds: list[float], score: str) -> tuple[list[int], list[int]]:
    """One sample at a time, as the rule reads in words."""
    higher = higher_is_confident(score)
    leaves_at, best = [], []
    for j in range(confidences.shape[1]):
        leave, top, top_c = len(thresholds), -1, least_confident(score)
        for k, t in enumerate(thresholds):
            c = confidences[k, j]
            if (c > top_c) if higher else (c < top_c):
                top, top_c = k, c
            if (c >= t) if higher else (c <= t):
                leave = k
                break
        leaves_at.append(leave)
        best.append(top)
    return leaves_at, best


# Few distinct values, so that ties between exits and confidences equal to a threshold come up often.
VALUES = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])


@st.composite
def walks(draw: st.DrawFn) -> tuple[np.ndarray, list[float], str]:
    num_exits, n = draw(st.integers(0, 4)), draw(st.integers(1, 12))
    rows = [draw(st.lists(VALUES, min_size=n, max_size=n)) for _ in range(num_exits)]
    score = draw(st.sampled_from(SCORES))
    extremes = st.sampled_from([never_leave(score), always_leave(score)])
    thresholds = draw(st.lists(VALUES | extremes, min_size=num_exits, max_size=num_exits))
    return np.array(rows, dtype=np.float32).reshape(num_exits, n), thresholds, score


@settings(max_examples=300, deadline=None)
@given(walks())
def test_walk_matches_a_per_sample_loop(case: tuple[np.ndarray, list[float], str]) -> None:
    confidences, thresholds, score = case
    walked = walk(confidences, thresholds, score)
    leaves_at, best = naive_walk(confidences, thresholds, score)
    assert walked.leaves_at.tolist() == leaves_at
    assert walked.best.tolist() == best
    num_exits, n = confidences.shape
    assert walked.shares() == [leaves_at.count(k) / n for k in range(num_exits + 1)]
    per_head = np.arange((num_exits + 1) * n).reshape(num_exits + 1, n)
    assert walked.answers(per_head).tolist() == [per_head[k, j] for j, k in enumerate(leaves_at)]
    costs = [10.0 ** k for k in range(num_exits + 1)]
    assert walked.mean_cost(costs) == pytest.approx(sum(costs[k] for k in leaves_at) / n)


def test_best_exit_is_the_surest_of_those_reached_first_among_equals() -> None:
    #                       sample: 0    1    2    3
    confidences = np.array([[0.3, 0.5, 0.7, 0.9],
                            [0.6, 0.5, 0.2, np.nan],   # sample 3 left at exit 0: what follows is never read
                            [0.4, 0.1, 0.95, np.nan]], dtype=np.float32)
    walked = walk(confidences, [0.8, 0.8, 0.9], "max_prob")
    assert walked.leaves_at.tolist() == [3, 3, 2, 0]
    assert walked.best.tolist() == [1, 0, 2, 0]  # sample 1: exits 0 and 1 tie, the first stands
    assert walked.goes_on.tolist() == [True, True, False, False]
    lower = walk(-confidences, [-0.8, -0.8, -0.9], "entropy")  # the same walk, lower is surer
    assert lower.leaves_at.tolist() == walked.leaves_at.tolist() and lower.best.tolist() == walked.best.tolist()


def test_walk_refuses_a_threshold_count_that_does_not_fit() -> None:
    with pytest.raises(ValueError, match="1 thresholds for 2 exits"):
        walk(np.zeros((2, 5)), [0.5], "max_prob")


@pytest.mark.parametrize("score", ["max_prob", "entropy"])
def test_the_edge_decides_as_the_offline_walk(score: str) -> None:
    torch.manual_seed(0)
    model = MultiExitModel(ModelConfig(backbone="vit_micro_32", img_size=(32, 32), in_chans=3, num_classes=10,
                                       exits=parse_exits("slvit@1,mlp@2,slvit@4"))).eval()
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        confidences = torch.stack([confidence(o, score) for o in model(x)[0]]).numpy()
    thresholds = [_between_samples(c) for c in confidences]  # some samples leave at each exit
    edge = EdgeHalf(model, 4).run(x, thresholds, score)
    walked = walk(confidences, thresholds, score)
    assert 0 < len(edge.offload) < len(x)
    assert edge.exit_index.tolist() == np.where(walked.goes_on, -1, walked.leaves_at).tolist()
    assert edge.best_exit.tolist() == walked.best.tolist()


def _between_samples(c: np.ndarray) -> float:
    """A threshold near the median and well clear of every sample: batch size must not tip a decision."""
    s = np.sort(c)
    gaps = np.diff(s[len(s) // 4: 3 * len(s) // 4])
    k = len(s) // 4 + int(gaps.argmax())
    return float((s[k] + s[k + 1]) / 2)


def test_answer_costs_charge_what_the_walk_has_computed_so_far() -> None:
    exits = parse_exits("slvit@0:audio,slvit@2,slvit@2:fused,slvit@4")
    visual, audio = (lambda p: 10_000 * p), 100_000
    assert answer_costs(exits, [1, 10, 100, 1000], visual, audio) == [
        100_000 + 1,  # audio only: no visual block yet
        100_000 + 20_000 + 11,
        100_000 + 20_000 + 111,  # fused at the same block: nothing more to run but the exit
        100_000 + 40_000 + 1111,
    ]
    assert answer_costs(exits[1:], [10, 100, 1000], visual, audio) == [20_010, 100_000 + 20_110, 100_000 + 41_110]
    assert answer_costs(exits[1:2], [10], visual, audio) == [20_010]  # a visual-only walk never encodes audio


def test_edge_exits_by_name() -> None:
    exits = parse_exits("slvit@2,cnn@2,slvit@4,mlp@6")
    assert edge_exit_ids(exits, 4) == [0, 1, 2]
    assert edge_exit_ids(exits, 6) == [0, 1, 2, 3]
    assert edge_exit_ids(exits, 4, ["slvit@4", "slvit@2"]) == [0, 2]  # cheapest first, whatever the listed order
    assert edge_exit_ids(exits, 4, []) == []
    with pytest.raises(ValueError, match="no exit mlp@6 up to block 4; the checkpoint has slvit@2, cnn@2, slvit@4"):
        edge_exit_ids(exits, 4, ["mlp@6"])
    with pytest.raises(ValueError, match="no exit nope@3, mlp@6 up to block 4"):
        edge_exit_ids(exits, 4, ["slvit@2", "nope@3", "mlp@6"])
    with pytest.raises(ValueError, match="exits listed twice in cnn@2, slvit@2, cnn@2"):
        edge_exit_ids(exits, 4, ["cnn@2", "slvit@2", "cnn@2"])
    with pytest.raises(ValueError, match="the checkpoint has none there"):
        edge_exit_ids(exits, 1, ["slvit@2"])
