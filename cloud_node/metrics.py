"""Prometheus metrics of one cloud server, in a registry of its own.

A registry per server (instead of the process-wide default) lets several
servers live in one process, as they do in the tests, without their counts
mixing or their names colliding.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from offramp.serving.process_metrics import add_process_metrics

from offramp.serving.labels import Children

# Stage latencies span sub-millisecond decodes to multi-second overloads.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class CloudMetrics:
    """Requests by outcome, bytes in, batch sizes, per-stage latency and queue depth."""

    def __init__(self, model: str = "", fingerprint: str = "") -> None:
        self.registry = CollectorRegistry()
        add_process_metrics(self.registry, "cloud", model, fingerprint)
        self.requests = Counter(
            "offramp_cloud_requests",
            "Requests answered (offramp.v1 offloads and OIP ModelInfer calls), by gRPC status code name.",
            ["code"], registry=self.registry,
        )
        self.received_bytes = Counter(
            "offramp_cloud_received_bytes",
            "Serialized size of the requests received (offramp.v1 offloads and OIP ModelInfer calls).",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "offramp_cloud_batch_size", "Samples per forward pass of the tail model.",
            buckets=_BATCH_BUCKETS, registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "offramp_cloud_stage_seconds", "Time per request in each cloud stage (decode, queue, compute, total).",
            ["stage"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.requests_by, self.stage = Children(self.requests), Children(self.stage_seconds)
        # The server binds this to its batcher's count (set_function), so it is never stale.
        self.queue_depth = Gauge("offramp_cloud_queue_depth", "Samples waiting for a batch.", registry=self.registry)
