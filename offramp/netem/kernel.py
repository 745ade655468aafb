"""The kernel path: real ``tc`` shaping on a veth pair between two network namespaces.

Where it works it shapes every packet (TCP handshake and congestion control
included), which the in-process proxy cannot; it needs root, ``ip netns``,
and the qdiscs ``tbf`` (bandwidth) and ``netem`` (delay, jitter, loss). Many
container and CI kernels ship without ``netem``: :func:`kernel_capabilities`
says exactly what is there, and :func:`setup_veth_pair` refuses a profile it
cannot honour rather than silently leaving the delay out.

Unlike the proxy, ``netem`` really drops packets on loss (TCP retransmits), and
its jitter is centred: ``delay D jitter J`` here becomes ``netem delay D+J/2 J/2``
so both paths have the same floor and mean.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from offramp.core.errors import OfframpError
from offramp.netem.profiles import Direction, LinkProfile

log = logging.getLogger(__name__)

SUBNET = "10.203.0.0/30"
ADDR_A, ADDR_B = "10.203.0.1", "10.203.0.2"
DEV_A, DEV_B = "ofr-a", "ofr-b"
TBF_LATENCY = "100ms"  # queue length in time: a router-sized buffer, enough for TCP to keep the link full
_PROBES: dict[str, list[str]] = {
    "netem": ["netem", "delay", "10ms"],
    "tbf": ["tbf", "rate", "8mbit", "burst", "32kb", "latency", "50ms"],
    "htb": ["htb", "default", "1"],
}


def netns_argv(ns: str, *argv: str) -> list[str]:
    """``argv`` run inside network namespace ``ns`` (for ``subprocess``)."""
    return ["ip", "netns", "exec", ns, *argv]


def _cmd(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = netns_argv(ns, *args) if ns else list(args)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and result.returncode:
        raise OfframpError(f"'{' '.join(argv)}' failed: {result.stderr.strip() or result.returncode}")
    return result


def kernel_capabilities() -> dict[str, Any]:
    """What the kernel path can use here: root, tools, ``ip netns``, and which qdiscs load.

    Qdiscs are probed for real, on a veth inside a throwaway namespace that is
    always removed. ``missing`` lists everything absent; ``errors`` holds the
    tools' own words for each failure.
    """
    caps: dict[str, Any] = {"root": os.geteuid() == 0, "ip": shutil.which("ip"), "tc": shutil.which("tc"),
                            "netns": False, "qdiscs": {kind: False for kind in _PROBES}, "errors": {}}
    if caps["root"] and caps["ip"] and caps["tc"]:
        ns = f"ofr-probe-{os.getpid()}"
        try:
            _cmd("ip", "netns", "add", ns)
            caps["netns"] = True
            _cmd("ip", "link", "add", "p0", "type", "veth", "peer", "name", "p1", ns=ns)
            for kind, args in _PROBES.items():
                result = _cmd("tc", "qdisc", "add", "dev", "p0", "root", *args, ns=ns, check=False)
                caps["qdiscs"][kind] = result.returncode == 0
                if result.returncode:
                    caps["errors"][kind] = result.stderr.strip()
                else:
                    _cmd("tc", "qdisc", "del", "dev", "p0", "root", ns=ns)
        except OfframpError as e:
            caps["errors"]["netns"] = str(e)
        finally:
            teardown(ns)
    wanted = {"root": caps["root"], "ip": caps["ip"], "tc": caps["tc"], "netns": caps["netns"], **caps["qdiscs"]}
    caps["missing"] = [name for name, present in wanted.items() if not present]
    return caps


@dataclass(frozen=True)
class VethPair:
    """Two namespaces joined by a shaped veth: ``ns_a`` (the edge, ``addr_a``) and ``ns_b`` (the cloud)."""

    ns_a: str
    ns_b: str
    addr_a: str = ADDR_A
    addr_b: str = ADDR_B

    def __enter__(self) -> VethPair:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        teardown(self.ns_a, self.ns_b)


def setup_veth_pair(ns_a: str, ns_b: str, profile: LinkProfile) -> VethPair:
    """Create ``ns_a`` and ``ns_b`` joined by a veth in 10.203.0.0/30, shaped by ``profile``.

    The uplink is shaped on ``ns_a``'s end (its egress), the downlink on
    ``ns_b``'s. Bandwidth uses ``tbf``; delay, jitter and loss need ``netem``,
    and without it this raises :class:`OfframpError` (after removing what it
    made) instead of building a link without delay.
    """
    for ns in (ns_a, ns_b):
        if _cmd("ip", "netns", "pids", ns, check=False).returncode == 0:
            raise OfframpError(f"network namespace {ns!r} already exists; pick another name or remove it")
    try:
        for ns in (ns_a, ns_b):
            _cmd("ip", "netns", "add", ns)
            _cmd("ip", "link", "set", "lo", "up", ns=ns)
        _cmd("ip", "link", "add", DEV_A, "type", "veth", "peer", "name", DEV_B, "netns", ns_b, ns=ns_a)
        ends = ((ns_a, DEV_A, ADDR_A, profile.uplink), (ns_b, DEV_B, ADDR_B, profile.downlink))
        for ns, dev, addr, direction in ends:
            _cmd("ip", "addr", "add", f"{addr}/30", "dev", dev, ns=ns)
            _cmd("ip", "link", "set", dev, "up", ns=ns)
            _shape(ns, dev, direction, profile.name)
    except BaseException:
        teardown(ns_a, ns_b)
        raise
    log.info("veth %s (%s) <-> %s (%s), profile %s", ns_a, ADDR_A, ns_b, ADDR_B, profile.name)
    return VethPair(ns_a, ns_b)


def _shape(ns: str, dev: str, link: Direction, name: str) -> None:
    """netem (if the link has delay, jitter or loss) at the root, tbf (if it has a bandwidth) below it."""
    if link.cut:
        raise OfframpError(f"profile {name!r} cuts the link, which tc cannot express; use the in-process proxy "
                           "('offramp link')")
    parent = ["root"]
    if link.delay_ms or link.jitter_ms or link.loss:
        netem = ["netem", "delay", f"{link.mean_delay_ms * 1e3:.0f}us"]
        if link.jitter_ms:
            netem += [f"{link.jitter_ms * 1e3 / 2:.0f}us"]
        if link.loss:
            netem += ["loss", f"{link.loss * 100:g}%"]
        result = _cmd("tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", *netem, ns=ns, check=False)
        if result.returncode:
            raise OfframpError(
                f"profile {name!r} needs tc netem for its delay/jitter/loss, but netem is missing from this kernel "
                f"({result.stderr.strip()}); use the in-process proxy ('offramp link') for delay, or a profile "
                "with delay=0,jitter=0,loss=0 here for bandwidth only")
        parent = ["parent", "1:1", "handle", "10:"]
    if link.bytes_per_s is not None:
        burst = max(32 * 1024, int(link.bytes_per_s * 0.004))  # >= 4 ms of line rate, so timer slack costs nothing
        _cmd("tc", "qdisc", "add", "dev", dev, *parent, "tbf", "rate", f"{link.bandwidth_mbps * 1e3:.0f}kbit",
             "burst", str(burst), "latency", TBF_LATENCY, ns=ns)


def teardown(*namespaces: str) -> None:
    """Delete the namespaces (and with them the veth ends inside); missing ones are ignored."""
    for ns in namespaces:
        result = _cmd("ip", "netns", "del", ns, check=False)
        if result.returncode and "No such file" not in result.stderr:
            log.warning("could not delete network namespace %s: %s", ns, result.stderr.strip())
