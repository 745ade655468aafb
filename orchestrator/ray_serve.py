"""Ray Serve baseline: the same cloud tail behind Ray Serve's gRPC proxy, batched with ``@serve.batch``.

Answers "why not Ray Serve?" with numbers from the same run. The replica runs
our cloud's own request handling (``cloud_node.handler.OffloadHandler``: checks, bounded
decoding, reply) on the same ``CloudHalf``; what differs is only what Ray
Serve replaces: its gRPC proxy, its routing to the replica, and
``@serve.batch`` in place of our batcher. Ray Serve's proxy has no use for
our bidirectional stream, so requests travel as unary calls of a bench-only
service, ``offramp.bench.v1.TailBench/Infer``, carrying our wire messages
(``OffloadRequest`` in, ``OffloadReply`` out).

The whole private Ray cluster (GCS, raylet, controller, proxy, replica) runs
on the server cores; the load generator runs in a process of its own on the
client cores, so its CPU does not count against the server.

    RAY_AUTH_MODE=disabled python -m bench.ray_serve --checkpoint runs/bench-exits/cifar10-vit   # alone
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from orchestrator.loadgen import load_summary
from orchestrator.pacing import closed_loop
from cloud_node.handler import OffloadHandler
from cloud_node.metrics import CloudMetrics
from offramp.core.checkpoint import load_checkpoint
from offramp.core.codec import CodecConfig, decode, encode
from offramp.serving.config import CloudConfig
from offramp.serving.daemon_proc import pin_threads as pin_process
from offramp.core.errors import OfframpError
from offramp.core.models import MultiExitModel
from offramp.core.data.card_data import load_validation
from offramp.serving.batcher import Batched
from offramp.core.halves import CloudHalf, EdgeHalf
from offramp.core.wire import pb

RESULTS = Path(__file__).parent / "results"
CODEC = CodecConfig(dtype="int8", zstd_level=3)  # what bench/offload.py sends
MODULE = "orchestrator.ray_serve"  # Ray's processes import this module's objects by this name
SERVICE, METHOD = "offramp.bench.v1.TailBench", "Infer"
APP = "offramp-tail"  # Ray Serve routes a gRPC call to the application named in its metadata
QUIET = {"log_level": "WARNING", "enable_access_log": False}  # Ray Serve's LoggingConfig, as a dict
ROOT = Path(__file__).resolve().parents[1]


class RayServeMissing(OfframpError):
    """Ray Serve is an optional extra; say which one instead of showing an import traceback."""


def import_serve() -> Any:
    try:
        import ray  # noqa: F401
        from ray import serve
    except ImportError as e:
        raise RayServeMissing(f"Ray Serve is not installed ({e}): pip install 'offramp[serve]'") from None
    return serve


# --------------------------------------------------------------------------- the service Ray Serve's proxy exposes


def add_tail_servicer_to_server(servicer: Any, server: grpc.Server) -> None:
    """Register ``TailBench/Infer``, unary ``OffloadRequest -> OffloadReply``, on ``server``.

    What protoc generates for a one-method service, written out so the
    product's wire contract stays as it is. Ray Serve's proxy takes the import
    path of this function (``gRPCOptions.grpc_servicer_functions``) and keeps
    its request parser: bytes from the network are only ever parsed as protobuf.
    """
    handler = grpc.unary_unary_rpc_method_handler(
        servicer.Infer,
        request_deserializer=pb.OffloadRequest.FromString,
        response_serializer=pb.OffloadReply.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))


@dataclass(eq=False)
class _Waiting:
    tokens: torch.Tensor  # (B, *token_shape)
    submitted: float  # time.perf_counter()


class _ServeBatcher:
    """Stands in for our Batcher inside ``OffloadHandler``: every request goes through a ``@serve.batch`` method.

    Deadlines are not enforced (the benchmark sends none), and ``@serve.batch``
    counts requests, not samples: the same thing when each request is one sample.
    """

    def __init__(self, batched: Any, max_batch: int) -> None:
        self._batched = batched
        self.max_batch = max_batch

    def check_room(self, size: int) -> None:
        """Ray Serve keeps its own queue (``max_ongoing_requests``): nothing to refuse here."""

    async def submit(self, tokens: torch.Tensor, audio: torch.Tensor | None = None,
                     deadline: float | None = None) -> Batched:
        return await self._batched(_Waiting(tokens, time.perf_counter()))


class TailReplica:
    """The Ray Serve deployment: our cloud's ``OffloadHandler`` on ``CloudHalf``, batched by ``@serve.batch``."""

    def __init__(self, checkpoint: str, split_block: int, max_batch: int, max_wait_s: float,
                 cores: list[int]) -> None:
        serve = import_serve()
        pin_process(os.getpid(), cores)
        torch.set_num_threads(1)  # like our daemon on one core
        model, card = load_checkpoint(checkpoint)
        self._half = CloudHalf(model, split_block)
        # Applied here rather than as a decorator, so this module imports without Ray installed.
        batched = serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=max_wait_s)(self._run_batch)
        self._handler = OffloadHandler(self._half, card, _ServeBatcher(batched, max_batch), CloudMetrics(), max_batch,
                          CloudConfig.max_message_mb << 20)

    async def Infer(self, request: pb.OffloadRequest) -> pb.OffloadReply:  # noqa: N802 - the gRPC method's name
        return await self._handler.answer(request)

    async def _run_batch(self, waiting: list[_Waiting]) -> list[Batched]:
        """One forward pass per token shape, off the event loop, as our batcher's worker thread does."""
        results: dict[int, Batched] = {}
        for shape in {tuple(w.tokens.shape[1:]) for w in waiting}:  # top-k selection can make shapes differ
            group = [i for i, w in enumerate(waiting) if tuple(w.tokens.shape[1:]) == shape]
            tokens = torch.cat([waiting[i].tokens for i in group])
            started = time.perf_counter()
            output = await asyncio.to_thread(self._half.run, tokens)
            compute_s = time.perf_counter() - started
            for i, rows in zip(group, output.split([waiting[i].tokens.shape[0] for i in group])):
                results[i] = Batched(rows, started - waiting[i].submitted, compute_s, tokens.shape[0])
        return [results[i] for i in range(len(waiting))]


# --------------------------------------------------------------------------- pinning


def parse_cores(text: str) -> list[int]:
    """``"0"``, ``"0,2"`` or ``"0-3"`` -> core ids, as taskset takes them."""
    cores: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        cores.update(range(int(first), int(last or first) + 1))
    return sorted(cores)


def descendants(pid: int) -> list[int]:
    """Processes started, directly or not, by ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # from field 3, the state
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cores(pid: int) -> dict[str, Any]:
    """A process's name and the cores any of its threads may run on."""
    cores: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with suppress(OSError):
            cores |= os.sched_getaffinity(int(tid))
    name = Path(f"/proc/{pid}/comm").read_text().strip()
    if name.startswith("python"):  # Ray's helper scripts: name them by the script they run
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        name = next((Path(a).name for a in args if a.endswith(".py")), name)
    return {"pid": pid, "name": name, "cores": sorted(cores)}


# --------------------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_serve_tail(checkpoint: str, split_block: int, max_batch: int, max_wait_ms: float,
                   cores: Sequence[int]) -> Iterator[tuple[str, list[int]]]:
    """A private Ray cluster on ``cores`` serving the tail; yields (gRPC address, ids of the Ray processes).

    The Ray processes inherit this process's affinity when ``ray.init`` starts
    them, so it is pinned to ``cores`` meanwhile; a sweep afterwards pins any
    thread that escaped. Per-request access logs are off, as in our daemon.
    """
    serve = import_serve()
    import ray
    from ray.serve.config import gRPCOptions, HTTPOptions

    own_cores = os.sched_getaffinity(0)
    before = set(descendants(os.getpid()))
    python_path = os.environ.get("PYTHONPATH")
    # Ray's workers import this module by name: let them find the same checkout as this process.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), python_path) if p)
    pin_process(os.getpid(), cores)
    try:
        # address="local": always a fresh cluster of our own, never one already running on the machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING", configure_logging=False)
        grpc_port = _free_port()
        serve.start(
            http_options=HTTPOptions(host="127.0.0.1", port=_free_port()),
            logging_config=QUIET,
            grpc_options=gRPCOptions(port=grpc_port,
                                     grpc_servicer_functions=[f"{MODULE}.add_tail_servicer_to_server"]),
        )
        replica = serve.deployment(
            TailReplica, name="tail", num_replicas=1,
            # Ray's default of 5 ongoing requests would cap batches at 5: admit what our daemon's queue admits.
            max_ongoing_requests=CloudConfig.max_queue,
            ray_actor_options={"num_cpus": 1},
            logging_config=QUIET,
        )
        serve.run(replica.bind(checkpoint, split_block, max_batch, max_wait_ms / 1e3, list(cores)),
                  name=APP, route_prefix=f"/{APP}")  # without a route the proxy knows no application
        ray_processes = [p for p in descendants(os.getpid()) if p not in before]
        for pid in ray_processes:
            with suppress(OSError):
                pin_process(pid, cores)
        pin_process(os.getpid(), sorted(own_cores))
        yield f"127.0.0.1:{grpc_port}", ray_processes
    finally:
        pin_process(os.getpid(), sorted(own_cores))
        if python_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = python_path
        with suppress(Exception):
            serve.shutdown()
        ray.shutdown()


# --------------------------------------------------------------------------- the load generator


async def drive_unary(address: str, payloads: Sequence[bytes], expected: Sequence[np.ndarray], edges: int,
                      window: int, seconds: float, ready_timeout_s: float = 60.0) -> dict[str, Any]:
    """``edges`` connections with ``window`` unary calls in flight on each, for ``seconds``.

    ``payloads[i]`` is a serialized OffloadRequest whose reply should carry
    ``expected[i]``; replies are checked against it, so a fast wrong answer
    does not count as throughput.
    """
    metadata = (("application", APP),)
    # A subchannel pool per channel: one TCP connection per simulated edge, as with our streams.
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(edges)]
    calls = [c.unary_unary(f"/{SERVICE}/{METHOD}", request_serializer=lambda b: b,
                           response_deserializer=pb.OffloadReply.FromString) for c in channels]
    latencies: list[float] = []
    batch_sizes: list[int] = []
    compute: list[float] = []
    counts = {"errors": 0, "wrong": 0}
    first_error: list[str] = []
    max_error = 0.0

    async def warm(call: Any) -> None:
        """Until the proxy knows the application, calls fail UNAVAILABLE or NOT_FOUND."""
        give_up = time.perf_counter() + ready_timeout_s
        while True:
            try:
                await call(payloads[0], metadata=metadata, timeout=30)
                return
            except grpc.aio.AioRpcError:
                if time.perf_counter() > give_up:
                    raise
                await asyncio.sleep(0.2)

    async def request(worker: int, i: int) -> None:
        nonlocal max_error
        n = (worker + i * edges * window) % len(payloads)  # every worker its own share of the samples
        t0 = time.perf_counter()
        try:
            reply = await calls[worker // window](payloads[n], metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as e:
            counts["errors"] += 1
            first_error[:] = first_error or [f"{e.code().name}: {e.details()}"]
            return
        latencies.append((time.perf_counter() - t0) * 1e3)
        if reply.status.code != grpc.StatusCode.OK.value[0]:
            counts["errors"] += 1
            first_error[:] = first_error or [f"status {reply.status.code}: {reply.status.message}"]
            return
        want, got = expected[n], np.asarray(reply.output, dtype=np.float32)
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-3):
            counts["wrong"] += 1
        if got.shape == want.shape:
            max_error = max(max_error, float(np.abs(got - want).max()))
        batch_sizes.append(reply.batch_size)
        compute.append(reply.timings.compute_ms)

    try:
        await asyncio.gather(*(warm(c) for c in calls))
        wall = await closed_loop(request, edges * window, seconds)
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    return {**load_summary(edges, window, wall, latencies, compute, batch_sizes),
            "errors": counts["errors"], "wrong": counts["wrong"], "max_abs_error": max_error,
            "first_error": first_error[0] if first_error else None}


def _drive_pinned(cores: list[int], *args: Any) -> dict[str, Any]:
    pin_process(os.getpid(), cores)
    return asyncio.run(drive_unary(*args))


def drive_in_process(cores: Sequence[int], address: str, payloads: Sequence[bytes], expected: Sequence[np.ndarray],
                     edges: int, window: int, seconds: float) -> dict[str, Any]:
    """``drive_unary`` in a fresh process pinned to ``cores``: its CPU and event loop are its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_drive_pinned, (list(cores), address, list(payloads), list(expected), edges, window,
                                          seconds))


# --------------------------------------------------------------------------- the baseline


@torch.no_grad()
def offload_requests(model: MultiExitModel, card: Any, split_block: int, samples: int = 256) -> list[pb.OffloadRequest]:
    """What bench/offload.py sends: one validation sample per request, int8 + zstd tokens."""
    val, _ = load_validation(card)
    x = val.tensors[0][:samples]
    edge = EdgeHalf(model, split_block)
    tokens = edge.run(x, [2.0] * edge.num_exits, "max_prob").tokens  # no exit is ever confident enough
    return [pb.OffloadRequest(model_fingerprint=card.fingerprint, split_block=split_block,
                              tokens=encode(tokens[i:i + 1], CODEC)) for i in range(len(tokens))]


def reference_outputs(model: MultiExitModel, split_block: int, requests: Sequence[pb.OffloadRequest]) -> list[np.ndarray]:
    """What ``CloudHalf`` itself answers to each request, flattened as in ``OffloadReply.output``."""
    half = CloudHalf(model, split_block)
    return [half.run(torch.from_numpy(decode(r.tokens))).numpy().reshape(-1) for r in requests]


def run_ray_serve_baseline(
    checkpoint: str | Path,
    *,
    split_block: int | None = None,
    requests: Sequence[pb.OffloadRequest] | None = None,
    edges: int = 16,
    window: int = 4,
    seconds: float = 8.0,
    max_batch: int = CloudConfig.max_batch,
    max_wait_ms: float = CloudConfig.max_wait_ms,
    server_cores: Sequence[int] = (0,),
    client_cores: Sequence[int] = (1,),
) -> dict[str, Any]:
    """Serve the checkpoint's tail with Ray Serve and measure it under ``edges`` x ``window`` unary calls in flight.

    ``requests`` (default: built like bench/offload.py's) are sent as they are.
    Call it outside a running event loop. Raises ``RayServeMissing`` without
    Ray Serve. Returns the keys of bench/offload.py's throughput rows
    (requests, throughput_rps, latency_ms, cloud_compute_ms, mean_batch)
    plus errors, wrong and max_abs_error (replies against CloudHalf's own
    output), the settings, and ``pinning``: each Ray process's cores and the
    CPU seconds it used while the client ran (warm-up included).

    The load generator is a spawned process: a calling script needs the
    ``if __name__ == "__main__":`` guard.
    """
    import_serve()
    import ray

    model, card = load_checkpoint(checkpoint)
    split = card.split_block if split_block is None else split_block
    requests = list(requests) if requests is not None else offload_requests(model, card, split)
    expected = reference_outputs(model, split, requests)
    payloads = [r.SerializeToString() for r in requests]
    with ray_serve_tail(str(checkpoint), split, max_batch, max_wait_ms, server_cores) as (address, ray_pids):
        cpu_before = {pid: cpu_seconds(pid) for pid in ray_pids}
        run = drive_in_process(client_cores, address, payloads, expected, edges, window, seconds)
        pinning = []
        for pid in ray_pids:
            with suppress(OSError, KeyError):  # a process that ended meanwhile
                pinning.append({**process_cores(pid), "cpu_s": cpu_seconds(pid) - cpu_before[pid]})
    return {"server": "ray-serve", "ray": ray.__version__, "max_batch": max_batch, "max_wait_ms": max_wait_ms,
            "seconds": seconds, "server_cores": list(server_cores), "client_cores": list(client_cores),
            **run, "pinning": pinning}
