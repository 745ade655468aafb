"""Offload requests in, replies out: check, decode, batch on the model's tail, answer.

Everything the Offload service does, as plain async functions on protobuf
messages, so the servicer stays a thin adapter. A request that cannot be
served gets a reply carrying the reason in ``status``: one bad request must
not end a stream that carries many good ones.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable

import grpc
import torch

from offramp.core.checkpoint import Card
from offramp.core.codec import CodecError, DecodeLimits, decode, zstd_dictionary
from offramp.core.halves import CloudHalf
from offramp.core.wire import make_status, pb, status_code

from offramp.serving.batcher import Batched, Batcher
from offramp.serving.errors import RequestError
from offramp.serving.offloop import call_by_size

from .metrics import CloudMetrics

log = logging.getLogger(__name__)

VISUAL, AUDIOVISUAL = ("visual",), ("visual", "audio")  # what a tail consumes: `tokens`, and `audio_tokens`
_FLOAT32_BYTES = 4  # the widest wire dtype


class OffloadHandler:
    """Answers OffloadRequests with the model's tail (``half``) run in batches; describes what it serves."""

    def __init__(
        self,
        half: CloudHalf,
        card: Card,
        batcher: Batcher,
        metrics: CloudMetrics,
        max_batch: int,
        max_message_bytes: int,
    ) -> None:
        self._half = half
        self._code_dictionary = zstd_dictionary(half.code_dictionary)  # the bottleneck's, if it ships one
        self._fingerprint = card.fingerprint
        self._batcher = batcher
        self._metrics = metrics
        token_shape = tuple(half.spec.shape)  # (N, D) tokens or (C, H, W) map
        self._limits = DecodeLimits(
            max_payload_bytes=max_message_bytes,
            # The most a legitimate request can inflate to: a full batch of float32 tokens.
            max_raw_bytes=max_batch * math.prod(token_shape) * _FLOAT32_BYTES,
            expected_shape=(None, *token_shape),
        )
        self._code_limits = None if half.code_shape is None else DecodeLimits(
            max_payload_bytes=max_message_bytes,
            max_raw_bytes=max_batch * math.prod(half.code_shape),  # int8
            expected_shape=(None, *half.code_shape),
        )
        audio_shape = half.audio_shape  # (tokens, width) for audiovisual models
        self._modalities = VISUAL if audio_shape is None else AUDIOVISUAL
        self._audio_limits = None if audio_shape is None else DecodeLimits(
            max_payload_bytes=max_message_bytes,
            max_raw_bytes=max_batch * math.prod(audio_shape) * _FLOAT32_BYTES,
            expected_shape=(None, *audio_shape),
        )
        self._description = pb.DescribeReply(
            card_json=json.dumps(card.to_dict()),
            fingerprint=card.fingerprint,
            split_block=half.split_block,
            token_shape=token_shape,
            max_batch_size=max_batch,
            max_message_bytes=max_message_bytes,
            modalities=self._modalities,
        )

    def describe(self) -> pb.DescribeReply:
        return self._description

    async def answer(self, request: pb.OffloadRequest, stream_fingerprint: str = "") -> pb.OffloadReply:
        """The reply to one request: head output and timings, or the reason in ``status``; the request's
        fingerprint, where it names none, is its stream's."""
        async def prepare(size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            self._check(request, request.model_fingerprint or stream_fingerprint)
            declared = request.tokens.shape[0] if request.tokens.shape else 0
            if 0 < declared <= self._batcher.max_batch:  # a full queue refuses before any decoding
                self._batcher.check_room(declared)
            return await call_by_size(size, self._decode_request, request)

        return await serve_request(request, prepare, self._batcher, self._metrics)

    def refuse(self, request: pb.OffloadRequest, code: grpc.StatusCode, message: str) -> pb.OffloadReply:
        """The reply to a request the stream refuses before any work, counted like any other."""
        self._metrics.received_bytes.inc(request.ByteSize())
        self._metrics.requests_by(code.name).inc()
        return pb.OffloadReply(request_id=request.request_id, status=make_status(code, message))

    def _check(self, request: pb.OffloadRequest, fingerprint: str) -> None:
        if fingerprint != self._fingerprint:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model fingerprint {fingerprint[:12] or '(none)'} does not match the cloud's "
                f"{self._fingerprint[:12]}: edge and cloud must load the same checkpoint",
            )
        if request.split_block != self._half.split_block:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tokens are from split block {request.split_block}; the cloud resumes at {self._half.split_block}",
            )
        unknown = [m for m in request.modalities if m not in AUDIOVISUAL]
        if unknown:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"unknown modality {', '.join(map(repr, unknown))}; this cloud takes "
                               f"{' and '.join(self._modalities)}")
        if self._audio_limits is None:
            if request.HasField("audio_tokens") or "audio" in request.modalities:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   "this cloud's model is not audiovisual: send visual tokens only")
        elif not request.HasField("audio_tokens"):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               "this cloud's model fuses audio with the visual tokens: the request carries no "
                               "audio_tokens")
        if not request.HasField("tokens"):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the request carries no tokens")
        code_of = request.tokens.bottleneck
        if code_of and code_of != self._half.bottleneck_id:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the tokens are a code of bottleneck {code_of[:40]!r}; this cloud decodes "
                + (f"codes of {self._half.bottleneck_id!r} only" if self._half.bottleneck_id else "no codes"),
            )

    def _decode_request(self, request: pb.OffloadRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, *token_shape) tokens (fewer after top-k), and (B, audio tokens, width) for audiovisual models."""
        if request.tokens.bottleneck:  # checked against ours in `_check`
            try:
                code = decode(request.tokens, self._code_limits, self._code_dictionary)
                tokens = self._half.from_code(torch.from_numpy(code))
            except ValueError as e:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        else:
            tokens = torch.from_numpy(decode(request.tokens, self._limits))
        if self._audio_limits is None:
            return tokens, None
        try:
            audio = torch.from_numpy(decode(request.audio_tokens, self._audio_limits))
        except CodecError as e:
            raise CodecError(f"audio_tokens: {e}", e.code) from None
        if audio.shape[0] != tokens.shape[0]:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{tokens.shape[0]} samples of visual tokens but {audio.shape[0]} of audio tokens")
        return tokens, audio


async def serve_request(request: pb.OffloadRequest,
                        prepare: Callable[[int], Awaitable[tuple[torch.Tensor, torch.Tensor | None]]],
                        batcher: Batcher, metrics: CloudMetrics) -> pb.OffloadReply:
    """The one reply to an offload: ``prepare(size)`` checks and decodes it into a batch of inputs (a
    ``RequestError`` or ``CodecError`` is the sender's mistake and becomes the status), the batcher runs them
    within the request's deadline, and the reply carries the output, the timings and the status."""
    received = time.perf_counter()
    size = request.ByteSize()
    metrics.received_bytes.inc(size)
    reply = pb.OffloadReply(request_id=request.request_id, status=make_status())
    try:
        inputs, audio = await prepare(size)
        decoded = time.perf_counter()
        deadline = received + request.deadline_ms / 1e3 if request.deadline_ms else None
        result = await batcher.submit(inputs, audio, deadline=deadline)
    except (CodecError, RequestError) as e:
        reply.status.CopyFrom(make_status(e.code, str(e)))
    except Exception as e:  # a bug: fail this request, keep the stream
        log.exception("request %d failed", request.request_id)
        reply.status.CopyFrom(make_status(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}"))
    else:
        fill_reply(reply, result, decoded - received, metrics)
    return finish_reply(reply, received, metrics)


def finish_reply(reply: pb.OffloadReply, received: float, metrics: CloudMetrics) -> pb.OffloadReply:
    """``reply`` with its total time since ``received`` (perf_counter), counted by its status."""
    total_s = time.perf_counter() - received
    reply.timings.total_ms = total_s * 1e3
    metrics.stage("total").observe(total_s)
    metrics.requests_by(status_code(reply.status).name).inc()
    return reply


def fill_reply(reply: pb.OffloadReply, result: Batched[torch.Tensor], decode_s: float, metrics: CloudMetrics) -> None:
    """The head's output of one answered request and its timings, into ``reply`` and the metrics."""
    reply.output.extend(result.rows.reshape(-1).tolist())
    reply.output_shape.extend(result.rows.shape)
    reply.batch_size = result.batch_size
    reply.timings.decode_ms = decode_s * 1e3
    reply.timings.queue_ms = result.queue_s * 1e3
    reply.timings.compute_ms = result.compute_s * 1e3
    for stage, seconds in (("decode", decode_s), ("queue", result.queue_s), ("compute", result.compute_s)):
        metrics.stage(stage).observe(seconds)
