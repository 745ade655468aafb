"""Per-exit evaluation reports: accuracy (or MAE/RMSE), overhead, and exit shares."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from offramp.core.exit_rule import answer_costs, walk
from offramp.core.models import MultiExitModel
from offramp.core.models.cost import count_macs, count_params
from offramp.core.tables import format_table
from offramp.training.train import HeadResult


@torch.no_grad()
def head_costs(model: MultiExitModel, input_shape: tuple[int, ...],
               exit_ids: list[int] | None = None) -> list[dict[str, int]]:
    """Params and MACs of each exit (``exit_ids``: of those walked) and of the final head,
    plus MACs spent to reach each answer as the edge walks them (see ``answer_costs``)."""
    bb = model.backbone
    x = torch.zeros(1, *input_shape)
    audio = torch.zeros(1, *model.config.audio.input_shape) if model.audiovisual else None
    audio_tokens = model.encode_audio(audio)
    audio_macs = count_macs(model.audio_encoder, audio) if audio is not None else 0
    walked = range(len(model.exit_configs)) if exit_ids is None else exit_ids
    exits = [model.exit_configs[i] for i in walked]
    exit_macs = [count_macs(lambda f, i=i: model.run_exit(i, f, audio_tokens), bb.head(x, e.position))
                 for i, e in zip(walked, exits)]
    to_answer = answer_costs(exits, exit_macs, lambda p: count_macs(lambda t: bb.head(t, p), x), audio_macs)
    costs = [{"params": count_params(model.exits[i]), "macs": macs, "macs_to_answer": spent}
             for i, macs, spent in zip(walked, exit_macs, to_answer)]
    full = count_macs(model.final, x, audio) if audio is not None else count_macs(bb, x)
    costs.append({"params": count_params(model) - count_params(model.exits), "macs": full,
                  "macs_to_answer": full + sum(exit_macs)})
    return costs


def cascade(results: list[HeadResult], score: str, thresholds: list[float],
            costs: list[dict[str, int]] | None = None) -> list[dict[str, Any]]:
    """For each threshold (shared by the exits), the share of samples each head answers, and the overall quality.

    Samples no exit is confident enough about reach the final head (on a
    split deployment: the cloud). With ``costs`` (``head_costs``), each row
    also gives the mean MACs per input, counting every exit evaluated on the
    way as the edge runs them, and the speed-up over the full model alone.
    """
    exits, final = results[:-1], results[-1]
    confidences = np.reshape([r.confidence for r in exits], (len(exits), len(final.pred)))
    quality = "accuracy" if final.correct is not None else "mae"
    per_head = np.stack([r.correct if quality == "accuracy" else r.error for r in results])
    rows = []
    for t in thresholds:
        walked = walk(confidences, [t] * len(exits), score)
        row = {"threshold": t, "shares": walked.shares(), quality: float(walked.answers(per_head).mean())}
        if costs is not None:
            row["mean_macs"] = walked.mean_cost([c["macs_to_answer"] for c in costs])
            row["macs_speedup"] = costs[-1]["macs"] / row["mean_macs"]
        rows.append(row)
    return rows


def evaluation_report(model: MultiExitModel, results: list[HeadResult], input_shape: tuple[int, ...],
                      score: str, thresholds: list[float], exit_ids: list[int] | None = None) -> dict[str, Any]:
    """Everything ``offramp eval`` prints, as plain JSON-able data; ``exit_ids``: the exits walked
    (``results`` holds those exits' results, then the final head's)."""
    costs = head_costs(model, input_shape, exit_ids)
    heads = [{"name": r.name, **r.summary(), **c} for r, c in zip(results, costs)]
    return {"score": score, "heads": heads, "cascade": cascade(results, score, thresholds, costs)}


def format_report(report: dict[str, Any]) -> str:
    heads = report["heads"]
    quality = "accuracy" if "accuracy" in heads[0] else "mae"
    cols = ["accuracy"] if quality == "accuracy" else ["mae", "rmse"]
    t1 = format_table(["head", *cols, "params", "MACs", "MACs to answer"],
                      [[h["name"], *[h[c] for c in cols], h["params"], h["macs"], h["macs_to_answer"]] for h in heads])
    names = [h["name"] for h in heads[:-1]] + ["final/cloud"]
    costed = all("mean_macs" in r for r in report["cascade"])
    t2 = format_table([f"{report['score']} thr", *names, quality, *(["mean MACs", "speed-up"] if costed else [])],
                      [[r["threshold"], *[f"{s:.1%}" for s in r["shares"]], r[quality],
                        *([round(r["mean_macs"]), f"{r['macs_speedup']:.2f}x"] if costed else [])]
                       for r in report["cascade"]])
    return (f"{t1}\n\nShare of validation samples answered by each head (first confident exit wins), and the mean "
            f"MACs per input (every exit tried on the way counted) against the full model's:\n{t2}")
