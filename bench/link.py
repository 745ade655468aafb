"""Does the emulated link deliver what its profile promises? One-way delay and throughput per named profile.

For each profile a LinkProxy sits in front of a local echo/sink/source
server on 127.0.0.1. The added one-way delay is half the median round trip of
small messages through the proxy, less the same without the proxy (loopback
and the server cost something too), against the profile's mean (delay +
jitter / 2, both directions averaged); throughput is a bulk transfer each way, timed at the receiver from
first to last byte, against the direction's bandwidth. Target: within 10 %.
Prints a table and writes JSON to bench/results/link.json.

    python -m bench.link             # every profile, under a minute
    python -m bench.link --quick     # smoke run, a few seconds per profile
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import socketserver
import statistics
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offramp.netem import PROFILES, LinkProfile, LinkProxy, ProxyThread

RESULTS = Path(__file__).parent / "results"
TARGET = 0.10
HEADER = struct.Struct("!cQ")  # command (E echo, S sink, O source), byte count
BUF = 256 * 1024
log = logging.getLogger("bench.link")


@dataclass(frozen=True)
class Budget:
    """How much traffic to spend per profile: transfers aim at ``seconds`` each way, capped in bytes."""

    pings: int
    ping_seconds: float
    seconds: float
    max_bytes: int


FULL = Budget(pings=20, ping_seconds=3.0, seconds=2.0, max_bytes=256 << 20)
QUICK = Budget(pings=5, ping_seconds=0.5, seconds=0.3, max_bytes=16 << 20)


class _Handler(socketserver.BaseRequestHandler):
    """E: echo until EOF. S n: swallow n bytes, timing them. O n: send n bytes."""

    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        command, n = HEADER.unpack(_recv_exact(sock, HEADER.size))
        if command == b"E":
            while data := sock.recv(BUF):
                sock.sendall(data)
        elif command == b"S":
            self.server.sink_rates.append(_receive_rate(sock, n))
        elif command == b"O":
            sock.sendall(bytes(n))


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    sink_rates: list[float]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if not (chunk := sock.recv(n - len(buf))):
            raise ConnectionError("peer closed early")
        buf += chunk
    return bytes(buf)


def _receive_rate(sock: socket.socket, n: int) -> float:
    """Receive ``n`` bytes; bit/s from the first to the last byte (the first read is the timing origin)."""
    buf = memoryview(bytearray(BUF))
    got = sock.recv_into(buf)
    t_first, first = time.perf_counter(), got
    while got < n:
        if not (k := sock.recv_into(buf)):
            raise ConnectionError("peer closed early")
        got += k
    elapsed = time.perf_counter() - t_first
    return 8 * (n - first) / elapsed if elapsed > 0 else float("inf")


def _connect(port: int, command: bytes, n: int = 0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(HEADER.pack(command, n))
    return sock


def one_way_ms(port: int, pings: int) -> float:
    """Half the median round trip of 64-byte messages, after one warm-up."""
    rtts = []
    with _connect(port, b"E") as sock:
        for i in range(pings + 1):
            t0 = time.perf_counter()
            sock.sendall(bytes(64))
            _recv_exact(sock, 64)
            if i:
                rtts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(rtts) / 2


def throughput(port: int, server: _Server, uplink: bool, nbytes: int) -> float:
    """Mbit/s of one bulk transfer, timed at the receiver."""
    if uplink:
        with _connect(port, b"S", nbytes) as sock:
            sock.sendall(bytes(nbytes))
            deadline = time.monotonic() + 120
            while not server.sink_rates and time.monotonic() < deadline:
                time.sleep(0.01)
        return server.sink_rates.pop() / 1e6
    with _connect(port, b"O", nbytes) as sock:
        return _receive_rate(sock, nbytes) / 1e6


def measure(profile: LinkProfile, server: _Server, budget: Budget, seed: int, base_ms: float) -> dict[str, Any]:
    """One profile's row; ``base_ms`` is the one-way time of the same path without the proxy."""
    upstream = server.server_address[:2]
    rtt_s = (profile.uplink.mean_delay_ms + profile.downlink.mean_delay_ms) / 1e3
    pings = max(3, min(budget.pings, int(budget.ping_seconds / max(rtt_s, 1e-3))))
    with ProxyThread(LinkProxy("127.0.0.1:0", upstream, profile, seed=seed)) as link:
        port = link.proxy.port
        delay = one_way_ms(port, pings)
        rates = {}
        for name, direction in (("up", profile.uplink), ("down", profile.downlink)):
            mbps = direction.bandwidth_mbps or 0.0
            nbytes = int(min(budget.max_bytes, max(256 << 10, mbps * 1e6 / 8 * budget.seconds)))
            rates[name] = (throughput(port, server, name == "up", nbytes), nbytes)
    want_delay = (profile.uplink.mean_delay_ms + profile.downlink.mean_delay_ms) / 2
    row: dict[str, Any] = {"profile": profile.name, "pings": pings, "delay_ms": want_delay, "via_proxy_ms": delay,
                           "measured_delay_ms": delay - base_ms, "delay_ratio": (delay - base_ms) / want_delay}
    for name, direction in (("up", profile.uplink), ("down", profile.downlink)):
        got, nbytes = rates[name]
        row |= {f"{name}_mbps": direction.bandwidth_mbps, f"measured_{name}_mbps": got, f"{name}_bytes": nbytes,
                f"{name}_ratio": got / direction.bandwidth_mbps if direction.bandwidth_mbps else None}
    ratios = [r for r in (row["delay_ratio"], row["up_ratio"], row["down_ratio"]) if r is not None]
    row["within_target"] = all(abs(r - 1) <= TARGET for r in ratios)
    return row


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Configured vs measured, with ratios (1.00 is perfect)."""
    headers = ["profile", "delay ms", "added", "ratio", "up Mbit/s", "measured", "ratio", "down Mbit/s",
               "measured", "ratio", f"within {TARGET:.0%}"]
    table = [headers] + [[r["profile"], f"{r['delay_ms']:.2f}", f"{r['measured_delay_ms']:.2f}",
                          f"{r['delay_ratio']:.3f}", f"{r['up_mbps']:g}", f"{r['measured_up_mbps']:.2f}",
                          f"{r['up_ratio']:.3f}", f"{r['down_mbps']:g}", f"{r['measured_down_mbps']:.2f}",
                          f"{r['down_ratio']:.3f}", "yes" if r["within_target"] else "NO"] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.link", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few pings and short transfers per profile")
    ap.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated named profiles (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON output (default bench/results/link[-quick].json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    unknown = [n for n in args.profiles.split(",") if n not in PROFILES]
    if unknown:
        ap.error(f"unknown profiles {unknown}; known: {', '.join(PROFILES)}")
    out = Path(args.out) if args.out else RESULTS / ("link-quick.json" if args.quick else "link.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    budget = QUICK if args.quick else FULL
    server = _Server(("127.0.0.1", 0), _Handler)
    server.sink_rates = []
    threading.Thread(target=server.serve_forever, name="bench-link-server", daemon=True).start()
    rows = []
    t0 = time.perf_counter()
    try:
        base_ms = one_way_ms(server.server_address[1], FULL.pings)
        for name in args.profiles.split(","):
            rows.append(measure(PROFILES[name], server, budget, args.seed, base_ms))
            log.info("%s done", name)
    finally:
        server.shutdown()
        server.server_close()
    print(format_rows(rows))
    print(f"\nwithout the proxy: {base_ms:.3f} ms one way (subtracted from the measured delays)")
    command = " ".join(["python -m bench.link", *(argv if argv is not None else sys.argv[1:])])
    out.write_text(json.dumps({"command": command, "seconds": time.perf_counter() - t0, "target": TARGET,
                               "direct_one_way_ms": base_ms,
                               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "python": platform.python_version()},
                               "results": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
