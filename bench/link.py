"""Does the emulated link deliver what its profile promises? One-way delay and throughput per named profile.

For each profile a LinkProxy sits in front of a local echo/sink/source
server on 127.0.0.1. The added one-way delay is half the median round trip of
small messages through the proxy, less the same without the proxy (loopback
and the server cost something too), against the profile's mean (delay +
jitter / 2, both directions averaged); throughput is a bulk transfer each way, timed at the receiver from
first to last byte, against the direction's bandwidth. Target: within 10 %.
Prints a table and writes JSON to bench/results/link.json.

Recorded traces (``--traces PREFIX,...``, Mahimahi files ``PREFIX.up`` and
``PREFIX.down``) are validated over their first ``--trace-seconds``: each
direction saturated by a bulk transfer, the bytes delivered in each second
against the trace's capacity in that second (target: within 5 % over the
window), and small probes on the otherwise idle uplink, whose added delay is
set against the wait the trace predicts (the next delivery opportunity, long
in a dead stretch).

    python -m bench.link             # every profile, under a minute
    python -m bench.link --quick     # smoke run, a few seconds per profile
    python -m bench.link --profiles lte --traces DIR/ATT-LTE-driving-2016 --trace-seconds 60
"""
from __future__ import annotations

import argparse
import json
import logging
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

from offramp.core.hostinfo import machine
from offramp.netem import PROFILES, LinkProfile, LinkProxy, ProxyThread, parse_profile
from offramp.netem.trace import load_trace

RESULTS = Path(__file__).parent / "results"
TARGET = 0.10
TRACE_TARGET = 0.05
PROBE_BYTES, PROBE_EVERY_S = 1000, 0.1
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
            try:
                sock.sendall(bytes(n))
            except (ConnectionResetError, BrokenPipeError):
                pass  # a receiver timing a window stops reading when its window ends


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


def _timed_receive(sock: socket.socket, n: int, t0: float, seconds: float) -> list[int]:
    """Bytes received in each whole second after ``t0`` (perf_counter), for ``seconds`` seconds."""
    buckets = [0] * int(seconds)
    buf = memoryview(bytearray(BUF))
    got = 0
    sock.settimeout(5)
    while got < n:
        try:
            k = sock.recv_into(buf)
        except TimeoutError:  # a long dead stretch: keep waiting until the window ends
            if time.perf_counter() - t0 >= seconds:
                break
            continue
        if not k:
            break
        got += k
        second = int(time.perf_counter() - t0)
        if second >= len(buckets):
            break
        buckets[second] += k
    return buckets


def trace_rate(prefix: str, uplink: bool, server: _Server, seconds: float, seed: int) -> dict[str, Any]:
    """Saturate one direction of a trace link for ``seconds``; delivered bytes per second against capacity."""
    trace = load_trace(f"{prefix}.{'up' if uplink else 'down'}")
    side = "uptrace" if uplink else "downtrace"
    profile = parse_profile(f"{side}={trace.path}")
    capacity = [trace.capacity_bytes(i, i + 1) for i in range(int(seconds))]
    nbytes = int(sum(capacity) * 1.5) + (1 << 20)
    sink = _Server(("127.0.0.1", 0), _BucketHandler)
    sink.buckets, sink.seconds = [], seconds
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    try:
        target = sink if uplink else server
        with ProxyThread(LinkProxy("127.0.0.1:0", target.server_address[:2], profile, seed=seed)) as link:
            t0 = time.perf_counter()  # the trace's clock started with the proxy, a moment earlier
            if uplink:
                sink.t0 = t0
                with _connect(link.proxy.port, b"B", nbytes) as sock:
                    sender = threading.Thread(target=_send_quietly, args=(sock, nbytes), daemon=True)
                    sender.start()
                    deadline = time.monotonic() + seconds + 10
                    while not sink.buckets and time.monotonic() < deadline:
                        time.sleep(0.05)
                delivered = sink.buckets.pop() if sink.buckets else []
            else:
                with _connect(link.proxy.port, b"O", nbytes) as sock:
                    delivered = _timed_receive(sock, nbytes, t0, seconds)
    finally:
        sink.shutdown()
        sink.server_close()
    delivered = (delivered + [0] * len(capacity))[:len(capacity)]
    total_ratio = sum(delivered) / max(1, sum(capacity))
    err = [abs(d - c) for d, c in zip(delivered, capacity)]
    return {"trace": Path(prefix).name, "direction": "up" if uplink else "down", "seconds": int(seconds),
            "trace_mean_mbps": 8 * sum(capacity) / seconds / 1e6, "delivered_mean_mbps": 8 * sum(delivered) / seconds / 1e6,
            "ratio": total_ratio, "within_target": abs(total_ratio - 1) <= TRACE_TARGET,
            "per_second_mean_abs_error": sum(err) / max(1, sum(capacity)),
            "capacity_bytes_per_s": capacity, "delivered_bytes_per_s": delivered}


def _send_quietly(sock: socket.socket, n: int) -> None:
    try:
        sock.sendall(bytes(n))
    except OSError:
        pass  # the receiver stops at the end of its window


class _BucketHandler(socketserver.BaseRequestHandler):
    """B n: receive up to n bytes, counting them per second since the server's t0."""

    server: Any

    def handle(self) -> None:
        sock: socket.socket = self.request
        command, n = HEADER.unpack(_recv_exact(sock, HEADER.size))
        self.server.buckets.append(_timed_receive(sock, n, self.server.t0, self.server.seconds))


def trace_probes(prefix: str, server: _Server, seconds: float, seed: int, base_ms: float) -> dict[str, Any]:
    """Small probes every 100 ms over the idle uplink trace: measured added delay against the trace's wait."""
    trace = load_trace(f"{prefix}.up")
    profile = parse_profile(f"uptrace={trace.path}")
    rows = []
    with ProxyThread(LinkProxy("127.0.0.1:0", server.server_address[:2], profile, seed=seed)) as link:
        t0 = time.perf_counter()
        with _connect(link.proxy.port, b"E") as sock:
            sock.settimeout(seconds + 30)
            while (sent := time.perf_counter() - t0) < seconds:
                sock.sendall(bytes(PROBE_BYTES))
                _recv_exact(sock, PROBE_BYTES)
                rtt_ms = 1e3 * (time.perf_counter() - t0 - sent)
                rows.append((sent, rtt_ms - 2 * base_ms, 1e3 * (trace.next_opportunity(sent) - sent)))
                time.sleep(max(0.0, PROBE_EVERY_S - (time.perf_counter() - t0 - sent)))
    errors = sorted(abs(m - p) for _, m, p in rows)
    waits = [p for _, _, p in rows]
    long = [(m, p) for _, m, p in rows if p >= 50]
    return {"trace": Path(prefix).name, "probes": len(rows), "median_abs_error_ms": errors[len(errors) // 2],
            "p90_abs_error_ms": errors[int(0.9 * (len(errors) - 1))], "predicted_max_wait_ms": max(waits),
            "long_waits": len(long), "long_waits_mean_measured_ms": sum(m for m, _ in long) / len(long) if long else None,
            "long_waits_mean_predicted_ms": sum(p for _, p in long) / len(long) if long else None}


def plot_traces(trace_rows: list[dict[str, Any]], path: Path) -> None:
    """Per trace and direction: the trace's capacity and the bytes delivered, second by second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(trace_rows), 1, figsize=(9, 1.6 * len(trace_rows)), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], trace_rows):
        t = range(len(r["capacity_bytes_per_s"]))
        ax.step(t, [8 * b / 1e6 for b in r["capacity_bytes_per_s"]], where="post", color="0.6", label="trace capacity")
        ax.step(t, [8 * b / 1e6 for b in r["delivered_bytes_per_s"]], where="post", color="C0", lw=1,
                label="delivered")
        ax.set_ylabel("Mbit/s", fontsize=7)
        ax.set_title(f"{r['trace']} {r['direction']}: ratio {r['ratio']:.3f}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("seconds from the link's start")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    ap.add_argument("--traces", default="", metavar="PREFIX,...",
                    help="Mahimahi traces to validate (files PREFIX.up and PREFIX.down)")
    ap.add_argument("--trace-seconds", type=float, default=60.0, help="window of each trace replayed (default 60)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON output (default bench/results/link[-quick].json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    unknown = [n for n in args.profiles.split(",") if n and n not in PROFILES]
    if unknown:
        ap.error(f"unknown profiles {unknown}; known: {', '.join(PROFILES)}")
    default = "link_traces.json" if args.traces and not args.profiles else "link.json"
    out = Path(args.out) if args.out else RESULTS / ("link-quick.json" if args.quick else default)
    out.parent.mkdir(parents=True, exist_ok=True)
    budget = QUICK if args.quick else FULL
    server = _Server(("127.0.0.1", 0), _Handler)
    server.sink_rates = []
    threading.Thread(target=server.serve_forever, name="bench-link-server", daemon=True).start()
    rows = []
    t0 = time.perf_counter()
    try:
        base_ms = one_way_ms(server.server_address[1], FULL.pings)
        for name in filter(None, args.profiles.split(",")):
            rows.append(measure(PROFILES[name], server, budget, args.seed, base_ms))
            log.info("%s done", name)
        trace_rows, probe_rows = [], []
        for prefix in filter(None, args.traces.split(",")):
            for uplink in (True, False):
                trace_rows.append(trace_rate(prefix, uplink, server, args.trace_seconds, args.seed))
            probe_rows.append(trace_probes(prefix, server, args.trace_seconds, args.seed, base_ms))
    finally:
        server.shutdown()
        server.server_close()
    if rows:
        print(format_rows(rows))
    for r in trace_rows:
        print(f"trace {r['trace']} {r['direction']}: {r['trace_mean_mbps']:.2f} Mbit/s in the trace, "
              f"{r['delivered_mean_mbps']:.2f} delivered (ratio {r['ratio']:.3f}, within {TRACE_TARGET:.0%}: "
              f"{'yes' if r['within_target'] else 'NO'}), per-second error {r['per_second_mean_abs_error']:.1%}")
    for r in probe_rows:
        print(f"trace {r['trace']} probes: {r['probes']}, added delay vs the trace's wait: median error "
              f"{r['median_abs_error_ms']:.1f} ms, p90 {r['p90_abs_error_ms']:.1f} ms; {r['long_waits']} probes "
              f"predicted to wait >= 50 ms waited {r['long_waits_mean_measured_ms'] or 0:.0f} ms on average "
              f"(predicted {r['long_waits_mean_predicted_ms'] or 0:.0f})")
    print(f"\nwithout the proxy: {base_ms:.3f} ms one way (subtracted from the measured delays)")
    command = " ".join(["python -m bench.link", *(argv if argv is not None else sys.argv[1:])])
    out.write_text(json.dumps({"command": command, "seconds": time.perf_counter() - t0, "target": TARGET,
                               "direct_one_way_ms": base_ms,
                               "machine": {**machine(), "platform": platform.platform()},
                               "results": rows, "trace_target": TRACE_TARGET, "traces": trace_rows,
                               "trace_probes": probe_rows}, indent=2) + "\n")
    if trace_rows:
        plot_traces(trace_rows, out.with_suffix(".png"))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
