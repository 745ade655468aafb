"""Helpers shared by the tests: polling with a deadline, an event loop in a thread, in-process clouds."""
from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offramp.core.wire import pb, pb_grpc

if TYPE_CHECKING:
    import torch

    from cloud_node.server import CloudServer
    from edge_node.server import EdgeServer

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T], timeout: float, *, process: subprocess.Popen | None = None, what: str = ""
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that.

    The test fails after ``timeout`` seconds, or as soon as ``process`` has
    exited: a daemon that died will never become ready, so waiting on is pointless.
    """
    what = what or getattr(condition, "__name__", repr(condition))
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        result = condition()
        if result:
            return result
        if process is not None and process.poll() is not None:
            pytest.fail(f"process exited with status {process.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class LoopThread:
    """An asyncio event loop in a background thread, so plain tests can host async servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)

    def __enter__(self) -> LoopThread:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Async generators still suspended (a stream's request iterator) are closed while the loop runs,
        # not by the garbage collector after it has closed.
        asyncio.run_coroutine_threadsafe(self.loop.shutdown_asyncgens(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


class CloudFactory:
    """Starts in-process cloud servers on port 0, serving one checkpoint, on a background event loop.

    ``with CloudFactory(checkpoint, defaults) as start: address, server = start(max_batch=4)``;
    settings are CloudConfig fields over ``defaults``. Leaving stops every server.
    """

    def __init__(self, checkpoint: Path, defaults: dict[str, Any]) -> None:
        self.checkpoint = checkpoint
        self.defaults = defaults
        self.loop = LoopThread()
        self._servers: list[CloudServer] = []

    def __enter__(self) -> CloudFactory:
        self.loop.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            for server in self._servers:
                self.loop.run(server.stop())
        finally:
            self.loop.__exit__(exc_type, exc, tb)

    def __call__(self, **settings: Any) -> tuple[str, CloudServer]:
        from cloud_node.server import serve
        from offramp.serving.config import CloudConfig

        config = CloudConfig(checkpoint=str(self.checkpoint), **{**self.defaults, **settings})
        server = self.loop.run(serve(config))
        self._servers.append(server)
        return server.address, server

    def stop_soon(self, server: CloudServer) -> concurrent.futures.Future[None]:
        """Begin draining ``server`` without waiting for it, as a SIGTERM would."""
        return asyncio.run_coroutine_threadsafe(server.stop(), self.loop.loop)


@contextmanager
def edge_servers(loop: LoopThread, checkpoint: Path, defaults: dict[str, Any]) -> Iterator[Callable[..., EdgeServer]]:
    """``start(**settings)`` starts an in-process edge on ``loop`` serving ``checkpoint`` (settings are
    EdgeConfig fields over ``defaults``); leaving stops every edge started."""
    from edge_node.server import serve
    from offramp.serving.config import EdgeConfig, replace_settings

    servers: list[EdgeServer] = []

    def start(**settings: Any) -> EdgeServer:
        config = replace_settings(EdgeConfig(checkpoint=str(checkpoint)), **{**defaults, **settings})
        servers.append(loop.run(serve(config)))
        return servers[-1]

    try:
        yield start
    finally:
        for server in servers:
            loop.run(server.stop())


# An edge that offloads every request (no exit is ever confident enough) and reconnects fast: the settings the
# fault and pool tests start from.
OFFLOADING_EDGE: dict[str, Any] = {"thresholds": (2.0, 2.0), "reconnect_initial_s": 0.05, "reconnect_max_s": 0.3,
                                   "grace_s": 2.0, "connect_timeout_s": 1.0}

# Raw bytes in and out: for calls that send what a hostile peer would.
IDENTITY = {"request_serializer": None, "response_deserializer": None}


def serving(address: str) -> bool:
    """Whether the daemon at ``address`` reports SERVING."""
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class Traffic:
    """One request every ``period_s`` on one InferStream to an edge, from a background thread, until
    the block ends; each reply is kept with the time it came."""

    def __init__(self, edge: EdgeServer, x: torch.Tensor, period_s: float = 0.02) -> None:
        self.edge, self.x, self.period_s = edge, x, period_s
        self.sent = 0
        self.replies: list[tuple[float, pb.InferReply]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the edge did not finish the stream"

    def _requests(self) -> Iterator[pb.InferRequest]:
        while not self._stop.is_set():
            x = self.x[self.sent % len(self.x)]
            yield pb.InferRequest(request_id=self.sent, tensor=pb.RawTensor(
                shape=list(x.shape), data=x.numpy().astype("<f4").tobytes()))
            self.sent += 1
            time.sleep(self.period_s)

    def _run(self) -> None:
        try:
            with grpc.insecure_channel(self.edge.address) as channel:
                for reply in pb_grpc.EdgeStub(channel).InferStream(self._requests(), timeout=120):
                    self.replies.append((time.monotonic(), reply))
        except BaseException as e:  # reported by the checks below
            self.error = e

    def after(self, t: float) -> list[pb.InferReply]:
        return [r for at, r in self.replies if at > t]

    def answered_by_cloud_after(self, t: float, n: int = 3) -> Callable[[], bool]:
        return lambda: sum(r.decided_by == "cloud" for r in self.after(t)) >= n

    def check_exactly_once(self) -> list[pb.InferReply]:
        assert self.error is None, self.error
        replies = [r for _, r in self.replies]
        assert sorted(r.request_id for r in replies) == list(range(self.sent))  # every one, exactly once
        assert all(r.status.code == 0 for r in replies)
        assert all(r.decided_by == "cloud" or (r.degraded and r.decided_by.startswith("exit:")) for r in replies)
        return replies


def free_ports(n: int) -> int:
    """A port p with p .. p+n-1 free now (a short race with other processes, acceptable in a test)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            held = []
            for p in range(base, base + n):
                t = socket.socket()
                held.append(t)
                t.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for t in held:
                t.close()
    raise RuntimeError("no run of free ports")
