"""Several split blocks on one cloud: an ``OffloadHandler`` per split block, and a router in front of them.

Each split has its own tail and its own batcher: tokens after different blocks must never share a batch,
even where their shapes agree (a ViT's do). The router gives each request to the handler of its split
block, or to the input route's handler when it carries the input itself, refuses what it does not serve,
and describes it all, so an edge can check every pairing before it sends anything.
"""
from __future__ import annotations

from collections.abc import Mapping

import grpc

from offramp.core.wire import pb

from .handler import OffloadHandler
from .input_route import InputHandler


class SplitRouter:
    """The ``OffloadHandler`` interface (``answer``, ``refuse``, ``describe``) over one handler per split block."""

    def __init__(self, handlers: Mapping[int, OffloadHandler], primary: int,
                 inputs: InputHandler | None = None) -> None:
        self._handlers = dict(handlers)
        self._primary = self._handlers[primary]
        self._inputs = inputs
        self._description = pb.DescribeReply()
        self._description.CopyFrom(self._primary.describe())
        self._description.split_blocks.extend(sorted(self._handlers))
        self._description.takes_input = inputs is not None

    def describe(self) -> pb.DescribeReply:
        return self._description

    async def answer(self, request: pb.OffloadRequest, stream_fingerprint: str = "") -> pb.OffloadReply:
        if request.HasField("input"):
            if self._inputs is None:
                return self.refuse(request, grpc.StatusCode.FAILED_PRECONDITION,
                                   "this cloud does not take inputs (take_inputs is off): send tokens")
            return await self._inputs.answer(request, stream_fingerprint)
        handler = self._handlers.get(request.split_block)
        if handler is None:
            served = ", ".join(str(s) for s in sorted(self._handlers))
            return self.refuse(request, grpc.StatusCode.FAILED_PRECONDITION,
                               f"tokens are from split block {request.split_block}; this cloud resumes after "
                               f"blocks {served} only")
        return await handler.answer(request, stream_fingerprint)

    def refuse(self, request: pb.OffloadRequest, code: grpc.StatusCode, message: str) -> pb.OffloadReply:
        return self._primary.refuse(request, code, message)
