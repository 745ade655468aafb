"""``offramp experiment run``, ``summarize`` and ``show``.

Only argparse is imported up front; Ray, torch and matplotlib load when a
command runs, so ``offramp --help`` stays fast.
"""
from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``experiment`` (with ``run``, ``summarize`` and ``show``) to the ``offramp`` command's subparsers."""
    p = sub.add_parser(
        "experiment", help="run a sweep of edge/cloud experiments on Ray, with baselines, records and plots",
        description="An experiment file names a checkpoint, the daemons' settings, the workload per edge and "
                    "a sweep (thresholds x codecs x link profiles x number of edges). See orchestrator/README.md.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    run = actions.add_parser(
        "run", help="run every point of the sweep and write records, a summary and plots",
        description="Starts a local Ray with one 'cloud' and enough 'edge' slots, or joins the cluster at "
                    "--address; per point starts the cloud, a link proxy per edge and the edges, drives the "
                    "load, and stops them. Writes records.parquet (or .csv), summary.csv/.json, plots/*.png, "
                    "points.json, nodes.json and the daemons' logs under the output folder.",
    )
    run.add_argument("file", metavar="FILE.toml", help="experiment file")
    run.add_argument("--address", metavar="RAY_ADDRESS",
                     help="join this Ray cluster (e.g. HEAD:6379) instead of starting a local one")
    run.add_argument("--out", metavar="DIR", help="output folder (default: the file's 'out', else "
                                                  "runs/experiments/NAME)")
    run.add_argument("--checkpoint", metavar="DIR", help="use this checkpoint instead of the file's")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                     help="the progress bar (default: on; --no-progress hides it)")
    run.set_defaults(run=_run)
    again = actions.add_parser(
        "summarize", help="write the summary and plots again from a run's records, with this code's study",
        description="Reads what 'run' left in the output folder (records, the edges' policy polls, the "
                    "calibration) and writes summary.csv/.json and plots/*.png again: for a study whose "
                    "reading changed since the run (the replayed accuracy), without running any point.")
    again.add_argument("file", metavar="FILE.toml", help="the experiment file of the run")
    again.add_argument("--out", metavar="DIR", help="the run's output folder (default: as for run)")
    again.set_defaults(run=_summarize)
    show = actions.add_parser("show", help="print the sweep points an experiment file expands to")
    show.add_argument("file", metavar="FILE.toml", help="experiment file")
    show.set_defaults(run=_show)

    fleet = sub.add_parser(
        "fleet", help="run a pool of cloud replicas (and edges) on a Ray cluster, restarted when they die",
        description="Places the replicas a fleet file asks for on Ray nodes by their resources, each an "
                    "`offramp cloud` on its own port, restarted by Ray when it dies; optionally edges, each "
                    "handed the whole pool. Prints the pool for edges started elsewhere and keeps the fleet "
                    "until Ctrl-C or SIGTERM, then drains it. See orchestrator/README.md.",
    )
    fleet_actions = fleet.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = fleet_actions.add_parser("up", help="start the fleet and keep it until interrupted")
    up.add_argument("file", metavar="FILE.toml", help="fleet file: checkpoint, [fleet], [cloud], [edge]")
    up.add_argument("--address", metavar="RAY_ADDRESS",
                    help="join this Ray cluster (e.g. HEAD:6379; the code travels as the job's working "
                         "directory) instead of starting a local one")
    up.set_defaults(run=_fleet_up)


def _run(args: argparse.Namespace) -> int:
    from .config import load_experiment
    from .report import format_summary
    from .sweep import run_experiment

    config = load_experiment(args.file, checkpoint=args.checkpoint, out=args.out)
    result = run_experiment(config, address=args.address, progress=args.progress)
    print(format_summary(result.summary))
    print(f"\nrecords: {result.records}")
    print(f"summary: {result.out_dir / 'summary.csv'}, {result.out_dir / 'summary.json'}")
    for plot in result.plots:
        print(f"plot:    {plot}")
    return 0


def _summarize(args: argparse.Namespace) -> int:
    from .config import load_experiment
    from .sweep import summarize_experiment

    config = load_experiment(args.file, out=args.out)
    for plot in summarize_experiment(config):
        print(f"plot:    {plot}")
    print(f"summary: {config.out_dir / 'summary.csv'}, {config.out_dir / 'summary.json'}")
    return 0


def _fleet_up(args: argparse.Namespace) -> int:
    from .fleet import load_fleet, run_fleet

    return run_fleet(load_fleet(args.file), args.address)


def _show(args: argparse.Namespace) -> int:
    from offramp.core.tables import format_table

    from .config import load_experiment
    from .sweep import expand

    config = load_experiment(args.file)
    points = expand(config)
    w = config.workload
    load = f"Poisson at {w.rate:g}/s" if w.arrival == "poisson" else f"closed loop, {w.concurrency} in flight"
    limits = " and ".join(x for x in (w.count is not None and f"{w.count} requests",
                                      w.duration_s is not None and f"{w.duration_s:g} s") if x)
    print(f"{config.name}: {len(points)} points; checkpoint {config.checkpoint}")
    print(f"per edge: {load}, up to {limits}; seed {config.seed}; edge slowdown {config.edge.slowdown:g}x\n")
    print(format_table(["#", "variant", "policy", "edges", "link per edge", "codec", "thresholds"],
                       [[p.index, p.variant, p.params()["policy"] or "-", p.edges,
                         ", ".join(p.links()) if p.profile is not None else "-", p.codec or "-",
                         p.thresholds_label or "-"] for p in points]))
    return 0
