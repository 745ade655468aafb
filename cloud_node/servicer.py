"""The Offload gRPC service: a thin adapter from the wire to ``OffloadHandler``."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from offramp.serving.streams import StreamStopped, unordered_map
from offramp.core.wire import FINGERPRINT_METADATA, pb, pb_grpc

from .handler import OffloadHandler
from .router import SplitRouter


class OffloadServicer(pb_grpc.OffloadServicer):
    """Many requests in flight per stream, answered as they finish; the stream ends on drain.

    Replies are matched to requests by id, so a stream may not reuse an id
    still in flight (INVALID_ARGUMENT), and one stream may not hold more than
    ``max_in_flight`` requests (RESOURCE_EXHAUSTED): one busy edge must not
    take the whole queue from the others.
    """

    def __init__(self, handler: OffloadHandler | SplitRouter, draining: asyncio.Event,
                 max_in_flight: int = 256) -> None:
        self._handler = handler
        self._draining = draining
        self._max_in_flight = max_in_flight

    async def Infer(
        self,
        request_iterator: AsyncIterator[pb.OffloadRequest],
        context: grpc.aio.ServicerContext[pb.OffloadRequest, pb.OffloadReply],
    ) -> AsyncIterator[pb.OffloadReply]:
        in_flight: set[int] = set()
        # Said once for the stream (its metadata); a request may still name its own.
        stream_fingerprint = next((str(v) for k, v in context.invocation_metadata() or ()
                                   if k == FINGERPRINT_METADATA), "")

        async def answer(request: pb.OffloadRequest) -> pb.OffloadReply:
            request_id = request.request_id
            if request_id in in_flight:
                return self._handler.refuse(request, grpc.StatusCode.INVALID_ARGUMENT,
                                         f"request id {request_id} is already in flight on this stream")
            if len(in_flight) >= self._max_in_flight:
                return self._handler.refuse(request, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                         f"{len(in_flight)} requests in flight on this stream, the limit per "
                                         "stream; wait for answers")
            in_flight.add(request_id)
            try:
                return await self._handler.answer(request, stream_fingerprint)
            finally:
                in_flight.discard(request_id)

        try:
            async for reply in unordered_map(request_iterator, answer, self._draining):
                yield reply
        except StreamStopped:
            # Every request read so far has its answer; what the edge sends next must go elsewhere.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the cloud is shutting down; reconnect elsewhere")

    async def Describe(
        self,
        request: pb.DescribeRequest,
        context: grpc.aio.ServicerContext[pb.DescribeRequest, pb.DescribeReply],
    ) -> pb.DescribeReply:
        return self._handler.describe()
