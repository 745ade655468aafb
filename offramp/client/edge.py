"""A client of an edge's local API, for applications: send pictures or clips, get one answer each.

    from offramp.client import EdgeClient

    with EdgeClient("127.0.0.1:50061") as edge:
        for answer in edge.infer(["cat.png", "dog.jpg"]):
            print(answer.label, answer.decided_by, answer.latency_ms)

    async with AsyncEdgeClient("127.0.0.1:50061") as edge:   # the same, for asyncio applications
        answers = await edge.infer(["cat.png", "dog.jpg"])

Inputs are file paths, encoded bytes (JPEG, PNG, WAV) or preprocessed arrays
(C, H, W). Everything asked for in one call goes over one stream, so the edge
batches them; answers come back in the order asked, one per input, failures
included (``Answer.ok`` is False, ``Answer.error`` says why).
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Union

import grpc
import numpy as np

from offramp.core.errors import OfframpError
from offramp.core.wire import pb, pb_grpc, status_code

Input = Union[str, Path, bytes, np.ndarray]


@dataclass(frozen=True)
class Answer:
    """The edge's answer to one input."""

    prediction: int  # class index; -1 for regression
    label: str  # the class's name from the model card ("" for regression)
    value: float  # the predicted value (regression)
    confidence: float
    decided_by: str  # "exit:<name>" or "cloud"
    degraded: bool  # the cloud was wanted but late or unreachable; the best exit answered
    latency_ms: float  # inside the edge, from arrival to answer
    bytes_sent: int  # uplinked for this input (0: answered on the edge)
    error: str = ""  # empty when the request succeeded
    reply: pb.InferReply | None = None  # everything the edge said (stage timings, raw outputs)
    degraded_reason: str = ""  # why the cloud could not answer, when degraded
    route: str = ""  # how it was answered: split, input or local
    scores: tuple[float, ...] = ()  # the deciding head's outputs (logits; value and log-variance for regression)

    @property
    def ok(self) -> bool:
        return not self.error

    @classmethod
    def from_reply(cls, reply: pb.InferReply) -> Answer:
        error = f"{status_code(reply.status).name}: {reply.status.message}" if reply.status.code else ""
        return cls(reply.prediction, reply.label, reply.value, reply.confidence, reply.decided_by, reply.degraded,
                   reply.stage_ms.get("total", 0.0), reply.bytes_sent, error, reply, reply.degraded_reason,
                   reply.route, tuple(reply.output))


def request(request_id: int, item: Input, audio: Input | None = None) -> pb.InferRequest:
    """One input as the edge's API takes it."""
    message = pb.InferRequest(request_id=request_id)
    if isinstance(item, np.ndarray):
        array = np.ascontiguousarray(item, dtype=np.float32)
        message.tensor.CopyFrom(pb.RawTensor(shape=list(array.shape), data=array.tobytes()))
    else:
        message.encoded_file = _read(item)
    if audio is not None:
        message.audio = _read(audio)
    return message


def _read(item: Input) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, np.ndarray):
        raise OfframpError("audio goes as a WAV file or its bytes, not an array")
    try:
        return Path(item).read_bytes()
    except OSError as e:
        raise OfframpError(f"cannot read '{item}': {e.strerror}") from None


Options = Sequence[tuple[str, int | str]]


class EdgeClient:
    """A connection to one edge's local API; close it (or use ``with``) when done. ``options`` are gRPC
    channel options (message limits, keepalive)."""

    def __init__(self, address: str, *, timeout_s: float = 120.0,
                 credentials: grpc.ChannelCredentials | None = None, options: Options = ()) -> None:
        self.address, self.timeout_s = address, timeout_s
        self._channel = (grpc.insecure_channel(address, options=options) if credentials is None
                         else grpc.secure_channel(address, credentials, options=options))
        self._stub = pb_grpc.EdgeStub(self._channel)

    def infer(self, inputs: Iterable[Input], audio: Sequence[Input] | None = None) -> list[Answer]:
        """One answer per input, in order. A call that fails as a whole (no edge there, a deadline) raises
        ``OfframpError``; a single input's failure is its ``Answer.error``."""
        items, requests = _requests(inputs, audio)
        return _answers(len(items), self.stream(requests))

    def stream(self, requests: Iterable[pb.InferRequest]) -> Iterator[pb.InferReply]:
        """The raw stream: requests as built by ``request``, replies as they come (by request_id, any order)."""
        try:
            yield from self._stub.InferStream(iter(requests), timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise _error(self.address, e) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncEdgeClient:
    """``EdgeClient`` for asyncio applications: ``await infer(...)``, ``async for reply in stream(...)``."""

    def __init__(self, address: str, *, timeout_s: float = 120.0,
                 credentials: grpc.ChannelCredentials | None = None, options: Options = ()) -> None:
        self.address, self.timeout_s = address, timeout_s
        self._channel = (grpc.aio.insecure_channel(address, options=options) if credentials is None
                         else grpc.aio.secure_channel(address, credentials, options=options))
        self._stub = pb_grpc.EdgeStub(self._channel)

    async def infer(self, inputs: Iterable[Input], audio: Sequence[Input] | None = None) -> list[Answer]:
        """One answer per input, in order (as ``EdgeClient.infer``)."""
        items, requests = _requests(inputs, audio)
        replies = [r async for r in self.stream(requests)]
        return _answers(len(items), iter(replies))

    async def stream(self, requests: Iterable[pb.InferRequest]) -> AsyncIterator[pb.InferReply]:
        """The raw stream, replies as they come."""
        try:
            async for reply in self._stub.InferStream(iter(requests), timeout=self.timeout_s):
                yield reply
        except grpc.aio.AioRpcError as e:
            raise _error(self.address, e) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncEdgeClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


def _requests(inputs: Iterable[Input], audio: Sequence[Input] | None) -> tuple[list[Input], list[pb.InferRequest]]:
    items = list(inputs)
    if audio is not None and len(audio) != len(items):
        raise OfframpError(f"{len(audio)} audio clips for {len(items)} inputs: give one per input")
    return items, [request(i, item, None if audio is None else audio[i]) for i, item in enumerate(items)]


def _answers(count: int, replies: Iterator[pb.InferReply]) -> list[Answer]:
    by_id = {r.request_id: r for r in replies}
    return [Answer.from_reply(by_id[i]) if i in by_id else _missing(i) for i in range(count)]


def _error(address: str, e: grpc.RpcError) -> OfframpError:
    if e.code() is grpc.StatusCode.UNAVAILABLE:
        return OfframpError(f"cannot reach the edge at {address}: {e.details()}")
    return OfframpError(f"edge at {address}: {e.code().name}: {e.details()}")


def _missing(i: int) -> Answer:
    return Answer(-1, "", 0.0, 0.0, "", False, 0.0, 0, error=f"no answer to input {i}")
