"""bench/RESULTS.md says every number comes from the JSON beside it: its headline figures, recomputed from
the committed JSON as RESULTS formats them, must appear in its text (a JSON rerun without its text fails)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def load(name: str) -> Any:
    return json.loads((RESULTS / name).read_text())


def text() -> str:
    return " ".join((ROOT / "bench" / "RESULTS.md").read_text().split())


def edge_first() -> list[str]:
    clean = load("edge_first_clean.json")["models"][0]
    row = next(r for r in clean["cascade"] if r["thresholds"] == [0.95] * 4)
    return [f"**{clean['val_accuracy'] * 100:.2f}% +- {clean['val_accuracy_se_points']:.2f}**",
            f"**{row['macs_speedup']:.2f}x** | {row['time_speedup']['eager']:.2f}x / "
            f"{row['time_speedup']['onnxruntime']:.2f}x",
            *consistent_choice()]


def consistent_choice() -> list[str]:
    b = load("edge_first_consistent.json")["models"][0]["best_within_half_point"]
    return [f"| {b['accuracy'] * 100:.2f}% | **{b['accuracy_loss_points']:.2f} +- {b['loss_se_points']:.2f}** "
            f"({b['on_selection']['broken_points']:.2f} broken on selection) | **{b['macs_speedup']:.2f}x** | "
            f"{b['time_speedup']['eager']:.2f}x / **{b['time_speedup']['onnxruntime']:.2f}x** |"]


def tradeoff_edge() -> list[str]:
    rows = load("tradeoff_edge/summary.json")
    mean = {(r["variant"], r["profile"], r["thresholds"]): r["latency_mean_ms"] for r in rows}
    return [f"**{mean[('system', 'lte', '0.95')]:.1f} (2.7%)**", f"**{mean[('system', '3g', '0.95')]:.1f} (2.7%)**",
            f"| {mean[('cloud_only', 'lte', '')]:.1f} | {mean[('edge_only', '', '')]:.1f} |"]


def tradeoff_edge_onnx() -> list[str]:
    rows = load("tradeoff_edge_onnx/summary.json")
    mean = {(r["variant"], r["profile"], r["thresholds"]): r["latency_mean_ms"] for r in rows}
    lte, g3, edge_only = mean[("system", "lte", "0.95")], mean[("system", "3g", "0.95")], mean[("edge_only", "", "")]
    best_lte = min(edge_only, mean[("cloud_only", "lte", "")])
    return [f"**{lte:.1f} (2.7%)**", f"**{g3:.1f} (2.7%)**", f"met, {best_lte / lte:.2f}x**",
            f"met, {edge_only / g3:.2f}x**"]


def adaptive_edge() -> list[str]:
    phases = load("adaptive_edge/summary.json")["policies"]["adaptive"]["phases"]
    return [f"{phases['p1_wifi']['accuracy_replayed'] * 100:.2f}%, 0%"]


def routes() -> list[str]:
    summary = load("routes/summary.json")
    out = []
    for link in summary["links"]:
        adaptive = next(p for p in link["policies"] if p["policy"].startswith("adaptive"))
        out.append(f"{adaptive['mean_ms']:.1f}")
        out.append(f"{link['adaptive_vs_fastest_static_mean']:.2f}x")
    targets = summary["targets"]
    out.append(f"{targets['wire_bytes_per_offload']} B on the stream")
    return out


def scale_and_overload() -> list[str]:
    scale, overload = load("scale.json")["targets"], load("overload.json")["targets"]
    return [f"{scale['cpu_per_request_vs_echo']:.2f}x the echo server's",
            f"**Recovery: {overload['recovered_after_s']:.1f} s**"]


def offload_threads() -> list[str]:
    by_threads = {(r["threads"], r["pinned"] is not None): r["client_ms"]["p50"]
                  for r in load("offload.json")["end_to_end_by_threads"]}
    return [f"takes {by_threads[(2, False)]:.1f} ms p50", f"with 1 thread {by_threads[(1, False)]:.1f} ms"]


def multimodal() -> list[str]:
    verdict = load("multimodal.json")["verdict"]
    dark = verdict["fused_beats_visual_in_dark"]["positions"]
    cheaper = verdict["ladder_cheaper_at_same_mae"]
    return [*(f"{p['visual_dark_mae']:.2f} visual vs {p['fused_dark_mae']:.2f} fused" for p in dark[:1]),
            *(f"[{p['diff_ci95'][0]:.2f}, {p['diff_ci95'][1]:.2f}]" for p in dark),
            f"at all {cheaper['ladder_cheaper']} (median ratio {cheaper['median_ratio']:.2f};",
            f"(median ratio {cheaper['latency']['median_ratio']:.2f})"]


@pytest.mark.parametrize("figures", [edge_first, tradeoff_edge, tradeoff_edge_onnx, adaptive_edge, routes, scale_and_overload,
                                     offload_threads, multimodal])
def test_headline_figures_match_their_json(figures: Any) -> None:
    body = text()
    missing = [f for f in figures() if f not in body]
    assert not missing, f"RESULTS.md lacks (or states otherwise) what the JSON says: {missing}"


WALL_KEYS = ("wall_s", "seconds")


def _wall(entry: dict[str, Any]) -> Any:
    return next((entry[k] for k in WALL_KEYS if entry.get(k) is not None), None) or (
        next((v for v in entry.values() if isinstance(v, dict) and _wall(v)), None))


@pytest.mark.parametrize("name", sorted(p.name for p in RESULTS.glob("*.json")))
def test_every_result_records_its_command_machine_and_wall_time(name: str) -> None:
    data = load(name)
    entries = data if isinstance(data, list) else [data]  # a list: runs gathered from their own cards
    for entry in entries:
        assert entry.get("command") or entry.get("commands"), name
        assert entry.get("machine") or entry.get("machines"), name
        assert _wall(entry) or entry.get("total_wall_s") or any(
            e.get("total_wall_s") for e in entry.get("backbones", [])), name


@pytest.mark.parametrize("name", sorted([p.name for p in RESULTS.glob("*.json")]
                                         + [f"{p.parent.name}/run.json" for p in RESULTS.glob("*/run.json")]))
def test_every_result_names_its_processor_or_says_why_not(name: str) -> None:
    data = load(name)
    for entry in data if isinstance(data, list) else [data]:
        machines = entry.get("machines") or [entry["machine"]]
        for machine in machines if isinstance(machines, list) else [machines]:
            # The CPU model (lscpu's name), or the GPU a GPU run used; a run that did not record it says so.
            assert machine.get("cpu") or machine.get("gpu") or machine.get("device") or (
                "cpu" in machine and "not recorded" in machine.get("note", "")), (name, machine)


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in RESULTS.glob("*/experiment.json")))
def test_every_experiment_folder_says_what_ran_where_and_how_long(folder: str) -> None:
    run = load(f"{folder}/run.json")
    assert run["command"].split()[0] in ("offramp", "python") and run["machine"]
    # Runs from before run.json existed say so, and give the time their records show instead.
    assert run["wall_s"] or (run["points_busy_s"] > 0 and "written afterwards" in run["source"])
