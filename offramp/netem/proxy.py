"""An asyncio TCP proxy that makes a loopback connection behave like an emulated link.

Put it between the edge and the cloud (``edge → proxy → cloud``): bytes from
the listening side travel the *uplink*, bytes from upstream the *downlink*,
each shaped independently by a :class:`~offramp.netem.shaper.Shaper`. It needs
no privileges and works for any TCP protocol (gRPC included); the kernel path
in :mod:`offramp.netem.kernel` is the alternative where root and ``tc`` allow.

Known limits: the proxy terminates TCP, so the TCP handshake is not delayed
(connecting is one RTT cheaper than on a real link) and congestion control
does not react to the emulated link; reads are cut into segments of at most
``SEGMENT_BYTES``, and loss and timing apply per segment.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import random
import signal
import socket
import struct
import threading
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, TypeVar

from offramp.core.errors import OfframpError
from offramp.netem.profiles import Direction, LinkProfile, Schedule
from offramp.netem.shaper import Shaper
from offramp.netem.trace import Trace, TraceQueue

log = logging.getLogger(__name__)
T = TypeVar("T")

LossMode = Literal["stall", "reset"]
READ_BYTES = 64 * 1024
SEGMENT_BYTES = 16 * 1024  # ~11 full-size packets: fine-grained enough for kbit/s links, cheap at Gbit/s
CUT_POLL_S = 0.005  # how often a cut link looks whether it is back
SPIN_S = 0.001  # the event loop's timer resolution (epoll waits in whole milliseconds)
MAX_INFLIGHT_BYTES = 1 << 20  # per direction per connection, raised to 2x the bandwidth-delay product if larger


@dataclass
class DirectionStats:
    bytes: int = 0
    segments: int = 0
    added_delay_s: float = 0.0  # sum over segments of (delivery time - arrival time)
    stalls: int = 0

    @property
    def mean_added_delay_ms(self) -> float:
        return 1e3 * self.added_delay_s / self.segments if self.segments else 0.0


@dataclass
class LinkStats:
    connections: int = 0
    resets: int = 0
    uplink: DirectionStats = field(default_factory=DirectionStats)
    downlink: DirectionStats = field(default_factory=DirectionStats)


class _Reset(Exception):
    """A segment drew a loss in reset mode: the connection dies."""


def parse_address(text: str) -> tuple[str, int]:
    """``"127.0.0.1:7000"``, ``"[::1]:7000"`` or ``"localhost:0"`` as ``(host, port)``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise OfframpError(f"bad address {text!r} (expected HOST:PORT)")
    return host.strip("[]") or "127.0.0.1", int(port)


class LinkProxy:
    """Listens on ``listen``, forwards every connection to ``upstream`` through the emulated link.

    ``link`` is a profile or a schedule (its clock starts at :meth:`start`).
    Randomness is ``random.Random`` seeded from ``(seed, connection index,
    direction)``, so a run is reproducible given the same sequence of reads.
    In ``on_loss="stall"`` mode a lost segment is delayed by the profile's
    ``stall_ms`` (TCP would retransmit it); in ``"reset"`` mode the connection
    is reset on both sides instead.
    """

    def __init__(self, listen: str | tuple[str, int], upstream: str | tuple[str, int],
                 link: LinkProfile | Schedule, *, seed: int = 0, on_loss: LossMode = "stall",
                 max_inflight_bytes: int = MAX_INFLIGHT_BYTES) -> None:
        if on_loss not in ("stall", "reset"):
            raise OfframpError(f"on_loss must be 'stall' or 'reset', got {on_loss!r}")
        self.listen = parse_address(listen) if isinstance(listen, str) else listen
        self.upstream = parse_address(upstream) if isinstance(upstream, str) else upstream
        self.schedule = link if isinstance(link, Schedule) else Schedule.constant(link)
        self.seed = seed
        self.on_loss = on_loss
        self.max_inflight_bytes = max_inflight_bytes
        self._stats = LinkStats()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._t0 = 0.0
        self._current: LinkProfile | None = None
        self._trace_queues: dict[tuple[bool, int], TraceQueue] = {}
        self.port = 0

    @property
    def address(self) -> str:
        """The bound ``HOST:PORT`` (after :meth:`start`)."""
        host = self.listen[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def stats(self) -> LinkStats:
        """A copy of the counters so far, over all connections."""
        return copy.deepcopy(self._stats)

    async def start(self) -> int:
        """Bind (port 0 picks a free port), start the schedule's clock, and return the bound port."""
        self._server = await asyncio.start_server(self._serve, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]
        self._t0 = asyncio.get_running_loop().time()
        self._current = self.schedule.at(0.0)
        log.info("link %s -> %s:%d, profile %s, seed %d, on loss %s", self.address, *self.upstream,
                 self._current.name, self.seed, self.on_loss)
        return self.port

    async def stop(self) -> None:
        """Stop accepting, then cut every open connection."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    def set_link(self, link: LinkProfile | Schedule) -> None:
        """From now on the link is ``link`` (a schedule's clock starts now); open connections follow at once."""
        self.schedule = link if isinstance(link, Schedule) else Schedule.constant(link)
        self._t0 = asyncio.get_running_loop().time()
        self._trace_queues.clear()  # a trace replays from its start with the new clock

    def run(self) -> None:
        """Serve until SIGINT or SIGTERM (the ``offramp link`` command)."""
        asyncio.run(self._serve_until_signal())

    async def _serve_until_signal(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
            log.info("stopping link %s: %s", self.address, self.stats())
        finally:
            await self.stop()

    def trace_queue(self, uplink: bool, trace: Trace) -> TraceQueue:
        """The one queue of a trace-driven direction, shared by every connection (the capacity is the link's)."""
        key = (uplink, id(trace))
        if key not in self._trace_queues:
            self._trace_queues[key] = TraceQueue(trace)
        return self._trace_queues[key]

    @property
    def clock0(self) -> float:
        """Loop time at which the link's schedule (and a trace) started."""
        return self._t0

    def direction(self, uplink: bool, now: float) -> Direction:
        """The direction's numbers at loop time ``now``, logging schedule steps as they happen."""
        profile = self.schedule.at(now - self._t0)
        if profile is not self._current:
            log.info("link %s now %s (t=%.1f s)", self.address, profile.name, now - self._t0)
            self._current = profile
        return profile.uplink if uplink else profile.downlink

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        """One accepted connection; ends quietly when :meth:`stop` cancels it."""
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        index = self._stats.connections
        self._stats.connections += 1
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self.upstream)
        except OSError as e:
            log.warning("connection %d: cannot reach upstream %s:%d: %s", index, *self.upstream, e)
            upstream_w = None
        try:
            if upstream_w is not None:
                await self._relay(index, client_r, client_w, upstream_r, upstream_w)
        except asyncio.CancelledError:
            log.debug("connection %d cut by stop", index)
        finally:
            for writer in (client_w, upstream_w):
                if writer is not None:
                    writer.close()
            self._connections.discard(task)

    async def _relay(self, index: int, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                     upstream_r: asyncio.StreamReader, upstream_w: asyncio.StreamWriter) -> None:
        """Both directions until both have ended; a reset or a socket error kills both sides with an RST."""
        pipes = [_Pipe(self, True, client_r, upstream_w, self._stats.uplink,
                       random.Random(f"{self.seed}/{index}/up")),
                 _Pipe(self, False, upstream_r, client_w, self._stats.downlink,
                       random.Random(f"{self.seed}/{index}/down"))]
        try:
            async with asyncio.TaskGroup() as group:
                for pipe in pipes:
                    group.create_task(pipe.read_loop())
                    group.create_task(pipe.write_loop())
        except* _Reset:
            self._stats.resets += 1
            log.debug("connection %d reset by emulated loss", index)
            _reset(client_w)
            _reset(upstream_w)
        except* OSError as errors:
            log.debug("connection %d ended: %s", index, errors.exceptions[0])
            _reset(client_w)
            _reset(upstream_w)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), as a connection killed by the network would."""
    if writer.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Pipe:
    """One direction of one connection: read, schedule, and write out in order, holding a bounded backlog.

    The reader stops reading while the backlog is full, so a fast sender is
    slowed by TCP flow control instead of filling memory.
    """

    def __init__(self, proxy: LinkProxy, uplink: bool, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 stats: DirectionStats, rng: random.Random) -> None:
        self.proxy, self.uplink, self.reader, self.writer, self.stats = proxy, uplink, reader, writer, stats
        self.shaper = Shaper(rng)
        self.queue: deque[tuple[float, bytes | None]] = deque()  # (deliver at, segment); None is EOF
        self.inflight = 0
        self.queued = asyncio.Event()
        self.drained = asyncio.Event()

    async def read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while data := await self.reader.read(READ_BYTES):
            for i in range(0, len(data), SEGMENT_BYTES):
                segment = data[i:i + SEGMENT_BYTES]
                await self._room(len(segment), loop.time())
                now = loop.time()
                link = self.proxy.direction(self.uplink, now)
                queue = None if link.trace is None else self.proxy.trace_queue(self.uplink, link.trace)
                delivery = self.shaper.admit(now, len(segment), link, queue, self.proxy.clock0)
                if delivery.lost and self.proxy.on_loss == "reset":
                    raise _Reset
                self.queue.append((delivery.at, segment))
                self.inflight += len(segment)
                self.queued.set()
                self.stats.bytes += len(segment)
                self.stats.segments += 1
                self.stats.added_delay_s += delivery.at - now
                self.stats.stalls += delivery.lost
        now = loop.time()  # the FIN crosses the link too, behind the data
        self.queue.append((max(self.shaper.last, now + self.proxy.direction(self.uplink, now).delay_ms / 1e3), None))
        self.queued.set()

    async def write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.queued.clear()
                await self.queued.wait()
            await _sleep_until(loop, self.queue[0][0])
            while self.proxy.direction(self.uplink, loop.time()).cut:  # held, connection open, until the link is back
                await asyncio.sleep(CUT_POLL_S)
            now, batch = loop.time(), []
            while self.queue and self.queue[0][0] <= now and self.queue[0][1] is not None:
                batch.append(self.queue.popleft()[1])
            self.writer.writelines(batch)
            await self.writer.drain()
            self.inflight -= sum(len(b) for b in batch)
            self.drained.set()
            if self.queue and self.queue[0][1] is None and self.queue[0][0] <= loop.time():
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return

    async def _room(self, nbytes: int, now: float) -> None:
        """Wait until ``nbytes`` more fit in the backlog (a lone segment always fits)."""
        link = self.proxy.direction(self.uplink, now)
        bdp = (link.bytes_per_s or 0.0) * (link.delay_ms + link.jitter_ms) / 1e3
        limit = link.queue_bytes or max(self.proxy.max_inflight_bytes, 2 * bdp)
        while self.inflight and self.inflight + nbytes > limit:
            self.drained.clear()
            await self.drained.wait()


async def _sleep_until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    """Sleep to ``when``, never waking early, to within tens of microseconds rather than epoll's millisecond.

    The event loop's timers round up to whole milliseconds, which would add up
    to 1 ms to every sub-millisecond delay (``lan``); the last millisecond is
    therefore spent yielding to the loop (other connections keep running).
    """
    while (wait := when - loop.time()) > 0:
        await asyncio.sleep(wait - SPIN_S if wait > SPIN_S else 0)


class ProxyThread:
    """A :class:`LinkProxy` on its own event loop in a daemon thread, for synchronous callers."""

    def __init__(self, proxy: LinkProxy) -> None:
        self.proxy = proxy
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="offramp-link", daemon=True)

    def __enter__(self) -> ProxyThread:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return self.proxy.address

    def start(self) -> int:
        """Start the loop and the proxy; return the bound port."""
        self._thread.start()
        return self._call(self.proxy.start())

    def stats(self) -> LinkStats:
        """A copy of the proxy's counters, taken on its own loop so they are consistent."""
        return self._call(self._snapshot())

    async def _snapshot(self) -> LinkStats:
        return self.proxy.stats()

    def set_link(self, link: LinkProfile | Schedule) -> None:
        """:meth:`LinkProxy.set_link`, on the proxy's own loop."""
        self._call(self._set_link(link))

    async def _set_link(self, link: LinkProfile | Schedule) -> None:
        self.proxy.set_link(link)

    def stop(self, timeout: float = 10.0) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._call(self.proxy.stop(), timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)
