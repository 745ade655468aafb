"""Start an ``offramp`` daemon as a child process, wait until it serves, stop it by its pid.

Used by the demo, the orchestrator and the tests, which all drive the daemons
through their public command line, as a user would.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Sequence
from contextlib import suppress
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offramp.serving.config import CloudConfig, EdgeConfig
from offramp.serving.config_text import settings_toml
from offramp.core.errors import OfframpError
from offramp.serving import DIE_WITH_PARENT
from offramp.serving.daemon import STARTUP
from offramp.serving.security import channel_credentials


def pin_threads(pid: int, cores: Collection[int]) -> None:
    """Pin every thread of ``pid`` to ``cores``: ``sched_setaffinity(pid)`` alone moves only its main thread.

    Threads and processes started later inherit the mask of the thread that starts them.
    """
    for tid in os.listdir(f"/proc/{pid}/task"):
        with suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(tid), cores)


class DaemonProcess:
    """``with DaemonProcess("cloud", ["--checkpoint", d]) as cloud: cloud.address``.

    Settings come as flags (``args``), or as a typed ``config`` that is
    written to a TOML file and passed with ``--config`` (flags override it).
    The daemon binds port 0 and writes the port it got to a file; start-up
    waits for that file and for the health service to report SERVING, and
    fails fast, with the tail of the daemon's log, if the process dies.
    """

    def __init__(self, command: str, args: Sequence[str] = (), host: str = "127.0.0.1", startup_timeout: float = 60.0,
                 log_path: str | Path | None = None, env: dict[str, str] | None = None,
                 cores: set[int] | None = None, config: CloudConfig | EdgeConfig | None = None,
                 tls_ca: str | None = None, tls_client: tuple[str, str] | None = None,
                 die_with_parent: bool = False) -> None:
        """``die_with_parent``: the daemon ends when this process does, even killed (an actor restarted by Ray
        must find its port free); call ``start`` from the main thread then."""
        self.startup_timeout = startup_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix=f"offramp-{command}-")
        if config is not None:
            config_file = Path(self._tmp.name) / "config.toml"
            config_file.write_text(settings_toml(config))
            args = ["--config", str(config_file), *args]
        self.command, self.args, self.host = command, list(args), host
        self.port_file = Path(self._tmp.name) / "port"
        self.log_path = Path(log_path) if log_path else Path(self._tmp.name) / f"{command}.log"
        self.env = env
        self.cores = cores  # CPU cores the daemon may run on (benchmarks pin servers apart from clients)
        # A daemon serving TLS is health-checked over TLS: the CA to trust, and for mutual TLS a
        # client certificate and key.
        self.tls_ca, self.tls_client = tls_ca, tls_client
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        if die_with_parent:
            self.env = {**(env or {}), DIE_WITH_PARENT: str(os.getpid())}

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "DaemonProcess":
        cmd = [sys.executable, "-m", "offramp.cli", self.command, "--listen", f"{self.host}:{self.port or 0}",
               "--port-file", str(self.port_file), *self.args]  # a restart keeps the port it had
        self.port_file.unlink(missing_ok=True)
        self._log = open(self.log_path, "a" if self.port else "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(self.env or {})})
        if self.cores is not None:  # before torch starts its threads: they inherit it
            os.sched_setaffinity(self.proc.pid, self.cores)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OfframpError(f"{self.command} daemon exited with status {self.proc.returncode}:\n{self.log_tail()}")
            if self.port_file.is_file() and self.port_file.read_text().strip():
                self.port = int(self.port_file.read_text())
                if self._serving(deadline - time.monotonic()):
                    if self.cores is not None:  # any thread the child started before the line above
                        pin_threads(self.proc.pid, self.cores)
                    return self
            time.sleep(0.05)
        self.stop()
        tail = self.log_tail()
        steps = [line.split(STARTUP, 1)[1].strip() for line in tail.splitlines() if STARTUP in line]
        where = f"stuck at {steps[-1]}" if steps else "before it logged any start-up step (starting Python)"
        raise OfframpError(f"{self.command} daemon did not become ready in {self.startup_timeout:.0f} s, {where}; "
                           f"raise the start-up timeout on a loaded machine:\n{tail}")

    def channel(self) -> grpc.Channel:
        """A channel to the daemon: plaintext, or TLS when the daemon serves it."""
        if self.tls_ca is None:
            return grpc.insecure_channel(self.address)
        cert, key = self.tls_client or (None, None)
        return grpc.secure_channel(self.address, channel_credentials(self.tls_ca, cert, key))

    def _serving(self, timeout: float) -> bool:
        with self.channel() as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                  timeout=max(0.1, min(timeout, 2.0)))
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL after ``grace`` seconds; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """Abrupt death (SIGKILL), for failure experiments."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> "DaemonProcess":
        """SIGKILL, then start again on the same port: a crashed daemon that its supervisor brings back."""
        self.kill()
        self._log.close()
        return self.start()

    def __enter__(self) -> "DaemonProcess":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        self._tmp.cleanup()
