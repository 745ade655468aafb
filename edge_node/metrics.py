"""Prometheus metrics of one edge, on its own registry.

A registry per server (not the global default) lets several edges live in one
process, as tests and experiments run them, without their counts mixing.
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from offramp.wire import pb

# Seconds: from sub-millisecond exits on a fast device to multi-second offloads over a poor link.
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EdgeMetrics:
    """What an operator watches: who answers, how often the cloud fails us, bytes and time per stage."""

    def __init__(self, connected: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.answers = Counter("offramp_edge_answers", "Answers, by where they were decided (exit:NAME or cloud)",
                               ["decided_by"], registry=r)
        self.degraded = Counter("offramp_edge_degraded_answers",
                                "Answers from the best exit because the cloud could not answer, by why",
                                ["kind"], registry=r)
        self.offloads = Counter("offramp_edge_offloads", "Samples sent to the cloud", registry=r)
        self.bytes_sent = Counter("offramp_edge_bytes_sent", "Encoded token bytes sent upstream", registry=r)
        self.bytes_saved = Counter("offramp_edge_bytes_saved",
                                   "Bytes the codec saved against sending the tokens as plain float32", registry=r)
        self.rejected = Counter("offramp_edge_rejected_requests", "Requests refused, by gRPC status code",
                                ["code"], registry=r)
        self.stage_seconds = Histogram("offramp_edge_stage_seconds", "Time per request spent in each stage",
                                       ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.batch_size = Histogram("offramp_edge_batch_size", "Samples per local batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        Gauge("offramp_edge_cloud_connected", "1 while a cloud stream is open", registry=r).set_function(connected)
        self._queue_depth = Gauge("offramp_edge_queue_depth", "Samples waiting for a local batch", registry=r)

    def watch_queue(self, depth: Callable[[], float]) -> None:
        """Report ``depth()`` as the queue depth whenever metrics are scraped."""
        self._queue_depth.set_function(depth)

    def record(self, reply: pb.InferReply, degraded_kind: str | None) -> None:
        """Count one answer sent back to a caller."""
        self.answers.labels(reply.decided_by).inc()
        if degraded_kind is not None:
            self.degraded.labels(degraded_kind).inc()
        for stage, ms in reply.stage_ms.items():
            self.stage_seconds.labels(stage).observe(ms / 1000)
