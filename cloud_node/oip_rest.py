"""The Open Inference Protocol over HTTP/REST (KServe v2), on a port of its own, feeding the same batches.

KServe's tooling and many load balancers speak REST first. The endpoints
are the protocol's: ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2``
(server metadata), ``/v2/models/NAME[/versions/V]`` (model metadata) and
``.../ready``, and ``POST .../infer``. A request's tensors come as JSON
``data`` or, with Triton's binary tensor extension (what ``tritonclient.http``
sends by default), as raw bytes after the JSON header
(``Inference-Header-Content-Length``); ``OUTPUT`` is returned the same way it
is asked for. Every request becomes the gRPC service's ``ModelInferRequest``
and runs through the same ``InferenceServicer.infer``: the same checks, the
same batcher, the same metrics. Errors are ``{"error": MESSAGE}`` with the
HTTP status of their gRPC code (a model of another name: 404).

Needs aiohttp (``pip install 'offramp[rest]'``); the cloud asks for it only
when ``rest_port`` is set.
"""
from __future__ import annotations

import json
import logging
import ssl
from typing import Any

import grpc
import numpy as np

from offramp.core.errors import OfframpError
from offramp.core.wire import oip
from offramp.serving.errors import RequestError

from .oip import InferenceServicer

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor extension
HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
               grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
               grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.UNAVAILABLE: 503,
               grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.INTERNAL: 500}
_NUMPY = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "INT8": np.dtype("i1"), "FP64": np.dtype("<f8"),
          "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8")}
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _require_aiohttp() -> Any:
    try:
        from aiohttp import web
    except ImportError:
        raise OfframpError("rest_port needs aiohttp: pip install 'offramp[rest]'") from None
    return web


def to_infer_request(name: str, version: str, body: bytes, header_length: int | None,
                     max_bytes: int) -> tuple[oip.ModelInferRequest, bool]:
    """The gRPC request a REST infer body stands for, and whether OUTPUT goes back as binary."""
    if len(body) > max_bytes:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request of {len(body)} bytes exceeds the "
                                                               f"{max_bytes}-byte limit")
    split = len(body) if header_length is None else header_length
    if not 0 <= split <= len(body):
        raise RequestError(INVALID, f"{HEADER_LENGTH} {split} is outside the body of {len(body)} bytes")
    try:
        doc = json.loads(body[:split])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(INVALID, f"the body is not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise RequestError(INVALID, "the body must be a JSON object with an 'inputs' list")
    request = oip.ModelInferRequest(model_name=name, model_version=version, id=str(doc.get("id", ""))[:128])
    binary, offset = body[split:], 0
    for i, item in enumerate(doc["inputs"]):
        if not isinstance(item, dict):
            raise RequestError(INVALID, f"inputs[{i}] must be an object")
        tensor_name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(tensor_name, str) or not isinstance(datatype, str) or not isinstance(shape, list) or \
                not all(isinstance(d, int) and d >= 0 for d in shape):
            raise RequestError(INVALID, f"inputs[{i}] needs a name, a datatype and a shape of non-negative ints")
        dtype = _NUMPY.get(datatype)
        if dtype is None:
            raise RequestError(INVALID, f"{tensor_name[:64]}: datatype {datatype[:16]!r} is not one of "
                                        f"{', '.join(_NUMPY)}")
        count = int(np.prod(shape)) if shape else 1
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise RequestError(INVALID, f"{tensor_name[:64]}: binary_data_size {size!r} runs past the body")
            raw, offset = binary[offset:offset + size], offset + size
        else:
            try:
                values = np.asarray(item.get("data"), dtype=dtype).reshape(-1)
            except (TypeError, ValueError) as e:
                raise RequestError(INVALID, f"{tensor_name[:64]}: data is not a list of {datatype}: {e}") from None
            if values.size != count:
                raise RequestError(INVALID, f"{tensor_name[:64]}: {values.size} values for shape {shape}")
            raw = values.tobytes()
        request.inputs.add(name=tensor_name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    if offset != len(binary):
        raise RequestError(INVALID, f"{len(binary) - offset} bytes after the inputs' binary data")
    binary_out = bool((doc.get("parameters") or {}).get("binary_data_output"))
    for out in doc.get("outputs") or []:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise RequestError(INVALID, "outputs[] must be objects with a name")
        request.outputs.add(name=out["name"])
        binary_out = binary_out or bool((out.get("parameters") or {}).get("binary_data"))
    return request, binary_out


def from_infer_response(reply: oip.ModelInferResponse, binary: bool) -> tuple[bytes, int | None]:
    """The REST body of a gRPC response, and its JSON header's length when OUTPUT follows as binary."""
    params = {k: (v.int64_param if v.WhichOneof("parameter_choice") == "int64_param" else v.double_param)
              for k, v in reply.parameters.items()}
    outputs, raw = [], b""
    for tensor, data in zip(reply.outputs, reply.raw_output_contents):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if binary:
            entry["parameters"] = {"binary_data_size": len(data)}
            raw += data
        else:
            entry["data"] = np.frombuffer(data, _NUMPY[tensor.datatype]).tolist()
        outputs.append(entry)
    header = json.dumps({"model_name": reply.model_name, "model_version": reply.model_version, "id": reply.id,
                         "parameters": params, "outputs": outputs}).encode()
    return header + raw, (len(header) if binary else None)


def metadata(reply: oip.ModelMetadataResponse) -> dict[str, Any]:
    def tensors(items: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {"name": reply.name, "versions": list(reply.versions), "platform": reply.platform,
            "inputs": tensors(reply.inputs), "outputs": tensors(reply.outputs)}


class RestServer:
    """The REST endpoints on ``host:port`` (0: a free port), on the cloud's event loop."""

    def __init__(self, servicer: InferenceServicer, max_bytes: int, token: str | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self._servicer, self._max_bytes, self._token, self._tls = servicer, max_bytes, token, tls
        self._runner: Any = None
        self._web: Any = None  # aiohttp.web, imported when the server starts
        self.port: int | None = None

    async def start(self, host: str, port: int, share_port: bool = False) -> int:
        """Serve on ``host:port``; ``share_port``: one worker of several on the port (SO_REUSEPORT)."""
        web = self._web = _require_aiohttp()
        app = web.Application(client_max_size=self._max_bytes + 1, middlewares=[self._guard])
        model = r"/v2/models/{name}"
        version = r"/v2/models/{name}/versions/{version}"
        app.add_routes([
            web.get("/v2/health/live", self._live), web.get("/v2/health/ready", self._ready),
            web.get("/v2", self._server_metadata),
            web.get(model, self._model_metadata), web.get(version, self._model_metadata),
            web.get(model + "/ready", self._model_ready), web.get(version + "/ready", self._model_ready),
            web.post(model + "/infer", self._infer), web.post(version + "/infer", self._infer),
        ])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self._tls, reuse_port=share_port or None)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise OfframpError(f"cannot serve REST on {host}:{port}: {e.strerror}") from None
        self.port = site._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _error(self, code: grpc.StatusCode, message: str) -> Any:
        web = self._web
        return web.json_response({"error": message}, status=HTTP_STATUS.get(code, 500))

    @property
    def _guard(self) -> Any:
        web = self._web

        @web.middleware
        async def guard(request: Any, handler: Any) -> Any:
            """The bearer token (health stays open, as over gRPC); any failure is one JSON error."""
            if self._token is not None and not request.path.startswith("/v2/health/") and \
                    request.headers.get("Authorization") != f"Bearer {self._token}":
                return self._error(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
            try:
                return await handler(request)
            except RequestError as e:
                return self._error(e.code, str(e))
            except web.HTTPException as e:  # 404 for unknown paths, 405, 413 (too large)
                return web.json_response({"error": e.reason}, status=e.status)
        return guard

    async def _live(self, request: Any) -> Any:
        web = self._web
        return web.json_response({"live": True})

    async def _ready(self, request: Any) -> Any:
        web = self._web
        ready = not self._servicer.draining
        return web.json_response({"ready": ready}, status=200 if ready else 400)

    async def _server_metadata(self, request: Any) -> Any:
        from offramp import __version__

        web = self._web
        return web.json_response({"name": "offramp", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def _model_metadata(self, request: Any) -> Any:
        web = self._web
        self._servicer.model.find(request.match_info["name"], request.match_info.get("version", ""))
        return web.json_response(metadata(self._servicer.model.metadata))

    async def _model_ready(self, request: Any) -> Any:
        web = self._web
        self._servicer.model.find(request.match_info["name"], request.match_info.get("version", ""))
        ready = not self._servicer.draining
        return web.json_response({"name": request.match_info["name"], "ready": ready}, status=200 if ready else 400)

    async def _infer(self, request: Any) -> Any:
        web = self._web
        header = request.headers.get(HEADER_LENGTH)
        try:
            header_length = None if header is None else int(header)
        except ValueError:
            raise RequestError(INVALID, f"{HEADER_LENGTH} must be an integer") from None
        body = await request.read()
        infer, binary = to_infer_request(request.match_info["name"], request.match_info.get("version", ""), body,
                                         header_length, self._max_bytes)
        reply = await self._servicer.infer(infer, None)
        payload, length = from_infer_response(reply, binary)
        headers = {"Content-Type": "application/octet-stream" if length is not None else "application/json"}
        if length is not None:
            headers[HEADER_LENGTH] = str(length)
        return web.Response(body=payload, headers=headers)


__all__ = ["RestServer", "from_infer_response", "to_infer_request"]
