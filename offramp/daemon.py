"""Plumbing both daemons share: metrics endpoint, signal-driven lifetime, the ready line."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from .errors import OfframpError

log = logging.getLogger(__name__)
S = TypeVar("S", bound=AbstractAsyncContextManager)


def listen_host(listen: str) -> str:
    """The host part of HOST:PORT (IPv6 brackets removed)."""
    return listen.rpartition(":")[0].strip("[]")


def start_metrics(port: int, listen: str, registry: CollectorRegistry) -> WSGIServer:
    """Prometheus /metrics on the gRPC listen host, in a thread of its own."""
    try:
        httpd, _ = start_http_server(port, addr=listen_host(listen), registry=registry)
    except OSError as e:
        raise OfframpError(f"cannot serve metrics on port {port}: {e}") from None
    return httpd


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
            if ready is not None:
                ready(server)
            log.info("%s received", (await received).name)

    asyncio.run(main())
    return 0


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
