"""The orchestrator: experiment files, the sweep grid, seeded load, and whole sweeps on Ray.

The Ray tests start real daemons: one on a three-node ``ray.cluster_utils.Cluster``
(a ``cloud`` node and two ``edge`` nodes) checks placement and one record per
request; one runs ``offramp experiment run`` on the CI experiment end to end.
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from offramp.core.errors import OfframpError
from orchestrator.config import BaselinesConfig, ExperimentConfig, SweepConfig, WorkloadConfig, load_experiment
from orchestrator.report import summarize
from orchestrator.sweep import NEVER, expand
from orchestrator.workload import EdgeLoad

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "orchestrator" / "experiments"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


# -- experiment files ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["digits_smoke", "tradeoff", "bandwidth_drop", "routes"])
def test_example_experiments_load(name: str) -> None:
    config = load_experiment(EXPERIMENTS / f"{name}.toml")
    assert Path(config.checkpoint).is_absolute()
    assert expand(config)


def test_paths_are_relative_to_the_file_and_flags_override_them(tmp_path: Path) -> None:
    path = write(tmp_path, 'checkpoint = "model"\n[workload]\ncount = 5\n')
    assert load_experiment(path).checkpoint == str(tmp_path / "model")
    assert load_experiment(path, checkpoint="other").checkpoint == str(Path("other").resolve())
    assert load_experiment(path).out_dir == Path("runs/experiments/experiment")


def test_trace_files_are_relative_to_the_experiment_and_labelled_by_name(tmp_path: Path) -> None:
    (tmp_path / "traces").mkdir()
    for side in ("up", "down"):
        (tmp_path / "traces" / f"cell.{side}").write_text("0\n5\n10\n")
    path = write(tmp_path, 'checkpoint = "m"\n[workload]\ncount = 5\n[sweep]\n'
                           'profiles = ["trace=traces/cell,delay=20ms", ["lte", "uptrace=traces/cell.up"]]\n'
                           'policies = ["fixed", "adaptive_routes"]\n[edge]\nlatency_slo_ms = 150\n')
    config = load_experiment(path)
    assert config.sweep.profiles[0] == f"trace={tmp_path / 'traces' / 'cell'},delay=20ms"
    labels = {p.profile_label for p in expand(config) if p.profile is not None}
    assert labels == {"trace=cell,delay=20ms", "lte | uptrace=cell.up"}
    assert {p.policy for p in expand(config)} == {"fixed", "adaptive_routes"}


@pytest.mark.parametrize("text, message", [
    ('checkpoint = "m"\ncheckpiont = "m"', "unknown setting 'checkpiont'"),
    ('name = "x"', "missing required setting(s) checkpoint"),
    ('checkpoint = "m"\n[sweep]\ncodecs = ["int8", "int4"]', "'sweep.codecs[1]' must be one of 'int8'"),
    ('checkpoint = "m"\n[sweep]\nthresholds = [0.8, "high"]', "'sweep.thresholds[1]' must be a number"),
    ('checkpoint = "m"\n[sweep]\nthresholds = [0.8, [0.7, "high"]]', "'sweep.thresholds[1][1]' must be a number"),
    ('checkpoint = "m"\n[sweep]\nprofiles = ["lte", "5g"]', "sweep.profiles[1]: unknown link profile '5g'"),
    ('checkpoint = "m"\n[sweep]\nedges = []', "sweep.edges must list at least one value"),
    ('checkpoint = "m"\n[workload]\nrate = 5', "workload.count or duration_s must be set"),
    ('checkpoint = "m"\n[workload]\ncount = 5\nrate = -1', "workload.rate must be positive"),
    ('checkpoint = "m"\n[edge]\nslowdown = 0.5', "edge.slowdown must be at least 1"),
    ('checkpoint = "m"\nedge = 3', "'edge' must be a table"),
    ('checkpoint = "m"\n[baselines]\nrun = ["edge_only", "oracle"]', "'baselines.run[1]' must be one of"),
    ('checkpoint = "m"\n[nodes]\nedge_cores = [4096]', "nodes.edge_cores: core(s) 4096 do not exist here"),
    ('checkpoint = "m"\n[nodes]\ncloud_cores = []', "nodes.cloud_cores must list at least one core"),
    ('checkpoint = "m"\n[nodes]\ncloud_cores = [0, 0]', "nodes.cloud_cores lists a core twice"),
])
def test_errors_name_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(OfframpError) as info:
        load_experiment(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_grid_runs_every_baseline_beside_the_system() -> None:
    config = ExperimentConfig(checkpoint="m", sweep=SweepConfig(
        thresholds=(0.8, (0.7, 0.9)), codecs=("int8", "float16"), profiles=("lan", ("lte", "3g")), edges=(1, 3)))
    points = expand(config)
    kinds = Counter(p.variant for p in points)
    # system: 2 thresholds x 2 codecs x 2 profiles x 2 edge counts; fixed split per codec, profile and edge
    # count; cloud-only per profile and edge count; edge-only per edge count.
    assert kinds == {"system": 16, "fixed_split": 8, "cloud_only": 4, "edge_only": 2}
    assert [p.index for p in points] == list(range(len(points)))
    assert [p.edges for p in points] == sorted(p.edges for p in points)  # grouped: one placement per edge count
    assert all(p.thresholds == NEVER for p in points if p.variant == "fixed_split")
    mixed = next(p for p in points if p.profile == ("lte", "3g") and p.edges == 3)
    assert mixed.links() == ("lte", "3g", "lte") and mixed.profile_label == "lte | 3g"
    assert next(p for p in points if p.thresholds == (0.7, 0.9)).thresholds_label == "0.7/0.9"



def test_repeats_run_each_link_again_in_reverse_order() -> None:
    """A slow drift of the host weighs alike on every policy of a link: forward, then backward."""
    config = ExperimentConfig(checkpoint="m", sweep=SweepConfig(
        profiles=("lte", "3g"), thresholds=(0.9,), repeats=2),
        baselines=BaselinesConfig(run=("fixed_split", "cloud_only", "edge_only")))
    points = expand(config)
    assert [p.index for p in points] == list(range(len(points)))
    lte = [(p.variant, p.thresholds, p.repeat) for p in points if p.profile == "lte"]
    assert lte == [("system", 0.9, 0), ("fixed_split", NEVER, 0), ("cloud_only", None, 0),
                   ("cloud_only", None, 1), ("fixed_split", NEVER, 1), ("system", 0.9, 1)]
    assert [p.repeat for p in points if p.variant == "edge_only"] == [0, 1]
    assert points[3].params()["repeat"] == 1 and "run 2" in points[3].describe()
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        SweepConfig(repeats=0)


# -- the load ------------------------------------------------------------------------------------------------------

def test_load_is_seeded_per_edge() -> None:
    w = WorkloadConfig(rate=50.0, count=200)
    a, b, other_edge = EdgeLoad(w, 7, 0, 30), EdgeLoad(w, 7, 0, 30), EdgeLoad(w, 7, 1, 30)
    assert np.array_equal(a.arrivals(), b.arrivals()) and len(a.arrivals()) == 200
    assert not np.array_equal(a.arrivals(), other_edge.arrivals())
    first = [s for s, _ in zip(a.samples(), range(90))]
    assert first == [s for s, _ in zip(b.samples(), range(90))]
    assert sorted(first[:30]) == list(range(30)) and first[:30] != first[30:60]  # a fresh permutation per pass
    mean_gap = float(np.diff(a.arrivals()).mean())
    assert 0.5 / 50 < mean_gap < 2 / 50


def test_duration_cuts_the_arrivals() -> None:
    load = EdgeLoad(WorkloadConfig(rate=100.0, duration_s=2.0), 0, 0, 10)
    arrivals = load.arrivals()
    assert arrivals[-1] <= 2.0 and 120 < len(arrivals) < 280 and load.planned_s == arrivals[-1]


def test_summary_counts_every_request() -> None:
    def record(i: int, correct: bool, offloaded: bool, latency: float, status: str = "OK") -> dict:
        return {"point": 0, "variant": "system", "edges": 1, "profile": "lan", "codec": "int8", "thresholds": "0.9",
                "threshold": 0.9, "status": status, "correct": correct, "offloaded": offloaded, "degraded": False,
                "bytes_sent": 1000 if offloaded else 0, "latency_ms": latency, "sent_s": i * 0.1}

    rows = summarize([record(0, True, False, 10.0), record(1, True, True, 30.0), record(2, False, True, 50.0),
                      record(3, False, False, math.nan, status="NO_REPLY")])
    (row,) = rows
    assert row["requests"] == 4 and row["errors"] == 1
    assert row["accuracy"] == 0.5 and row["offload_rate"] == 0.5
    assert row["latency_mean_ms"] == 30.0 and row["bytes_per_request"] == 500 and row["bytes_per_offload"] == 1000


# -- pinning ------------------------------------------------------------------------------------------------------

def _thread_cores(pid: int) -> set[frozenset[int]]:
    """The distinct core sets the threads of ``pid`` may run on."""
    import os

    return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


def test_pinned_daemons_run_on_their_cores_only(tiny_checkpoint: Path) -> None:
    """DaemonProcess(cores=...) and an orchestrator actor's pin (the daemon inherits it) hold every daemon thread."""
    import os

    from offramp.serving.daemon_proc import DaemonProcess
    from orchestrator.actors import Pinned

    have = sorted(os.sched_getaffinity(0))
    if len(have) < 2:
        pytest.skip("pinning apart needs two cores")
    core = have[-1]  # not the first: an unpinned process would also be allowed on it
    with DaemonProcess("cloud", ["--checkpoint", str(tiny_checkpoint)], cores={core}) as cloud:
        assert cloud.proc is not None and _thread_cores(cloud.proc.pid) == {frozenset({core})}

    try:  # the actors' way: pin the starting process, and what it starts inherits the mask
        Pinned().pin((core,), "cloud_cores")
        assert _thread_cores(os.getpid()) == {frozenset({core})}
        with DaemonProcess("cloud", ["--checkpoint", str(tiny_checkpoint)]) as cloud:
            assert cloud.proc is not None and _thread_cores(cloud.proc.pid) == {frozenset({core})}
        with pytest.raises(OfframpError, match="cloud_cores: core.*4096 do not exist here"):
            Pinned().pin((4096,), "cloud_cores")
    finally:
        from offramp.serving.daemon_proc import pin_threads

        pin_threads(os.getpid(), have)
    assert _thread_cores(os.getpid()) == {frozenset(have)}


# -- whole sweeps on Ray --------------------------------------------------------------------------------------------

@pytest.fixture
def three_nodes() -> Iterator[str]:
    """A Ray cluster on this machine: a head with ``cloud`` and two nodes with ``edge``; yields its address."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"cloud": 1},
                                                            "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, resources={"edge": 1})
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()


@pytest.mark.long
def test_daemons_are_placed_by_resource_and_every_request_has_one_record(
        three_nodes: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from orchestrator.sweep import run_experiment

    count = 12
    path = write(tmp_path, textwrap.dedent(f"""
        name = "placement"
        checkpoint = "{tiny_checkpoint}"
        [nodes]
        host = "127.0.0.1"
        [edge]
        exits = ["slvit@4"]  # of the card's slvit@2 and slvit@4
        [workload]
        rate = 40.0
        count = {count}
        warmup = 2
        [sweep]
        thresholds = [0.0]   # every sample leaves at the first exit
        profiles = ["lan"]
        edges = [2]
        [baselines]
        run = ["fixed_split"]  # every sample crosses to the cloud node
    """))
    result = run_experiment(load_experiment(path, out=str(tmp_path / "out")), address=three_nodes, progress=False)

    nodes = json.loads((result.out_dir / "nodes.json").read_text())
    points = json.loads((result.out_dir / "points.json").read_text())
    assert [p["params"]["variant"] for p in points] == ["system", "fixed_split"]
    for point in points:
        placed = point["nodes"]
        assert nodes[placed["cloud"]].get("cloud") == 1
        assert all(nodes[node].get("edge") == 1 for node in placed["edges"] + placed["drivers"])
        assert len(set(placed["edges"])) == 2 and placed["edges"] == placed["drivers"]  # one edge per node
        assert placed["cloud"] not in placed["edges"]

    import pyarrow.parquet as pq

    records = pq.read_table(result.records).to_pylist()
    keys = Counter((r["point"], r["edge"], r["request_id"]) for r in records)
    assert set(keys.values()) == {1}
    assert sorted(keys) == [(p, e, i) for p in (0, 1) for e in (0, 1) for i in range(count)]
    assert all(r["status"] == "OK" and not r["degraded"] for r in records)
    assert {r["decided_by"] for r in records if r["point"] == 0} == {"exit:slvit@4"}
    assert {r["decided_by"] for r in records if r["point"] == 1} == {"cloud"}
    assert all(r["bytes_sent"] > 0 and r["cloud_node"] != r["edge_node"] for r in records if r["point"] == 1)


@pytest.mark.long
def test_experiment_run_writes_records_summary_and_plots(tiny_checkpoint: Path, tmp_path: Path) -> None:
    smoke = EXPERIMENTS / "digits_smoke.toml"
    config = load_experiment(smoke)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "offramp.cli", "experiment", "run", str(smoke), "--checkpoint",
               str(tiny_checkpoint), "--out", str(out), "--no-progress"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "edge-only" in run.stdout and "cloud-only" in run.stdout and "fixed split" in run.stdout

    import pyarrow.parquet as pq

    points = expand(config)
    records = pq.read_table(out / "records.parquet").to_pylist()
    edges = max(config.sweep.edges)
    assert len(records) == len(points) * edges * config.workload.count
    assert Counter(r["variant"] for r in records)["edge_only"] == edges * config.workload.count
    with (out / "summary.csv").open() as fh:
        summary = list(csv.DictReader(fh))
    assert [int(r["point"]) for r in summary] == [p.index for p in points]
    assert len(json.loads((out / "summary.json").read_text())) == len(points)
    run = json.loads((out / "run.json").read_text())
    assert run["wall_s"] > 0 and run["points"] == len(points) and run["machine"]["cpu"] and run["command"]
    for plot in ("accuracy_latency", "offload_rate", "bytes_per_request"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 10_000
    assert (out / "logs" / "point-000" / "edge-1.log").is_file()

    shown = subprocess.run([sys.executable, "-m", "offramp.cli", "experiment", "show", str(smoke)],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and f"{len(points)} points" in shown.stdout


def test_edge_exits_must_be_the_checkpoints(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from orchestrator.sweep import run_experiment

    path = write(tmp_path, textwrap.dedent(f"""
        name = "bad-exits"
        checkpoint = "{tiny_checkpoint}"
        [edge]
        exits = ["cnn@2"]
    """))
    with pytest.raises(OfframpError, match="edge.exits: no exit cnn@2 up to block 4; "
                                           "the checkpoint has slvit@2, slvit@4"):
        run_experiment(load_experiment(path, out=str(tmp_path / "out")), progress=False)


def test_daemon_tables_hold_daemon_settings_and_each_point_completes_them(tmp_path: Path) -> None:
    from offramp.serving.config import EdgeConfig, load_config, replace_settings
    from offramp.serving.config_text import settings_toml
    from orchestrator.sweep import Context

    path = write(tmp_path, 'checkpoint = "model"\n[edge]\nslowdown = 4.0\nscore = "margin"\nexits = ["slvit@4"]\n'
                           '[cloud]\nthreads = 2\n')
    config = load_experiment(path)
    assert config.edge.threads == 1 and config.cloud.threads == 2  # edges default to one thread each
    assert config.edge.checkpoint == config.cloud.checkpoint == str(tmp_path / "model")
    point = next(p for p in expand(config) if p.variant == "fixed_split")
    edge = Context(config, 1, "margin", None, 10).edge_config(point, "127.0.0.1:7001")
    written = tmp_path / "edge.toml"
    written.write_text(settings_toml(edge))
    assert load_config(EdgeConfig, written) == edge == replace_settings(
        EdgeConfig(checkpoint=str(tmp_path / "model")), cloud=("127.0.0.1:7001",), thresholds=(math.inf,),
        score="margin", codec="int8", exits=("slvit@4",), slowdown=4.0, threads=1)
    assert Context(config, 1, "margin", None, 10).cloud_config(point).split_blocks is None  # the checkpoint's
    split = load_experiment(write(tmp_path, 'checkpoint = "model"\n[edge]\nsplit_block = 3\n'))
    # an edge that splits elsewhere than the checkpoint finds its cloud resuming there, whatever the point
    assert {Context(split, 1, "max_prob", None, 10).cloud_config(p).split_blocks for p in expand(split)} == {(3,)}
    for text, key in (('[edge]\ncodec = "int8"', "edge.codec"), ('[cloud]\ncheckpoint = "x"', "cloud.checkpoint")):
        with pytest.raises(OfframpError, match=f"{key} is set per point"):
            load_experiment(write(tmp_path, f'checkpoint = "m"\n{text}\n'))
    with pytest.raises(OfframpError, match=r"'edge.threads' must be an integer"):
        load_experiment(write(tmp_path, 'checkpoint = "m"\n[edge]\nthreads = "1"\n'))


# -- policy studies ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ('[sweep]\npolicies = ["adaptive"]', "sweep.policies adaptive need edge.latency_slo_ms"),
    ('[edge]\nlatency_slo_ms = 100.0\n[sweep]\npolicies = ["adaptive_two_splits"]',
     "adaptive_two_splits needs edge.split_blocks with two or more blocks"),
    ('[edge]\nlatency_slo_ms = 100.0\nsplit_blocks = [2, 4]\n', "only the adaptive_two_splits policy uses"),
    ('[sweep]\npolicies = ["fixed", "fixed"]', "sweep.policies must not repeat a policy"),
    ('[sweep]\npolicies = ["greedy"]', "'sweep.policies[0]' must be one of 'fixed'"),
    ('[sweep]\nthresholds = ["calibrate"]', "'sweep.thresholds[0]' must be a number"),
    ('[cloud_load]\nschedule = "0; 40s:fast"', "schedule step '40s:fast' must be RATE or TIMEs:RATE"),
    ('[cloud_load]\nschedule = "50; 40s:0; 20s:5"', "schedule step '20s:5' must come after"),
    ('[cloud]\nsplit_blocks = [2, 4]', "cloud.split_blocks is set per point"),
])
def test_policy_study_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, f'checkpoint = "m"\n[workload]\ncount = 5\n{text}\n')
    with pytest.raises(OfframpError) as info:
        load_experiment(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_policies_expand_and_phases_follow_link_and_cloud_load() -> None:
    from orchestrator.config import parse_rates
    from orchestrator.study import phases, tail

    config = load_experiment(EXPERIMENTS / "adaptive.toml")
    points = expand(config)
    assert [(p.policy, p.thresholds_label) for p in points] == [
        ("fixed", "calibrated"), ("fixed", "0.8"), ("fixed", "0.99"), ("adaptive", "calibrated"),
        ("adaptive_two_splits", "calibrated")]
    found = phases(points[0].profile, 1, config.cloud_load.steps, 80.0)
    assert [(p.key, p.start_s, p.end_s) for p in found] == [
        ("p1_wifi", 0, 20), ("p2_3g", 20, 40), ("p3_lte+load", 40, 60), ("p4_wifi+load", 60, 80)]
    assert parse_rates("40s:10") == ((0.0, 0.0), (40.0, 10.0))
    assert tail([10.0] * 19 + [500.0]) == 10.0 and tail([10.0] * 18 + [math.nan, math.nan]) == math.inf


@pytest.mark.long
def test_a_policy_study_runs_fixed_and_adaptive_edges_under_a_changing_link_and_cloud_load(
        tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The whole path on the tiny model: calibration, tables in the edges' configs, a two-split cloud, the
    cloud load, GetPolicy polls and the study's summary and plot."""
    from orchestrator.sweep import run_experiment

    path = write(tmp_path, textwrap.dedent(f"""
        name = "policies"
        checkpoint = "{tiny_checkpoint}"
        [edge]
        latency_slo_ms = 200.0
        split_blocks = [2, 4]
        [workload]
        rate = 20.0
        duration_s = 3.0
        warmup = 2
        [sweep]
        thresholds = ["calibrated"]
        profiles = ["lan; 2s:lte"]
        policies = ["fixed", "adaptive_two_splits"]   # "adaptive" differs only in its split_blocks
        [cloud_load]
        schedule = "0; 2s:30"
        [study]
        settle_s = 1.0
        [baselines]
        run = []
    """))
    result = run_experiment(load_experiment(path, out=str(tmp_path / "out")), progress=False)
    out = result.out_dir
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]) == {"fixed", "adaptive_two_splits"}
    for policy in summary["policies"].values():
        assert set(policy["phases"]) == {"p1_lan", "p2_lte+load"}
        assert all(0 <= ph["offload_share"] <= 1 and ph["p95_ms"] > 0 and 0 <= ph["accuracy_replayed"] <= 1
                   for ph in policy["phases"].values())
        assert 0 <= policy["p95_within_target_share"] <= 1
    # the fixed edge's answers are worth what its thresholds score on validation (calibrated there, here)
    chosen = json.loads((out / "calibration.json").read_text())["chosen"]
    assert {round(ph["accuracy_replayed"], 6) for ph in summary["policies"]["fixed"]["phases"].values()} == {
        round(chosen["quality"], 6)}
    assert summary["machine"]["torch"] and len(summary["points"]) == 2
    polls = json.loads((out / "policy.json").read_text())
    assert {p["point"] for p in polls} == {0, 1}
    assert {p["split_block"] for p in polls if p["point"] == 0} == {4}  # fixed: the checkpoint's split
    assert all(p["adaptive"] for p in polls if p["point"] > 0)
    import pyarrow.parquet as pq

    load = pq.read_table(out / "cloud_load.parquet").to_pylist()
    assert load and all(r["sent_s"] >= 2.0 for r in load) and {r["status"] for r in load} == {"OK"}
    tables = json.loads((out / "calibration.json").read_text())["tables"]
    assert [t["split_block"] for t in tables] == [2, 4]
    assert (out / "plots" / "policy_timeline.png").stat().st_size > 10_000
    # the summary can be written again from the records alone, as it was
    from orchestrator.sweep import summarize_experiment

    (out / "summary.json").unlink()
    summarize_experiment(load_experiment(path, out=str(out)))
    again = json.loads((out / "summary.json").read_text())["policies"]
    assert json.dumps(again, sort_keys=True) == json.dumps(summary["policies"], sort_keys=True)
