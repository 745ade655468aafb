"""Outputs of an experiment: the records, a summary per point, and the plots researchers look at first.

Every number in the summary is computed from the records, so a reader can
recompute (or dispute) any of them from ``records.parquet`` alone.

Plots (PNG):

* ``accuracy_latency.png`` — per link profile, accuracy against mean and p95
  latency: one marker per threshold (a line per codec and edge count), with
  the baselines (fixed split ▲, cloud-only ■, edge-only ★) on the same axes;
* ``offload_rate.png`` — share of requests the policy sent upstream, per threshold;
* ``bytes_per_request.png`` — bytes sent upstream per request, averaged over profiles;
* ``timeline.png`` — latency over time, only where a profile is a schedule (a bandwidth drop).
"""
from __future__ import annotations

import csv
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from offramp.core.tables import format_table

from .workload import Record

log = logging.getLogger(__name__)

Row = dict[str, Any]
PARAMS = ("point", "variant", "edges", "profile", "codec", "thresholds", "threshold", "policy", "repeat")
METRICS = ("requests", "errors", "accuracy", "offload_rate", "degraded_rate", "latency_mean_ms", "latency_p50_ms",
           "latency_p95_ms", "latency_p99_ms", "bytes_per_request", "bytes_per_offload", "throughput_rps",
           "route_split", "route_input", "route_local")
ROUTES = ("split", "input", "local")  # how each request was answered (the edge's Policy.route)
MARKERS = {"system": "o", "fixed_split": "^", "cloud_only": "s", "edge_only": "*"}
NAMES = {"system": "system", "fixed_split": "fixed split", "cloud_only": "cloud-only", "edge_only": "edge-only"}


def write_json(path: Path, value: Any) -> None:
    """JSON with NaN written as null (NaN is not JSON), tuples as lists."""
    path.write_text(json.dumps(_jsonable(value), indent=2, default=str) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _columns(rows: Sequence[Row]) -> list[str]:
    """Every key of every row in order of first appearance, the stage timings (which differ by variant) last."""
    keys = dict.fromkeys(key for row in rows for key in row)
    return sorted(keys, key=lambda key: key.startswith("stage_"))


def write_records(records: Sequence[Record], out: Path, name: str = "records") -> Path | None:
    """``NAME.parquet`` where pyarrow is installed, ``NAME.csv`` otherwise; None when there are none."""
    if not records:
        return None
    columns = _columns(records)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path = out / f"{name}.csv"
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, columns)
            writer.writeheader()
            writer.writerows(records)
        return path
    path = out / f"{name}.parquet"
    pq.write_table(pa.table({c: [r.get(c) for r in records] for c in columns}), path)
    return path


def read_records(out: Path, name: str = "records") -> list[Record]:
    """What ``write_records`` wrote (parquet, else CSV with its columns as strings); [] where there is none."""
    if (out / f"{name}.parquet").is_file():
        import pyarrow.parquet as pq

        return pq.read_table(out / f"{name}.parquet").to_pylist()
    if (out / f"{name}.csv").is_file():
        with (out / f"{name}.csv").open(newline="") as fh:
            return list(csv.DictReader(fh))
    return []


def summarize(records: Iterable[Record]) -> list[Row]:
    """One row per sweep point: its parameters and the metrics over its requests."""
    by_point: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        by_point[r["point"]].append(r)
    return [_summary_row(rows) for _, rows in sorted(by_point.items())]


def _summary_row(rows: list[Record]) -> Row:
    n = len(rows)
    latency = np.array([r["latency_ms"] for r in rows], dtype=float)
    answered = latency[~np.isnan(latency)]
    offloaded = [r for r in rows if r["offloaded"]]
    sent_bytes = [r["bytes_sent"] for r in offloaded if r["bytes_sent"]]
    # Wall time of the point: first arrival (t=0 on every edge) to the last answer.
    span = max((r["sent_s"] + r["latency_ms"] / 1e3 for r in rows if not math.isnan(r["latency_ms"])), default=0.0)

    def pct(q: float) -> float:
        return float(np.percentile(answered, q)) if len(answered) else math.nan

    return {key: rows[0].get(key, "") for key in PARAMS} | {
        "requests": n,
        "errors": sum(r["status"] != "OK" for r in rows),
        "accuracy": float(np.mean([r["correct"] for r in rows])),
        "offload_rate": len(offloaded) / n,
        "degraded_rate": sum(r["degraded"] for r in rows) / n,
        "latency_mean_ms": float(answered.mean()) if len(answered) else math.nan,
        "latency_p50_ms": pct(50), "latency_p95_ms": pct(95), "latency_p99_ms": pct(99),
        "bytes_per_request": float(np.mean([r["bytes_sent"] for r in rows])),
        "bytes_per_offload": float(np.mean(sent_bytes)) if sent_bytes else math.nan,
        "throughput_rps": len(answered) / span if span > 0 else math.nan,
    } | {f"route_{route}": sum(r.get("route") == route for r in rows) / n for route in ROUTES}


def write_summary(summary: Sequence[Row], out: Path, extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """``summary.csv`` and ``summary.json``: the rows, or with ``extra`` (a policy study's timelines, see
    ``orchestrator.study``) an object holding ``extra``'s keys and the rows as ``points``."""
    csv_path, json_path = out / "summary.csv", out / "summary.json"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, [*PARAMS, *METRICS], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(summary)
    write_json(json_path, list(summary) if extra is None else {**extra, "points": list(summary)})
    return csv_path, json_path


def format_summary(summary: Sequence[Row]) -> str:
    """The summary as a fixed-width table for the terminal."""
    headers = ["#", "variant", "edges", "profile", "codec", "thresh", "acc", "offload", "degr", "mean ms",
               "p95 ms", "B/req", "req/s", "errors"]
    rows = [[r["point"], NAMES[r["variant"]] + (f" ({r['policy']})" if r["policy"] not in ("", "fixed") else ""),
             r["edges"], r["profile"] or "-", r["codec"] or "-",
             r["thresholds"] or "-", r["accuracy"], r["offload_rate"], r["degraded_rate"],
             round(r["latency_mean_ms"], 1), round(r["latency_p95_ms"], 1), round(r["bytes_per_request"]),
             round(r["throughput_rps"], 1), r["errors"]] for r in summary]
    return format_table(headers, rows)


def plot_all(summary: Sequence[Row], records: Sequence[Record], folder: Path) -> list[Path]:
    """Every plot the summary supports; returns their paths (none without matplotlib, with a warning)."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install 'offramp[plot]')")
        return []
    matplotlib.use("Agg")
    if not summary:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    paths = [_accuracy_latency(summary, folder / "accuracy_latency.png"),
             _offload_rate(summary, folder / "offload_rate.png"),
             _bytes_per_request(summary, folder / "bytes_per_request.png")]
    if any(";" in r["profile"] for r in summary):
        paths.append(_timeline(summary, records, folder / "timeline.png"))
    return [p for p in paths if p is not None]


def _series_label(row: Row) -> str:
    parts = [NAMES[row["variant"]], row["codec"], f"{row['edges']} edge{'s' if row['edges'] > 1 else ''}"]
    return ", ".join(p for p in parts if p)


def _accuracy_latency(summary: Sequence[Row], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    profiles = list(dict.fromkeys(r["profile"] for r in summary if r["profile"]))
    if not profiles:
        return None
    fig, axes = plt.subplots(len(profiles), 2, figsize=(12, 3.8 * len(profiles)), squeeze=False)
    for row_axes, profile in zip(axes, profiles):
        # Edge-only has no link: the same markers belong on every profile's axes.
        rows = [r for r in summary if r["profile"] in (profile, "")]
        for ax, stat, name in zip(row_axes, ("latency_mean_ms", "latency_p95_ms"), ("mean", "p95")):
            series: dict[str, list[Row]] = defaultdict(list)
            for r in rows:
                series[_series_label(r)].append(r)
            for label, members in series.items():
                variant = members[0]["variant"]
                xs, ys = [m[stat] for m in members], [m["accuracy"] for m in members]
                ax.plot(xs, ys, marker=MARKERS[variant], linestyle="-" if variant == "system" else "none",
                        markersize=11 if variant == "edge_only" else 7, label=label)
                if variant == "system":
                    for m, x, y in zip(members, xs, ys):
                        ax.annotate(m["thresholds"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            values = [r[stat] for r in rows if not math.isnan(r[stat])]
            if values and min(values) > 0 and max(values) / min(values) > 30:
                ax.set_xscale("log")
            ax.set(title=f"{profile}: accuracy vs {name} latency", xlabel=f"{name} latency (ms)", ylabel="accuracy")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _save(fig, path)


def _offload_rate(summary: Sequence[Row], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    system = [r for r in summary if r["variant"] == "system"]
    if not system:
        return None
    order = list(dict.fromkeys(r["thresholds"] for r in system))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(order) + 3), 4))
    series: dict[str, list[Row]] = defaultdict(list)
    for r in system:
        series[f"{r['profile']}, {r['codec']}, {r['edges']} edge{'s' if r['edges'] > 1 else ''}"].append(r)
    for label, members in series.items():
        ax.plot([order.index(m["thresholds"]) for m in members], [m["offload_rate"] for m in members],
                marker="o", label=label)
    ax.set_xticks(range(len(order)), order)
    ax.set(xlabel="thresholds (one per exit where they differ)", ylabel="offload rate", ylim=(-0.03, 1.03),
           title="share of requests sent to the cloud")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _bytes_per_request(summary: Sequence[Row], path: Path) -> Path:
    import matplotlib.pyplot as plt

    groups: dict[str, list[float]] = defaultdict(list)
    for r in summary:
        label = NAMES[r["variant"]] + (f", {r['codec']}" if r["codec"] else "")
        if r["variant"] == "system":
            label += f", t={r['thresholds']}"
        groups[label].append(r["bytes_per_request"])
    labels = list(groups)
    means = [float(np.mean(groups[k])) for k in labels]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(labels) + 1.5))
    bars = ax.barh(range(len(labels)), means, color="tab:blue")
    ax.bar_label(bars, [f"{m:,.0f}" for m in means], fontsize=7, padding=3)
    ax.margins(x=0.15)  # room for the labels
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="bytes sent upstream per request (mean over profiles and edges)", title="bytes per request")
    return _save(fig, path)


def _timeline(summary: Sequence[Row], records: Sequence[Record], path: Path) -> Path:
    import matplotlib.pyplot as plt

    schedules = list(dict.fromkeys(r["profile"] for r in summary if ";" in r["profile"]))
    fig, axes = plt.subplots(len(schedules), 1, figsize=(11, 3.8 * len(schedules)), squeeze=False)
    for ax, schedule in zip(axes[:, 0], schedules):
        for row in (r for r in summary if r["profile"] == schedule):
            mine = [r for r in records if r["point"] == row["point"] and not math.isnan(r["latency_ms"])]
            label = _series_label(row) + (f", t={row['thresholds']}" if row["variant"] == "system" else "")
            ax.scatter([r["sent_s"] for r in mine], [r["latency_ms"] for r in mine], s=6, alpha=0.6, label=label)
        ax.set(title=f"latency over time: {schedule}", xlabel="arrival (s since the load started)",
               ylabel="latency (ms)", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, markerscale=2)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    """Write a finished figure as PNG and free it (figures are not collected while pyplot holds them)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
