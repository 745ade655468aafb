"""The ``offramp link`` command: run the shaping proxy between an edge and a cloud, or list the profiles."""
from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import TYPE_CHECKING

from offramp.core.errors import OfframpError

if TYPE_CHECKING:
    from offramp.netem.profiles import LinkProfile


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("link", help="emulate a network link: a shaping TCP proxy between edge and cloud",
                       description="Listens on --listen and forwards each connection to --upstream with the "
                                   "profile's delay, jitter, bandwidth and loss, each direction on its own "
                                   "(uplink = listen -> upstream). Runs until SIGTERM or Ctrl-C.")
    p.add_argument("--list", action="store_true", help="print the named profiles and exit")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to accept the edge on (port 0: pick one)")
    p.add_argument("--upstream", help="HOST:PORT of the cloud")
    p.add_argument("--profile", default="lan",
                   help="named profile (see --list), custom 'delay=20ms,jitter=5ms,bw=8mbit,loss=0.01', or a name "
                        "with overrides 'lte,loss=0.01', or a recorded Mahimahi trace 'trace=DIR/ATT-LTE-driving,"
                        "delay=20ms,queue=200' (files PREFIX.up and PREFIX.down) (default: lan)")
    p.add_argument("--schedule", default=None,
                   help="profile changes during the run, e.g. 'lte; 30s:3g; 60s:bw=1mbit' (steps after t=0 "
                        "start from --profile)")
    p.add_argument("--seed", type=int, default=0, help="seed for jitter and loss (default 0)")
    p.add_argument("--on-loss", choices=["stall", "reset"], default="stall",
                   help="a lost segment stalls by the profile's stall time (TCP retransmit), or resets the "
                        "connection (default: stall)")
    p.set_defaults(run=_run_link)


def _run_link(args: argparse.Namespace) -> int:
    from offramp.netem.profiles import PROFILES, Schedule, parse_profile
    from offramp.netem.proxy import LinkProxy

    if args.list:
        print(format_profiles(PROFILES.values()))
        return 0
    if not args.upstream:
        raise OfframpError("offramp link needs --upstream HOST:PORT (or --list)")
    profile = parse_profile(args.profile)
    link = Schedule.parse(args.schedule, initial=profile) if args.schedule else Schedule.constant(profile)
    LinkProxy(args.listen, args.upstream, link, seed=args.seed, on_loss=args.on_loss).run()
    return 0


def format_profiles(profiles: Iterable[LinkProfile]) -> str:
    """The profiles as a fixed-width table: one-way delay, jitter, bandwidth per direction, loss."""
    def mbps(v: float | None) -> str:
        return "unlimited" if v is None else f"{v:g}"

    rows = [("profile", "delay ms", "jitter ms", "up Mbit/s", "down Mbit/s", "loss", "what")]
    rows += [(p.name, f"{p.uplink.delay_ms:g}", f"{p.uplink.jitter_ms:g}", mbps(p.uplink.bandwidth_mbps),
              mbps(p.downlink.bandwidth_mbps), f"{p.uplink.loss:g}", p.note) for p in profiles]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
