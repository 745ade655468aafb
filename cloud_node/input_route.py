"""The input route on the cloud: the edge sends the input itself and the cloud runs the whole model on it.

Over a fast link with a slow device, sending the picture beats computing anything on the edge. The request
comes on the same Offload stream as tokens, with the same fingerprint check, deadline and reply; its
``input`` is an ``InferRequest`` exactly as an application gives one to an edge, decoded by the edge's own
hardened decoder (``offramp.serving.inputs``), so a bad file gets the same precise error on either side.
"""
from __future__ import annotations

import grpc
import torch

from offramp.core.checkpoint import Card
from offramp.core.halves import WholeModel
from offramp.core.wire import pb
from offramp.serving.batcher import Batcher
from offramp.serving.errors import RequestError
from offramp.serving.inputs import InputError, request_inputs
from offramp.serving.offloop import call_by_size

from .handler import serve_request
from .metrics import CloudMetrics


class InputHandler:
    """Answers OffloadRequests carrying an ``input`` with the whole model (``whole``), run in batches."""

    def __init__(self, whole: WholeModel, card: Card, batcher: Batcher, metrics: CloudMetrics) -> None:
        self._whole = whole
        self._card = card
        self._batcher = batcher
        self._metrics = metrics
        audio = card.config.audio
        self._audio_shape = None if audio is None else tuple(audio.input_shape)

    async def answer(self, request: pb.OffloadRequest, stream_fingerprint: str = "") -> pb.OffloadReply:
        """The reply to one input: head output and timings, or the reason in ``status``; the request's
        fingerprint, where it names none, is its stream's."""
        async def prepare(size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            self._check(request, request.model_fingerprint or stream_fingerprint)
            self._batcher.check_room(1)  # a full queue refuses before any decoding
            x, audio = await call_by_size(size, self._decode, request.input)
            return x[None], None if audio is None else audio[None]

        return await serve_request(request, prepare, self._batcher, self._metrics)

    def _check(self, request: pb.OffloadRequest, fingerprint: str) -> None:
        if fingerprint != self._card.fingerprint:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model fingerprint {fingerprint[:12] or '(none)'} does not match the cloud's "
                f"{self._card.fingerprint[:12]}: edge and cloud must load the same checkpoint",
            )
        if request.HasField("tokens") or request.HasField("audio_tokens"):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               "a request carries either its input (the input route) or tokens, not both")

    def _decode(self, message: pb.InferRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        try:
            return request_inputs(message, self._card.modality, tuple(self._card.input_shape), self._audio_shape)
        except InputError as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"input: {e}") from None
