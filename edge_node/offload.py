"""The edge's side of the Offload service: one long-lived stream to one cloud at a time.

Many requests share the stream; replies come back in any order and are matched
to their callers by ``request_id``. Before streaming, the client asks the cloud
what it serves (``Describe``) and refuses to pair with a cloud whose model
fingerprint or split block differ from the edge's: its answers would be wrong
without any error to show for it. Clouds are tried in the configured order
(the first is the primary); when none can be used the client keeps retrying
with exponential back-off, and callers fail fast in the meantime, so the engine
answers them from their best exit instead of letting them wait. While a
secondary serves, the clouds before it are asked every few seconds whether
they are back; the client returns to the first that pairs (failback). While
connected, a tiny health check on the same connection every
``probe_interval_s`` times the round trip without payload (``on_rtt``).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offramp.serving.config import CloudConnection, EdgeConfig
from offramp.serving.security import bearer_metadata, channel_credentials, read_token
from offramp.core.wire import FINGERPRINT_METADATA, pb, pb_grpc, status_code

log = logging.getLogger(__name__)


class OffloadError(Exception):
    """Why an offloaded request got no answer from the cloud; the message becomes the degraded reason."""

    kind = "error"  # short label for metrics


class CloudUnavailable(OffloadError):
    kind = "unavailable"


class DeadlineExceeded(OffloadError):
    kind = "deadline"


class CloudError(OffloadError):
    """The cloud answered this one request with an error status (``code``; None: an answer that makes no sense)."""

    kind = "cloud_error"

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def _expire(future: asyncio.Future, timeout_s: float) -> None:
    """The deadline timer of one offloaded request."""
    if not future.done():
        future.set_exception(DeadlineExceeded(f"deadline exceeded after {timeout_s * 1000:.0f} ms"))


@dataclass(frozen=True)
class OffloadSettings:
    """What an offload client needs besides the clouds' addresses: the edge's ``[connection]`` settings as they
    are, and what its ``[cloud_tls]`` settings and message limit come to (``from_config``)."""

    connection: CloudConnection = CloudConnection()
    max_message_bytes: int = 64 << 20
    credentials: grpc.ChannelCredentials | None = None  # None: plaintext
    server_name: str | None = None  # name to check the cloud's certificate against, if not the host's
    token: str | None = None  # bearer token the clouds expect

    @classmethod
    def from_config(cls, config: EdgeConfig) -> OffloadSettings:
        """The edge's settings, its certificate and token files read."""
        tls = config.cloud_tls
        credentials = channel_credentials(tls.ca, tls.cert, tls.key) if tls.ca is not None else None
        return cls(config.connection, config.max_message_bytes, credentials, tls.server_name,
                   read_token(tls.token_file) if tls.token_file is not None else None)


def pairing_problem(cloud: pb.DescribeReply, fingerprint: str, split_blocks: int | Sequence[int]) -> str | None:
    """Why the edge must not send tokens to this cloud, or None if the halves belong together: the same
    model, and every split block the edge may stop after among those the cloud resumes from."""
    if cloud.fingerprint != fingerprint:
        return (f"it serves a different model (fingerprint {cloud.fingerprint[:12] or '<none>'}..., "
                f"the edge has {fingerprint[:12]}...)")
    wanted = [split_blocks] if isinstance(split_blocks, int) else list(split_blocks)
    served = list(cloud.split_blocks) or [cloud.split_block]  # older clouds list none: their split_block
    missing = [s for s in wanted if s not in served]
    if missing:
        if len(served) == 1 and len(wanted) == 1:
            return f"it resumes after block {served[0]}, the edge stops after block {wanted[0]}"
        return (f"it resumes after blocks {', '.join(map(str, served))}, the edge may stop after "
                f"{', '.join(map(str, wanted))} (not served: {', '.join(map(str, missing))})")
    return None


@dataclass
class _Stream:
    """One open Infer stream and the requests waiting to be written to it."""

    address: str
    max_request_bytes: int
    takes_input: bool = False  # the cloud runs the whole model on inputs sent as they are
    outbox: asyncio.Queue[tuple[pb.OffloadRequest, asyncio.Future[pb.OffloadReply]] | None] = field(
        default_factory=asyncio.Queue)  # None: write no more (half-close; the cloud answers what it has)

    async def requests(self) -> AsyncIterator[pb.OffloadRequest]:
        """What gRPC writes, in order; requests whose caller already gave up are skipped.

        Writing from this iterator rather than from the callers matters: a caller
        cancelled (by its deadline) inside ``call.write`` would cancel the whole
        stream, and with it every other request in flight.
        """
        while (item := await self.outbox.get()) is not None:
            request, future = item
            if not future.done():
                yield request


class OffloadClient:
    """Offloads requests to the first usable cloud of ``addresses``, with failover and reconnection."""

    def __init__(self, addresses: list[str], fingerprint: str, split_blocks: int | Sequence[int],
                 settings: OffloadSettings = OffloadSettings()) -> None:
        """``split_blocks``: every block the edge may stop after; a cloud must resume from each."""
        if not addresses:
            raise ValueError("an offload client needs at least one cloud address")
        self.addresses = list(addresses)
        self.fingerprint = fingerprint
        self.split_blocks = [split_blocks] if isinstance(split_blocks, int) else list(split_blocks)
        self.settings = settings
        self._options = [
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.keepalive_time_ms", int(settings.connection.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(settings.connection.keepalive_timeout_s * 1000)),
            ("grpc.http2.max_pings_without_data", 0),  # the stream may idle while every sample exits early
            # Keep pinging while nothing comes back (gRPC's default spaces such pings 5 minutes apart):
            # that silence is exactly what a half-open connection looks like.
            ("grpc.http2.min_time_between_pings_ms", int(settings.connection.keepalive_s * 1000)),
            # Any ping unanswered that long ends the connection, not only keepalive's: gRPC's own
            # bandwidth probes are pings too, and one left hanging would otherwise hold keepalive back.
            ("grpc.http2.ping_timeout_ms", int(settings.connection.keepalive_timeout_s * 1000)),
            # A connection of its own, as a device has: clients in one process (a load generator's edges, a
            # pool's replicas) would otherwise share one, and a cloud's workers would each see all or none.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if settings.server_name is not None:
            self._options.append(("grpc.ssl_target_name_override", settings.server_name))
        self._metadata = bearer_metadata(settings.token)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[pb.OffloadReply]] = {}
        self._stream: _Stream | None = None
        self._problems: dict[str, str] = {}  # address -> why it is not in use
        self._task: asyncio.Task[None] | None = None
        self._failing_back = False  # the stream is ending because a cloud before it is back
        self.on_rtt: Callable[[float], None] | None = None  # told each probe's round trip, in milliseconds

    @property
    def takes_input(self) -> bool:
        """The cloud in use now also takes inputs as they are (the input route)."""
        return self._stream is not None and self._stream.takes_input

    @property
    def connected_to(self) -> str | None:
        """The cloud requests go to now, or None."""
        return self._stream.address if self._stream else None

    def unavailable_reason(self) -> str:
        if not self._problems:
            return f"connecting to {', '.join(self.addresses)}"
        return "; ".join(f"{a}: {self._problems[a]}" for a in self.addresses if a in self._problems)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="offload-client")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail_pending(CloudUnavailable("cloud unavailable: the edge is shutting down"))

    async def infer(self, request: pb.OffloadRequest, timeout_s: float) -> pb.OffloadReply:
        """The cloud's OK reply to ``request`` (its ``request_id`` is set here), or an ``OffloadError``."""
        stream = self._stream
        if stream is None:
            raise CloudUnavailable(f"cloud unavailable: {self.unavailable_reason()}")
        if request.HasField("input") and not stream.takes_input:
            raise CloudUnavailable(f"cloud {stream.address} does not take inputs (the input route): it serves "
                                   "tokens only")
        size = request.ByteSize()
        if size > stream.max_request_bytes:
            raise OffloadError(f"offload request of {size} bytes exceeds the {stream.max_request_bytes}-byte "
                               f"message limit of {stream.address}")
        request.request_id = next(self._ids)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[pb.OffloadReply] = loop.create_future()
        self._pending[request.request_id] = future
        stream.outbox.put_nowait((request, future))
        # A timer fails the future itself at the deadline (a done future is never written), rather than
        # asyncio.wait_for wrapping it: that costs a second future and an extra pass of the event loop per reply.
        deadline = loop.call_later(timeout_s, _expire, future, timeout_s)
        try:
            return await future
        finally:
            deadline.cancel()
            self._pending.pop(request.request_id, None)

    async def _run(self) -> None:
        """Connect, stream until the stream breaks, start over; primary first, back-off between rounds.

        The back-off only resets after a stream that held up for ``backoff_max_s``,
        so a cloud that accepts and then drops every stream is not hammered.
        """
        delay = self.settings.connection.reconnect_initial_s
        while True:
            lived = None
            for rank, address in enumerate(self.addresses):
                lived = await self._session(address, rank)
                if lived is not None:
                    break
            if self._failing_back:  # a cloud before the one just left is back: go to it now
                self._failing_back = False
                delay = self.settings.connection.reconnect_initial_s
                continue
            if lived is not None and lived >= self.settings.connection.reconnect_max_s:
                delay = self.settings.connection.reconnect_initial_s
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # jitter: edges must not reconnect in lockstep
            delay = min(2 * delay, self.settings.connection.reconnect_max_s)

    def _channel(self, address: str) -> grpc.aio.Channel:
        credentials = self.settings.credentials
        return (grpc.aio.insecure_channel(address, options=self._options) if credentials is None
                else grpc.aio.secure_channel(address, credentials, options=self._options))

    async def _describe(self, stub: pb_grpc.OffloadStub, address: str) -> pb.DescribeReply | None:
        """The cloud's description if it pairs with this edge; otherwise None, and why is noted."""
        try:
            cloud = await stub.Describe(pb.DescribeRequest(), timeout=self.settings.connection.connect_timeout_s,
                                        metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            self._note(address, f"{e.code().name} ({e.details()})", logging.WARNING, "cloud %s is unreachable: %s")
            return None
        problem = pairing_problem(cloud, self.fingerprint, self.split_blocks)
        if problem is not None:
            self._note(address, f"refused: {problem}", logging.ERROR, "REFUSING cloud %s: %s")
            return None
        return cloud

    async def _watch_preferred(self, rank: int, stream: _Stream, call: grpc.aio.StreamStreamCall) -> None:
        """While the cloud at ``rank`` > 0 serves, ask the ones before it whether they are back. On the first
        that pairs, stop sending here (callers fail fast for the moment of the switch), let this cloud
        answer what it has, and end the session so that ``_run`` connects to the one that is back."""
        while True:
            await asyncio.sleep(self.settings.connection.failback_check_s)
            for address in self.addresses[:rank]:
                async with self._channel(address) as channel:
                    if await self._describe(pb_grpc.OffloadStub(channel), address) is None:
                        continue
                log.info("cloud %s is back: leaving %s for it", address, stream.address)
                self._failing_back = True
                self._stream = None
                stream.outbox.put_nowait(None)
                await asyncio.sleep(self.settings.connection.connect_timeout_s)
                call.cancel()  # answers still missing by now fail over as a lost stream's do
                return

    async def _session(self, address: str, rank: int = 0) -> float | None:
        """One connection to ``address``: seconds it streamed, or None if it never got that far."""
        async with self._channel(address) as channel:
            stub = pb_grpc.OffloadStub(channel)
            cloud = await self._describe(stub, address)
            if cloud is None:
                return None
            limit = min(self.settings.max_message_bytes, cloud.max_message_bytes or self.settings.max_message_bytes)
            stream = _Stream(address, limit, cloud.takes_input)
            # The fingerprint goes once, with the stream: requests on it leave theirs empty.
            call = stub.Infer(stream.requests(), metadata=(*self._metadata, (FINGERPRINT_METADATA, self.fingerprint)))
            started = time.monotonic()
            self._stream = stream
            self._problems.pop(address, None)
            log.info("offloading to cloud %s (split block%s %s, max batch %d)", address,
                     "s" if len(self.split_blocks) > 1 else "", ",".join(map(str, self.split_blocks)),
                     cloud.max_batch_size)
            reason = "the cloud closed the stream"
            watcher = (asyncio.create_task(self._watch_preferred(rank, stream, call))
                       if rank > 0 and self.settings.connection.failback_check_s > 0 else None)
            prober = (asyncio.create_task(self._probe(channel))
                      if self.on_rtt is not None and self.settings.connection.probe_interval_s > 0 else None)
            try:
                async for reply in call:
                    self._resolve(reply)
            except grpc.aio.AioRpcError as e:
                reason = f"{e.code().name} ({e.details()})"
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # the client is closing
                    raise
                reason = "it did not finish its answers in time after failback"  # the watcher cancelled the call
            finally:
                self._stream = None
                call.cancel()
                stream.outbox.put_nowait(None)  # its request iterator ends rather than wait on a dead stream
                if prober is not None:
                    prober.cancel()
                    await asyncio.gather(prober, return_exceptions=True)
                if watcher is not None:
                    watcher.cancel()
                    [outcome] = await asyncio.gather(watcher, return_exceptions=True)
                    if isinstance(outcome, Exception):
                        log.warning("failback check of the clouds before %s failed: %r", address, outcome)
            if self._failing_back and not self._pending:
                return time.monotonic() - started
            self._problems[address] = f"lost: {reason}"
            log.warning("lost cloud %s: %s; %d requests in flight fall back", address, reason, len(self._pending))
            self._fail_pending(CloudUnavailable(f"cloud unavailable: lost {address}: {reason}"))
            return time.monotonic() - started

    async def _probe(self, channel: grpc.aio.Channel) -> None:
        """Time a health check on the offload connection every ``probe_interval_s``: with no payload to carry,
        the quickest of them is the link's round trip (the gRPC service itself costs well under a millisecond)."""
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            await asyncio.sleep(self.settings.connection.probe_interval_s)
            t0 = time.perf_counter()
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=self.settings.connection.connect_timeout_s)
            except grpc.aio.AioRpcError as e:
                log.debug("rtt probe failed: %s", e.code().name)
                continue
            if self.on_rtt is not None:
                self.on_rtt((time.perf_counter() - t0) * 1000)

    def _note(self, address: str, problem: str, level: int, message: str) -> None:
        """Remember why ``address`` is not in use; log it when it is news (retries repeat it every round)."""
        news = self._problems.get(address) != problem
        self._problems[address] = problem
        log.log(level if news else logging.DEBUG, message, address, problem)

    def _resolve(self, reply: pb.OffloadReply) -> None:
        future = self._pending.pop(reply.request_id, None)
        if future is None or future.done():
            log.debug("reply %d came after its caller gave up", reply.request_id)
            return
        code = status_code(reply.status)
        if code is grpc.StatusCode.OK:
            future.set_result(reply)
        else:
            future.set_exception(CloudError(f"cloud error {code.name}: {reply.status.message}", code))

    def _fail_pending(self, error: OffloadError) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
