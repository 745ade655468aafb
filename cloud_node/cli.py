"""``offramp cloud``: the cloud daemon's subcommand; its flags are generated from ``CloudConfig``."""
from __future__ import annotations

import argparse

from offramp.serving.config import CloudConfig
from offramp.serving.flags import add_config_flags, config_from_args


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``cloud`` to the ``offramp`` command's subparsers."""
    p = sub.add_parser(
        "cloud", help="run the cloud daemon: the model's tail behind a gRPC Offload service",
        description="Serves the blocks after the split and the final head of a checkpoint to any number of "
                    "edges, batching their requests together. Settings come from --config, then the flags. "
                    "SIGTERM or SIGINT drains it: health turns NOT_SERVING, in-flight requests are answered, "
                    "then it exits 0.",
    )
    p.add_argument("--config", metavar="TOML", help="settings file: the flags below as keys (max_batch = 16)")
    add_config_flags(p, CloudConfig)
    p.add_argument("--port-file", metavar="PATH", help="write the bound gRPC port here once serving")
    p.set_defaults(run=_run_cloud)


def _run_cloud(args: argparse.Namespace) -> int:
    from offramp.serving.daemon import StartupLog, announce

    StartupLog("cloud").step("importing the serving code (torch, gRPC)")
    from .server import run

    config = config_from_args(CloudConfig, args)
    if config.workers > 1:
        from .workers import run_workers

        return run_workers(config, lambda address, port: announce("cloud", address, port, args.port_file),
                           args.log_format)
    return run(config, ready=lambda server: announce("cloud", server.address, server.port, args.port_file))
