"""The cloud daemon: ``serve(config)`` loads, binds and starts; ``stop()`` drains.

Start-up order: load the checkpoint (a bad one fails before anything
listens), bind the gRPC port (port 0 picks a free one, read back from
``CloudServer.port``), bind the metrics port, start. Health reports SERVING
from then on. ``stop()`` reverses it: health NOT_SERVING, streams stop
reading and end once their in-flight requests are answered, gRPC refuses new
calls and waits up to the grace period, then everything closes.

One port serves both APIs: ``offramp.v1.Offload`` for edges and the Open
Inference Protocol (``cloud_node.oip``) for any KServe v2 / Triton client;
they feed one batcher.

``run(config)`` is the blocking form for the command line: serve until
SIGTERM or SIGINT, then drain.
"""
from __future__ import annotations

import asyncio
import ssl
import logging
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from offramp.core.checkpoint import Card, load_checkpoint
from offramp.serving.config import CloudConfig, non_defaults
from offramp.serving.daemon import (DaemonServer, StartupLog, bind, grpc_server, listen_host, run_until_signalled,
                                    start_metrics)
from offramp.core.errors import OfframpError
from offramp.serving.security import PROTECTED_PREFIX, BearerTokenInterceptor, read_token, server_credentials
from offramp.serving.batcher import Batcher, lone_on_loop
from offramp.serving.guard import MalformedLog, add_service
from offramp.core.halves import CloudHalf, WholeModel
from offramp.core.wire import OFFLOAD_SERVICE, OIP_SERVICE, oip

from .handler import OffloadHandler
from .input_route import InputHandler
from .router import SplitRouter
from .metrics import CloudMetrics
from .oip import VERSION, InferenceServicer, ServedModel
from .oip_rest import RestServer
from .servicer import OffloadServicer

log = logging.getLogger(__name__)

__all__ = ["CloudServer", "run", "serve"]


class CloudServer(DaemonServer):
    """A started cloud daemon; ``await stop()`` (or leaving ``async with``) drains it."""

    def __init__(
        self,
        config: CloudConfig,
        card: Card,
        server: grpc.aio.Server,
        port: int,
        health_servicer: health.aio.HealthServicer,
        batchers: list[Batcher],
        metrics: CloudMetrics,
        metrics_http: WSGIServer | None,
        draining: asyncio.Event,
        rest: RestServer | None = None,
    ) -> None:
        super().__init__(config, server, port, health_servicer, metrics_http)
        self.card = card
        self.rest = rest  # the Open Inference Protocol over REST, if served
        self.metrics = metrics
        self._batchers = batchers  # one per split block served, and the input route's
        self._draining = draining

    @property
    def queue_depth(self) -> int:
        """Samples waiting for a batch right now."""
        return sum(b.depth() for b in self._batchers)

    async def _before_grpc_stop(self) -> None:
        self._draining.set()  # streams stop reading new requests
        for batcher in self._batchers:
            batcher.flush()  # the open batch window closes early

    async def _after_grpc_stop(self) -> None:
        if self.rest is not None:
            await self.rest.stop()
        for batcher in self._batchers:
            await batcher.close()

    @property
    def rest_port(self) -> int | None:
        return None if self.rest is None else self.rest.port


async def serve(config: CloudConfig, share_port: bool = False) -> CloudServer:
    """Load the checkpoint, bind, start; the returned server is answering (and SERVING). ``share_port``: one
    worker of several on the same port (``cloud_node.workers``)."""
    startup = StartupLog("cloud")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    startup.step(f"loading checkpoint {config.checkpoint}")
    model, card = await asyncio.to_thread(load_checkpoint, config.checkpoint)
    startup.step("building the tails and batchers")
    splits = config.split_blocks or (card.split_block,)
    primary = card.split_block if card.split_block in splits else splits[0]  # what older edges pair with
    try:
        halves = {s: CloudHalf(model, s, device=config.device, dtype=config.dtype) for s in splits}
    except ValueError as e:
        raise OfframpError(f"cannot run the model's tail: {e}") from None
    metrics = CloudMetrics(config.served_model_name, card.fingerprint)
    batchers = {s: Batcher(h.run, config.max_batch, max_queue=config.max_queue, max_wait_s=config.max_wait_ms / 1e3,
                           lone_on_loop=lone_on_loop(h.device), on_batch=metrics.batch_size.observe,
                           name=f"cloud-tail-{s}") for s, h in halves.items()}
    inputs = None
    if config.take_inputs:  # the input route: the whole model, batched on its own
        whole = WholeModel(model, device=config.device, dtype=config.dtype)
        whole_batcher = Batcher(whole.run, config.max_batch, max_queue=config.max_queue,
                                max_wait_s=config.max_wait_ms / 1e3, lone_on_loop=lone_on_loop(whole.device),
                                on_batch=metrics.batch_size.observe, name="cloud-whole")
        inputs = InputHandler(whole, card, whole_batcher, metrics)
    startup.step("warming up (one pass of each tail and of the whole model)")
    await asyncio.to_thread(_warm_up, halves.values(), whole if inputs is not None else None, card)
    half, batcher = halves[primary], batchers[primary]
    all_batchers = [*batchers.values(), *([whole_batcher] if inputs is not None else [])]
    metrics.queue_depth.set_function(lambda: sum(b.depth() for b in all_batchers))
    handler = SplitRouter({s: OffloadHandler(h, card, batchers[s], metrics, config.max_batch,
                                             config.max_message_bytes) for s, h in halves.items()}, primary, inputs)
    draining = asyncio.Event()

    credentials = (server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
                   if config.tls_cert is not None else None)
    protected = (PROTECTED_PREFIX, f"/{OIP_SERVICE}/")
    token = read_token(config.token_file) if config.token_file is not None else None
    interceptors = [BearerTokenInterceptor(token, protected)] if token is not None else []
    server = grpc_server(config.max_message_bytes, interceptors, share_port)
    malformed = MalformedLog(metrics.registry, "offramp_cloud")
    add_service(server, OffloadServicer(handler, draining, config.max_in_flight_per_stream), "Offload", malformed,
                config.max_message_bytes)
    # The Open Inference Protocol on the same port, feeding the same batcher.
    served = ServedModel(config.served_model_name, half, config.max_batch)
    inference = InferenceServicer(served, batcher, metrics, draining)
    add_service(server, inference, "GRPCInferenceService", malformed,
                config.max_message_bytes, messages=oip, methods=InferenceServicer.METHODS, full_name=OIP_SERVICE)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", OFFLOAD_SERVICE, OIP_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    if config.reflection:
        reflection.enable_server_reflection(
            # Not the OIP service: its messages are registered under our copy's proto package, so reflection
            # could not describe it by the protocol's name (its clients bring their own stubs anyway).
            [OFFLOAD_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    startup.step(f"binding {config.listen}")
    port = bind(server, config.listen, credentials)
    metrics_http = start_metrics(config.metrics_port, config.listen, metrics.registry) if config.metrics_port is not None else None

    rest = None
    if config.rest_port is not None:
        rest = RestServer(inference, config.max_message_bytes, token, rest_tls(config))
        await rest.start(listen_host(config.listen), config.rest_port, share_port)
    for b in all_batchers:
        b.start()
    await server.start()
    cloud = CloudServer(config, card, server, port, health_servicer, all_batchers, metrics, metrics_http, draining,
                        rest)
    security = ("mutual TLS" if config.tls_client_ca else "TLS" if credentials else "plaintext") + (
        " + bearer token" if interceptors else "")
    log.info("serving %s (split block%s %s%s, fingerprint %s) on %s (%s)", config.checkpoint,
             "s" if len(splits) > 1 else "", ",".join(map(str, splits)), " and inputs" if inputs else "",
             card.fingerprint[:12], cloud.address, security)
    log.info("Open Inference Protocol: model %r, version %s (%s%s)", served.name, VERSION, OIP_SERVICE,
             "" if rest is None else f"; REST on http://{listen_host(config.listen)}:{rest.port}/v2")
    if cloud.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", listen_host(config.listen), cloud.metrics_port)
    log.info("settings: %s", ", ".join(f"{k}={v!r}" for k, v in non_defaults(config).items()))
    return cloud


def rest_tls(config: CloudConfig) -> ssl.SSLContext | None:
    """HTTPS for the REST port with the gRPC port's certificate (and client CA: mutual TLS), if it has one."""
    if config.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(config.tls_client_ca)
    return context


def _warm_up(halves, whole: WholeModel | None, card: Card) -> None:
    """One sample through each tail and the whole model before serving, so that the first edge's first
    request does not pay for the kernels' and allocator's first use."""
    for h in halves:
        audio = None if h.audio_shape is None else torch.zeros(1, *h.audio_shape)
        h.run(torch.zeros(1, *h.spec.shape), audio)
    if whole is not None:
        audio = card.config.audio
        whole.run(torch.zeros(1, *card.input_shape), None if audio is None else torch.zeros(1, *audio.input_shape))


def run(config: CloudConfig, ready: Callable[[CloudServer], None] | None = None, share_port: bool = False) -> int:
    """Serve until SIGTERM or SIGINT, then drain; ``ready`` is called once the server answers."""
    return run_until_signalled(lambda: serve(config, share_port), config.log_level, ready)
