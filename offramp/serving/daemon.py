"""Plumbing both daemons share: metrics endpoint, signal-driven lifetime, the ready line."""
from __future__ import annotations

import asyncio
import ctypes
import gc
import ipaddress
import logging
import os
import signal
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health
from prometheus_client import CollectorRegistry, start_http_server

from offramp.serving.config import MIN_KEEPALIVE_S
from offramp.serving.guard import CEILING
from offramp.core.errors import OfframpError

log = logging.getLogger(__name__)
S = TypeVar("S", bound=AbstractAsyncContextManager)


def listen_host(listen: str) -> str:
    """The host part of HOST:PORT (IPv6 brackets removed)."""
    return listen.rpartition(":")[0].strip("[]")


def on_loopback(listen: str) -> bool:
    """Whether HOST:PORT is reachable from this machine only."""
    host = listen_host(listen)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost may resolve anywhere
        return False


def start_metrics(port: int, listen: str, registry: CollectorRegistry) -> WSGIServer:
    """Prometheus /metrics on the gRPC listen host, in a thread of its own."""
    try:
        httpd, _ = start_http_server(port, addr=listen_host(listen), registry=registry)
    except OSError as e:
        raise OfframpError(f"cannot serve metrics on port {port}: {e}") from None
    return httpd




def grpc_server(max_message_bytes: int, interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                share_port: bool = False) -> grpc.aio.Server:
    """An asyncio gRPC server with deliberate message limits on both directions; ``share_port``: one of
    several worker processes on one port (SO_REUSEPORT: the kernel spreads connections over them)."""
    return grpc.aio.server(interceptors=list(interceptors), options=[
        # Up to CEILING x the limit, messages reach our own check (refused and counted there).
        ("grpc.max_receive_message_length", CEILING * max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", int(share_port)),  # otherwise a second daemon on a busy port must fail, not share it
        # Accept the edges' keepalive pings on idle streams instead of answering them with
        # GOAWAY ("too many pings") below gRPC's default 5-minute floor.
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_KEEPALIVE_S * 1000),
        ("grpc.keepalive_permit_without_calls", 1),
    ])


def bind(server: grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials | None = None) -> int:
    """Bind ``listen`` (port 0 picks one), with TLS when ``credentials`` are given; returns the bound port."""
    try:
        if credentials is None:
            return server.add_insecure_port(listen)
        return server.add_secure_port(listen, credentials)
    except RuntimeError:
        raise OfframpError(f"cannot listen on {listen}: address in use or not local") from None


class DaemonServer:
    """A started daemon: its address, and an idempotent drain.

    The drain order is the same for both daemons: health NOT_SERVING first (balancers
    stop sending), then ``_before_grpc_stop``, then gRPC stops within the grace (in-flight
    requests finish), then ``_after_grpc_stop``, then the metrics endpoint.
    """

    def __init__(self, config: Any, server: grpc.aio.Server, port: int,
                 health_servicer: health.aio.HealthServicer, metrics_http: WSGIServer | None) -> None:
        self.config = config
        self.port = port
        self._server = server
        self._health = health_servicer
        self._metrics_http = metrics_http
        self._stopped: asyncio.Future[None] | None = None

    @property
    def address(self) -> str:
        """HOST:PORT as bound, for clients and logs."""
        return f"{listen_host(self.config.listen)}:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        return None if self._metrics_http is None else self._metrics_http.server_port

    async def stop(self, grace: float | None = None) -> None:
        """Drain within ``grace`` seconds (default: the config's); later calls wait for the first."""
        if self._stopped is None:
            self._stopped = asyncio.ensure_future(self._drain(self.config.grace_s if grace is None else grace))
        await asyncio.shield(self._stopped)

    async def _before_grpc_stop(self) -> None:
        """Hook: stop taking new work."""

    async def _after_grpc_stop(self) -> None:
        """Hook: release what the requests used."""

    async def _drain(self, grace: float) -> None:
        log.info("draining: finishing in-flight requests (grace %.1f s)", grace)
        await self._health.enter_graceful_shutdown()
        await self._before_grpc_stop()
        await self._server.stop(grace)
        await self._after_grpc_stop()
        if self._metrics_http is not None:
            await asyncio.to_thread(self._metrics_http.shutdown)
            self._metrics_http.server_close()
        log.info("stopped")

    async def __aenter__(self) -> "DaemonServer":
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


def freeze_heap() -> None:
    """Exempt everything made so far from Python's cyclic garbage collector (call once start-up is done).

    Start-up leaves 200,000-300,000 long-lived objects (modules, torch, gRPC, the model), and every full
    collection walks all of them with the event loop stopped: 75-130 ms per collection on the soak
    benchmark's host, one every minute or two under its load, and every request in flight waits it out.
    Frozen, they are never walked again; a full collection then sees only what serving made since
    (a few thousand objects: as quick as a young-generation collection, 1-2 ms at most there).
    """
    gc.collect()
    gc.freeze()


def run_until_signalled(serve: Callable[[], Awaitable[S]], log_level: str,
                        ready: Callable[[S], None] | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then leave the server's context (which drains it)."""
    logging.getLogger().setLevel(log_level)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        received: asyncio.Future[signal.Signals] = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda s=sig: received.done() or received.set_result(s))
        async with await serve() as server:
            freeze_heap()
            if ready is not None:
                ready(server)
            log.info("%s received", (await received).name)

    asyncio.run(main())
    return 0


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGTERM this process when ``parent`` dies, even by SIGKILL, so that no orphan keeps
    serving a port its restarted parent needs (Linux; elsewhere it outlives a killed parent). Call it from the
    main thread: the kernel ties it to the thread that forked, and the parent's must live as long."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


STARTUP = "start-up:"  # what each start-up step's log line begins with (DaemonProcess names the last one)


class StartupLog:
    """One log line per start-up step as it begins, with the seconds since the process started: on a loaded
    machine a slow start says where it is, and a timeout can name the step it was stuck in."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def step(self, what: str) -> None:
        log.info("%s %s (%.1f s since the %s daemon's process started)", STARTUP, what, _process_age_s(), self.kind)


def _process_age_s() -> float:
    """Seconds since this process started (Linux; 0 where unknown)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def announce(kind: str, address: str, port: int, port_file: str | None) -> None:
    """The one line on stdout that scripts read, and the port file written by a rename
    (so a reader polling for it never sees it half-written)."""
    print(f"offramp {kind} listening on {address}", flush=True)
    if port_file:
        path = Path(port_file)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{port}\n")
        os.replace(tmp, path)
