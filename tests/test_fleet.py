"""``offramp fleet``: cloud replicas placed on a multi-node Ray cluster by resources, a replica killed and
restarted by Ray on its port, and an edge's pool using it again; the fleet file's errors."""
from __future__ import annotations

import os
import signal
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import LoopThread, Traffic, edge_servers, free_ports, wait_for

from edge_node.server import EdgeServer
from offramp.core.checkpoint import read_card
from offramp.core.data.card_data import load_validation
from offramp.core.errors import OfframpError
from offramp.serving.config import CloudConfig

ray = pytest.importorskip("ray")


@pytest.fixture
def cloud_nodes() -> Iterator[str]:
    """A head without a cloud slot and three nodes with one each; yields the cluster's address."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=1, resources={"cloud": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def start_edge(tiny_checkpoint: Path, loop: LoopThread) -> Iterator[Callable[..., EdgeServer]]:
    settings = {"thresholds": (2.0, 2.0), "cloud_balance": "least_outstanding", "reconnect_initial_s": 0.05,
                "reconnect_max_s": 0.3, "connect_timeout_s": 1.0, "grace_s": 2.0, "deadline_ms": 10_000}
    with edge_servers(loop, tiny_checkpoint, settings) as start:
        yield start


@pytest.mark.long
def test_a_killed_replica_is_restarted_by_ray_and_used_again(
        cloud_nodes: str, tiny_checkpoint: Path, start_edge: Callable[..., EdgeServer]) -> None:
    from orchestrator.fleet import Fleet, FleetConfig, FleetSettings

    config = FleetConfig(checkpoint=str(tiny_checkpoint),
                         fleet=FleetSettings(replicas=3, port=free_ports(3), host="127.0.0.1", num_cpus=0),
                         cloud=CloudConfig(checkpoint="", threads=1, grace_s=1.0))
    fleet = Fleet(config, "127.0.0.1")
    fleet.up()
    try:
        before = fleet.infos()
        assert len({i["node_id"] for i in before}) == 3  # one replica per node with a cloud slot
        assert [i["address"] for i in before] == [f"127.0.0.1:{config.fleet.port + k}" for k in range(3)]
        edge = start_edge(cloud=tuple(fleet.pool))
        pool = edge.engine.offload
        wait_for(lambda: len(pool.streaming) == 3, 20, what="the edge streaming to three replicas")
        x = load_validation(read_card(tiny_checkpoint))[0].tensors[0][:16]
        with Traffic(edge, x, period_s=0.01) as traffic:
            wait_for(lambda: min(pool.sent.values(), default=0) >= 5, 20, what="offloads to every replica")
            victim = before[1]
            os.kill(victim["actor_pid"], signal.SIGKILL)  # the replica's actor dies; its daemon goes with it
            wait_for(lambda: victim["address"] not in pool.streaming, 15, what="the pool to drop the replica")
            wait_for(lambda: victim["address"] in pool.streaming, 90, what="Ray to restart the replica")
            back, since = pool.sent[victim["address"]], time.monotonic()
            wait_for(lambda: pool.sent[victim["address"]] >= back + 5, 15, what="offloads to the restarted replica")
        replies = traffic.check_exactly_once()
        after = fleet.infos()[1]
        assert after["address"] == victim["address"] and after["pid"] != victim["pid"]
        assert after["started"] > victim["started"] and time.monotonic() - since < 15
        assert all(r.decided_by == "cloud" for r in replies)  # nothing lost: the others took its share
    finally:
        fleet.down()


def test_fleet_files_are_checked(tmp_path: Path) -> None:
    from orchestrator.fleet import load_fleet

    example = load_fleet(Path(__file__).resolve().parents[1] / "orchestrator" / "fleets" / "fleet.toml")
    assert example.fleet.replicas == 3 and example.cloud.checkpoint.endswith("runs/edge_c10_sel")

    def fleet(text: str) -> Path:
        path = tmp_path / "fleet.toml"
        path.write_text(textwrap.dedent(text))
        return path

    config = load_fleet(fleet("""
        checkpoint = "model"
        [fleet]
        replicas = 2
        [cloud]
        max_batch = 8
    """))
    assert config.cloud.checkpoint == str(tmp_path / "model") and config.cloud.max_batch == 8
    with pytest.raises(OfframpError, match="replicas must be at least 1, not 0"):
        load_fleet(fleet('checkpoint = "m"\n[fleet]\nreplicas = 0\n'))
    with pytest.raises(OfframpError, match=r"cloud.listen is the fleet's to set"):
        load_fleet(fleet('checkpoint = "m"\n[cloud]\nlisten = "0.0.0.0:1"\n'))
    with pytest.raises(OfframpError, match="port"):
        load_fleet(fleet('checkpoint = "m"\n[fleet]\nport = 65535\nreplicas = 3\n'))
