"""The Offload gRPC service: a thin adapter from the wire to ``Tail``."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from offramp.wire import pb, pb_grpc

from .streams import StreamStopped, unordered_map
from .tail import Tail


class OffloadServicer(pb_grpc.OffloadServicer):
    """Many requests in flight per stream, answered as they finish; the stream ends on drain."""

    def __init__(self, tail: Tail, draining: asyncio.Event) -> None:
        self._tail = tail
        self._draining = draining

    async def Infer(
        self,
        request_iterator: AsyncIterator[pb.OffloadRequest],
        context: grpc.aio.ServicerContext[pb.OffloadRequest, pb.OffloadReply],
    ) -> AsyncIterator[pb.OffloadReply]:
        try:
            async for reply in unordered_map(request_iterator, self._tail.answer, self._draining):
                yield reply
        except StreamStopped:
            # Every request read so far has its answer; what the edge sends next must go elsewhere.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the cloud is shutting down; reconnect elsewhere")

    async def Describe(
        self,
        request: pb.DescribeRequest,
        context: grpc.aio.ServicerContext[pb.DescribeRequest, pb.DescribeReply],
    ) -> pb.DescribeReply:
        return self._tail.describe()
