"""The whole model behind the edge API: the edge-only and cloud-only baselines.

The system is measured against what it replaces, under the same load, links
and seeds:

* **edge-only** — the device runs the whole model and never talks to a cloud.
  The edge daemon cannot do that (it answers from an exit or the cloud), so a
  :class:`FullModelServer` runs on the edge's node, slowed by the edge's
  ``slowdown`` exactly as the daemon's compute is, with the edge's batch size
  and thread count; the driver reaches it on loopback.
* **cloud-only** — the device sends its input as a camera would (a JPEG or PNG
  re-encoded from the pixels) and the cloud runs the whole model. A
  :class:`FullModelServer` runs on the cloud's node with the cloud's batch
  size and batching wait, and the driver reaches it through the same link
  proxy the edge would use, so the encoded file pays the link's delay and
  bandwidth for real. The encoding itself is not charged (cameras do it in
  hardware); ``bytes_sent`` is the request as it crossed the link.
* **fixed split** needs no server of its own: it is the real edge and cloud
  daemons with every threshold out of reach, so every sample is offloaded.

Both servers speak the Edge service's ``InferStream`` with the daemons' own
serving parts (input decoding, batcher, stream handling, replies), so one
driver measures the system and its baselines the same way.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Literal

import grpc
import torch
from offramp.core.checkpoint import load_checkpoint
from offramp.core.halves import ready_for_inference
from offramp.serving.daemon import grpc_server
from offramp.netem import slowed
from offramp.netem.device_costs import load_or_measure_whole
from offramp.core.scores import default_score
from offramp.serving.batcher import Batcher, lone_on_loop
from offramp.serving.errors import RequestError
from offramp.serving.inputs import InputError, request_inputs
from offramp.serving.offloop import call_by_size
from offramp.serving.replies import answer_reply
from offramp.serving.streams import unordered_map
from offramp.core.wire import make_status, pb, pb_grpc

from .workload import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

Where = Literal["edge", "cloud"]
# What the baselines put in decided_by: the cloud-only answer is the cloud's, as in the system.
DECIDED_BY: dict[Where, str] = {"edge": "edge:full", "cloud": "cloud"}


class FullModelServer:
    """A gRPC server answering every input with the whole model, batched like the daemons batch.

    ``where`` says whose resources it stands for: ``"edge"`` (slowed, no
    bytes on the wire) or ``"cloud"`` (``bytes_sent`` is what crossed the link).
    Runs its own event loop in a thread, so a Ray actor can start and stop it
    from plain methods.
    """

    def __init__(self, checkpoint: str, where: Where, host: str = "127.0.0.1", slowdown: float = 1.0,
                 max_batch: int = 16, max_wait_ms: float = 0.0, device: str = "cpu", onnx_dir: str | None = None,
                 device_costs: str | None = None) -> None:
        """``onnx_dir``: the whole model exported for onnxruntime (split after its last block), run in place of
        PyTorch (an edge-only baseline for edges that run onnxruntime); the head stays PyTorch's.
        ``device_costs``: with ``slowdown``, each batch is charged the whole model's time in that table (measured
        here and added if it has none), as the experiment's edges are charged theirs; else its CPU time here."""
        model, self.card = load_checkpoint(checkpoint)
        self.model = ready_for_inference(model, torch.device(device))
        self._onnx = None
        if onnx_dir is not None:
            from offramp.core.onnx_edge import OnnxEdgeHalf

            self._onnx = OnnxEdgeHalf(onnx_dir, self.card, model.backbone.num_blocks, exits=[],
                                      threads=torch.get_num_threads())
        self.where, self.host, self.device = where, host, torch.device(device)
        self.max_batch, self.max_wait_s, self.slowdown = max_batch, max_wait_ms / 1e3, slowdown
        audio = self.card.config.audio
        self._audio_shape = None if audio is None else tuple(audio.input_shape)
        cost = None
        if device_costs is not None and slowdown > 1.0:
            costs = load_or_measure_whole(device_costs, self._run_model, self.card.fingerprint, self.card.input_shape,
                                          max_batch, self._audio_shape)

            def cost(output: torch.Tensor) -> float:
                return costs.whole_s(output.shape[0])  # one row per sample
        self._forward = slowed(self._run_model, slowdown, cpu_clock=torch.get_num_threads() == 1, cost=cost)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"full-model-{where}", daemon=True)
        self._server: grpc.aio.Server | None = None
        self._batcher: Batcher[torch.Tensor] | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> str:
        """Bind a free port, start computing and serving; returns the address."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=60)
        log.info("full model (%s baseline) serving on %s", self.where, self.address)
        return self.address

    def stop(self, grace: float = 2.0) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(grace), self._loop).result(timeout=grace + 30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _start(self) -> None:
        self._batcher = Batcher(self._forward, self.max_batch, max_wait_s=self.max_wait_s,
                                lone_on_loop=lone_on_loop(self.device, sleeps=self.slowdown > 1.0), name="full-model")
        self._batcher.start()
        self._server = grpc_server(MAX_MESSAGE_BYTES)
        pb_grpc.add_EdgeServicer_to_server(_Servicer(self), self._server)
        self.port = self._server.add_insecure_port(f"{self.host}:0")
        await self._server.start()

    async def _stop(self, grace: float) -> None:
        if self._server is not None:
            await self._server.stop(grace)
        if self._batcher is not None:
            await self._batcher.close()

    async def answer(self, request: pb.InferRequest) -> pb.InferReply:
        """The one reply to ``request``, as the edge daemon would shape it."""
        arrived = time.perf_counter()
        try:
            x, audio = await call_by_size(request.ByteSize(), request_inputs, request, self.card.modality,
                                          tuple(self.card.input_shape), self._audio_shape)
            decoded = time.perf_counter()
            batched = await self._batcher.submit(x[None], None if audio is None else audio[None])
        except (InputError, RequestError) as e:
            code = e.code if isinstance(e, RequestError) else grpc.StatusCode.INVALID_ARGUMENT
            return pb.InferReply(request_id=request.request_id, status=make_status(code, str(e)))
        task = self.card.config.task
        reply = answer_reply(batched.rows[0], default_score(task), task, self.card.label_names,
                             DECIDED_BY[self.where], -1)
        reply.request_id = request.request_id
        reply.bytes_sent = request.ByteSize() if self.where == "cloud" else 0
        reply.route = "input" if self.where == "cloud" else "local"  # cloud-only sends the input itself
        reply.stage_ms.update({
            "preprocess": (decoded - arrived) * 1e3, "queue": batched.queue_s * 1e3,
            "edge_compute" if self.where == "edge" else "cloud": batched.compute_s * 1e3,
            "total": (time.perf_counter() - arrived) * 1e3,
        })
        return reply

    @torch.no_grad()
    def _run_model(self, x: torch.Tensor, audio: torch.Tensor | None) -> torch.Tensor:
        if self._onnx is not None:
            with torch.inference_mode():
                features = self._onnx.run(x, [], "max_prob").tokens
                return self.model.backbone.forward_head(features).float().cpu()
        return self.model.final(x.to(self.device), None if audio is None else audio.to(self.device)).float().cpu()


class _Servicer(pb_grpc.EdgeServicer):
    """``InferStream`` only: answers in the order they finish, as the edge daemon does."""

    def __init__(self, server: FullModelServer) -> None:
        self.server = server

    async def InferStream(self, request_iterator: AsyncIterator[pb.InferRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.InferReply]:
        async for reply in unordered_map(request_iterator, self.server.answer):
            yield reply
