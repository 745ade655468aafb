"""``offramp cloud --workers N``: N cloud processes on one port, supervised by the one started.

One cloud process is bound by its per-request Python work (gRPC, decode,
batcher, replies), not by the model. Workers each run a whole cloud (its own
batchers, metrics, health) and bind the same port with SO_REUSEPORT, so the
kernel hands each new connection to one of them. That spreads edges, not
requests: one edge's stream stays on one worker, which is what its batches
and ordering want, and with a few edges or more per worker the load evens out.
A front end handing requests to workers would spread finer, at the price of
a second hop for every request and a process that is itself the bottleneck
this exists to remove.

The supervisor picks the port first (port 0 reserves a free one, held until
every worker is serving), starts the workers as fresh interpreters (spawn),
announces the address once all are serving, restarts a worker that dies,
and on SIGTERM or SIGINT passes the signal on: every worker drains (health
NOT_SERVING, in-flight requests answered) and the supervisor exits when all
have, 0 if every one drained cleanly.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.process import BaseProcess
from typing import Any

from offramp.core.errors import OfframpError
from offramp.serving.config import CloudConfig
from offramp.serving.daemon import die_with_parent, listen_host
from offramp.serving.log import LogFormat, setup_logging

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0  # a worker loads the checkpoint and warms up before it reports
RESTART_WINDOW_S = 30.0  # a worker that dies this soon after its start, twice in a row, is not restarted


def worker_config(config: CloudConfig, index: int, port: int) -> CloudConfig:
    """Worker ``index``'s settings: the shared port, its own metrics port, its share of the cores."""
    threads = config.threads or max(1, (os.cpu_count() or 1) // config.workers)
    metrics = None if config.metrics_port is None else (config.metrics_port and config.metrics_port + index)
    return replace(config, listen=f"{config.listen.rpartition(':')[0]}:{port}", metrics_port=metrics,
                   threads=threads, workers=1)


def _worker_main(config: CloudConfig, index: int, ready: Any, log_format: LogFormat, supervisor: int) -> None:
    """A worker process: one cloud on the shared port; tells the supervisor once it answers."""
    from .server import run

    die_with_parent(supervisor)
    setup_logging(config.log_level, log_format, process=f"worker {index}")
    code = run(config, ready=lambda server: ready.put((index, server.metrics_port)), share_port=True)
    raise SystemExit(code)


def _reserve(listen: str) -> socket.socket:
    """A socket bound to ``listen`` in SO_REUSEPORT mode, not listening: it holds the port (port 0: a free
    one) for the workers to join, and makes a daemon that does not share ports fail to bind it."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host or "0.0.0.0", int(port)))
    except OSError as e:
        sock.close()
        raise OfframpError(f"cannot listen on {listen}: {e.strerror}") from None
    return sock


class Supervisor:
    """Starts, watches and stops the worker processes of one cloud."""

    def __init__(self, config: CloudConfig, log_format: LogFormat = "text") -> None:
        if config.workers < 2:
            raise ValueError("a supervisor runs two workers or more")
        self.config, self.log_format = config, log_format
        self._context = multiprocessing.get_context("spawn")
        self._ready = self._context.Queue()
        self._reservation = _reserve(config.listen)
        self.port = self._reservation.getsockname()[1]
        self.address = f"{listen_host(config.listen)}:{self.port}"
        self.workers: list[BaseProcess] = []
        self.metrics_ports: dict[int, int | None] = {}
        self._started: list[float] = []
        self._quick_deaths = [0] * config.workers
        self._stopping = False
        self._all_served = False  # every worker has served once: a report now is a restarted worker's

    def start(self) -> None:
        """Start every worker and wait until all serve; a worker that fails to start stops them all."""
        self.workers = [self._spawn(i) for i in range(self.config.workers)]
        self._started = [time.monotonic()] * self.config.workers
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(self.metrics_ports) < self.config.workers:
            dead = [i for i, w in enumerate(self.workers) if w.exitcode is not None]
            if dead:
                self.stop()
                raise OfframpError(f"cloud worker {dead[0]} exited with status {self.workers[dead[0]].exitcode} "
                                   "before serving (its log says why)")
            if time.monotonic() > deadline:
                self.stop()
                raise OfframpError(f"cloud workers did not all serve within {READY_TIMEOUT_S:.0f} s")
            self._collect_ready(timeout=0.2)
        self._all_served = True
        self._reservation.close()  # every worker holds the port now
        log.info("%d workers serving on %s%s", self.config.workers, self.address, "".join(
            f"; worker {i} metrics on port {p}" for i, p in sorted(self.metrics_ports.items()) if p is not None))

    def watch(self, stop_requested: Callable[[], bool]) -> None:
        """Restart workers that die until ``stop_requested()``; give up on one that keeps dying at start."""
        while not stop_requested():
            for i, worker in enumerate(self.workers):
                if worker.exitcode is None or self._stopping:
                    continue
                quick = time.monotonic() - self._started[i] < RESTART_WINDOW_S
                self._quick_deaths[i] = self._quick_deaths[i] + 1 if quick else 0
                if self._quick_deaths[i] >= 2:
                    raise OfframpError(f"cloud worker {i} keeps dying at start (status {worker.exitcode})")
                log.error("cloud worker %d died (status %s): restarting it", i, worker.exitcode)
                self.metrics_ports.pop(i, None)
                self.workers[i] = self._spawn(i)
                self._started[i] = time.monotonic()
            self._collect_ready(timeout=0.2)

    def stop(self) -> int:
        """SIGTERM every worker (each drains within grace_s) and wait; 0 if every one exited cleanly."""
        self._stopping = True
        for worker in self.workers:
            if worker.exitcode is None and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace_s + 10
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.exitcode is None:
                log.error("cloud worker pid %s did not drain in time: killing it", worker.pid)
                worker.kill()
                worker.join()
        self._reservation.close()
        # A worker still starting has no handler yet: SIGTERM ends it at once, which is clean too.
        clean = [w.exitcode == 0 or (i not in self.metrics_ports and w.exitcode == -signal.SIGTERM)
                 for i, w in enumerate(self.workers)]
        return 0 if all(clean) else 1

    def _spawn(self, index: int) -> BaseProcess:
        worker = self._context.Process(target=_worker_main, name=f"offramp-cloud-worker-{index}",
                                       args=(worker_config(self.config, index, self.port), index, self._ready,
                                             self.log_format, os.getpid()))
        worker.start()
        return worker

    def _collect_ready(self, timeout: float) -> None:
        try:
            index, metrics_port = self._ready.get(timeout=timeout)
        except Exception:  # queue.Empty: nothing reported meanwhile
            return
        if self._all_served and index not in self.metrics_ports:
            log.info("cloud worker %d serving again", index)
        self.metrics_ports[index] = metrics_port


def run_workers(config: CloudConfig, ready: Callable[[str, int], None] | None = None,
                log_format: LogFormat = "text") -> int:
    """Serve with ``config.workers`` processes until SIGTERM or SIGINT, then drain them all; ``ready(address,
    port)`` once every worker serves."""
    logging.getLogger().setLevel(config.log_level)
    received: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _frame: received.append(s))
    supervisor = Supervisor(config, log_format)
    try:
        supervisor.start()
        if ready is not None:
            ready(supervisor.address, supervisor.port)
        supervisor.watch(lambda: bool(received))
    except OfframpError:
        supervisor.stop()
        raise
    log.info("%s received: draining %d workers", signal.Signals(received[0]).name, config.workers)
    return supervisor.stop()
