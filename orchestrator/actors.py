"""Ray actors that place daemons, links, baselines and load drivers on the right nodes.

Nodes declare what they are with Ray custom resources: ``cloud`` on the
machine that serves the tail, ``edge`` on each device (``ray start ...
--resources '{"edge": 1}'``). Each sweep group reserves one ``cloud`` slot and
one ``edge`` slot per edge as a placement group (bundles ``{"cloud": 1}``,
``{"edge": 1}``, ...), so a node with ``edge: 1`` hosts exactly one edge.
Every actor asks for no CPU and a sliver of its slot's resource inside its
bundle: the edge daemon, its link proxy, its load driver and its edge-only
baseline all land on that edge's node, by construction rather than by luck.

The actors are thin: the daemons are the real ``offramp cloud`` / ``offramp
edge`` processes (:class:`~offramp.serving.daemon_proc.DaemonProcess`), the link is
the real :class:`~offramp.netem.LinkProxy`; each actor reports the Ray node it
ran on, so every record says where its request was served.

With ``[nodes] edge_cores`` / ``cloud_cores`` every actor of a slot pins its
own process, all its threads, to that slot's cores before it starts anything:
the daemons, proxies and load generators it starts inherit the mask. So one
machine can host an edge and a cloud that do not take each other's CPU.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from offramp.serving.config import CloudConfig, EdgeConfig
from offramp.serving.daemon_proc import DaemonProcess, pin_threads
from offramp.core.errors import OfframpError
from offramp.netem import LinkProxy, ProxyThread, Schedule

from .config import NodesConfig, check_cores
from .workload import Dataset, EdgeLoad, PolicyPoller, Record, drive, drive_cloud, warm_up

if TYPE_CHECKING:
    from .baselines import FullModelServer, Where

log = logging.getLogger(__name__)

# Of its slot's resource each actor takes: any number of them fit in one bundle.
SHARE = 0.001
LOG_BYTES = 1 << 20  # most of a daemon's log brought back to the head


@dataclass(frozen=True)
class Started:
    """Where a server listens and which Ray node it runs on."""

    address: str
    node_id: str


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def _threads() -> int:
    """One per core this process may run on: the slot's cores where it is pinned."""
    return len(os.sched_getaffinity(0)) or 1


class Pinned:
    """What every actor can do: pin its own process to cores (before it starts daemons, threads or load)."""

    def pin(self, cores: tuple[int, ...], name: str) -> None:
        try:
            check_cores(cores, name)  # checked on the head already; this node may have fewer cores
        except ValueError as e:
            raise OfframpError(f"[nodes] {e} (node {ray.util.get_node_ip_address()})") from None
        pin_threads(os.getpid(), cores)


def _bind_host(host: str | None) -> str:
    """``host``, or this node's IP where the head asked for each node's own (a real cluster)."""
    return host if host is not None else ray.util.get_node_ip_address()


@ray.remote(num_cpus=0)
class DaemonActor(Pinned):
    """Runs one ``offramp cloud`` or ``offramp edge`` process on this actor's node, one at a time."""

    def __init__(self) -> None:
        self._daemon: DaemonProcess | None = None
        self._files = contextlib.ExitStack()  # leaving it removes the daemon's port file and log

    def start(self, config: CloudConfig | EdgeConfig, host: str | None, startup_timeout_s: float = 120.0) -> Started:
        """Start the daemon ``config`` describes and wait until it serves; unset threads: one per core it may use."""
        command = "edge" if isinstance(config, EdgeConfig) else "cloud"
        env = {"OMP_NUM_THREADS": str(config.threads or _threads())}
        self._daemon = DaemonProcess(command, config=config, host=_bind_host(host), env=env,
                                     startup_timeout=startup_timeout_s)
        self._files.enter_context(self._daemon)
        return Started(self._daemon.address, _node_id())

    def stop(self) -> str:
        """SIGTERM (drain), then kill; returns the daemon's log (its end, if long)."""
        if self._daemon is None:
            return ""
        daemon, self._daemon = self._daemon, None
        status = daemon.stop()
        text = f"[log unreadable; exit status {status}]\n"
        with contextlib.suppress(OSError), daemon.log_path.open("rb") as fh:
            fh.seek(max(0, daemon.log_path.stat().st_size - LOG_BYTES))
            text = fh.read().decode(errors="replace") + f"\n[exit status {status}]\n"
        self._files.close()
        return text


@ray.remote(num_cpus=0)
class LinkActor(Pinned):
    """The emulated link of one edge: a shaping proxy on the edge's node, edge → proxy → upstream."""

    def __init__(self) -> None:
        self._proxy: ProxyThread | None = None
        self._schedule: Schedule | None = None
        self._started = 0.0

    def start(self, upstream: str, spec: str, seed: int) -> Started:
        """Shape with the first step of ``spec`` until :meth:`begin` starts its schedule."""
        self._schedule = Schedule.parse(spec)
        first = Schedule.constant(self._schedule.steps[0][1])
        self._proxy = ProxyThread(LinkProxy("127.0.0.1:0", upstream, first, seed=seed))
        self._proxy.start()
        self._started = time.monotonic()
        return Started(self._proxy.address, _node_id())

    def begin(self) -> None:
        """Start the schedule's clock now (the measured load starts), not when the proxy started.

        The proxy's clock began at :meth:`start`; the steps after t=0 are
        shifted by the time since, so ``30s:3g`` means 30 s into the load.
        """
        assert self._proxy is not None and self._schedule is not None
        elapsed = time.monotonic() - self._started
        steps = ((t + elapsed if t else 0.0, profile) for t, profile in self._schedule.steps)
        self._proxy.proxy.schedule = Schedule(tuple(steps))

    def stop(self) -> dict[str, Any]:
        """Cut the link; returns its counters (bytes, segments, added delay per direction)."""
        if self._proxy is None:
            return {}
        proxy, self._proxy = self._proxy, None
        stats = proxy.stats()
        proxy.stop()
        return {"connections": stats.connections, "resets": stats.resets,
                **{f"{name}_{key}": value for name, d in (("up", stats.uplink), ("down", stats.downlink))
                   for key, value in vars(d).items()}}


@ray.remote(num_cpus=0)
class FullModelActor(Pinned):
    """Hosts a :class:`~orchestrator.baselines.FullModelServer` (edge-only or cloud-only baseline)."""

    def __init__(self) -> None:
        self._server: FullModelServer | None = None

    def start(self, checkpoint: str, where: Where, host: str | None, slowdown: float, max_batch: int,
              max_wait_ms: float, threads: int, device: str, onnx_dir: str | None = None,
              device_costs: str | None = None) -> Started:
        import torch  # here, not at the top: the other actors' workers stay free of torch

        from .baselines import FullModelServer

        torch.set_num_threads(threads or _threads())
        self._server = FullModelServer(checkpoint, where, _bind_host(host), slowdown, max_batch, max_wait_ms, device,
                                       onnx_dir, device_costs)
        return Started(self._server.start(), _node_id())

    def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.stop()


@ray.remote(num_cpus=0)
class DriverActor(Pinned):
    """The load generator of one edge, on that edge's node, so the local API is reached on loopback."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def node_id(self) -> str:
        return _node_id()

    def warm_up(self, address: str, count: int, encoded: bool, timeout_s: float) -> None:
        warm_up(address, self.dataset, count, encoded, timeout_s)

    def drive(self, address: str, load: EdgeLoad, encoded: bool,
              policy_every_s: float | None = None) -> tuple[list[Record], list[dict[str, Any]]]:
        """The load's records and, every ``policy_every_s`` (None: never), the edge's policy."""
        with PolicyPoller(address, policy_every_s) as poller:
            records = drive(address, self.dataset, load, encoded)
        return records, poller.samples


@ray.remote(num_cpus=0)
class CloudLoadActor(Pinned):
    """The other edges' offloads, sent straight to the cloud on a rate schedule (``drive_cloud``)."""

    def drive(self, address: str, steps: tuple[tuple[float, float], ...], duration_s: float, seed: int,
              timeout_s: float) -> list[Record]:
        return drive_cloud(address, steps, duration_s, seed, timeout_s)


@dataclass(frozen=True)
class EdgeSlot:
    """The actors of one edge, all on one node."""

    daemon: Any  # DaemonActor handle
    link: Any  # LinkActor handle
    driver: Any  # DriverActor handle
    full_model: Any | None  # FullModelActor handle (edge-only baseline), if the sweep runs it
    node_id: str


class Placement:
    """One ``cloud`` slot and ``edges`` ``edge`` slots, reserved together, with their actors.

    ``with Placement(2, data, ...) as p: p.cloud.start.remote(...); p.edges[0].driver...``;
    leaving kills the actors and frees the slots.
    """

    def __init__(self, edges: int, dataset: ray.ObjectRef, *, edge_only: bool, cloud_only: bool,
                 cloud_load: bool = False, cores: dict[str, tuple[int, ...] | None] | None = None,
                 ready_timeout_s: float = 120.0) -> None:
        self.num_edges = edges
        self.dataset = dataset
        self.edge_only, self.cloud_only, self.with_cloud_load = edge_only, cloud_only, cloud_load
        self.ready_timeout_s = ready_timeout_s
        self.cores = cores or {}  # slot resource ("edge", "cloud") -> the cores its actors pin to
        self._pinned: list[ray.ObjectRef] = []
        self._pg: PlacementGroup | None = None
        self._actors: list[Any] = []

    def __enter__(self) -> Placement:
        self._pg = placement_group([{"cloud": 1}] + [{"edge": 1}] * self.num_edges, strategy="SPREAD")
        try:
            ray.get(self._pg.ready(), timeout=self.ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.__exit__(None, None, None)
            raise OfframpError(f"Ray could not reserve 1 'cloud' and {self.num_edges} 'edge' slot(s) within "
                               f"{self.ready_timeout_s:.0f} s; cluster resources: {_custom(ray.cluster_resources())}"
                               ) from None
        try:
            self._create_actors()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _create_actors(self) -> None:
        self.cloud = self._actor(DaemonActor, 0, "cloud")
        # Baseline servers only where the sweep runs that baseline: each actor is a worker process.
        self.cloud_full_model = self._actor(FullModelActor, 0, "cloud") if self.cloud_only else None
        # The other edges' load arrives at the cloud; its sender sits in the cloud's slot (no edge slot of its own).
        self.cloud_load = self._actor(CloudLoadActor, 0, "cloud") if self.with_cloud_load else None
        slots = []
        for i in range(1, self.num_edges + 1):
            slots.append((self._actor(DaemonActor, i, "edge"), self._actor(LinkActor, i, "edge"),
                          self._actor(DriverActor, i, "edge", self.dataset),
                          self._actor(FullModelActor, i, "edge") if self.edge_only else None))
        ray.get(self._pinned)  # every actor pinned before anything starts a daemon or sends load
        node_ids = ray.get([driver.node_id.remote() for _, _, driver, _ in slots])
        self.edges = [EdgeSlot(*slot, node_id=node) for slot, node in zip(slots, node_ids)]

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._actors.clear()
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    def _actor(self, cls: Any, bundle: int, resource: str, *args: Any) -> Any:
        assert self._pg is not None
        actor = cls.options(
            resources={resource: SHARE},
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=bundle),
        ).remote(*args)
        self._actors.append(actor)
        if self.cores.get(resource) is not None:
            self._pinned.append(actor.pin.remote(self.cores[resource], f"{resource}_cores"))
        return actor


def _custom(resources: dict[str, float]) -> dict[str, float]:
    """The resources that say what nodes are for (cloud, edge), without Ray's bookkeeping ones."""
    return {k: v for k, v in resources.items() if k in ("cloud", "edge", "CPU", "GPU")}


@contextlib.contextmanager
def ray_session(address: str | None, nodes: NodesConfig, edges: int) -> Iterator[str | None]:
    """Join the cluster at ``address``, or start a local Ray with one cloud and ``edges`` edge slots.

    Yields the host cloud-side servers bind: loopback for a local Ray, None
    (each node's own IP) in a cluster, or ``nodes.host`` where it is set.
    Ray is always shut down on leaving.
    """
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=nodes.cpus, resources={"cloud": 1, "edge": edges}, include_dashboard=False,
                 logging_level=logging.WARNING)
    try:
        have = ray.cluster_resources()
        if have.get("cloud", 0) < 1 or have.get("edge", 0) < edges:
            raise OfframpError(
                f"the cluster offers {have.get('cloud', 0):g} 'cloud' and {have.get('edge', 0):g} 'edge' slot(s); "
                f"the sweep needs 1 and {edges} (sweep.edges): start nodes with "
                "ray start --address HEAD:6379 --resources '{\"edge\": 1}'")
        log.info("Ray %s: %s", address or "started locally", _custom(have))
        yield None if nodes.host == "auto" and address else ("127.0.0.1" if nodes.host == "auto" else nodes.host)
    finally:
        ray.shutdown()


def node_resources() -> dict[str, dict[str, float]]:
    """Node id → its custom resources and address, for ``nodes.json`` (which machine did what)."""
    return {n["NodeID"]: {"address": n["NodeManagerAddress"], **_custom(n["Resources"])}
            for n in ray.nodes() if n["Alive"]}
