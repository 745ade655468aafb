"""An edge's offloads spread over a pool of cloud replicas: shares, a replica killed and brought back with
nothing lost, a replica of another model left out, dns: names, and the settings' errors."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import OFFLOADING_EDGE, CloudFactory, LoopThread, Traffic, edge_servers, wait_for

from edge_node.pool import check_resolvable, dns_name
from edge_node.server import EdgeServer
from offramp.core.checkpoint import load_checkpoint, save_checkpoint
from offramp.core.errors import OfframpError
from offramp.serving.config import EdgeConfig
from offramp.serving.daemon_proc import DaemonProcess

EDGE_SETTINGS = {**OFFLOADING_EDGE, "cloud_balance": "least_outstanding", "deadline_ms": 5000}


@pytest.fixture
def start_edge(tiny_checkpoint: Path, loop: LoopThread) -> Iterator[Callable[..., EdgeServer]]:
    with edge_servers(loop, tiny_checkpoint, EDGE_SETTINGS) as start:
        yield start


@pytest.fixture(scope="module")
def inputs(first_inputs: torch.Tensor) -> torch.Tensor:
    return first_inputs


def shares(edge: EdgeServer) -> dict[str, float]:
    sent = edge.engine.offload.sent
    total = sum(sent.values())
    return {a: n / total for a, n in sent.items()}


def streaming(edge: EdgeServer, n: int) -> Callable[[], bool]:
    return lambda: len(edge.engine.offload.streaming) == n


def test_a_replica_killed_mid_run_loses_nothing_and_takes_its_share_again(
        tiny_checkpoint: Path, start_cloud: CloudFactory, start_edge: Callable[..., EdgeServer],
        inputs: torch.Tensor) -> None:
    (a, _), (b, _) = start_cloud(), start_cloud()
    with DaemonProcess("cloud", ["--checkpoint", str(tiny_checkpoint)]) as dying:
        edge = start_edge(cloud=(a, b, dying.address))
        wait_for(streaming(edge, 3), 15, what="three replicas streaming")
        pool = edge.engine.offload
        with Traffic(edge, inputs, period_s=0.01) as traffic:
            wait_for(lambda: sum(pool.sent.values()) >= 60, 20, what="60 offloads")
            spread = shares(edge)
            dying.kill()
            wait_for(streaming(edge, 2), 10, what="the pool to drop the killed replica")
            dead = time.monotonic()
            wait_for(traffic.answered_by_cloud_after(dead, 20), 10, what="the others to answer")
            dying.restart()
            wait_for(streaming(edge, 3), 15, what="the replica to rejoin")
            before = dict(pool.sent)
            wait_for(lambda: pool.sent[dying.address] - before.get(dying.address, 0) >= 10, 5,
                     what="the rejoined replica to take offloads within 5 s")
        replies = traffic.check_exactly_once()
    assert all(0.2 < spread[r] < 0.47 for r in (a, b, dying.address)), spread
    # Requests in flight on the killed replica went to another one: every answer is the cloud's.
    assert all(r.decided_by == "cloud" and not r.degraded for r in replies), \
        [r.degraded_reason for r in replies if r.degraded][:3]
    count = edge.engine.metrics.registry.get_sample_value
    assert count("offramp_edge_replica_up", {"replica": a}) == 1
    assert count("offramp_edge_replica_offloads_total", {"replica": b}) == pool.sent[b] > 0
    assert count("offramp_edge_offload_retries_total") == pool.retried


def test_a_replica_of_another_model_is_left_out(
        tiny_checkpoint: Path, start_cloud: CloudFactory, start_edge: Callable[..., EdgeServer],
        inputs: torch.Tensor, tmp_path: Path) -> None:
    model, card = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)  # the same shapes: only the fingerprint tells them apart
    save_checkpoint(tmp_path / "other", model, card)
    (good, _), (also_good, _) = start_cloud(), start_cloud()
    with CloudFactory(tmp_path / "other", {"grace_s": 1.0}) as other_cloud:
        other, _ = other_cloud()
        edge = start_edge(cloud=(good, other, also_good), cloud_balance="round_robin")
        wait_for(streaming(edge, 2), 15, what="the two matching replicas streaming")
        wait_for(lambda: "different model" in edge.engine.offload.unavailable_reason(), 10, what="the refusal")
        with Traffic(edge, inputs, period_s=0.005) as traffic:
            wait_for(lambda: len(traffic.replies) >= 20, 20, what="20 answers")
        replies = traffic.check_exactly_once()
    assert all(r.decided_by == "cloud" for r in replies)
    assert set(edge.engine.offload.sent) == {good, also_good}


def test_a_dns_name_stands_for_its_addresses(
        start_cloud: CloudFactory, start_edge: Callable[..., EdgeServer], inputs: torch.Tensor) -> None:
    address, _ = start_cloud()
    port = address.rpartition(":")[2]
    edge = start_edge(cloud=(f"dns:///localhost:{port}",), cloud_resolve_s=0.5)
    wait_for(lambda: f"127.0.0.1:{port}" in edge.engine.offload.streaming, 15, what="the resolved replica")
    with Traffic(edge, inputs) as traffic:
        wait_for(lambda: len(traffic.replies) >= 5, 20, what="answers")
    assert all(r.decided_by == "cloud" for r in traffic.check_exactly_once())


@pytest.mark.parametrize(("settings", "error"), [
    ({"cloud": ("dns:localhost:1",)}, "set cloud_balance to least_outstanding or round_robin"),
    ({"cloud": ("dns:localhost",), "cloud_balance": "round_robin"}, "cloud must be HOST:PORT"),
    ({"cloud": ("a:1",), "cloud_balance": "round_robin", "cloud_resolve_s": 0}, "cloud_resolve_s must be positive"),
])
def test_pool_settings_are_checked(settings: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        EdgeConfig(checkpoint="x", **settings)


def test_a_name_that_resolves_to_nothing_is_refused_at_start() -> None:
    assert dns_name("dns:///cloud.example:50051") == dns_name("dns:cloud.example:50051") == "cloud.example:50051"
    assert dns_name("10.0.0.1:50051") is None
    check_resolvable(["127.0.0.1:1", "dns:localhost:1"])  # nothing to resolve, and a name that resolves
    with pytest.raises(OfframpError, match="replica pool name no-such-replica.invalid:50051 resolves to no address"):
        check_resolvable(["dns:no-such-replica.invalid:50051"])
