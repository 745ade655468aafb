"""Container health probe: a ``grpc.health.v1.Health/Check`` call, exit 0 when the answer is SERVING.

    python healthcheck.py [ADDRESS] [SERVICE]

ADDRESS is ``HOST:PORT`` or a bare port (on 127.0.0.1); without it the probe reads
``OFFRAMP_HEALTH_ADDR``, then ``PORT``, then uses 127.0.0.1:50051. SERVICE is the
health service name ("" = the whole server, which both daemons report). A daemon that
is draining after SIGTERM answers NOT_SERVING, so the probe fails as it should.
Exit status: 0 SERVING, 1 anything else (not serving, unreachable, timeout).
Pointed at an ``offramp link`` port, it checks the cloud *through* the link.

TLS daemons: ``OFFRAMP_HEALTH_TLS_CA`` (PEM bundle to trust) turns TLS on;
``OFFRAMP_HEALTH_TLS_CERT`` and ``OFFRAMP_HEALTH_TLS_KEY`` add a client
certificate (mutual TLS); ``OFFRAMP_HEALTH_TLS_SERVER_NAME`` is the name to
check the server's certificate against when it is not the address's host.
"""
from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def resolve_address(arg: str | None) -> str:
    text = arg or os.environ.get("OFFRAMP_HEALTH_ADDR") or os.environ.get("PORT") or "50051"
    return f"127.0.0.1:{text}" if text.isdigit() else text


def channel_for(address: str) -> grpc.Channel:
    """Plaintext, or TLS as the OFFRAMP_HEALTH_TLS_* variables say."""
    ca = os.environ.get("OFFRAMP_HEALTH_TLS_CA")
    if not ca:
        return grpc.insecure_channel(address)
    cert, key = os.environ.get("OFFRAMP_HEALTH_TLS_CERT"), os.environ.get("OFFRAMP_HEALTH_TLS_KEY")

    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    credentials = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
    name = os.environ.get("OFFRAMP_HEALTH_TLS_SERVER_NAME")
    return grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", name)] if name else [])


def check(address: str, service: str = "", timeout: float = 3.0) -> int:
    try:
        with channel_for(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as e:
        print(f"{address}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def main(argv: list[str]) -> int:
    address = resolve_address(argv[0] if argv else None)
    service = argv[1] if len(argv) > 1 else ""
    timeout = float(os.environ.get("OFFRAMP_HEALTH_TIMEOUT", "3"))
    return check(address, service, timeout)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
