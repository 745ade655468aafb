"""The edge's offloads spread over a pool of cloud replicas, each request to one of them.

Each replica is an ``OffloadClient`` of its own: one stream, its own
Describe and fingerprint check, keepalive, round-trip probes and reconnection
with back-off, exactly as a lone cloud. The pool only chooses, per request,
among the replicas streaming now: the one with the fewest requests
outstanding (ties in turn), or strictly in turn. A replica that refuses to
pair (another model) is never chosen; one that dies is left out until it
streams again, and is then chosen at once, since it has nothing outstanding.

A request lost with its replica (the stream broke, or the replica answered
UNAVAILABLE or RESOURCE_EXHAUSTED: it is draining or full) is sent again to
another replica within what is left of its deadline; only when none is left
does it fail, and the engine answers it degraded. Either way it gets exactly
one answer.

Replicas come from addresses, or from ``dns:HOST:PORT`` names resolved to
every address they hold (a Kubernetes headless Service), resolved again every
``resolve_interval_s``: replicas that appear join, replicas that vanish are
closed and their requests go elsewhere. gRPC's own load balancing does not
fit here: it spreads calls, and all of an edge's offloads share one stream.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Literal

import grpc

from offramp.core.errors import OfframpError
from offramp.core.wire import pb

from .offload import CloudError, CloudUnavailable, DeadlineExceeded, OffloadClient, OffloadSettings

log = logging.getLogger(__name__)

Balance = Literal["least_outstanding", "round_robin"]
DNS_PREFIX = "dns:"
# Codes a replica answers when it cannot take a request now but another may: draining, or full.
_TRY_ANOTHER = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def dns_name(entry: str) -> str | None:
    """``HOST:PORT`` of a ``dns:HOST:PORT`` (or gRPC's ``dns:///HOST:PORT``) entry; None for a plain address."""
    if not entry.startswith(DNS_PREFIX):
        return None
    return entry[len(DNS_PREFIX):].removeprefix("///")


async def resolve(name: str) -> list[str]:
    """Every address ``HOST:PORT`` resolves to, as ``IP:PORT`` (IPv6 in brackets), in a stable order."""
    host, _, port = name.rpartition(":")
    return _addresses(await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM), port)


def check_resolvable(entries: Sequence[str]) -> None:
    """Raise OfframpError naming a ``dns:`` entry that resolves to no address (a typo, or nothing deployed)."""
    for entry in entries:
        if (name := dns_name(entry)) is None:
            continue
        host, _, port = name.rpartition(":")
        try:
            addresses = _addresses(socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM), port)
        except OSError as e:
            raise OfframpError(f"replica pool name {name} resolves to no address ({e.strerror or e})") from None
        if not addresses:
            raise OfframpError(f"replica pool name {name} resolves to no address")


def _addresses(infos: list, port: str) -> list[str]:
    found = {(family, sockaddr[0]) for family, _, _, _, sockaddr in infos}
    return sorted(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}" for family, ip in found)


class ReplicaPool:
    """Offloads each request to one replica of ``entries``; the same interface as ``OffloadClient``."""

    def __init__(self, entries: Sequence[str], fingerprint: str, split_blocks: int | Sequence[int],
                 settings: OffloadSettings | None = None, balance: Balance = "least_outstanding",
                 resolve_interval_s: float = 10.0) -> None:
        if not entries:
            raise ValueError("a replica pool needs at least one address or dns: name")
        if balance not in ("least_outstanding", "round_robin"):
            raise ValueError(f"unknown balance {balance!r}: least_outstanding or round_robin")
        self.entries = list(entries)
        self.fingerprint, self.split_blocks = fingerprint, split_blocks
        self.settings = settings or OffloadSettings()
        self.balance = balance
        self.resolve_interval_s = resolve_interval_s
        self.replicas: dict[str, OffloadClient] = {}  # address -> its client, in the order they joined
        self.outstanding: collections.Counter[str] = collections.Counter()
        self.sent: collections.Counter[str] = collections.Counter()  # requests each replica answered
        self.retried = 0  # requests sent again after their replica could not answer them
        self._last: str | None = None  # the replica chosen last
        self._on_rtt: Callable[[float], None] | None = None
        self._resolver: asyncio.Task[None] | None = None

    @property
    def on_rtt(self) -> Callable[[float], None] | None:
        return self._on_rtt

    @on_rtt.setter
    def on_rtt(self, callback: Callable[[float], None] | None) -> None:
        """Every replica's probes are the link's round trip: each tells the same callback."""
        self._on_rtt = callback
        for client in self.replicas.values():
            client.on_rtt = callback

    @property
    def streaming(self) -> list[str]:
        """The replicas requests may go to now."""
        return [a for a, c in self.replicas.items() if c.connected_to is not None]

    @property
    def connected_to(self) -> str | None:
        """The replicas streaming now, comma-separated, or None."""
        return ",".join(self.streaming) or None

    @property
    def takes_input(self) -> bool:
        return any(c.takes_input for c in self.replicas.values())

    def unavailable_reason(self) -> str:
        if not self.replicas:
            return f"no replica: {', '.join(self.entries)} resolved to no address"
        return "; ".join(c.unavailable_reason() for c in self.replicas.values())

    def start(self) -> None:
        """Start a client per address; ``dns:`` names are resolved in the background, now and every
        ``resolve_interval_s``."""
        for entry in self.entries:
            if dns_name(entry) is None:
                self._join(entry)
        if any(dns_name(e) is not None for e in self.entries):
            self._resolver = asyncio.get_running_loop().create_task(self._keep_resolving(), name="pool-resolver")

    async def close(self) -> None:
        if self._resolver is not None:
            self._resolver.cancel()
            await asyncio.gather(self._resolver, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self.replicas.values()))

    async def infer(self, request: pb.OffloadRequest, timeout_s: float) -> pb.OffloadReply:
        """One replica's OK reply to ``request``, trying another while its replica cannot answer and time is
        left; otherwise the ``OffloadError`` of the last try."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        tried: set[str] = set()
        error: Exception | None = None
        while (address := self._pick(request.HasField("input"), tried)) is not None:
            left = deadline - loop.time()
            if left <= 0:
                raise DeadlineExceeded(f"deadline exceeded after {timeout_s * 1000:.0f} ms ({error})")
            if tried:
                self.retried += 1
                request = _copy(request)  # the lost stream may still hold the first one
            tried.add(address)
            self.outstanding[address] += 1
            try:
                reply = await self.replicas[address].infer(request, left)
            except CloudUnavailable as e:
                error = e
                continue
            except CloudError as e:
                if e.code not in _TRY_ANOTHER:
                    raise
                error = e
                continue
            finally:
                self.outstanding[address] -= 1
            self.sent[address] += 1
            return reply
        if error is not None:
            raise error
        raise CloudUnavailable(f"cloud unavailable: no replica streams ({self.unavailable_reason()})")

    def _pick(self, needs_input: bool, tried: set[str]) -> str | None:
        ready = [a for a in self.streaming if a not in tried and (not needs_input or self.replicas[a].takes_input)]
        if not ready:
            return None
        if self.balance == "least_outstanding":
            fewest = min(self.outstanding[a] for a in ready)
            ready = [a for a in ready if self.outstanding[a] == fewest]
        # In turn: the first candidate after the replica chosen last, in the order they joined (an index into
        # the candidates alone would starve one whenever their number changes in step with the turns).
        order = list(self.replicas)
        last = order.index(self._last) if self._last in self.replicas else -1
        chosen = min(ready, key=lambda a: (order.index(a) - last - 1) % len(order))
        self._last = chosen
        return chosen

    def _join(self, address: str, server_name: str | None = None) -> None:
        settings = self.settings
        if server_name is not None and settings.credentials is not None and settings.server_name is None:
            settings = replace(settings, server_name=server_name)  # a resolved IP: check the name's certificate
        client = OffloadClient([address], self.fingerprint, self.split_blocks, settings)
        client.on_rtt = self._on_rtt
        self.replicas[address] = client
        client.start()

    async def _keep_resolving(self) -> None:
        """Resolve every name now and every ``resolve_interval_s``; a failed or empty answer keeps what was known."""
        names = [n for e in self.entries if (n := dns_name(e)) is not None]
        fixed = {e for e in self.entries if dns_name(e) is None}
        while True:
            found: dict[str, str] = {}
            for name in names:
                try:
                    addresses = await resolve(name)
                except OSError as e:
                    log.warning("cannot resolve replica pool name %s: %s; keeping %d replicas", name, e,
                                len(self.replicas))
                    found = {a: "" for a in self.replicas}
                    break
                found.update((a, name.rpartition(":")[0]) for a in addresses)
            for address, host in found.items():
                if address not in self.replicas:
                    log.info("replica %s joins the pool", address)
                    self._join(address, host or None)
            for address in [a for a in self.replicas if a not in found and a not in fixed]:
                log.info("replica %s left the pool (no longer resolved)", address)
                await self.replicas.pop(address).close()  # its requests in flight go to another replica
            await asyncio.sleep(self.resolve_interval_s)


def _copy(request: pb.OffloadRequest) -> pb.OffloadRequest:
    fresh = pb.OffloadRequest()
    fresh.CopyFrom(request)
    return fresh

