"""The wire contract (``proto/offramp/v1/offramp.proto``) under short names.

Import messages and stubs from here, not from the generated package, so the
generated layout can change without touching callers::

    from offramp.core.wire import pb, pb_grpc

    request = pb.OffloadRequest(request_id=1, tokens=encoded)
    stub = pb_grpc.OffloadStub(channel)
"""
from __future__ import annotations

import grpc

from offramp.proto.offramp.oip.v2 import inference_pb2 as oip
from offramp.proto.offramp.v1 import offramp_pb2 as pb
from offramp.proto.offramp.v1 import offramp_pb2_grpc as pb_grpc

__all__ = ["OFFLOAD_SERVICE", "EDGE_SERVICE", "OIP_SERVICE", "make_status", "oip", "pb", "pb_grpc", "status_code"]

# The Open Inference Protocol's service, by the protocol's own name (our copy of its messages lives in another
# proto package; see proto/offramp/oip/v2/inference.proto).
OIP_SERVICE = "inference.GRPCInferenceService"

# Full service names, as the health service and reflection know them.
OFFLOAD_SERVICE: str = pb.DESCRIPTOR.services_by_name["Offload"].full_name
# Stream metadata naming the model the edge runs: said once per stream, so that requests need not carry it.
FINGERPRINT_METADATA = "offramp-model-fingerprint"
EDGE_SERVICE: str = pb.DESCRIPTOR.services_by_name["Edge"].full_name

_CODES_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def make_status(code: grpc.StatusCode = grpc.StatusCode.OK, message: str = "") -> pb.Status:
    """A per-request status: one failed request on a stream must not end the stream."""
    return pb.Status(code=code.value[0], message=message)


def status_code(status: pb.Status) -> grpc.StatusCode:
    """The gRPC code of a per-request status; unknown numbers read as UNKNOWN."""
    return _CODES_BY_VALUE.get(status.code, grpc.StatusCode.UNKNOWN)
