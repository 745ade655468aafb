"""The kernel path (tc on a veth between namespaces): what this kernel offers, and tbf's real throughput."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from offramp.core.errors import OfframpError
from offramp.netem import parse_profile
from offramp.netem.kernel import VethPair, kernel_capabilities, netns_argv, setup_veth_pair

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
PORT = 5201
RECEIVER = """
import socket, sys, time
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
conn, _ = server.accept()
buf = bytearray(1 << 16)
first = total = conn.recv_into(buf)
t0 = t1 = time.perf_counter()
while k := conn.recv_into(buf):
    total += k
    t1 = time.perf_counter()
print(8 * (total - first) / (t1 - t0) / 1e6)
"""
ECHO = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
conn, _ = server.accept()
while data := conn.recv(4096):
    conn.sendall(data)
"""
PING = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(5):
    t0 = time.perf_counter()
    s.sendall(b"x")
    s.recv(1)
    rtts.append(1e3 * (time.perf_counter() - t0))
print(min(rtts))
"""
SENDER = "import socket, sys; s = socket.create_connection((sys.argv[1], int(sys.argv[2]))); s.sendall(bytes({n}))"


@pytest.fixture(scope="module")
def caps() -> dict[str, Any]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    return kernel_capabilities()


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@needs_root
def test_capabilities_report_what_is_missing(caps: dict[str, Any]) -> None:
    assert caps["root"] and caps["netns"]
    assert set(caps["qdiscs"]) == {"netem", "tbf", "htb"}
    assert caps["missing"] == [kind for kind, present in caps["qdiscs"].items() if not present]
    for kind in caps["missing"]:
        assert caps["errors"][kind]  # the tool's own words
    assert f"ofr-probe-{os.getpid()}" not in _namespaces()


@pytest.fixture
def veth(caps: dict[str, Any]) -> Iterator[VethPair]:
    if not caps["qdiscs"]["tbf"]:
        pytest.skip("tbf missing from this kernel")
    with setup_veth_pair(f"ofr-ta-{os.getpid()}", f"ofr-tb-{os.getpid()}", parse_profile("bw=8mbit")) as pair:
        yield pair
    assert pair.ns_a not in _namespaces()


def test_tbf_throughput_through_veth(veth: VethPair) -> None:
    receiver = subprocess.Popen(netns_argv(veth.ns_b, sys.executable, "-c", RECEIVER, veth.addr_b, str(PORT)),
                                stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout.readline().strip() == "ready"
        subprocess.run(netns_argv(veth.ns_a, sys.executable, "-c", SENDER.format(n=2_000_000), veth.addr_b,
                                  str(PORT)), check=True, timeout=30)
        out, _ = receiver.communicate(timeout=30)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait(timeout=10)
    # tbf counts Ethernet/IP/TCP headers: payload goodput is ~1448/1514 of the rate
    assert float(out) == pytest.approx(8.0, rel=0.10)


def test_delay_without_netem_is_refused(caps: dict[str, Any]) -> None:
    if caps["qdiscs"]["netem"]:
        pytest.skip("this kernel has netem")
    ns_a, ns_b = f"ofr-ta-{os.getpid()}", f"ofr-tb-{os.getpid()}"
    with pytest.raises(OfframpError, match="netem is missing.*in-process proxy"):
        setup_veth_pair(ns_a, ns_b, parse_profile("lte"))
    assert ns_a not in _namespaces() and ns_b not in _namespaces()


def test_netem_delays_the_veth(caps: dict[str, Any]) -> None:
    if not caps["qdiscs"]["netem"]:
        pytest.skip("netem missing from this kernel")
    with setup_veth_pair(f"ofr-ta-{os.getpid()}", f"ofr-tb-{os.getpid()}", parse_profile("delay=20ms")) as veth:
        echo = subprocess.Popen(netns_argv(veth.ns_b, sys.executable, "-c", ECHO, veth.addr_b, str(PORT)),
                                stdout=subprocess.PIPE, text=True)
        try:
            assert echo.stdout.readline().strip() == "ready"
            ping = subprocess.run(netns_argv(veth.ns_a, sys.executable, "-c", PING, veth.addr_b, str(PORT)),
                                  capture_output=True, text=True, check=True, timeout=30)
        finally:
            echo.kill()
            echo.wait(timeout=10)
    assert 40.0 <= float(ping.stdout) <= 40.0 * 1.15 + 5
