"""Faults end to end, with real cloud processes and a real link proxy: a cloud killed and brought back on
its port, failback to the primary, a 5-second partition, a half-open peer. Every request the edge
receives gets exactly one answer: degraded (from its best exit) while the cloud cannot answer, from
the cloud again after."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers import OFFLOADING_EDGE, LoopThread, Traffic, edge_servers, wait_for

from edge_node.server import EdgeServer
from offramp.serving.daemon_proc import DaemonProcess
from offramp.netem import PROFILES, LinkProxy, ProxyThread
from offramp.netem.profiles import PARTITION

EDGE_SETTINGS = OFFLOADING_EDGE


@pytest.fixture
def start_edge(tiny_checkpoint: Path, loop: LoopThread) -> Iterator[Callable[..., EdgeServer]]:
    with edge_servers(loop, tiny_checkpoint, EDGE_SETTINGS) as start:
        yield start


@pytest.fixture(scope="module")
def inputs(first_inputs: torch.Tensor) -> torch.Tensor:
    return first_inputs


def connected(edge: EdgeServer, address: str | None) -> Callable[[], bool]:
    return lambda: edge.engine.offload.connected_to == address


def test_a_cloud_killed_and_restarted_on_its_port_gets_the_edge_back(
        tiny_checkpoint: Path, start_edge: Callable[..., EdgeServer], inputs: torch.Tensor) -> None:
    with DaemonProcess("cloud", ["--checkpoint", str(tiny_checkpoint)]) as cloud:
        edge = start_edge(cloud=(cloud.address,))
        wait_for(connected(edge, cloud.address), 10, what="the edge to pair with the cloud")
        with Traffic(edge, inputs) as traffic:
            wait_for(traffic.answered_by_cloud_after(0), 10, what="answers from the cloud")
            cloud.kill()
            wait_for(connected(edge, None), 10, what="the edge to notice the cloud's death")
            dead = time.monotonic()
            wait_for(lambda: len(traffic.after(dead)) >= 5, 10, what="degraded answers meanwhile")
            restarting = time.monotonic()  # from here on answers may come from the new cloud, whatever they say
            cloud.restart()
            back = time.monotonic()
            wait_for(connected(edge, cloud.address), 15, what="the edge to return to the restarted cloud")
            wait_for(traffic.answered_by_cloud_after(back), 10, what="answers from the restarted cloud")
        replies = traffic.check_exactly_once()
    meanwhile = [r for at, r in traffic.replies if dead < at < restarting]
    assert meanwhile and all(r.degraded and r.degraded_reason.startswith("cloud unavailable") for r in meanwhile)
    assert sum(r.decided_by == "cloud" for r in replies) >= 6


def test_failback_to_the_primary_once_it_is_healthy(
        tiny_checkpoint: Path, start_edge: Callable[..., EdgeServer], inputs: torch.Tensor) -> None:
    with DaemonProcess("cloud", ["--checkpoint", str(tiny_checkpoint)]) as primary, \
            DaemonProcess("cloud", ["--checkpoint", str(tiny_checkpoint)]) as secondary:
        edge = start_edge(cloud=(primary.address, secondary.address), failback_check_s=0.3, deadline_ms=5000)
        wait_for(connected(edge, primary.address), 10, what="the edge to pair with the primary")
        with Traffic(edge, inputs, period_s=0.05) as traffic:
            wait_for(traffic.answered_by_cloud_after(0), 10, what="answers from the primary")
            primary.kill()
            wait_for(connected(edge, secondary.address), 10, what="failover to the secondary")
            over = time.monotonic()
            wait_for(traffic.answered_by_cloud_after(over), 10, what="answers from the secondary")
            primary.restart()
            back = time.monotonic()
            wait_for(connected(edge, primary.address), 10, what="failback to the primary")
            switched = time.monotonic()
            wait_for(traffic.answered_by_cloud_after(switched), 10, what="answers from the primary again")
        replies = traffic.check_exactly_once()
    assert switched - back < 0.3 + 5  # within a few checks of the primary being up
    # Degraded answers only where no cloud could answer: in flight at the kill, or in the moment of a switch.
    assert all(r.degraded_reason.startswith("cloud unavailable") for r in replies if r.degraded)


@pytest.fixture
def cloud_behind_link(tiny_checkpoint: Path) -> Iterator[tuple[DaemonProcess, ProxyThread]]:
    with DaemonProcess("cloud", ["--checkpoint", str(tiny_checkpoint)]) as cloud, \
            ProxyThread(LinkProxy("127.0.0.1:0", cloud.address, PROFILES["lan"])) as link:
        yield cloud, link


def test_a_five_second_partition_is_answered_degraded_then_from_the_cloud(
        cloud_behind_link: tuple[DaemonProcess, ProxyThread], start_edge: Callable[..., EdgeServer],
        inputs: torch.Tensor) -> None:
    _, link = cloud_behind_link
    edge = start_edge(cloud=(link.address,), deadline_ms=400)
    wait_for(connected(edge, link.address), 10, what="the edge to pair through the link")
    with Traffic(edge, inputs, period_s=0.05) as traffic:
        wait_for(traffic.answered_by_cloud_after(0), 10, what="answers through the link")
        link.set_link(PARTITION)
        cut = time.monotonic()
        time.sleep(5)
        link.set_link(PROFILES["lan"])
        healed = time.monotonic()
        wait_for(traffic.answered_by_cloud_after(healed), 15, what="answers from the cloud after the partition")
    traffic.check_exactly_once()
    during = [r for at, r in traffic.replies if cut + 0.45 < at < healed]  # sent after the cut, timed out in it
    assert len(during) >= 40 and all(r.degraded for r in during)
    assert all(r.degraded_reason == "deadline exceeded after 400 ms" for r in during)
    assert edge.engine.offload.connected_to == link.address  # a short partition does not cost the connection


def test_a_half_open_cloud_is_noticed_within_the_keepalive_bound(
        cloud_behind_link: tuple[DaemonProcess, ProxyThread], start_edge: Callable[..., EdgeServer],
        inputs: torch.Tensor) -> None:
    _, link = cloud_behind_link
    edge = start_edge(cloud=(link.address,), deadline_ms=30_000, keepalive_s=1.0, keepalive_timeout_s=1.0)
    wait_for(connected(edge, link.address), 10, what="the edge to pair through the link")
    with Traffic(edge, inputs, period_s=0.05) as traffic:
        wait_for(traffic.answered_by_cloud_after(0), 10, what="answers through the link")
        link.set_link(PARTITION)  # the peer stops answering and never closes
        cut = time.monotonic()
        wait_for(connected(edge, None), 1 + 1 + 3, what="the edge to give the silent connection up")
        noticed = time.monotonic() - cut
        gone = time.monotonic()
        wait_for(lambda: len(traffic.after(gone)) >= 10, 10, what="answers while the cloud is unreachable")
        link.set_link(PROFILES["lan"])
        healed = time.monotonic()
        wait_for(traffic.answered_by_cloud_after(healed), 20, what="answers from the cloud once it is back")
    traffic.check_exactly_once()
    assert noticed <= 1 + 1 + 3  # keepalive_s + keepalive_timeout_s, plus scheduling slack
    meanwhile = [r for at, r in traffic.replies if gone < at < healed]
    assert meanwhile and all(r.degraded and r.degraded_reason.startswith("cloud unavailable") for r in meanwhile)
