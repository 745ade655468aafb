"""``offramp cloud``: the cloud daemon's subcommand; flags override the TOML file."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from offramp.config import CloudConfig

if TYPE_CHECKING:
    pass

# Flags that override a CloudConfig field of the same name.
_OVERRIDES = ("checkpoint", "listen", "device", "dtype", "max_batch", "max_wait_ms", "max_queue", "threads", "metrics_port",
              "tls_cert", "tls_key", "tls_client_ca", "token_file")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``cloud`` to the ``offramp`` command's subparsers."""
    d = CloudConfig
    p = sub.add_parser(
        "cloud", help="run the cloud daemon: the model's tail behind a gRPC Offload service",
        description="Serves the blocks after the split and the final head of a checkpoint to any number of "
                    "edges, batching their requests together. Settings come from --config, then the flags. "
                    "SIGTERM or SIGINT drains it: health turns NOT_SERVING, in-flight requests are answered, "
                    "then it exits 0.",
    )
    p.add_argument("--config", metavar="TOML",
                   help="settings file: the flags below as keys (max_batch = 16), and max_message_mb, grace_s, "
                        "reflection, log_level")
    p.add_argument("--checkpoint", metavar="DIR", help="checkpoint directory written by 'offramp train' (required)")
    p.add_argument("--listen", metavar="HOST:PORT", help=f"address to bind; port 0 picks one (default {d.listen})")
    p.add_argument("--device", help=f"cpu, cuda or cuda:N (default {d.device})")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help=f"compute precision of the tail (default {d.dtype})")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help=f"most samples per forward pass, across all edges (default {d.max_batch})")
    p.add_argument("--max-wait-ms", type=float, metavar="MS",
                   help=f"0: no timer, a batch is what queued during the last one; above 0, a batch also waits this long for company (default {d.max_wait_ms})")
    p.add_argument("--max-queue", type=int, metavar="N",
                   help=f"samples allowed to wait; beyond, requests get RESOURCE_EXHAUSTED (default {d.max_queue})")
    p.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads (default: one per core)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on this port of the listen host; 0 picks one (default: off)")
    p.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain (needs --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--tls-client-ca", metavar="PEM",
                   help="mutual TLS: accept only edges with a certificate signed by this CA")
    p.add_argument("--token-file", metavar="PATH",
                   help="require this bearer token from edges (a file, so it stays off the command line)")
    p.add_argument("--port-file", metavar="PATH", help="write the bound gRPC port here once serving")
    p.set_defaults(run=_run_cloud)


def _run_cloud(args: argparse.Namespace) -> int:
    from offramp.config import load_config
    from offramp.daemon import announce

    from .server import run

    overrides = {key: getattr(args, key) for key in _OVERRIDES}
    if args.verbose:
        overrides["log_level"] = "DEBUG"
    config = load_config(CloudConfig, args.config, overrides)

    return run(config, ready=lambda server: announce("cloud", server.address, server.port, args.port_file))
