"""The edge half at batch 1: PyTorch eager vs onnxruntime on one CPU core, in the same run.

Both runtimes run the same walk (``EdgeWalk.run``, as the edge daemon calls
it) on the same inputs, pinned to one core with one intra-op thread each.
Rounds alternate between them, in alternating order, so that drift on a
shared machine hits both alike. Two paths through the edge:

* all exits: no exit is confident, every exit runs and the sample leaves at
  the split as tokens: the most the edge computes for one sample;
* first exit: the first exit answers: the least it computes.

Beside the latencies: the largest difference between the runtimes' outputs
(every exit's, the split tokens and top-k's scores) and the export's time.

    python -m bench.onnx_edge     # a small digits checkpoint, trained first (about 20 s)
    python -m bench.onnx_edge --checkpoint runs/bench-exits/cifar10-hybrid --exits slvit@1,slvit@2
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from offramp.core.hostinfo import cpu_name
from orchestrator.loadgen import percentiles, write_result
from offramp.core.checkpoint import load_checkpoint
from offramp.core.exit_rule import always_leave, never_leave
from offramp.core.onnx_edge import OnnxEdgeHalf, export_onnx, parity, read_manifest
from offramp.core.tables import format_table
from offramp.core.halves import EdgeHalf, EdgeWalk

RESULTS = Path(__file__).parent / "results"
SCORE = "max_prob"


def small_checkpoint(directory: Path) -> str:
    """A vit_micro_32 on 300 digits with exits after blocks 2 and 4, split after 4 (what the tests use)."""
    from offramp.training.pipeline import TrainJob, run_training
    from offramp.training.train import TrainConfig

    out = directory / "checkpoint"
    run_training(TrainJob(data="digits", model="vit_micro_32", exits="slvit@2,slvit@4", out=str(out), limit=300),
                 TrainConfig(epochs=1, exit_epochs=1, progress=False))
    return str(out)


def latencies(run: Callable[[torch.Tensor], Any], inputs: torch.Tensor, seconds: float) -> list[float]:
    """Milliseconds of ``run`` on one input at a time, cycling through ``inputs``, for ``seconds``."""
    for i in range(5):  # warm-up
        run(inputs[i % len(inputs)][None])
    times, i, stop = [], 0, time.perf_counter() + seconds
    while time.perf_counter() < stop:
        x = inputs[i % len(inputs)][None]
        t0 = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - t0) * 1e3)
        i += 1
    return times


def paths(half: EdgeWalk) -> dict[str, list[float]]:
    """Thresholds of each path measured."""
    out = {"all exits": [never_leave(SCORE)] * half.num_exits}
    if half.num_exits:
        out["first exit"] = [always_leave(SCORE)] + [never_leave(SCORE)] * (half.num_exits - 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.onnx_edge", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="default: train a small digits checkpoint first")
    ap.add_argument("--onnx", default=None, metavar="DIR",
                    help="an export of the checkpoint ('offramp export --onnx'); default: export into a temporary "
                         "folder (its time is reported)")
    ap.add_argument("--exits", default=None, help="the exits the edge runs, comma-separated (default: all up to "
                                                  "the split)")
    ap.add_argument("--core", type=int, default=min(os.sched_getaffinity(0)), help="the core both runtimes run on")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per runtime and path")
    ap.add_argument("--seconds", type=float, default=1.0, help="seconds per round")
    ap.add_argument("--out", default=str(RESULTS / "onnx_edge.json"))
    args = ap.parse_args(argv)
    started = time.perf_counter()
    mask, threads = os.sched_getaffinity(0), torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="offramp-bench-onnx-") as tmp:
        try:
            return measure(args, argv, Path(tmp), started)
        finally:  # a caller (a test run) gets its cores and threads back
            os.sched_setaffinity(0, mask)
            torch.set_num_threads(threads)


def measure(args: argparse.Namespace, argv: list[str] | None, tmp: Path, started: float) -> int:
    checkpoint = args.checkpoint or small_checkpoint(tmp)
    export_s = None
    onnx_dir = args.onnx
    if onnx_dir is None:
        t0 = time.perf_counter()
        export_onnx(checkpoint, tmp / "onnx")
        export_s, onnx_dir = time.perf_counter() - t0, str(tmp / "onnx")
    exits = None if args.exits is None else [e.strip() for e in args.exits.split(",") if e.strip()]
    model, card = load_checkpoint(checkpoint)
    split = read_manifest(onnx_dir).split_block
    halves: dict[str, EdgeWalk] = {"pytorch eager": EdgeHalf(model, split, exits=exits),
                                   "onnxruntime": OnnxEdgeHalf(onnx_dir, card, exits=exits, threads=1)}
    torch.manual_seed(0)
    inputs = torch.randn(64, *card.input_shape)
    diff = parity(halves["pytorch eager"], halves["onnxruntime"], inputs[:8])

    os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(1)
    samples: dict[tuple[str, str], list[float]] = {}
    with torch.no_grad():
        for r in range(args.rounds):
            for path, thresholds in paths(halves["pytorch eager"]).items():
                order = list(halves) if r % 2 == 0 else list(reversed(halves))
                for runtime in order:
                    run = lambda x, h=halves[runtime], t=thresholds: h.run(x, t, SCORE)  # noqa: E731
                    samples.setdefault((runtime, path), []).extend(latencies(run, inputs, args.seconds))

    rows = []
    for (runtime, path), times in samples.items():
        rows.append({"runtime": runtime, "path": path, "calls": len(times), "latency_ms": percentiles(times)})
    for row in rows:
        eager = next(r for r in rows if r["path"] == row["path"] and r["runtime"] == "pytorch eager")
        row["speedup_p50"] = eager["latency_ms"]["p50"] / row["latency_ms"]["p50"]
    rows.sort(key=lambda r: (r["path"], r["runtime"]))
    half = halves["onnxruntime"]
    name = args.checkpoint or "a small digits checkpoint trained for the run"
    print(f"edge half of {name} (split after block {split}, exits {', '.join(half.exit_names) or 'none'}), "
          f"batch 1, core {args.core}, 1 thread each; largest output difference {diff:.1e}")
    print(format_table(["path", "runtime", "calls", "p50 ms", "p95 ms", "mean ms", "speedup (p50)"],
                       [[r["path"], r["runtime"], r["calls"], r["latency_ms"]["p50"], r["latency_ms"]["p95"],
                         r["latency_ms"]["mean"], r["speedup_p50"]] for r in rows]))
    import onnxruntime

    result = {
        "command": "python -m bench.onnx_edge " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "core": args.core, "threads": 1,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__},
        "checkpoint": name,
        "fingerprint": card.fingerprint, "backbone": card.config.backbone, "split_block": split,
        "exits": half.exit_names, "input_shape": list(card.input_shape), "batch": 1,
        "export_s": export_s, "max_abs_diff": diff, "rounds": args.rounds, "seconds_per_round": args.seconds,
        "rows": rows, "wall_s": time.perf_counter() - started,
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
