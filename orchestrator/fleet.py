"""``offramp fleet up FILE.toml``: a pool of cloud replicas (and optionally edges) placed on a Ray cluster.

Each replica is a Ray actor that runs one ``offramp cloud`` process on the
node Ray placed it on (by its resources: a custom ``cloud`` slot and CPUs,
or a GPU). Ray restarts an actor that dies, and its ``__init__`` starts the
daemon again on the replica's own port (``port + index``), so the edges'
pools, which hold each replica's address, see it come back and use it again
within a reconnection back-off. The daemon ends with its actor (the kernel
signals it), so a restarted replica finds its port free. A replica whose
daemon dies on its own takes its actor down with it, so Ray restarts both.

Edges started by the fleet (``edges = N``) run on ``edge`` slots with
``--cloud`` set to every replica and ``cloud_balance`` least_outstanding.

On a real cluster Ray may restart a replica on another node, with another
address; edges given the addresses would not follow it there. Pin replicas
to their nodes with a per-node custom resource (``resource``), or give the
edges a DNS name in front of the replicas.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from offramp.core.errors import OfframpError
from offramp.core.tables import format_table
from offramp.serving.config import CloudConfig, EdgeConfig, build, read_toml, require, setting
from offramp.serving.daemon_proc import DaemonProcess

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FleetSettings:
    """The ``[fleet]`` table: how many replicas, where, on which ports."""

    replicas: int = setting("Cloud replicas to run.", 3)
    port: int = setting("Replica i listens on port + i, on its node (restarts keep it).", 50051)
    host: str = setting("Address the replicas bind and advertise; auto: loopback when the fleet starts its own "
                        "Ray, each node's IP when it joins a cluster.", "auto")
    resource: str = setting("Custom Ray resource each replica takes one unit of (nodes offer it with ray start "
                            "--resources '{\"cloud\": 1}'); empty: none.", "cloud")
    num_cpus: float = setting("CPUs each replica reserves.", 1.0)
    num_gpus: float = setting("GPUs each replica reserves (the cloud then runs on cuda).", 0.0)
    edges: int = setting("Edges to start on 'edge' slots, each with the whole pool.", 0)
    startup_timeout_s: float = setting("How long a replica may take to serve.", 120.0)

    def __post_init__(self) -> None:
        require(self.replicas >= 1, f"replicas must be at least 1, not {self.replicas}")
        require(1 <= self.port and self.port + self.replicas - 1 <= 65535, "port + replicas - 1 must be a port")
        require(self.num_cpus >= 0 and self.num_gpus >= 0, "num_cpus and num_gpus must not be negative")
        require(self.edges >= 0, "edges must not be negative")
        require(self.startup_timeout_s > 0, "startup_timeout_s must be positive")


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    """One fleet file: the checkpoint, ``[fleet]``, and the settings of every replica (``[cloud]``) and edge
    (``[edge]``)."""

    checkpoint: str = setting("Checkpoint directory every replica serves (a path each node can read).", path=True)
    fleet: FleetSettings = FleetSettings()
    cloud: CloudConfig = CloudConfig(checkpoint="")
    edge: EdgeConfig = EdgeConfig(checkpoint="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "cloud", dataclasses.replace(self.cloud, checkpoint=self.checkpoint))
        object.__setattr__(self, "edge", dataclasses.replace(self.edge, checkpoint=self.checkpoint))


def load_fleet(path: str | Path) -> FleetConfig:
    path = Path(path)
    table = read_toml(path, "fleet file")
    for daemon in ("cloud", "edge"):
        section = table.setdefault(daemon, {})
        for key in ("checkpoint", "listen", "cloud"):
            if key in section:
                raise OfframpError(f"{path}: {daemon}.{key} is the fleet's to set, not [{daemon}]'s")
        section["checkpoint"] = table.get("checkpoint", "")
    return build(FleetConfig, table, str(path), path.resolve().parent)


@ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)
class CloudReplica:
    """One ``offramp cloud`` process on a fixed port of this actor's node; restarted by Ray with its actor."""

    def __init__(self, config: CloudConfig, index: int, host: str | None, port: int, timeout_s: float) -> None:
        host = host or ray.util.get_node_ip_address()
        self.index = index
        self.started = time.time()
        self._daemon = DaemonProcess("cloud", config=config, host=host, startup_timeout=timeout_s,
                                     die_with_parent=True)
        deadline = time.monotonic() + timeout_s
        while True:  # after a restart, the killed actor's daemon may hold the port for a moment as it ends
            self._daemon.port = port  # the replica's own port, the one the edges hold, every time it starts
            try:
                self._daemon.start()
                break
            except OfframpError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        threading.Thread(target=self._watch, daemon=True, name="replica-watch").start()

    def _watch(self) -> None:
        """A daemon that dies on its own takes the actor down, so that Ray restarts both."""
        proc = self._daemon.proc
        if proc is not None and proc.wait() != 0 and not getattr(self, "_stopping", False):
            log.error("cloud replica %d: its daemon exited with status %s; restarting the actor", self.index,
                      proc.returncode)
            os._exit(1)

    def info(self) -> dict[str, Any]:
        return {"index": self.index, "address": self._daemon.address, "pid": self._daemon.proc.pid,
                "actor_pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "started": self.started}

    def stop(self) -> int | None:
        """Drain (SIGTERM) and wait for the daemon; the actor stays until it is killed."""
        self._stopping = True
        return self._daemon.stop()


class Fleet:
    """The replicas (and edges) of one fleet, on the Ray cluster this process is connected to."""

    def __init__(self, config: FleetConfig, host: str | None) -> None:
        self.config, self.host = config, host
        self.replicas: list[Any] = []
        self.edges: list[Any] = []

    @property
    def pool(self) -> list[str]:
        """Every replica's address, in index order: what an edge's ``--cloud`` takes."""
        return [info["address"] for info in self.infos()]

    def up(self) -> None:
        """Place every replica and wait until all serve; then the edges, each handed the pool."""
        f = self.config.fleet
        options: dict[str, Any] = {"num_cpus": f.num_cpus, "num_gpus": f.num_gpus}
        if f.resource:
            options["resources"] = {f.resource: 1}
        cloud = self.config.cloud if f.num_gpus == 0 else dataclasses.replace(self.config.cloud, device="cuda")
        self.replicas = [CloudReplica.options(name=None, **options).remote(
            cloud, i, self.host, f.port + i, f.startup_timeout_s) for i in range(f.replicas)]
        infos = self.infos(timeout_s=f.startup_timeout_s + 30)
        log.info("fleet: %d replicas serving: %s", len(infos), ", ".join(i["address"] for i in infos))
        if f.edges:
            from .actors import DaemonActor

            edge = dataclasses.replace(self.config.edge, cloud=tuple(self.pool), cloud_balance="least_outstanding",
                                       listen=f"{self.host or '0.0.0.0'}:0")
            self.edges = [DaemonActor.options(resources={"edge": 1}).remote() for _ in range(f.edges)]
            started = ray.get([a.start.remote(edge, self.host, f.startup_timeout_s) for a in self.edges])
            log.info("fleet: %d edges serving: %s", len(started), ", ".join(s.address for s in started))

    def infos(self, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Each replica's address, pids and node (waits while a replica is being restarted)."""
        return ray.get([r.info.remote() for r in self.replicas], timeout=timeout_s)

    def watch(self, stop: Callable[[], bool], every_s: float = 2.0) -> None:
        """Log replicas as Ray restarts them, until ``stop()``."""
        known = {i["index"]: i["started"] for i in self.infos()}
        while not stop():
            time.sleep(every_s)
            try:
                for info in self.infos(timeout_s=every_s * 5):
                    if info["started"] != known.get(info["index"]):
                        log.warning("fleet: replica %d was restarted by Ray (%s)", info["index"], info["address"])
                        known[info["index"]] = info["started"]
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
                log.warning("fleet: a replica is not answering yet (%s)", type(e).__name__)

    def down(self) -> None:
        """Stop the edges, then drain every replica, then remove the actors (no restart)."""
        for logs in ray.get([e.stop.remote() for e in self.edges]):
            log.debug("edge log:\n%s", logs[-2000:])
        ray.get([r.stop.remote() for r in self.replicas])
        for actor in [*self.edges, *self.replicas]:
            ray.kill(actor, no_restart=True)
        self.edges, self.replicas = [], []


def run_fleet(config: FleetConfig, address: str | None) -> int:
    """``offramp fleet up``: start the fleet, print its pool, keep it until SIGINT or SIGTERM, then stop it."""
    f = config.fleet
    if address:
        # The code and the settings travel to the cluster's workers with the job's working directory.
        ray.init(address=address, logging_level=logging.WARNING,
                 runtime_env={"working_dir": str(Path(__file__).resolve().parents[1]),
                              "excludes": ["runs/", ".venv/", "bench/results/", ".git/"]})
    else:
        ray.init(num_cpus=max(2, int(f.replicas * f.num_cpus) + 1),
                 resources={**({f.resource: f.replicas} if f.resource else {}), "edge": f.edges},
                 include_dashboard=False, logging_level=logging.WARNING)
    host = None if address and f.host == "auto" else ("127.0.0.1" if f.host == "auto" else f.host)
    fleet = Fleet(config, host)
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _frame: received.append(s))
    try:
        fleet.up()
        print(format_table(["replica", "address", "node"],
                           [[i["index"], i["address"], i["node_id"][:12]] for i in fleet.infos()]))
        print(f"\npool: --cloud {' '.join(fleet.pool)} --cloud-balance least_outstanding", flush=True)
        fleet.watch(lambda: bool(received))
    finally:
        fleet.down()
        ray.shutdown()
    return 0
