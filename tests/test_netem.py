"""Link emulation: profiles, the shaper's arithmetic, and the proxy on real loopback traffic (gRPC included)."""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from offramp.core.errors import OfframpError
from offramp.netem import DeviceProfile, LinkProxy, ProxyThread, Schedule, parse_profile, slowed
from offramp.netem.cli import add_commands
from offramp.netem.profiles import PROFILES, Direction
from offramp.netem.shaper import MIN_BURST_BYTES, Shaper
from offramp.netem.trace import TraceQueue, load_trace

from helpers import LoopThread, wait_for

ROOT = Path(__file__).resolve().parents[1]
Address = tuple[str, int]


# -- profiles -------------------------------------------------------------------------------------------------------

def test_named_profiles_and_overrides() -> None:
    lte = parse_profile("lte")
    assert lte == PROFILES["lte"]
    assert (lte.uplink.delay_ms, lte.uplink.bandwidth_mbps, lte.downlink.bandwidth_mbps) == (25, 10, 30)
    lossy = parse_profile("lte,loss=1%,jitter=0")
    assert lossy.uplink.loss == lossy.downlink.loss == 0.01
    assert lossy.uplink.jitter_ms == 0 and lossy.downlink.bandwidth_mbps == 30


def test_custom_profile_units() -> None:
    p = parse_profile("delay=0.02s,jitter=500us,bw=500kbit,loss=0.01,stall=1s")
    assert p.uplink == p.downlink == Direction(delay_ms=20, jitter_ms=0.5, bandwidth_mbps=0.5, loss=0.01,
                                               stall_ms=1000)
    asym = parse_profile("delay=25,up=10mbit,down=none")
    assert (asym.uplink.bandwidth_mbps, asym.downlink.bandwidth_mbps, asym.uplink.delay_ms) == (10, None, 25)


@pytest.mark.parametrize("bad", ["5g", "delay=fast", "bw=-1", "loss=2", "colour=blue", "delay"])
def test_bad_profiles_are_user_errors(bad: str) -> None:
    with pytest.raises(OfframpError):
        parse_profile(bad)


def test_schedule_steps() -> None:
    s = Schedule.parse("lte; 30s:3g; 1m:bw=1mbit")
    assert [s.at(t).name for t in (0, 29.9, 30, 59, 60, 1e6)] == ["lte", "lte", "3g", "3g", "bw=1mbit", "bw=1mbit"]
    assert Schedule.parse("500ms:3g", initial=PROFILES["lan"]).at(0.1).name == "lan"
    for bad in ("30s:3g", "lte; 3g", "lte; 10s:3g; 5s:lan"):
        with pytest.raises(OfframpError):
            Schedule.parse(bad)


def test_slowed_emulates_a_weaker_device() -> None:
    def work() -> str:
        time.sleep(0.02)
        return "done"

    t0 = time.perf_counter()
    assert slowed(work, 3.0)() == "done"
    assert time.perf_counter() - t0 >= 0.06
    assert slowed(work, 1.0) is work
    with pytest.raises(OfframpError):
        DeviceProfile(0.5)


def test_slowed_on_the_cpu_clock_multiplies_only_the_threads_own_work() -> None:
    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    def waits_then_spins() -> None:  # time off the CPU (as if preempted by a neighbour), then 20 ms of work
        time.sleep(0.1)
        spin(0.02)

    t0 = time.perf_counter()
    slowed(waits_then_spins, 3.0, cpu_clock=True)()
    took = time.perf_counter() - t0
    assert 0.115 <= took < 0.2  # 3 x 20 ms of work, of which the 100 ms wait already covers the first 60
    t0 = time.perf_counter()
    slowed(lambda: spin(0.03), 3.0, cpu_clock=True)()
    assert time.perf_counter() - t0 >= 0.088


# -- the shaper, with a made-up clock ------------------------------------------------------------------------------

def test_shaper_never_early_never_reorders() -> None:
    pick = random.Random(0)
    for _ in range(20):
        link = Direction(delay_ms=pick.uniform(0, 50), jitter_ms=pick.uniform(0, 30), loss=pick.uniform(0, 0.3),
                         bandwidth_mbps=pick.choice([None, 0.5, 8, 1000]), stall_ms=50)
        shaper, now, last = Shaper(random.Random(1)), 0.0, 0.0
        for _ in range(200):
            now += pick.expovariate(1000)
            nbytes = pick.randint(1, 16384)
            delivery = shaper.admit(now, nbytes, link)
            assert delivery.at >= now + link.delay_ms / 1e3 + (link.stall_ms / 1e3 if delivery.lost else 0)
            assert delivery.at >= last
            last = delivery.at


def test_shaper_serialises_at_the_bandwidth() -> None:
    link = Direction(bandwidth_mbps=8)  # 1e6 bytes/s
    shaper = Shaper(random.Random(0))
    at = [shaper.admit(0.0, 10_000, link).at for _ in range(100)]  # 1 MB offered at once
    assert at[-1] == pytest.approx((1e6 - MIN_BURST_BYTES) / 1e6)
    assert shaper.admit(10.0, 100, link).at == 10.0  # idle time refills the (small) burst


def test_shaper_is_seeded() -> None:
    link = Direction(delay_ms=10, jitter_ms=20, loss=0.1)

    def run(seed: int) -> list[float]:
        shaper = Shaper(random.Random(seed))
        return [shaper.admit(float(i), 100, link).at - i for i in range(50)]

    assert run(1) == run(1)
    assert run(1) != run(2)


# -- the proxy on loopback ------------------------------------------------------------------------------------------

async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture(scope="module")
def echo() -> Iterator[tuple[Address, asyncio.Server]]:
    """A real asyncio echo server on 127.0.0.1, port 0."""
    with LoopThread() as loop:
        server = loop.run(asyncio.start_server(_echo, "127.0.0.1", 0))
        yield server.sockets[0].getsockname()[:2], server
        server.close()
        loop.run(server.wait_closed())


@pytest.fixture
def link(echo: tuple[Address, asyncio.Server]) -> Iterator[Callable[..., ProxyThread]]:
    """``link(profile_or_schedule_text, **LinkProxy kwargs)`` -> a started proxy in front of the echo server."""
    started: list[ProxyThread] = []

    def start(text: str, upstream: Address | None = None, **kwargs: object) -> ProxyThread:
        proxy = ProxyThread(LinkProxy("127.0.0.1:0", upstream or echo[0], Schedule.parse(text), **kwargs))
        proxy.start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def _connect(proxy: ProxyThread) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.proxy.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "connection closed early"
        buf += chunk
    return bytes(buf)


def _rtts(proxy: ProxyThread, count: int, size: int = 32) -> list[float]:
    """Round trips of small messages, in ms, one connection."""
    out = []
    with _connect(proxy) as sock:
        for _ in range(count):
            t0 = time.perf_counter()
            sock.sendall(bytes(size))
            _recv_exact(sock, size)
            out.append(1e3 * (time.perf_counter() - t0))
    return out


def _arrivals(sock: socket.socket, payload: bytes, *, until: float | None = None) -> list[tuple[float, int]]:
    """Send ``payload`` from a thread while receiving the echo; ``(time, bytes so far)`` after each read."""
    sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
    sender.start()
    got, marks = 0, []
    while got < len(payload) and (until is None or time.perf_counter() < until):
        chunk = sock.recv(65536)
        assert chunk, "connection closed early"
        got += len(chunk)
        marks.append((time.perf_counter(), got))
    return marks


def _mbps(marks: list[tuple[float, int]], start: float = 0.0, stop: float = float("inf")) -> float:
    """Receive rate between the first and last read that fall in ``[start, stop]``."""
    inside = [(t, n) for t, n in marks if start <= t <= stop]
    (t0, n0), (t1, n1) = inside[0], inside[-1]
    return 8 * (n1 - n0) / (t1 - t0) / 1e6


def test_rtt_is_twice_the_one_way_delay(link: Callable[..., ProxyThread]) -> None:
    rtts = _rtts(link("delay=30ms"), 6)
    assert min(rtts) >= 60.0
    assert statistics.median(rtts) <= 60.0 * 1.15 + 5


def test_throughput_matches_bandwidth(link: Callable[..., ProxyThread]) -> None:
    proxy = link("bw=8mbit")
    with _connect(proxy) as sock:
        marks = _arrivals(sock, bytes(1_000_000))
    assert _mbps(marks) == pytest.approx(8.0, rel=0.10)
    stats = proxy.stats()
    assert stats.uplink.bytes == stats.downlink.bytes == 1_000_000
    assert stats.connections == 1 and stats.uplink.segments >= 1_000_000 // 16384


def test_jitter_follows_the_seed(link: Callable[..., ProxyThread]) -> None:
    def run(seed: int) -> list[float]:
        return _rtts(link("delay=1ms,jitter=40ms", seed=seed), 8)

    first, again, other = run(1), run(1), run(2)
    assert statistics.median(abs(a - b) for a, b in zip(first, again)) < 4.0
    assert statistics.mean(abs(a - b) for a, b in zip(first, other)) > 8.0


def test_no_reordering_under_jitter(link: Callable[..., ProxyThread]) -> None:
    payload = b"".join(i.to_bytes(4, "big") for i in range(20_000))
    with _connect(link("delay=1ms,jitter=30ms,bw=50mbit")) as sock:
        sender = threading.Thread(target=lambda: [sock.sendall(payload[i:i + 4000])
                                                  for i in range(0, len(payload), 4000)], daemon=True)
        sender.start()
        assert _recv_exact(sock, len(payload)) == payload
        sender.join(5)


def test_schedule_drops_bandwidth_mid_transfer(link: Callable[..., ProxyThread]) -> None:
    proxy = link("bw=16mbit; 0.6s:bw=4mbit", max_inflight_bytes=64 * 1024)
    t0 = time.perf_counter()
    with _connect(proxy) as sock:
        marks = _arrivals(sock, bytes(4_000_000), until=t0 + 1.4)
    before, after = _mbps(marks, t0 + 0.1, t0 + 0.5), _mbps(marks, t0 + 0.85, t0 + 1.4)
    assert before == pytest.approx(16.0, rel=0.2)
    assert after == pytest.approx(4.0, rel=0.2)


def test_loss_stalls(link: Callable[..., ProxyThread]) -> None:
    proxy = link("delay=5ms,loss=1,stall=100ms")
    assert _rtts(proxy, 1)[0] >= 210.0
    stats = proxy.stats()
    assert stats.uplink.stalls == stats.downlink.stalls == 1
    assert stats.uplink.mean_added_delay_ms >= 105.0 - 1e-6  # float sums of the configured parts


def test_loss_in_reset_mode_kills_the_connection(link: Callable[..., ProxyThread]) -> None:
    proxy = link("loss=0.5", on_loss="reset", seed=3)
    with _connect(proxy) as sock:
        with pytest.raises((ConnectionResetError, AssertionError)):  # RST, or an EOF seen first
            for _ in range(50):
                sock.sendall(b"ping")
                _recv_exact(sock, 4)
    wait_for(lambda: proxy.stats().resets == 1, 5, what="the proxy to count the reset")


def test_unreachable_upstream_closes_the_client(link: Callable[..., ProxyThread]) -> None:
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        dead = spare.getsockname()[:2]  # bound, never listening: connections are refused
        proxy = link("lan", upstream=dead)
        with _connect(proxy) as sock:
            assert sock.recv(1) == b""


@pytest.fixture
def health_server() -> Iterator[tuple[Address, grpc.Server]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield ("127.0.0.1", port), server
    server.stop(grace=None)


def _check_ms(target: str, count: int) -> list[float]:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connect and warm up
        out = []
        for _ in range(count):
            t0 = time.perf_counter()
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            out.append(1e3 * (time.perf_counter() - t0))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return out


def test_grpc_through_the_link(link: Callable[..., ProxyThread], health_server: tuple[Address, grpc.Server]) -> None:
    address, _ = health_server
    direct = statistics.median(_check_ms(f"{address[0]}:{address[1]}", 5))
    proxy = link("delay=20ms,bw=10mbit", upstream=address)
    shaped = _check_ms(proxy.address, 5)
    assert min(shaped) >= 40.0
    assert statistics.median(shaped) <= 40.0 * 1.15 + 5 + direct


# -- the command and the benchmark ----------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offramp")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_link_list_prints_every_profile(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["link", "--list"])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PROFILES) and "Mbit/s" in out
    args = _parser().parse_args(["link"])
    with pytest.raises(OfframpError, match="--upstream"):
        args.run(args)


def test_link_command_serves_until_sigterm(echo: tuple[Address, asyncio.Server]) -> None:
    host, port = echo[0]
    script = ("import logging, sys; from offramp.netem.cli import add_commands; import argparse; "
              "logging.basicConfig(level=logging.INFO); p = argparse.ArgumentParser(); "
              "add_commands(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.run(a))")
    proc = subprocess.Popen([sys.executable, "-c", script, "link", "--upstream", f"{host}:{port}",
                             "--profile", "delay=5ms", "--schedule", "1s:3g"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        line = wait_for(lambda: proc.stderr.readline(), 20, process=proc, what="the link to log its address")
        assert "profile delay=5ms" in line
        listen = line.split("link ", 1)[1].split(" ", 1)[0]
        with socket.create_connection((listen.rsplit(":", 1)[0], int(listen.rsplit(":", 1)[1])), timeout=5) as s:
            t0 = time.perf_counter()
            s.sendall(b"hi")
            assert _recv_exact(s, 2) == b"hi"
            assert time.perf_counter() - t0 >= 0.010
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stderr.close()


def test_bench_link_quick(tmp_path: Path) -> None:
    out = tmp_path / "link.json"
    result = subprocess.run([sys.executable, "-m", "bench.link", "--quick", "--profiles", "wifi,lte",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    assert [r["profile"] for r in rows] == ["wifi", "lte"]
    for r in rows:
        assert r["measured_delay_ms"] >= 0.9 * r["delay_ms"] - 1.0
        assert 0.7 < r["up_ratio"] < 1.3 and 0.7 < r["down_ratio"] < 1.3
    assert "within 10%" in result.stdout


# -- recorded traces ------------------------------------------------------------------------------------------------

def _trace_file(tmp_path: Path, lines: list[str], name: str = "t.up") -> str:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("lines, message", [
    ([], "is empty"),
    (["0", "5", "3"], "line 3: time goes backwards"),
    (["0", "1.5"], "line 2: '1.5' is not a whole number"),
    (["0", "abc"], "line 2: 'abc' is not a whole number"),
    (["-1", "4"], "negative time"),
    (["0", "0"], "last time must be after 0 ms"),
])
def test_bad_traces_are_one_line_errors(tmp_path: Path, lines: list[str], message: str) -> None:
    path = _trace_file(tmp_path, lines, f"bad{len(lines)}{hash(message) % 1000}.up")
    with pytest.raises(OfframpError, match=message):
        load_trace(path)
    with pytest.raises(OfframpError, match="no such file"):
        load_trace(str(tmp_path / "missing.up"))
    with pytest.raises(OfframpError, match="no such file"):
        parse_profile(f"trace={tmp_path / 'missing'}")


def test_trace_profiles_parse(tmp_path: Path) -> None:
    _trace_file(tmp_path, ["1", "1", "2"], "x.up")
    _trace_file(tmp_path, ["4"], "x.down")
    p = parse_profile(f"trace={tmp_path / 'x'},delay=20ms,queue=10")
    assert p.uplink.trace.period_s == 0.002 and p.downlink.trace.period_s == 0.004
    assert p.uplink.bandwidth_mbps is None and p.uplink.delay_ms == 20 and p.uplink.queue_bytes == 15_000
    assert p.uplink.trace.mean_mbps == pytest.approx(3 * 1500 * 8 / 0.002 / 1e6)
    with pytest.raises(OfframpError, match="not both"):
        parse_profile(f"lte,uptrace={tmp_path / 'x.up'},up=5mbit")
    with pytest.raises(OfframpError, match="bad queue"):
        parse_profile(f"trace={tmp_path / 'x'},queue=0")


def test_trace_queue_by_hand(tmp_path: Path) -> None:
    """Opportunities at 0, 0, 10 and 20 ms (period 20 ms): 1,500 bytes each, unused capacity lost."""
    queue = TraceQueue(load_trace(_trace_file(tmp_path, ["0", "0", "10", "20"])))
    assert queue.send(0.0, 3000) == 0.0  # both opportunities at 0
    assert queue.send(0.0, 100) == 0.010  # the next one
    assert queue.send(0.015, 100) == 0.020  # 10 ms's leftover is gone; 20 ms carries it
    assert queue.send(0.016, 1500) == 0.020  # the trace repeats: its 0 ms lines fall at 20 ms again
    assert queue.send(0.021, 1) == 0.030
    assert queue.backlog(0.025) == 1 and queue.backlog(0.030) == 0
    assert queue.trace.capacity_bytes(0.0, 0.040) == 1500 * (4 + 3)


def test_a_trace_link_delivers_its_capacity_and_holds_data_through_a_dead_stretch(
        link: Callable[..., ProxyThread], tmp_path: Path) -> None:
    """12 Mbit/s for 0.5 s, then nothing until 1 s: the echo comes back at the trace's pace."""
    path = _trace_file(tmp_path, [str(ms) for ms in range(1, 501)] + ["1000"], "rate.up")
    proxy = link(f"uptrace={path}")
    host, port = proxy.address.rsplit(":", 1)
    total, received, marks = 1_200_000, 0, {}
    with socket.create_connection((host, int(port)), timeout=10) as s:
        sender = threading.Thread(target=s.sendall, args=(bytes(total),), daemon=True)
        t0 = time.perf_counter()
        sender.start()
        s.settimeout(5)
        while received < total:
            received += len(s.recv(1 << 16))
            t = time.perf_counter() - t0
            for mark in (0.45, 0.95):
                if t < mark:
                    marks[mark] = received
        sender.join(5)
    assert marks[0.45] == pytest.approx(449 * 1500, rel=0.12)
    assert marks[0.95] == pytest.approx(500 * 1500, rel=0.05)  # nothing crossed in the dead stretch
    assert t >= 1.0  # the rest waited for the trace's next lap


def test_bench_link_validates_a_trace(tmp_path: Path) -> None:
    _trace_file(tmp_path, [str(ms) for ms in range(1, 501)] + ["1000"], "s.up")
    _trace_file(tmp_path, [str(ms) for ms in range(0, 1000, 2)] + ["1000"], "s.down")
    out = tmp_path / "traces.json"
    result = subprocess.run([sys.executable, "-m", "bench.link", "--profiles", "", "--traces", str(tmp_path / "s"),
                             "--trace-seconds", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [(r["trace"], r["direction"]) for r in report["traces"]] == [("s", "up"), ("s", "down")]
    assert all(0.85 < r["ratio"] < 1.1 for r in report["traces"])
    (probes,) = report["trace_probes"]
    assert probes["long_waits"] >= 1 and probes["long_waits_mean_measured_ms"] >= 300  # the dead stretch
