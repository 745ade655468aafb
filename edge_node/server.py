"""The edge daemon: ``serve(config)`` loads, binds and starts; ``stop()`` drains.

Start-up order: load the checkpoint and check the policy against it (a bad
one fails before anything listens), bind the gRPC port (port 0 picks a free
one, read back from ``EdgeServer.port``), bind the metrics port, start the
batcher and the offload client, start serving. Health reports SERVING
from then on, whether or not a cloud is reachable: without one the edge still
answers, degraded. ``stop()`` reverses it.

``run(config)`` is the blocking form for the command line: serve until
SIGTERM or SIGINT, then drain.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from wsgiref.simple_server import WSGIServer

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from offramp.core.checkpoint import Card, load_checkpoint, read_card
from offramp.serving.config import EdgeConfig, non_defaults
from offramp.serving.daemon import (DaemonServer, StartupLog, bind, grpc_server, listen_host, on_loopback,
                                    run_until_signalled, start_metrics)
from offramp.core.errors import OfframpError
from offramp.core.exit_rule import exits_up_to
from offramp.core.scores import default_score
from offramp.netem.device_costs import load_or_measure
from offramp.serving.security import ADMIN_METHODS, BearerTokenInterceptor, read_token
from offramp.serving.guard import MalformedLog, add_service
from offramp.serving.inputs import InputError, request_inputs
from offramp.serving.offloop import call_by_size
from offramp.serving.streams import unordered_map
from offramp.core.halves import EdgeHalf, EdgeWalk
from offramp.core.wire import EDGE_SERVICE, make_status, pb, pb_grpc, status_code

from .engine import EdgeEngine
from .offload import OffloadClient, OffloadSettings
from .pool import ReplicaPool, check_resolvable
from .policy import ExitPolicy, PolicyError, PolicySettings, default_settings

log = logging.getLogger(__name__)

__all__ = ["EdgeServer", "build_engine", "run", "serve"]


class EdgeServicer(pb_grpc.EdgeServicer):
    """Decode the request, hand it to the engine, send the reply back."""

    def __init__(self, engine: EdgeEngine) -> None:
        self.engine = engine
        self.card: Card = engine.card
        audio = self.card.config.audio
        self._audio_shape = None if audio is None else tuple(audio.input_shape)

    async def Infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferReply:
        reply = await self._answer(request)
        if reply.status.code != grpc.StatusCode.OK.value[0]:
            await context.abort(status_code(reply.status), reply.status.message)
        return reply

    async def InferStream(self, request_iterator: AsyncIterator[pb.InferRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.InferReply]:
        """Every request is answered as soon as it is done; a bad one gets an error reply, the stream goes on."""
        async for reply in unordered_map(request_iterator, self._answer):
            yield reply

    async def GetPolicy(self, request: pb.GetPolicyRequest, context: grpc.aio.ServicerContext) -> pb.Policy:
        return policy_reply(self.engine)

    async def SetPolicy(self, request: pb.Policy, context: grpc.aio.ServicerContext) -> pb.Policy:
        policy = self.engine.policy
        try:
            if request.adaptive:
                policy.unpin()
                log.info("policy handed back to the latency controller")
            else:
                settings = policy.set(PolicySettings.from_proto(request))
                log.info("policy %s: route %s, thresholds %s, score %s", "pinned" if policy.pinned else "changed",
                         settings.route, list(settings.thresholds), settings.score)
        except PolicyError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return policy_reply(self.engine)

    async def _answer(self, request: pb.InferRequest) -> pb.InferReply:
        """The one reply to ``request``; errors become its status rather than exceptions."""
        arrived = time.perf_counter()
        try:
            x, audio = await call_by_size(request.ByteSize(), request_inputs, request, self.card.modality,
                                          self.card.input_shape, self._audio_shape)
            preprocess_ms = (time.perf_counter() - arrived) * 1000
            reply = await self.engine.infer(x, request.request_id, since=arrived,
                                            stage_ms={"preprocess": preprocess_ms}, audio=audio, source=request)
        except InputError as e:
            reply = pb.InferReply(request_id=request.request_id,
                                  status=make_status(grpc.StatusCode.INVALID_ARGUMENT, str(e)))
        except Exception:  # a bug must not leave the caller without an answer
            log.exception("request %d failed", request.request_id)
            reply = pb.InferReply(request_id=request.request_id,
                                  status=make_status(grpc.StatusCode.INTERNAL, "internal error; see the edge's log"))
        if reply.status.code != grpc.StatusCode.OK.value[0]:
            self.engine.metrics.rejected_by(status_code(reply.status).name).inc()
        return reply


def policy_reply(engine: EdgeEngine) -> pb.Policy:
    """The policy in force, whether a controller chose it, and the measurements (and choice) behind it."""
    reply = engine.policy.get().to_proto()
    reply.adaptive = engine.policy.adaptive
    m, state = engine.measurements.snapshot(), reply.state
    for name, value in (("rtt_ms", m.rtt_ms), ("transfer_ms", m.transfer_ms),
                        ("uplink_bytes_per_s", m.uplink_bytes_per_s), ("offload_bytes", m.offload_bytes),
                        ("cloud_ms", m.cloud_ms), ("cloud_queue_ms", m.cloud_queue_ms),
                        ("cloud_compute_ms", m.cloud_compute_ms)):
        if value is not None:
            setattr(state, name, value)
    state.edge_queue_ms, state.request_rate = m.edge_queue_ms, m.request_rate
    several = len(engine.halves) > 1
    for split, stages in engine.stage_names().items():  # "slvit@2", or "2/slvit@2" where the edge has several splits
        state.compute_ms.update({f"{split}/{name}" if several else name: ms
                                 for name, ms in zip(stages, m.compute_ms[split]) if not math.isnan(ms)})
    adaptive = engine.adaptive
    if adaptive is not None:
        state.latency_slo_ms, state.slo_window_s = adaptive.slo_ms, adaptive.window_s
        decision = adaptive.decision
        if decision is not None:
            o = decision.option
            state.planned_tail = decision.tail
            state.predicted_p95_ms, state.target_met, state.reason = (decision.predicted_p95_ms,
                                                                      decision.target_met, decision.reason)
            state.expected_accuracy, state.expected_offload, state.split_block = o.accuracy, o.offload, o.split_block
            state.changes = decision.state.changes
            state.chosen_thresholds.extend(o.thresholds)
    return reply


def build_engine(config: EdgeConfig) -> EdgeEngine:
    """Model, policy, codec and offload client from the config; user mistakes become ``OfframpError``."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        half, others, card = edge_halves(config)
        splits = tuple(h.split_block for h in (half, *others))
        task = card.config.task
        score = config.score or default_score(task)
        route = config.route or ("split" if config.offload_enabled else "local")
        settings = (default_settings(half.num_exits, score, config.offload_enabled, route) if config.thresholds is None
                    else PolicySettings(config.thresholds, score, config.offload_enabled, route=route))
        policy = ExitPolicy(settings, half.num_exits, task, {h.split_block: h.num_exits for h in (half, *others)})
        offload = None
        if config.cloud:
            connection = OffloadSettings.from_config(config)
            if config.cloud_balance == "failover":
                offload = OffloadClient(list(config.cloud), card.fingerprint, splits, connection)
            else:
                check_resolvable(config.cloud)
                offload = ReplicaPool(config.cloud, card.fingerprint, splits, connection, config.cloud_balance,
                                      config.cloud_resolve_s)
        costs = None
        if config.device_costs is not None:
            audio = card.config.audio
            costs = load_or_measure(config.device_costs, (half, *others), card.fingerprint, card.input_shape, score,
                                    config.max_batch, config.codec.top_k is not None,
                                    None if audio is None else audio.input_shape)
        engine = EdgeEngine(half, card, policy, config.codec, config.deadline_ms, offload, config.max_batch,
                            config.slowdown, others, config.input_quality, costs)
    except PolicyError as e:
        raise OfframpError(f"edge policy: {e}") from None
    except ValueError as e:
        raise OfframpError(f"cannot serve '{config.checkpoint}': {e}") from None
    if config.controller.latency_slo_ms is not None:
        try:
            engine.adapt(config.controller, config.calibration, config.input_route, config.route)
        except ValueError as e:
            raise OfframpError(str(e)) from None
    return engine


def edge_halves(config: EdgeConfig) -> tuple[EdgeWalk, list[EdgeWalk], Card]:
    """The edge half the config asks for (to its split block), the halves to its further split blocks (a latency
    controller may choose them), and the card of its checkpoint."""
    if config.runtime == "onnxruntime":
        from offramp.core.onnx_edge import OnnxEdgeHalf

        card = read_card(config.checkpoint)  # the graphs hold the weights: only the card (and its fingerprint)
        half = OnnxEdgeHalf(config.onnx_dir, card, config.split_block, config.exits, config.threads)
        if set(config.split_blocks or (half.split_block,)) != {half.split_block}:
            raise ValueError(f"runtime onnxruntime runs the export's one split block ({half.split_block}): leave "
                             "split_blocks unset")
        return half, [], card
    model, card = load_checkpoint(config.checkpoint)
    split = card.split_block if config.split_block is None else config.split_block
    splits = config.split_blocks or (split,)
    if split not in splits:
        raise ValueError(f"split_blocks must include the edge's split block {split} (the checkpoint's, unless "
                         "split_block says otherwise)")
    half = EdgeHalf(model, split, config.device, config.dtype, config.exits)
    others = [EdgeHalf(model, s, config.device, config.dtype, exits_up_to(model.exit_configs, config.exits, s))
              for s in splits if s != split]
    return half, others, card


def admin_guard(config: EdgeConfig) -> list[BearerTokenInterceptor]:
    """The policy RPCs need the admin token when one is configured, and are closed beyond loopback without."""
    if config.admin_token_file is not None:
        return [BearerTokenInterceptor(read_token(config.admin_token_file), ADMIN_METHODS)]
    if on_loopback(config.listen):
        return []
    return [BearerTokenInterceptor(None, ADMIN_METHODS, closed_reason=(
        f"the edge listens on {config.listen}, beyond loopback: policy changes need the edge's admin_token_file"))]


class EdgeServer(DaemonServer):
    """A started edge daemon; ``await stop()`` (or leaving ``async with``) drains it."""

    def __init__(self, config: EdgeConfig, engine: EdgeEngine, server: grpc.aio.Server, port: int,
                 health_servicer: health.aio.HealthServicer, metrics_http: WSGIServer | None) -> None:
        super().__init__(config, server, port, health_servicer, metrics_http)
        self.engine = engine

    async def _after_grpc_stop(self) -> None:
        await self.engine.close()


async def serve(config: EdgeConfig) -> EdgeServer:
    """Load the checkpoint, bind, start; the returned server is answering (and SERVING)."""
    startup = StartupLog("edge")
    startup.step(f"loading checkpoint {config.checkpoint} and profiling its exits"
                 + (f" (device costs {config.device_costs}, measured there if absent)"
                    if config.device_costs else ""))
    engine = await asyncio.to_thread(build_engine, config)
    startup.step(f"binding {config.listen}")
    server = grpc_server(config.max_message_bytes, admin_guard(config))
    add_service(server, EdgeServicer(engine), "Edge", MalformedLog(engine.metrics.registry, "offramp_edge"),
                config.max_message_bytes)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = bind(server, config.listen)
    metrics_http = start_metrics(config.metrics_port, config.listen, engine.metrics.registry) if config.metrics_port is not None else None

    engine.start()
    await server.start()
    for service in ("", EDGE_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    edge = EdgeServer(config, engine, server, port, health_servicer, metrics_http)
    policy = engine.policy.get()
    log.info("offramp edge listening on %s (split block %d, exits %s, thresholds %s, score %s, clouds %s)",
             edge.address, engine.half.split_block, ",".join(engine.exit_names) or "none",
             list(policy.thresholds), policy.score, ",".join(config.cloud) or "none")
    if engine.adaptive is not None:
        log.info("latency target: p95 %g ms; the controller chooses among %d calibrated options",
                 engine.adaptive.slo_ms, len(engine.adaptive.options))
    if edge.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", listen_host(config.listen), edge.metrics_port)
    log.info("settings: %s", ", ".join(f"{k}={v!r}" for k, v in non_defaults(config).items()))
    return edge


def run(config: EdgeConfig, ready: Callable[[EdgeServer], None] | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then drain; ``ready`` is called once the server answers."""
    return run_until_signalled(lambda: serve(config), config.log_level, ready)
