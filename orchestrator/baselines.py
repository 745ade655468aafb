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

Both servers speak the Edge service's ``InferStream``, so one driver measures
the system and its baselines the same way.
"""
from __future__ import annotations

import io
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Literal

import grpc
import numpy as np
import torch
from PIL import Image

from offramp.checkpoint import load_checkpoint
from offramp.data.preprocess import preprocess_bytes
from offramp.errors import DataError
from offramp.netem import slowed
from offramp.scores import confidence
from offramp.wire import make_status, pb, pb_grpc

from .workload import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

Where = Literal["edge", "cloud"]
# What the baselines put in decided_by: the cloud-only answer is the cloud's, as in the system.
DECIDED_BY: dict[Where, str] = {"edge": "edge:full", "cloud": "cloud"}


def encode_images(inputs: np.ndarray, image_format: Literal["jpeg", "png"], quality: int) -> tuple[bytes, ...]:
    """Each (C, H, W) input in [-1, 1] as the image file a camera would send (the exact inverse of decoding)."""
    pixels = np.clip(np.rint((inputs + 1.0) * 127.5), 0, 255).astype(np.uint8)  # (N, C, H, W)
    files = []
    for sample in pixels:
        image = Image.fromarray(sample[0] if sample.shape[0] == 1 else sample.transpose(1, 2, 0))
        buffer = io.BytesIO()
        image.save(buffer, format=image_format.upper(), **({"quality": quality} if image_format == "jpeg" else {}))
        files.append(buffer.getvalue())
    return tuple(files)


@dataclass
class _Job:
    request_id: int
    x: torch.Tensor  # (C, H, W)
    arrived: float  # perf_counter when the request was read
    queued: float  # perf_counter when it was decoded and queued
    bytes_in: int
    respond: Callable[[pb.InferReply], None]


class FullModelServer:
    """A gRPC server answering every input with the whole model, batching what queues up.

    ``where`` says whose resources it stands for: ``"edge"`` (slowed, no
    bytes on the wire) or ``"cloud"`` (``bytes_sent`` is what crossed the link).
    """

    def __init__(self, checkpoint: str, where: Where, host: str = "127.0.0.1", slowdown: float = 1.0,
                 max_batch: int = 16, max_wait_ms: float = 0.0, device: str = "cpu") -> None:
        self.model, self.card = load_checkpoint(checkpoint)
        self.model.eval().to(device)
        self.where, self.host, self.device = where, host, torch.device(device)
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1e3
        self._forward = slowed(self._run_model, slowdown)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name=f"full-model-{where}", daemon=True)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ])
        pb_grpc.add_EdgeServicer_to_server(_Servicer(self), self._server)
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> str:
        """Bind a free port, start computing and serving; returns the address."""
        self.port = self._server.add_insecure_port(f"{self.host}:0")
        self._worker.start()
        self._server.start()
        log.info("full model (%s baseline) serving on %s", self.where, self.address)
        return self.address

    def stop(self, grace: float = 2.0) -> None:
        self._server.stop(grace).wait()
        self._jobs.put(None)
        self._worker.join(timeout=10)

    def submit(self, request: pb.InferRequest, respond: Callable[[pb.InferReply], None]) -> None:
        """Decode ``request`` (on the caller's thread, as the edge does) and queue it for the model."""
        arrived = time.perf_counter()
        try:
            x = self._decode(request)
        except DataError as e:
            respond(pb.InferReply(request_id=request.request_id,
                                  status=make_status(grpc.StatusCode.INVALID_ARGUMENT, str(e))))
            return
        self._jobs.put(_Job(request.request_id, x, arrived, time.perf_counter(), request.ByteSize(), respond))

    def _decode(self, request: pb.InferRequest) -> torch.Tensor:
        shape = tuple(self.card.input_shape)
        if request.WhichOneof("input") == "encoded_file":
            return preprocess_bytes(request.encoded_file, self.card.modality, shape)
        if tuple(request.tensor.shape) != shape or len(request.tensor.data) != 4 * int(np.prod(shape)):
            raise DataError(f"tensor of shape {list(request.tensor.shape)}, the model takes {list(shape)}")
        return torch.from_numpy(np.frombuffer(request.tensor.data, dtype=np.float32).reshape(shape).copy())

    @torch.no_grad()
    def _run_model(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.backbone(x.to(self.device)).float().cpu()  # (B, classes)

    def _batches(self) -> Iterator[list[_Job]]:
        """What has queued up, at most ``max_batch``, waiting ``max_wait_s`` after the first for company."""
        while (first := self._jobs.get()) is not None:
            batch, deadline = [first], time.perf_counter() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    job = self._jobs.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if job is None:
                    self._jobs.put(None)  # stop after this batch
                    break
                batch.append(job)
            yield batch

    def _work(self) -> None:
        for batch in self._batches():
            started = time.perf_counter()
            output = self._forward(torch.stack([job.x for job in batch]))
            compute_ms = (time.perf_counter() - started) * 1e3
            probs = confidence(output, "max_prob").tolist()
            for job, out, conf in zip(batch, output, probs):
                prediction = int(out.argmax())
                reply = pb.InferReply(
                    request_id=job.request_id, prediction=prediction, label=self.card.label_names[prediction],
                    confidence=conf, decided_by=DECIDED_BY[self.where], exit_index=-1, output=out.tolist(),
                    bytes_sent=job.bytes_in if self.where == "cloud" else 0, status=make_status(),
                )
                reply.stage_ms.update({
                    "preprocess": (job.queued - job.arrived) * 1e3, "queue": (started - job.queued) * 1e3,
                    "edge_compute" if self.where == "edge" else "cloud": compute_ms,
                    "total": (time.perf_counter() - job.arrived) * 1e3,
                })
                job.respond(reply)


class _Servicer(pb_grpc.EdgeServicer):
    """``InferStream`` only: read requests on one thread, yield answers as the model finishes them."""

    def __init__(self, server: FullModelServer) -> None:
        self.server = server

    def InferStream(self, request_iterator: Iterator[pb.InferRequest],
                    context: grpc.ServicerContext) -> Iterator[pb.InferReply]:
        replies: queue.Queue[pb.InferReply | int] = queue.Queue()  # an int: the reader is done, after that many

        def read() -> None:
            count = 0
            try:
                for request in request_iterator:
                    count += 1
                    self.server.submit(request, replies.put)
            finally:
                replies.put(count)

        threading.Thread(target=read, name="full-model-reader", daemon=True).start()
        expected, answered = None, 0
        while expected is None or answered < expected:
            item = replies.get()
            if isinstance(item, int):
                expected = item
            else:
                answered += 1
                yield item
