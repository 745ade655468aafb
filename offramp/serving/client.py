"""A client of an edge's local API, for applications: send pictures or clips, get one answer each.

    from offramp.serving.client import EdgeClient

    with EdgeClient("127.0.0.1:50061") as edge:
        for answer in edge.infer(["cat.png", "dog.jpg"]):
            print(answer.label, answer.decided_by, answer.latency_ms)

Inputs are file paths, encoded bytes (JPEG, PNG, WAV) or preprocessed arrays
(C, H, W). Everything asked for in one call goes over one stream, so the edge
batches them; answers come back in the order asked, one per input, failures
included (``Answer.ok`` is False, ``Answer.error`` says why).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
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

    @property
    def ok(self) -> bool:
        return not self.error

    @classmethod
    def from_reply(cls, reply: pb.InferReply) -> Answer:
        error = f"{status_code(reply.status).name}: {reply.status.message}" if reply.status.code else ""
        return cls(reply.prediction, reply.label, reply.value, reply.confidence, reply.decided_by, reply.degraded,
                   reply.stage_ms.get("total", 0.0), reply.bytes_sent, error, reply)


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


class EdgeClient:
    """A connection to one edge's local API; close it (or use ``with``) when done."""

    def __init__(self, address: str, *, timeout_s: float = 120.0,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address, self.timeout_s = address, timeout_s
        self._channel = (grpc.insecure_channel(address) if credentials is None
                         else grpc.secure_channel(address, credentials))
        self._stub = pb_grpc.EdgeStub(self._channel)

    def infer(self, inputs: Iterable[Input], audio: Sequence[Input] | None = None) -> list[Answer]:
        """One answer per input, in order. A call that fails as a whole (no edge there, a deadline) raises
        ``OfframpError``; a single input's failure is its ``Answer.error``."""
        items = list(inputs)
        if audio is not None and len(audio) != len(items):
            raise OfframpError(f"{len(audio)} audio clips for {len(items)} inputs: give one per input")
        replies = {r.request_id: r for r in self.stream(
            request(i, item, None if audio is None else audio[i]) for i, item in enumerate(items))}
        return [Answer.from_reply(replies[i]) if i in replies else _missing(i) for i in range(len(items))]

    def stream(self, requests: Iterable[pb.InferRequest]) -> Iterator[pb.InferReply]:
        """The raw stream: requests as built by ``request``, replies as they come (by request_id, any order)."""
        try:
            yield from self._stub.InferStream(iter(requests), timeout=self.timeout_s)
        except grpc.RpcError as e:
            if e.code() is grpc.StatusCode.UNAVAILABLE:
                raise OfframpError(f"cannot reach the edge at {self.address}: {e.details()}") from None
            raise OfframpError(f"edge at {self.address}: {e.code().name}: {e.details()}") from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _missing(i: int) -> Answer:
    return Answer(-1, "", 0.0, 0.0, "", False, 0.0, 0, error=f"no answer to input {i}")
