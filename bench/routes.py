"""Every route on real links: the adaptive edge against the best fixed choice, per trace and profile.

Runs the experiment ``orchestrator/experiments/routes.toml`` (or reads the records an earlier run left in
``--out`` with ``--reuse``): edge-only, cloud-only (the picture as a JPEG), the fixed split, fixed
calibrated thresholds, and the adaptive edge choosing among every route (input, local, split), over the
shared cellular traces and the lte, 3g and wifi profiles, on the 8x-slowed device. Then, per link and
policy:

* ``mean_ms``, ``p95_ms`` from the records, pooled over the runs of a policy on a link (``[sweep] repeats``:
  each link's points run forward, then backward), with each run's mean beside them;
* ``accuracy`` judged by each answer's true label, with its 95 % interval, and ``accuracy_replayed``: the
  route and thresholds actually in force for each request (the edge's policy, polled once a second),
  replayed over the whole validation split (a few hundred requests do not resolve half a point). Never
  the controller's own expectation;
* ``bytes_per_request`` uplinked and ``cloud_macs_per_request``, each against cloud-only's;
* ``route_shares``: how the requests were answered;
* per one-second window, whether the p95 met the target, for the timelines plot.

Targets: the worst ratio of the adaptive edge's mean latency to the best static policy's (the fastest
whose replayed accuracy is within 0.5 points of the full model), and to the fastest static policy whatever
its accuracy; how far the adaptive edge's replayed accuracy falls below the full model at worst; the least
share of judged windows met; and the envelope of one offload on the bottleneck codec (wire bytes, gRPC framing included, against the
code's own bytes).

    python -m bench.routes                      # runs the experiment (about 40 min on 2 cores)
    python -m bench.routes --reuse              # recompute the summary from bench/results/routes
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from offramp.core.hostinfo import machine
from offramp.core.tables import format_table
from orchestrator.loadgen import write_result
from orchestrator.replay import Replay

RESULTS = Path(__file__).resolve().parent / "results" / "routes"
EXPERIMENT = Path(__file__).resolve().parent.parent / "orchestrator" / "experiments" / "routes.toml"
MAX_DROP_POINTS = 0.5
GRPC_PREFIX_BYTES = 5  # a gRPC message's length prefix on the stream
HYBRID_CODE_BYTES = 198  # the hybrid's bottleneck code at its split (bench/results/bottleneck.json)


def policy_name(row: dict[str, Any]) -> str:
    if row["variant"] != "system":
        return row["variant"]
    return row["policy"] if row["policy"] != "fixed" else f"fixed t={row['thresholds']}"


def load_records(out: Path) -> list[dict[str, Any]]:
    parquet, csv_path = out / "records.parquet", out / "records.csv"
    if parquet.is_file():
        import pyarrow.parquet as pq

        return pq.read_table(parquet).to_pylist()
    import csv

    with csv_path.open() as fh:
        return list(csv.DictReader(fh))


def cloud_macs(record: dict[str, Any], full_macs: float, tail_macs: float) -> float:
    """What the cloud computed for one request: the whole model (input route), the tail (split), nothing."""
    if record["status"] != "OK" or record["degraded"] or record["decided_by"] != "cloud":
        return 0.0
    return full_macs if record.get("route") == "input" else tail_macs


def windows(rows: list[dict[str, Any]], slo_ms: float, min_requests: int = 5) -> list[dict[str, Any]]:
    """One per second of the run: its p95 against the target (judged with at least ``min_requests``), and
    how its requests were answered."""
    by_second: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_second[int(r["sent_s"])].append(r)
    out = []
    for second in sorted(by_second):
        mine = by_second[second]
        lat = [r["latency_ms"] for r in mine if r["status"] == "OK"]
        p95 = float(np.percentile(lat, 95)) if lat else math.inf
        out.append({"t_s": second, "requests": len(mine), "p95_ms": p95, "judged": len(mine) >= min_requests,
                    "met": p95 <= slo_ms, **{f"route_{k}": sum(r.get("route") == k for r in mine) / len(mine)
                                             for k in ("split", "input", "local")}})
    return out


def envelope() -> dict[str, Any]:
    """An offload as the edge now sends it on the bottleneck codec, around a code of the hybrid's size: its
    bytes on the stream (gRPC's prefix included) against the code's own."""
    from offramp.core.wire import pb

    code = pb.EncodedTensor(shape=[1, 65, 8], dtype=pb.EncodedTensor.DTYPE_INT8,
                            compression=pb.EncodedTensor.COMPRESSION_ZSTD, bottleneck="c8b4@5:" + "0" * 16,
                            raw_size=65 * 8, crc32=0xFFFFFFFF, payload=bytes(HYBRID_CODE_BYTES))
    request = pb.OffloadRequest(request_id=1 << 20, split_block=5, tokens=code, deadline_ms=2000)
    wire = request.ByteSize() + GRPC_PREFIX_BYTES
    return {"code_bytes_per_offload": HYBRID_CODE_BYTES, "wire_bytes_per_offload": wire,
            "ratio": round(wire / HYBRID_CODE_BYTES, 3)}


def summarize(out: Path, experiment: Path = EXPERIMENT) -> dict[str, Any]:
    """The study in ``out``: per link, each policy's figures, the adaptive edge against the fixed ones, and
    the targets over all links."""
    from offramp.core.checkpoint import load_checkpoint
    from offramp.core.models.cost import count_macs
    from orchestrator.config import load_experiment

    import torch

    config = load_experiment(experiment, out=str(out))
    records = load_records(out)
    polls = json.loads((out / "policy.json").read_text()) if (out / "policy.json").is_file() else []
    input_route = json.loads((out / "input_route.json").read_text()) if (out / "input_route.json").is_file() else None
    model, card = load_checkpoint(config.checkpoint)
    x = torch.zeros(1, *card.input_shape)
    full_macs = float(count_macs(model.final, x))
    split = config.edge.split_block if config.edge.split_block is not None else card.split_block
    tail_macs = full_macs - float(count_macs(lambda t: model.backbone.head(t, split), x))
    replayed = Replay(config, polls, fixed={}).per_point(records)  # fixed points: their polled thresholds
    slo = config.edge.controller.latency_slo_ms
    links, timelines = _links(records, replayed, slo, full_macs, tail_macs)
    full = max((p["accuracy_replayed"] for b in links.values() for p in b["policies"]
                if p["policy"] in ("edge_only", "fixed_split")), default=math.nan)
    env = envelope()
    return {
        "full_model_accuracy": full, "latency_slo_ms": slo, "full_macs": full_macs, "tail_macs": tail_macs,
        "input_route": input_route, "links": list(links.values()), "timelines": timelines,
        "targets": {**_compare(links, full), "wire_bytes_per_offload": env["wire_bytes_per_offload"],
                    "code_bytes_per_offload": env["code_bytes_per_offload"]},
        "envelope": env,
    }


def _links(records: list[dict[str, Any]], replayed: dict[int, float], slo: float | None, full_macs: float,
           tail_macs: float) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Per link (profile or trace), each policy's figures over all its runs ([sweep] repeats), edge-only
    (which has no link) beside every one; and the adaptive edge's per-second windows on each (its first run)."""
    from orchestrator.report import summarize as point_rows

    by_point: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_point[r["point"]].append(r)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)  # a policy on a link: its points
    for row in point_rows(records):
        runs[(row["profile"], policy_name(row))].append(row)
    links: dict[str, dict[str, Any]] = {}
    timelines: dict[str, list[dict[str, Any]]] = {}
    edge_only: dict[str, Any] | None = None
    for (profile, name), rows in runs.items():
        first = rows[0]["point"]
        mine = [{**r, "point": first} for row in rows for r in by_point[row["point"]]]
        pooled = point_rows(mine)[0]
        n = len(mine)
        acc = pooled["accuracy"]
        per_run = [windows(by_point[row["point"]], slo) if slo else [] for row in rows]
        judged = [x for w in per_run for x in w if x["judged"]]
        entry = {
            "policy": name, "mean_ms": pooled["latency_mean_ms"], "p95_ms": pooled["latency_p95_ms"],
            "mean_ms_by_run": [row["latency_mean_ms"] for row in rows],
            "accuracy": acc, "accuracy_ci95": 1.96 * math.sqrt(acc * (1 - acc) / n) if n else math.nan,
            "accuracy_replayed": float(np.average([replayed.get(row["point"], math.nan) for row in rows],
                                                  weights=[row["requests"] for row in rows])),
            "bytes_per_request": pooled["bytes_per_request"],
            "cloud_macs_per_request": float(np.mean([cloud_macs(r, full_macs, tail_macs) for r in mine])),
            "route_shares": {k: pooled[f"route_{k}"] for k in ("split", "input", "local")},
            "degraded_rate": pooled["degraded_rate"], "requests": n, "runs": len(rows),
            "windows_met_share": sum(x["met"] for x in judged) / len(judged) if judged else math.nan,
        }
        if rows[0]["variant"] == "edge_only":
            edge_only = entry
            continue
        link = profile or "(none)"
        links.setdefault(link, {"profile": link, "policies": []})["policies"].append(entry)
        if rows[0]["variant"] == "system" and rows[0]["policy"] != "fixed":
            timelines[link] = per_run[0]
    if edge_only is not None:
        for bucket in links.values():
            bucket["policies"].append(edge_only)
    return links, timelines


def _compare(links: dict[str, dict[str, Any]], full: float) -> dict[str, float]:
    """The adaptive edge against the fixed policies on each link (written into the link's entry), and the
    worst of each comparison over all links."""
    ratios, any_ratios, drops, met = [], [], [], []
    for bucket in links.values():
        adaptive = next((p for p in bucket["policies"] if p["policy"].startswith("adaptive")), None)
        fixed = [p for p in bucket["policies"] if not p["policy"].startswith("adaptive")]
        if adaptive is None or not fixed:
            continue
        static = [p for p in fixed if p["accuracy_replayed"] >= full - MAX_DROP_POINTS / 100 - 1e-9]
        if static:
            best = min(static, key=lambda p: p["mean_ms"])
            bucket["best_static"] = best["policy"]
            bucket["adaptive_vs_best_static_mean"] = adaptive["mean_ms"] / best["mean_ms"]
            if len(adaptive["mean_ms_by_run"]) == len(best["mean_ms_by_run"]) > 1:  # each run on its own
                bucket["adaptive_vs_best_static_mean_by_run"] = [
                    a / b for a, b in zip(adaptive["mean_ms_by_run"], best["mean_ms_by_run"])]
            ratios.append(bucket["adaptive_vs_best_static_mean"])
        fastest = min(fixed, key=lambda p: p["mean_ms"])  # whatever its accuracy: the stricter reading
        bucket["fastest_static"] = fastest["policy"]
        bucket["adaptive_vs_fastest_static_mean"] = adaptive["mean_ms"] / fastest["mean_ms"]
        any_ratios.append(bucket["adaptive_vs_fastest_static_mean"])
        drops.append((full - adaptive["accuracy_replayed"]) * 100)
        if any(p["windows_met_share"] >= 0.95 for p in fixed) and not math.isnan(adaptive["windows_met_share"]):
            met.append(adaptive["windows_met_share"])
        cloud_only = next((p for p in fixed if p["policy"] == "cloud_only"), None)
        if cloud_only is not None:
            for key, figure in (("adaptive_bytes_vs_cloud_only", "bytes_per_request"),
                                ("adaptive_cloud_macs_vs_cloud_only", "cloud_macs_per_request")):
                bucket[key] = adaptive[figure] / cloud_only[figure] if cloud_only[figure] else math.nan
    return {
        "adaptive_vs_best_static_mean_max_ratio": max(ratios) if ratios else math.nan,
        # against the fastest fixed policy even where its replayed accuracy is below the floor, and how far
        # below the full model the adaptive edge's own replayed accuracy falls at worst
        "adaptive_vs_fastest_static_mean_max_ratio": max(any_ratios) if any_ratios else math.nan,
        "adaptive_accuracy_below_full_max_points": max(drops) if drops else math.nan,
        "windows_met_share_min": min(met) if met else math.nan,
    }


def short(profile: str) -> str:
    """A link's label for a plot: the trace's name, or the profile."""
    return profile.removeprefix("trace=").split(",")[0]


def plot(result: dict[str, Any], path: Path) -> None:
    from offramp.training.plots import pyplot

    plt = pyplot()
    if plt is None:
        return
    links = result["links"]
    fig, axes = plt.subplots(2, 1, figsize=(11, 8))
    names = sorted({p["policy"] for b in links for p in b["policies"]})
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        xs = [j + i * width for j, b in enumerate(links)]
        ys = [next((p["mean_ms"] for p in b["policies"] if p["policy"] == name), math.nan) for b in links]
        axes[0].bar(xs, ys, width, label=name)
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(links))], [short(b["profile"]) for b in links],
                       fontsize=7)
    axes[0].set_yscale("log")
    axes[0].set(ylabel="mean latency (ms, log)", title="every route, per link: mean latency per policy "
                "(8x-slowed device; traces with 20 ms each way)")
    axes[0].legend(fontsize=7)
    colors = {"split": "tab:blue", "input": "tab:orange", "local": "tab:green"}
    for k, (profile, w) in enumerate(result["timelines"].items()):
        for x in w:
            bottom = k
            for route, color in colors.items():
                share = x[f"route_{route}"]
                axes[1].bar(x["t_s"], share * 0.8, bottom=bottom, color=color, width=1.0,
                            label=route if k == 0 and x is w[0] else None)
                bottom += share * 0.8
    axes[1].set_yticks([k + 0.4 for k in range(len(result["timelines"]))], [short(p) for p in result["timelines"]],
                       fontsize=7)
    axes[1].set(xlabel="time (s)", title="adaptive edge: the route it took, per second")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.routes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(RESULTS), help="experiment output folder (default bench/results/routes)")
    ap.add_argument("--reuse", action="store_true", help="summarize the records already in --out; run nothing")
    ap.add_argument("--experiment", default=str(EXPERIMENT),
                    help="experiment file (default orchestrator/experiments/routes.toml; a shorter one for a smoke run)")
    args = ap.parse_args(argv)
    out, experiment = Path(args.out), Path(args.experiment)
    started = time.time()
    command = "python -m bench.routes " + shlex.join(sys.argv[1:] if argv is None else argv)
    if not args.reuse:
        from orchestrator.config import load_experiment
        from orchestrator.sweep import run_experiment

        run_experiment(load_experiment(experiment, out=str(out)), command=command)
    result = summarize(out, experiment)
    result = {"command": command,
              "machine": machine(), "experiment": experiment.name,
              **result, "wall_s": round(time.time() - started, 1)}
    for bucket in result["links"]:
        print(f"\n{bucket['profile']}")
        print(format_table(["policy", "mean ms", "p95 ms", "accuracy", "replayed", "bytes/req", "cloud MMACs",
                            "split/input/local", "windows met"],
                           [[p["policy"], p["mean_ms"], p["p95_ms"], p["accuracy"], p["accuracy_replayed"],
                             p["bytes_per_request"], p["cloud_macs_per_request"] / 1e6,
                             "/".join(f"{p['route_shares'][k]:.2f}" for k in ("split", "input", "local")),
                             p["windows_met_share"]] for p in bucket["policies"]]))
    print("\ntargets:", json.dumps(result["targets"]))
    # The experiment's own rows stay in summary.csv; summary.json becomes this study's summary.
    write_result(result, out / "summary.json")
    plot(result, out / "routes.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
