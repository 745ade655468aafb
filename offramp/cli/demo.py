"""The quick start, end to end: the system's job, against what it replaces.

Trains a small ViT with SL-ViT exits on the bundled digits, or on another data
spec (``--data fsdd:PATH`` trains the spectrogram ViT on spoken digits), once:
later runs reuse the checkpoint while its card names the same data. Then it
calibrates the exit thresholds (and the input route), starts ``offramp cloud``
and, behind an emulated link (``lte``), ``offramp edge`` on an emulated slower
device, and sends the validation set at a camera's pace three ways: the split
with exits (confident exits answer, the rest cross the link as int8 tokens),
cloud-only (the edge's input route: every picture crosses the link as a JPEG
and the cloud runs the whole model) and edge-only (the whole model on the
device). One table side by side, and a plot. Like the CLI, it sits on top of
the serving code (it calibrates through the edge's own function).
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from offramp.core.checkpoint import CARD, read_card
from offramp.serving.daemon_proc import DaemonProcess
from offramp.core.data import load_data
from offramp.core.errors import OfframpError
from offramp.core.data.card_data import load_validation
from offramp.training.pipeline import TrainJob, run_training
from offramp.core.tables import format_table
from offramp.training.train import TrainConfig
from offramp.core.wire import pb, pb_grpc
from offramp.client import EdgeClient, request

DEMO_JOB = TrainJob(data="digits", model="vit_micro_32", exits="slvit@2,slvit@4")
DEMO_TRAIN = TrainConfig(epochs=30, exit_epochs=10, copycat="hard", copycat_epochs=5, batch_size=64, lr=2e-3)
# Other data, by modality: half the FSDD benchmark's schedule (30 backbone, 10 exit epochs) is
# enough for a demo; images from an imagefolder are many more samples per epoch, so fewer epochs.
OTHER_TRAIN = {
    "audio": TrainConfig(epochs=15, exit_epochs=5, copycat="hard", copycat_epochs=3, batch_size=64, lr=2e-3),
    "image": TrainConfig(epochs=4, exit_epochs=2, copycat="hard", copycat_epochs=1, batch_size=128, lr=2e-3),
}
OFFLOAD_SHARE = 0.25  # of the validation inputs the demo's thresholds send to the cloud
PROFILE = "lte"  # the emulated link between edge and cloud
RATE = 40.0  # requests per second, as a camera sends them
SLOWDOWN = 4.0  # the emulated edge device is this much slower than the machine the demo runs on


def _stale_reason(checkpoint: Path, data: str, model: str | None) -> str | None:
    """Why the checkpoint there cannot serve this demo (None: reuse it)."""
    if not (checkpoint / CARD).is_file():
        return "no checkpoint yet"
    card = read_card(checkpoint)
    if card.data.get("spec") != data:
        return f"the checkpoint there was trained on '{card.data.get('spec')}', not '{data}'"
    if model is not None and card.config.backbone != model:
        return f"the checkpoint there is a {card.config.backbone}, not a {model}"
    return None


def ensure_demo_model(workdir: Path, retrain: bool = False, data: str = "digits", model: str | None = None) -> Path:
    """Train the demo model once; later runs reuse the checkpoint if it was trained on ``data`` (and is ``model``)."""
    out = workdir / "model"
    reason = "--retrain" if retrain else _stale_reason(out, data, model)
    if reason is None:
        return out
    if data == DEMO_JOB.data:
        job = TrainJob(**{**DEMO_JOB.__dict__, "model": model or DEMO_JOB.model, "out": str(out)})
        print(f"training the demo model on digits into {out} ({reason}; a few minutes on 2 cores)...", flush=True)
        run_training(job, DEMO_TRAIN)
        return out
    job = TrainJob(data=data, model=model, exits=DEMO_JOB.exits, out=str(out))
    if data.partition(":")[0].strip().lower() == "crowd-av":
        raise OfframpError("the demo streams classification data; for the audiovisual crowd-av model use "
                           "'offramp train --data crowd-av', 'offramp infer --audio' or 'python -m bench.multimodal'")
    splits = load_data(job.data, val_fraction=job.val_fraction, seed=job.seed)
    cfg = OTHER_TRAIN.get(splits.modality, OTHER_TRAIN["image"])
    print(f"training the demo model on {data} ({len(splits.train)} {splits.modality} samples) into {out} "
          f"({reason}; {cfg.epochs} + {cfg.exit_epochs} + {cfg.copycat_epochs} epochs)...", flush=True)
    run_training(job, cfg, data=splits)
    return out


def calibrate(checkpoint: Path, edge_toml: Path) -> tuple[float, ...]:
    """Thresholds that send about ``OFFLOAD_SHARE`` of the inputs to the cloud, written into the edge's config
    as ``offramp calibrate`` does, with the input route measured beside them. The digits exits are about as
    accurate as the whole model, so an accuracy target would offload almost nothing and the demo would never
    cross the link: it picks the most accurate operating point near that share instead, and says so."""
    from offramp.training.calibrate import Target, calibrate_checkpoint, calibrate_input_route
    from offramp.serving.edge_toml import write_thresholds

    shared = [round(1 - 10 ** -k, 6) for k in np.arange(0.5, 4.01, 0.25)]  # 0.68 ... 0.9999
    card = read_card(checkpoint)
    edge_exits = sum(e.position <= card.split_block for e in card.config.exits)
    result = calibrate_checkpoint(checkpoint, Target(max_offload=OFFLOAD_SHARE), edge_toml=edge_toml,
                                  evaluate_thresholds=tuple((t,) * edge_exits for t in shared))
    near = min(result.evaluated, key=lambda p: (abs(p.offload - OFFLOAD_SHARE), -p.quality))
    route = calibrate_input_route(checkpoint, 90)
    write_thresholds(edge_toml, checkpoint, near.thresholds, result.score, result.tables, route)
    print(f"thresholds {', '.join(f'{t:.3g}' for t in near.thresholds)} ({result.score}): on the validation "
          f"split {near.offload:.0%} go to the cloud, accuracy {near.quality:.4f} (whole model "
          f"{result.full_quality:.4f})")
    return near.thresholds


@dataclass(frozen=True)
class Run:
    """One way of answering the same inputs, and what came back."""

    name: str
    replies: list[pb.InferReply]
    wall_s: float


def run_demo(workdir: str, retrain: bool = False, data: str = "digits", model: str | None = None,
             profile: str = PROFILE, rate: float = RATE) -> int:
    from offramp.netem import Schedule, parse_profile
    from offramp.netem.proxy import LinkProxy, ProxyThread
    from orchestrator.baselines import FullModelServer

    work = Path(workdir)
    checkpoint = ensure_demo_model(work, retrain, data, model)
    card = read_card(checkpoint)
    val, _ = load_validation(card)
    x, y = val.tensors[0].numpy(), val.tensors[1].numpy()
    edge_toml = work / "edge.toml"
    calibrate(checkpoint, edge_toml)
    link_profile = parse_profile(profile)
    print(f"\nthe edge device is {SLOWDOWN:g}x slower than this machine; edge and cloud talk over an emulated "
          f"'{profile}' link ({link_profile.uplink.delay_ms:g} ms each way); {len(x)} inputs at {rate:g} per "
          "second, each way of answering in turn", flush=True)
    runs: list[Run] = []
    with DaemonProcess("cloud", ["--checkpoint", str(checkpoint)], log_path=work / "cloud.log") as cloud:
        link = ProxyThread(LinkProxy("127.0.0.1:0", cloud.address, Schedule.constant(link_profile), seed=0))
        link.start()
        try:
            for name, route in (("split with exits", "split"), ("cloud-only", "input")):
                with DaemonProcess("edge", ["--config", str(edge_toml), "--checkpoint", str(checkpoint),
                                            "--cloud", link.address, "--route", route, "--slowdown", str(SLOWDOWN)],
                                   log_path=work / f"edge-{route}.log") as edge:
                    _wait_paired(edge.address)
                    runs.append(_paced(name, edge.address, x, rate))
        finally:
            link.stop()
        print(f"cloud stopped (status {cloud.stop()})")
    edge_only = FullModelServer(str(checkpoint), "edge", slowdown=SLOWDOWN)
    edge_only.start()
    try:
        runs.insert(0, _paced("edge-only", edge_only.address, x, rate))
    finally:
        edge_only.stop()
    print_summary(card, runs, y)
    plot(runs, y, work / "demo.png", profile)
    return 0


def _wait_paired(address: str, timeout_s: float = 60.0) -> None:
    """Wait until the edge streams to its cloud (it has timed a round trip over the link), so that no request
    of the run is answered locally only because it came first."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.EdgeStub(channel)
        deadline = time.monotonic() + timeout_s
        while stub.GetPolicy(pb.GetPolicyRequest(), timeout=10).state.rtt_ms <= 0:
            if time.monotonic() > deadline:
                raise OfframpError(f"the edge at {address} did not reach its cloud within {timeout_s:.0f} s")
            time.sleep(0.1)


def _paced(name: str, address: str, x: np.ndarray, rate: float) -> Run:
    """Send every input at ``rate`` per second on one stream (as a camera would); the answers."""
    def paced() -> Iterator[pb.InferRequest]:
        start = time.perf_counter()
        for i, sample in enumerate(x):
            time.sleep(max(0.0, start + i / rate - time.perf_counter()))
            yield request(i, sample)

    print(f"  {name}...", flush=True)
    start = time.perf_counter()
    with EdgeClient(address) as client:  # the raw stream: the summary checks one answer per request
        replies = list(client.stream(paced()))
    return Run(name, replies, time.perf_counter() - start)


def print_summary(card, runs: list[Run], y: np.ndarray) -> None:
    rows = []
    for run in runs:
        by_id = {r.request_id: r for r in run.replies}
        if len(by_id) != len(y) or len(run.replies) != len(y):
            raise OfframpError(f"{run.name}: expected exactly one answer per request: {len(y)} sent, "
                               f"{len(run.replies)} answered")
        ordered = [by_id[i] for i in range(len(y))]
        correct = np.array([r.prediction == t for r, t in zip(ordered, y)])
        where = Counter("cloud" if r.decided_by == "cloud" else "edge" for r in ordered)
        latency = np.array([r.stage_ms.get("total", 0.0) for r in ordered])
        offloaded = [r for r in ordered if r.bytes_sent]
        rows.append([run.name, where["edge"], where["cloud"], f"{where['cloud'] / len(y):.0%}",
                     float(correct.mean()), float(np.percentile(latency, 50)), float(np.percentile(latency, 95)),
                     np.mean([r.bytes_sent for r in ordered]),
                     f"{np.mean([r.bytes_sent for r in offloaded]):.0f}" if offloaded else "n/a",
                     sum(r.degraded for r in ordered)])
    full = card.metrics.get("copycat", card.metrics.get("exits", {})).get("final", {}).get("accuracy")
    print(f"\n{len(y)} requests / {len(y)} answers each; whole model on validation: "
          + (f"{full:.4f}" if full is not None else "n/a"))
    print(format_table(["", "answered on the edge", "by the cloud", "offload rate", "accuracy", "p50 ms",
                        "p95 ms", "bytes / request", "bytes per offload", "degraded"], rows))


def plot(runs: list[Run], y: np.ndarray, path: Path, profile: str) -> None:
    """Latency (p50, p95) and accuracy of each way of answering, side by side."""
    from offramp.training.plots import pyplot

    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, run in enumerate(runs):
        by_id = {r.request_id: r for r in run.replies}
        latency = np.array([by_id[k].stage_ms.get("total", 0.0) for k in range(len(y))])
        accuracy = np.mean([by_id[k].prediction == t for k, t in enumerate(y)])
        p50, p95 = np.percentile(latency, 50), np.percentile(latency, 95)
        ax.bar(i, p50, color="tab:blue", label="p50" if i == 0 else None)
        ax.bar(i, p95 - p50, bottom=p50, color="tab:blue", alpha=0.35, label="p95" if i == 0 else None)
        ax.annotate(f"accuracy {accuracy:.3f}", (i, p95), ha="center", xytext=(0, 4), textcoords="offset points",
                    fontsize=8)
    ax.set_xticks(range(len(runs)), [r.name for r in runs])
    ax.set(ylabel="latency at the edge (ms)", title=f"the same inputs three ways, over '{profile}'")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
