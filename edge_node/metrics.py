"""Prometheus metrics of one edge, on its own registry.

A registry per server (not the global default) lets several edges live in one
process, as tests and experiments run them, without their counts mixing.
What the edge measures of its link, its cloud and itself, and what its latency
controller chose, are read at scrape time from one snapshot (``_Measured``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from offramp.serving.process_metrics import add_process_metrics

from offramp.serving.labels import Children
from offramp.core.wire import pb

if TYPE_CHECKING:
    from .adaptive import Adaptive
    from .measure import Measured
    from .policy import ExitPolicy
    from .pool import ReplicaPool

# Seconds: from sub-millisecond exits on a fast device to multi-second offloads over a poor link.
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EdgeMetrics:
    """What an operator watches: who answers, how often the cloud fails us, bytes and time per stage."""

    def __init__(self, connected: Callable[[], float], model: str = "", fingerprint: str = "") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        add_process_metrics(r, "edge", model, fingerprint)
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
        self.slo_unmet_answers = Counter(
            "offramp_edge_slo_unmet_answers",
            "Answers given while no option met the latency target (the edge answers locally then)", registry=r)
        self._answers, self._degraded, self._stages = (Children(self.answers), Children(self.degraded),
                                                       Children(self.stage_seconds))
        self.rejected_by = Children(self.rejected)

    def watch_queue(self, depth: Callable[[], float]) -> None:
        """Report ``depth()`` as the queue depth whenever metrics are scraped."""
        self._queue_depth.set_function(depth)

    def watch_measurements(self, snapshot: Callable[[], Measured], stages: Mapping[int, Sequence[str]],
                           adaptive: Callable[[], Adaptive | None], policy: Callable[[], ExitPolicy]) -> None:
        """Export ``snapshot()`` and the controller's choice whenever metrics are scraped; ``stages``: per split,
        the names of its compute stages (its exits, then the split)."""
        self.registry.register(_Measured(snapshot, stages, adaptive, policy))

    def watch_pool(self, pool: ReplicaPool) -> None:
        """Export the pool's per-replica counts whenever metrics are scraped."""
        self.registry.register(_Pool(pool))

    def record(self, reply: pb.InferReply, degraded_kind: str | None) -> None:
        """Count one answer sent back to a caller."""
        self._answers(reply.decided_by).inc()
        if degraded_kind is not None:
            self._degraded(degraded_kind).inc()
        for stage, ms in reply.stage_ms.items():
            self._stages(stage).observe(ms / 1000)


class _Measured(Collector):
    """The measurements and the controller's state as gauges, from one snapshot per scrape; unmeasured
    quantities are left out rather than reported as 0."""

    def __init__(self, snapshot: Callable[[], Measured], stages: Mapping[int, Sequence[str]],
                 adaptive: Callable[[], Adaptive | None], policy: Callable[[], ExitPolicy]) -> None:
        self._snapshot, self._stages, self._adaptive, self._policy = snapshot, stages, adaptive, policy

    def describe(self) -> list[Metric]:
        return []  # collected only when scraped: the registry needs no names up front

    def collect(self) -> Iterator[Metric]:
        m = self._snapshot()
        seconds = [
            ("rtt", "Round trip of the link without payload: the quickest recent health probe", m.rtt_ms),
            ("transfer", "An offload's time on the link beyond the rtt (upload, jitter, waiting), 90th percentile",
             m.transfer_ms),
            ("cloud", "The cloud's own time per offload (decode, queue, compute), 90th percentile", m.cloud_ms),
            ("cloud_queue", "The cloud's queueing per offload, from its replies (median)", m.cloud_queue_ms),
            ("cloud_compute", "The cloud's compute per offload's batch, from its replies (median)",
             m.cloud_compute_ms),
            ("edge_queue", "Wait for a local batch, 90th percentile", m.edge_queue_ms),
        ]
        for name, text, ms in seconds:
            yield from _gauge(f"offramp_edge_measured_{name}_seconds", text, None if ms is None else ms / 1000)
        yield from _gauge("offramp_edge_measured_uplink_bytes_per_second",
                          "Effective uplink bandwidth: bytes per offload over its time on the link",
                          m.uplink_bytes_per_s)
        yield from _gauge("offramp_edge_measured_offload_bytes", "Bytes per offloaded sample (median)",
                          m.offload_bytes)
        yield from _gauge("offramp_edge_measured_requests_per_second", "Requests per second reaching the edge",
                          m.request_rate)
        compute = GaugeMetricFamily("offramp_edge_measured_compute_seconds",
                                    "Local batch time by its deepest stage (an exit, or the split with encoding)",
                                    labels=["split", "stage"])
        for split, names in self._stages.items():
            for name, ms in zip(names, m.compute_ms.get(split, ())):
                if not math.isnan(ms):
                    compute.add_metric([str(split), name], ms / 1000)
        yield compute
        adaptive = self._adaptive()
        if adaptive is None:
            return
        policy = self._policy()
        decision = adaptive.decision
        yield from _gauge("offramp_edge_slo_target_seconds", "The p95 latency target (latency_slo_ms)",
                          adaptive.slo_ms / 1000)
        yield from _gauge("offramp_edge_policy_pinned", "1 while `offramp policy set` pins the thresholds",
                          float(policy.pinned))
        changes = CounterMetricFamily("offramp_edge_controller_changes", "Times the controller changed its choice")
        changes.add_metric([], decision.state.changes if decision else 0)
        yield changes
        if decision is None:
            return
        o = decision.option
        yield from _gauge("offramp_edge_slo_predicted_p95_seconds", "The controller's p95 prediction for its choice",
                          decision.predicted_p95_ms / 1000)
        yield from _gauge("offramp_edge_slo_met", "1 while the controller's choice is predicted to meet the target; "
                          "0: no option does, the edge answers locally", float(decision.target_met))
        yield from _gauge("offramp_edge_controller_expected_accuracy_ratio",
                          "Expected accuracy of the controller's choice (calibration table)", o.accuracy)
        yield from _gauge("offramp_edge_controller_expected_offload_ratio",
                          "Expected offload share of the controller's choice (calibration table)", o.offload)
        yield from _gauge("offramp_edge_controller_split_block", "Split block of the controller's choice",
                          o.split_block)
        thresholds = GaugeMetricFamily("offramp_edge_controller_threshold", "Thresholds of the controller's choice",
                                       labels=["exit"])
        for name, t in zip(self._stages.get(o.split_block, ()), o.thresholds):
            thresholds.add_metric([name], t)
        yield thresholds


class _Pool(Collector):
    """A replica pool's view: requests each replica answered, requests sent again, replicas streaming."""

    def __init__(self, pool: ReplicaPool) -> None:
        self._pool = pool

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        pool = self._pool
        answered = CounterMetricFamily("offramp_edge_replica_offloads", "Offloads each cloud replica answered",
                                       labels=["replica"])
        outstanding = GaugeMetricFamily("offramp_edge_replica_outstanding_requests",
                                        "Offloads waiting for each replica's answer", labels=["replica"])
        streaming = set(pool.streaming)
        up = GaugeMetricFamily("offramp_edge_replica_up", "1 while a replica streams (paired and connected)",
                               labels=["replica"])
        for address in pool.replicas:
            answered.add_metric([address], pool.sent[address])
            outstanding.add_metric([address], pool.outstanding[address])
            up.add_metric([address], float(address in streaming))
        retried = CounterMetricFamily("offramp_edge_offload_retries",
                                      "Offloads sent again to another replica after theirs could not answer")
        retried.add_metric([], pool.retried)
        yield from (answered, outstanding, up, retried)


def _gauge(name: str, text: str, value: Any) -> Iterator[Metric]:
    if value is not None:
        yield GaugeMetricFamily(name, text, value=float(value))
