"""TLS, mutual TLS and bearer tokens on the edge-cloud link.

Plaintext stays the default (loopback demos, tests); a deployment across
machines turns on TLS with a certificate and key on the cloud and the CA on
the edge, optionally mutual TLS (the cloud checks edge certificates against
a CA) and a bearer token. Secrets are read from files, never taken from the
command line, where any local user could read them in the process list.
"""
from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from offramp.core.errors import OfframpError

# Services a token guards; health checks and reflection stay open for orchestrators and tools.
PROTECTED_PREFIX = "/offramp.v1.Offload/"
# The edge's admin methods: whoever may call them decides what the edge answers alone.
ADMIN_METHODS = ("/offramp.v1.Edge/GetPolicy", "/offramp.v1.Edge/SetPolicy")


def read_secret(path: str | Path, what: str) -> bytes:
    """The bytes of a PEM or token file, or an ``OfframpError`` naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise OfframpError(f"cannot read {what} '{path}': {e.strerror}") from None
    if not data.strip():
        raise OfframpError(f"{what} '{path}' is empty")
    return data


def read_token(path: str | Path) -> str:
    """A bearer token file: one line, surrounding whitespace ignored."""
    token = read_secret(path, "token file").decode("utf-8", errors="replace").strip()
    if any(c.isspace() for c in token) or not token.isprintable():
        raise OfframpError(f"token file '{path}' must hold one token: printable, without spaces")
    return token


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    """TLS for a server; with ``client_ca``, clients must present a certificate it signed."""
    pair = (read_secret(key, "TLS key"), read_secret(cert, "TLS certificate"))
    root = read_secret(client_ca, "client CA bundle") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)


def channel_credentials(ca: str, cert: str | None = None, key: str | None = None) -> grpc.ChannelCredentials:
    """TLS for a client that trusts ``ca``; ``cert``/``key`` present a client certificate (mutual TLS)."""
    return grpc.ssl_channel_credentials(
        root_certificates=read_secret(ca, "CA bundle"),
        private_key=read_secret(key, "TLS key") if key else None,
        certificate_chain=read_secret(cert, "TLS certificate") if cert else None,
    )


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return () if token is None else (("authorization", f"Bearer {token}"),)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to the ``protected`` methods (path prefixes) without the right ``authorization: Bearer``.

    With no token at all, the protected methods are closed to everyone and
    answer UNAUTHENTICATED with ``closed_reason``.
    """

    def __init__(self, token: str | None, protected: tuple[str, ...] = (PROTECTED_PREFIX,),
                 closed_reason: str = "") -> None:
        self._expected = None if token is None else f"Bearer {token}".encode()
        self._protected = protected
        self._closed_reason = closed_reason

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._protected):
            return handler
        if self._expected is None:
            return _refusal(handler, self._closed_reason)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            return handler
        reason = "missing bearer token" if not given else "wrong bearer token"
        return _refusal(handler, reason)


def _refusal(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED."""
    async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)
