"""Ray Serve baseline on its own: the same cloud tail behind Ray Serve's gRPC proxy, under closed-loop load
(the baseline itself is ``orchestrator.ray_serve``; ``bench.offload`` runs it beside our cloud).

    RAY_AUTH_MODE=disabled python -m bench.ray_serve --checkpoint runs/bench-exits/cifar10-vit
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from offramp.core.hostinfo import cpu_name
from offramp.core.tables import format_table
from offramp.serving.config import CloudConfig
from orchestrator.ray_serve import RayServeMissing, parse_cores, run_ray_serve_baseline

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.ray_serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, metavar="DIR")
    ap.add_argument("--split-block", type=int, metavar="K", help="block the tail resumes at (default: the card's)")
    ap.add_argument("--seconds", type=float, default=8.0, help="duration of the measured run")
    ap.add_argument("--edges", type=int, default=16, help="client connections")
    ap.add_argument("--window", type=int, default=4, help="unary calls in flight per connection")
    ap.add_argument("--max-batch", type=int, default=CloudConfig.max_batch)
    ap.add_argument("--max-wait-ms", type=float, default=CloudConfig.max_wait_ms)
    ap.add_argument("--server-cores", default="0", help="cores of every Ray process, as taskset takes them")
    ap.add_argument("--client-cores", default="1", help="cores of the load generator")
    ap.add_argument("--out", default=str(RESULTS / "ray_serve.json"))
    args = ap.parse_args(argv)
    started = time.perf_counter()
    try:
        run = run_ray_serve_baseline(
            args.checkpoint, split_block=args.split_block, edges=args.edges, window=args.window,
            seconds=args.seconds, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
            server_cores=parse_cores(args.server_cores), client_cores=parse_cores(args.client_cores))
    except RayServeMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wall_s = time.perf_counter() - started

    lat = run["latency_ms"]
    print(f"Ray Serve {run['ray']} (gRPC proxy, @serve.batch max {run['max_batch']}, wait {run['max_wait_ms']} ms), "
          f"server cores {run['server_cores']}, client cores {run['client_cores']}:")
    print(format_table(["in flight", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "mean batch", "errors",
                        "wrong"],
                       [[f"{run['edges']}x{run['window']}", run["requests"], run["throughput_rps"], lat["p50"],
                         lat["p95"], lat["p99"], run["mean_batch"], run["errors"], run["wrong"]]]))
    strays = [p for p in run["pinning"] if not set(p["cores"]) <= set(run["server_cores"])]
    print(f"{len(run['pinning'])} Ray processes, " + (
        "all on the server cores" if not strays else
        "not pinned: " + ", ".join(f"{p['name']} {p['cores']}" for p in strays)))
    busiest = sorted(run["pinning"], key=lambda p: -p["cpu_s"])[:4]
    print("server CPU seconds while the client ran: " + ", ".join(f"{p['name']} {p['cpu_s']:.1f}" for p in busiest))
    if run["first_error"]:
        print(f"first error: {run['first_error']}")

    result = {
        "command": "python -m bench.ray_serve " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "wall_s": wall_s,
        "ray_serve": run,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if run["errors"] == 0 and run["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
