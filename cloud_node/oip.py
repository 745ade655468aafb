"""The Open Inference Protocol (KServe v2, what Triton speaks) on the cloud's port, beside ``offramp.v1``.

Why: any OIP client (``tritonclient``, KServe's, a load balancer's probes)
can then run the model's tail without our stubs. Requests join the same
batcher as the Offload streams, so both share batches, the queue bound and
the deadlines.

The model is the checkpoint, named ``CloudConfig.served_model_name``, version
"1". ``TOKENS`` (``[-1, *token_shape]``) is FP32, FP16 or INT8; INT8 comes
with ``SCALE`` (FP32, ``[-1, N, 1]``), our codec's per-token symmetric scale:
value = int8 x scale. Audiovisual models also take ``AUDIO_TOKENS`` (and
``AUDIO_SCALE`` when INT8). The answer is ``OUTPUT``, FP32 ``[-1,
num_outputs]``. Tensors travel in ``raw_input_contents`` or typed
``contents``; every declared size is checked against the model before
anything is allocated. Only the six methods below are registered: gRPC
answers the rest of the service UNIMPLEMENTED.

The messages are our copy of the protocol's (``offramp.core.wire.oip``,
from proto/offramp/oip/v2/inference.proto), so no tritonclient is needed to
serve; the service goes by the protocol's own name (``offramp.core.wire.OIP_SERVICE``).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping

import grpc
import numpy as np
import torch

from offramp import __version__
from offramp.serving.batcher import Batched, Batcher
from offramp.serving.errors import RequestError
from offramp.serving.offloop import call_by_size
from offramp.core.halves import CloudHalf
from offramp.core.wire import oip

from .metrics import CloudMetrics

log = logging.getLogger(__name__)

VERSION = "1"  # one checkpoint, one version; "" in a request means this one
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
_DTYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "INT8": np.dtype("i1")}
_TYPED = {"FP32": "fp32_contents", "INT8": "int_contents"}  # the protocol has no typed FP16 field
_Tensor = oip.ModelInferRequest.InferInputTensor


class ServedModel:
    """The tail as OIP sees it: its name, its tensors, and the conversions to and from them."""

    def __init__(self, name: str, half: CloudHalf, max_batch: int) -> None:
        self.name = name
        self.max_batch = max_batch
        # input name -> (shape without the batch, name of its scale input)
        self._inputs = {"TOKENS": (tuple(half.spec.shape), "SCALE")}
        if half.audio_shape is not None:
            self._inputs["AUDIO_TOKENS"] = (tuple(half.audio_shape), "AUDIO_SCALE")
        self._num_outputs = half.num_outputs
        meta = oip.ModelMetadataResponse.TensorMetadata
        inputs = []
        for tensor, (shape, scale) in self._inputs.items():
            inputs += [meta(name=tensor, datatype="FP32", shape=[-1, *shape]),
                       meta(name=scale, datatype="FP32", shape=[-1, *_scale_shape(shape)])]
        self.metadata = oip.ModelMetadataResponse(
            name=name, versions=[VERSION], platform="pytorch", inputs=inputs,
            outputs=[meta(name="OUTPUT", datatype="FP32", shape=[-1, self._num_outputs])])

    def find(self, name: str, version: str) -> None:
        """NOT_FOUND unless the request names this model (and this version, or none)."""
        if name != self.name:
            raise RequestError(NOT_FOUND, f"no model named {name[:64]!r}; this server serves {self.name!r}")
        if version not in ("", VERSION):
            raise RequestError(NOT_FOUND, f"model {self.name!r} has no version {version[:16]!r}; it has {VERSION!r}")

    def inputs(self, request: oip.ModelInferRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tail's (B, *token_shape) tokens and, for audiovisual models, (B, *audio_shape) audio tokens."""
        tensors = self._named(request)
        arrays = [self._dequantised(tensors, name, shape, scale) for name, (shape, scale) in self._inputs.items()]
        if len(arrays) == 2 and len(arrays[0]) != len(arrays[1]):
            raise RequestError(INVALID, f"{len(arrays[0])} samples of TOKENS but {len(arrays[1])} of AUDIO_TOKENS")
        tokens, *audio = (torch.from_numpy(a) for a in arrays)
        return tokens, (audio[0] if audio else None)

    def response(self, request: oip.ModelInferRequest, result: Batched[torch.Tensor]) -> oip.ModelInferResponse:
        rows = result.rows.numpy().astype("<f4", copy=False)
        output = oip.ModelInferResponse.InferOutputTensor(name="OUTPUT", datatype="FP32", shape=rows.shape)
        param = oip.InferParameter
        return oip.ModelInferResponse(
            model_name=self.name, model_version=VERSION, id=request.id, outputs=[output],
            raw_output_contents=[rows.tobytes()],
            parameters={"batch_size": param(int64_param=result.batch_size),
                        "queue_ms": param(double_param=result.queue_s * 1e3),
                        "compute_ms": param(double_param=result.compute_s * 1e3)})

    def _named(self, request: oip.ModelInferRequest) -> dict[str, tuple[_Tensor, bytes | None]]:
        """Each input by name with its raw bytes (None: typed contents); unknown names and outputs refused."""
        known = [n for name, (_, scale) in self._inputs.items() for n in (name, scale)]
        raws = request.raw_input_contents
        if raws and len(raws) != len(request.inputs):
            raise RequestError(INVALID, f"{len(raws)} raw_input_contents for {len(request.inputs)} inputs: "
                                        "with raw contents, every input has one, in order")
        named: dict[str, tuple[_Tensor, bytes | None]] = {}
        for i, tensor in enumerate(request.inputs):
            if tensor.name not in known:
                raise RequestError(INVALID, f"unknown input {tensor.name[:64]!r}; the model takes {', '.join(known)}")
            if tensor.name in named:
                raise RequestError(INVALID, f"input {tensor.name} is given twice")
            if raws and tensor.HasField("contents"):
                raise RequestError(INVALID, f"input {tensor.name} has contents and raw_input_contents: send one")
            named[tensor.name] = tensor, (raws[i] if raws else None)
        for output in request.outputs:
            if output.name != "OUTPUT":
                raise RequestError(INVALID, f"unknown output {output.name[:64]!r}; the model has OUTPUT")
            if "classification" in output.parameters:
                raise RequestError(INVALID, "the classification extension is not supported: ask for OUTPUT itself")
        return named

    def _dequantised(self, tensors: Mapping[str, tuple[_Tensor, bytes | None]], name: str, shape: tuple[int, ...],
                     scale_name: str) -> np.ndarray:
        """Input ``name`` as float32, INT8 scaled by its ``scale_name`` input."""
        if name not in tensors:
            raise RequestError(INVALID, f"the request carries no {name} input")
        tensor, raw = tensors[name]
        if tensor.datatype not in _DTYPES:
            raise RequestError(INVALID, f"{name} has datatype {tensor.datatype[:16]!r}; the model takes FP32, FP16 "
                                        f"or INT8 (with {scale_name})")
        values = _array(tensor, raw, shape, self.max_batch)
        scale = tensors.get(scale_name)
        if tensor.datatype != "INT8":
            if scale is not None:
                raise RequestError(INVALID, f"{scale_name} goes with INT8 {name} only; {name} is {tensor.datatype}")
            out = values.astype(np.float32)
            if not np.isfinite(out).all():
                raise RequestError(INVALID, f"{name} contains NaN or infinite values")
            return out
        want = f"FP32 {_shown(_scale_shape(shape))}"
        if scale is None:
            raise RequestError(INVALID, f"{name} is INT8: send its per-token scale as {scale_name}, {want}")
        if scale[0].datatype != "FP32":
            raise RequestError(INVALID, f"{scale_name} has datatype {scale[0].datatype[:16]!r}; it must be {want}")
        scales = _array(scale[0], scale[1], _scale_shape(shape), self.max_batch)
        if len(scales) != len(values):
            raise RequestError(INVALID, f"{len(values)} samples of {name} but {len(scales)} of {scale_name}")
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise RequestError(INVALID, f"{scale_name} must be finite and not negative")
        return values.astype(np.float32) * scales


def _scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One scale per token (or channel), as the codec's int8: (N, 1) for (N, D) tokens."""
    return (shape[0], *[1] * (len(shape) - 1))


def _shown(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(["-1", *map(str, shape)]) + "]"


def _array(tensor: _Tensor, raw: bytes | None, shape: tuple[int, ...], max_batch: int) -> np.ndarray:
    """The values of ``tensor`` in its own datatype, after checking its declared shape and sizes."""
    dims = tuple(tensor.shape)
    if len(dims) != len(shape) + 1 or dims[1:] != shape:
        raise RequestError(INVALID, f"{tensor.name} has shape {list(dims[:8])}; the model takes {_shown(shape)}")
    batch = dims[0]
    if batch < 1:
        raise RequestError(INVALID, f"{tensor.name} has shape {list(dims)}: a batch needs at least one sample")
    if batch > max_batch:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"{batch} samples exceed the max batch of {max_batch}")
    count = batch * math.prod(shape)
    dtype = _DTYPES[tensor.datatype]
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise RequestError(INVALID, f"{tensor.name}: {len(raw)} bytes of raw_input_contents; shape {list(dims)} "
                                        f"in {tensor.datatype} needs {count * dtype.itemsize}")
        return np.frombuffer(raw, dtype).reshape(dims)
    field = _TYPED.get(tensor.datatype)
    if field is None:
        raise RequestError(INVALID, f"{tensor.name}: {tensor.datatype} travels in raw_input_contents only (the "
                                    "protocol has no typed contents for it)")
    typed = getattr(tensor.contents, field)
    if len(typed) != count:
        raise RequestError(INVALID, f"{tensor.name}: {len(typed)} values in contents.{field}; shape {list(dims)} "
                                    f"needs {count}")
    if tensor.datatype == "INT8":
        wide = np.fromiter(typed, np.int64, count)
        if count and (wide.min() < -128 or wide.max() > 127):
            raise RequestError(INVALID, f"{tensor.name}: INT8 values must lie in [-128, 127]")
        return wide.astype(np.int8).reshape(dims)
    return np.fromiter(typed, np.float32, count).reshape(dims)


class InferenceServicer:
    """Health, metadata and ModelInfer of one model; inference goes through the shared ``batcher``."""

    METHODS = ("ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelInfer")

    def __init__(self, model: ServedModel, batcher: Batcher, metrics: CloudMetrics, draining: asyncio.Event) -> None:
        self._model = model
        self._batcher = batcher
        self._metrics = metrics
        self._draining = draining

    async def ServerLive(self, request: oip.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request: oip.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=not self._draining.is_set())

    async def ServerMetadata(self, request: oip.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name="offramp", version=__version__)  # no Triton extensions

    async def ModelReady(self, request: oip.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> oip.ModelReadyResponse:
        # As Triton does: a model this server does not have is simply not ready.
        try:
            self._model.find(request.name, request.version)
        except RequestError:
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=not self._draining.is_set())

    async def ModelMetadata(self, request: oip.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> oip.ModelMetadataResponse:
        try:
            self._model.find(request.name, request.version)
        except RequestError as e:
            await context.abort(e.code, str(e))
        return self._model.metadata

    async def ModelInfer(self, request: oip.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> oip.ModelInferResponse:
        remaining = context.time_remaining()  # the caller's gRPC deadline, if it set one
        try:
            return await self.infer(request, remaining)
        except RequestError as e:
            await context.abort(e.code, str(e))
            raise  # abort raises; never reached

    async def infer(self, request: oip.ModelInferRequest, timeout_s: float | None) -> oip.ModelInferResponse:
        """One ModelInfer, over gRPC or REST: the response, or a ``RequestError`` with the status; counted in the
        metrics either way."""
        received = time.perf_counter()
        size = request.ByteSize()
        self._metrics.received_bytes.inc(size)
        code, message = grpc.StatusCode.OK, ""
        try:
            self._model.find(request.model_name, request.model_version)
            tokens, audio = await call_by_size(size, self._model.inputs, request)
            result = await self._batcher.submit(tokens, audio,
                                                deadline=None if timeout_s is None else received + timeout_s)
            reply = self._model.response(request, result)
        except RequestError as e:
            code, message = e.code, str(e)
        except Exception as e:  # a bug: fail this request, keep serving
            log.exception("ModelInfer failed")
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}"
        self._metrics.requests_by(code.name).inc()
        self._metrics.stage("total").observe(time.perf_counter() - received)
        if code != grpc.StatusCode.OK:
            raise RequestError(code, message)
        return reply

    @property
    def model(self) -> ServedModel:
        return self._model

    @property
    def draining(self) -> bool:
        return self._draining.is_set()
