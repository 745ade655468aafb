"""Services that parse their own requests, so a malformed message costs a counter, not a traceback.

gRPC's generated registration parses each message before our code sees it;
a message that does not parse is answered UNKNOWN and logged at ERROR with a
full traceback (about 1.8 KB per message: any peer that reaches the port can
fill the disk). Registered through ``add_service``, a service receives raw
bytes and parses them here: a malformed message is answered
INVALID_ARGUMENT with a short reason, counted in a metric by method and
reason, and logged as a summary at most once per interval. On a stream, the
requests read before it are still answered, then the stream ends.

Messages over the daemon's size limit are refused here too, with
RESOURCE_EXHAUSTED, and counted (reason "oversized"): gRPC itself lets
messages through up to ``CEILING`` times the limit so that they reach this
check, and still stops anything larger before it is read (those are the only
refusals no counter sees).
"""
from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter

from offramp.core.wire import pb

log = logging.getLogger(__name__)


CEILING = 2  # gRPC's own receive limit, as a multiple of the daemon's (see above)


class MalformedMessage(Exception):
    """A request message refused before the service sees it; its text is the reason the caller gets."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class OversizedMessage(MalformedMessage):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class MalformedLog:
    """Counts refused messages by method and reason; logs one summary line at most every ``interval_s``."""

    def __init__(self, registry: CollectorRegistry, prefix: str, interval_s: float = 10.0) -> None:
        self.counter = Counter(f"{prefix}_malformed_messages",
                               "Request messages refused before the service saw them: unparsable "
                               "(INVALID_ARGUMENT) or over the size limit (RESOURCE_EXHAUSTED), by method and "
                               "reason", ["method", "reason"], registry=registry)
        self.interval_s = interval_s
        self._unlogged: Tally[tuple[str, str]] = Tally()
        self._next_line = 0.0

    def record(self, method: str, reason: str) -> None:
        self.counter.labels(method, reason).inc()
        self._unlogged[method, reason] += 1
        now = time.monotonic()
        if now >= self._next_line:
            top = ", ".join(f"{n} x {m} ({r})" for (m, r), n in self._unlogged.most_common(4))
            more = len(self._unlogged) - 4
            log.warning("refused malformed or oversized messages since the last report: %s%s", top,
                        f" and {more} more kinds" if more > 0 else "")
            self._unlogged.clear()
            self._next_line = now + self.interval_s


def add_service(server: grpc.aio.Server, servicer: Any, service: str, malformed: MalformedLog, max_bytes: int,
                messages: ModuleType = pb, methods: Collection[str] | None = None, full_name: str | None = None) -> None:
    """Register ``servicer``'s methods of ``service`` (e.g. "Offload") with parsing done here.

    ``messages`` is the generated module that declares the service (ours by
    default); ``methods`` limits registration to those the servicer
    implements, so gRPC itself answers the others UNIMPLEMENTED, quietly;
    ``full_name`` serves it under another name than its proto package gives.
    """
    descriptor = messages.DESCRIPTOR.services_by_name[service]
    full_name = full_name or descriptor.full_name
    handlers = {}
    for method in descriptor.methods:
        if methods is not None and method.name not in methods:
            continue
        parse = _parser(getattr(messages, method.input_type.name), method.name, malformed, max_bytes)
        serialize = getattr(messages, method.output_type.name).SerializeToString
        behaviour = getattr(servicer, method.name)
        if not method.client_streaming and not method.server_streaming:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(behaviour, parse), response_serializer=serialize)
        elif method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _stream(behaviour, parse), response_serializer=serialize)
        else:
            raise ValueError(f"{descriptor.full_name}.{method.name}: only unary and bidi methods are handled")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(full_name, handlers),))
    server.add_registered_method_handlers(full_name, handlers)


def _parser(message: type, method: str, malformed: MalformedLog, max_bytes: int) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        if len(raw) > max_bytes:
            malformed.record(method, "oversized")
            raise OversizedMessage(f"the {len(raw)}-byte message exceeds this server's {max_bytes}-byte limit")
        try:
            return message.FromString(raw)
        except DecodeError:
            malformed.record(method, "unparsable")
            raise MalformedMessage(f"the {len(raw)}-byte message is not a valid {message.__name__}") from None
    return parse


def _unary(behaviour: Callable[[Any, Any], Awaitable[Any]], parse: Callable[[bytes], Any]):
    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = parse(raw)
        except MalformedMessage as e:
            await context.abort(e.code, str(e))
        return await behaviour(request, context)
    return handle


def _stream(behaviour: Callable[[AsyncIterator[Any], Any], AsyncIterator[Any]], parse: Callable[[bytes], Any]):
    async def handle(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async def requests() -> AsyncIterator[Any]:
            async for raw in raws:
                yield parse(raw)

        try:
            async for reply in behaviour(requests(), context):
                yield reply
        except MalformedMessage as e:
            await context.abort(e.code, str(e))
    return handle
