"""The load on one edge: which inputs, when they arrive, and one record per request.

Everything random is drawn from ``numpy`` generators seeded by ``(seed, edge)``
and nothing else, so every sweep point sees the same requests in the same
order at the same times: points are paired comparisons, and a rerun with the
same seed makes the same exit decisions.

Open loop (``poisson``): request *i* arrives at its scheduled time whether or
not earlier ones were answered, and its latency is counted from that time, so
queueing at an overloaded edge shows up in the numbers. Closed loop
(``closed``): ``concurrency`` requests are in flight, each answer releases the
next, and latency is counted from the send. The schedules and their pacing are
``orchestrator.pacing``'s, as for every load generator; this module adds what
an edge's API takes and what each answer records.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from offramp.client import EdgeClient
from offramp.core.errors import OfframpError
from offramp.core.wire import pb, pb_grpc, status_code

from .config import WorkloadConfig
from .pacing import due, poisson, stepped_poisson

if TYPE_CHECKING:
    from offramp.core.checkpoint import Card

log = logging.getLogger(__name__)

# gRPC message limit towards the edge: a batch of encoded images is well below it.
MAX_MESSAGE_BYTES = 64 << 20
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
Record = dict[str, Any]


@dataclass(frozen=True)
class Dataset:
    """The inputs the workload draws from, shipped once to every driver through Ray's object store."""

    inputs: np.ndarray  # (N, C, H, W) float32, as the model takes them
    labels: np.ndarray  # (N,) int64
    # Each input as the file a camera would send (JPEG/PNG), for the cloud-only
    # baseline; empty where the modality has no such file (the raw tensor is sent).
    encoded: tuple[bytes, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    def request(self, request_id: int, sample: int, encoded: bool) -> pb.InferRequest:
        """The request carrying input ``sample``: its file if ``encoded`` and there is one, else the tensor."""
        if encoded and self.encoded:
            return pb.InferRequest(request_id=request_id, encoded_file=self.encoded[sample])
        x = self.inputs[sample]
        return pb.InferRequest(request_id=request_id, tensor=pb.RawTensor(shape=list(x.shape), data=x.tobytes()))


def load_dataset(card: Card, data: str | None) -> Dataset:
    """The checkpoint's validation split (or all of ``data``), checked against the model's input shape."""
    from offramp.core.data.card_data import load_validation  # torch: only the head needs it, not the drivers

    if card.config.task != "classification":
        raise OfframpError("experiments score classification models; this checkpoint predicts numbers "
                           "(for the audiovisual crowd-counting model, see bench/multimodal.py)")
    val, input_shape = load_validation(card, data)
    if tuple(input_shape) != tuple(card.input_shape):
        raise OfframpError(f"workload.data '{data}' has inputs of shape {tuple(input_shape)}, "
                           f"the model expects {tuple(card.input_shape)}")
    if len(val) == 0:
        raise OfframpError("the workload has no inputs (the validation split is empty)")
    inputs, labels = val.tensors[0].numpy().astype(np.float32), val.tensors[1].numpy()
    if labels.dtype.kind == "f":
        raise OfframpError("experiments score classification models; this checkpoint predicts numbers")
    return Dataset(np.ascontiguousarray(inputs), labels.astype(np.int64))


@dataclass(frozen=True)
class EdgeLoad:
    """The requests one edge receives at every sweep point, fully determined by ``(seed, edge)``."""

    workload: WorkloadConfig
    seed: int
    edge: int
    num_inputs: int

    def arrivals(self) -> np.ndarray:
        """Open loop: arrival offsets in seconds, Poisson at ``rate``, cut at ``count`` and ``duration_s``."""
        w = self.workload
        return poisson(np.random.default_rng([self.seed, self.edge, 0]), w.rate, w.count, w.duration_s)

    def samples(self) -> Iterator[int]:
        """Input indices: a fresh seeded permutation of the dataset per pass, endlessly."""
        epoch = 0
        while True:
            yield from np.random.default_rng([self.seed, self.edge, 1, epoch]).permutation(self.num_inputs).tolist()
            epoch += 1

    @property
    def planned_s(self) -> float:
        """How long sending is meant to take; the call's deadline is this plus ``timeout_s``."""
        w = self.workload
        if w.arrival == "poisson":
            arrivals = self.arrivals()
            return float(arrivals[-1]) if len(arrivals) else 0.0
        return w.duration_s or 0.0


@dataclass
class _Sent:
    sample: int
    at: float  # perf_counter: the scheduled arrival (open loop) or the send (closed loop)


def warm_up(address: str, dataset: Dataset, count: int, encoded: bool, timeout_s: float) -> None:
    """Send ``count`` unrecorded requests, so the measured ones find models loaded and connections open."""
    if count == 0:
        return
    with EdgeClient(address, timeout_s=timeout_s, options=_CHANNEL_OPTIONS) as edge:
        requests = [dataset.request(i, i % len(dataset), encoded) for i in range(count)]
        try:
            replies = list(edge.stream(requests))
        except OfframpError as e:
            raise OfframpError(f"warm-up failed: {e}") from None
    failed = [r for r in replies if r.status.code]
    if failed:
        log.warning("%d of %d warm-up requests at %s failed, e.g. %s", len(failed), count, address,
                    failed[0].status.message)


def drive(address: str, dataset: Dataset, load: EdgeLoad, encoded: bool) -> list[Record]:
    """Push ``load`` through the edge API's ``InferStream`` at ``address``: one record per request sent.

    A request that never gets an answer (the stream broke, or timed out) still
    gets its record, with the stream's error as its status.
    """
    w = load.workload
    sent: dict[int, _Sent] = {}
    answers: dict[int, tuple[pb.InferReply, float]] = {}
    slots = threading.Semaphore(w.concurrency)
    finished = threading.Event()
    t0 = time.perf_counter()

    def open_loop() -> Iterator[pb.InferRequest]:
        for (i, at), sample in zip(due(load.arrivals(), t0, stop=finished), load.samples()):
            sent[i] = _Sent(sample, at)
            yield dataset.request(i, sample, encoded)

    def closed_loop() -> Iterator[pb.InferRequest]:
        end = t0 + (w.duration_s if w.duration_s is not None else math.inf)
        for i, sample in enumerate(load.samples()):
            if w.count is not None and i >= w.count:
                return
            while not slots.acquire(timeout=0.5):
                if finished.is_set():
                    return
            if (now := time.perf_counter()) >= end:
                return
            sent[i] = _Sent(sample, now)
            yield dataset.request(i, sample, encoded)

    error = ""
    with EdgeClient(address, timeout_s=load.planned_s + w.timeout_s, options=_CHANNEL_OPTIONS) as edge:
        requests = open_loop() if w.arrival == "poisson" else closed_loop()
        try:
            for reply in edge.stream(requests):
                received = time.perf_counter()
                if reply.request_id in answers:
                    log.error("edge %s answered request %d twice; keeping the first", address, reply.request_id)
                    continue
                answers[reply.request_id] = (reply, received)
                slots.release()
        except OfframpError as e:
            error = f"stream ended: {e}"
            log.warning("load on %s: %s", address, error)
        finally:
            finished.set()
    records = []
    for i, request in sorted(sent.items()):
        reply, received = answers.get(i, (None, math.nan))
        records.append(request_record(i, request.sample, int(dataset.labels[request.sample]), request.at - t0,
                                      reply, (received - request.at) * 1e3, error))
    return records


def request_record(request_id: int, sample: int, label: int, sent_s: float, reply: pb.InferReply | None,
                   latency_ms: float, stream_error: str) -> Record:
    """The per-request half of a record (the sweep adds the point's parameters and the node ids).

    ``reply`` None: no answer came, and ``stream_error`` says why.
    """
    record: Record = {"request_id": request_id, "sample": sample, "label": label, "sent_s": sent_s}
    if reply is None or reply.status.code:
        return record | {
            "status": "NO_REPLY" if reply is None else status_code(reply.status).name,
            "error": (stream_error or "no answer") if reply is None else reply.status.message,
            "prediction": -1, "predicted_label": "", "correct": False, "confidence": math.nan,
            "decided_by": "", "exit_index": -1, "offloaded": False, "degraded": False, "degraded_reason": "",
            "bytes_sent": 0, "latency_ms": math.nan, "route": "",
        }
    record |= {
        "status": "OK", "error": "",
        "prediction": reply.prediction, "predicted_label": reply.label, "correct": reply.prediction == label,
        "confidence": reply.confidence, "decided_by": reply.decided_by, "exit_index": reply.exit_index,
        # The policy sent it upstream: answered by the cloud, or by an exit after the cloud failed it.
        "offloaded": reply.decided_by == "cloud" or reply.degraded,
        "degraded": reply.degraded, "degraded_reason": reply.degraded_reason,
        "bytes_sent": reply.bytes_sent, "latency_ms": latency_ms,
        # How it was answered: split, input or local (an older edge says nothing: split, or local without bytes).
        "route": reply.route or ("split" if reply.bytes_sent else "local"),
    }
    record |= {f"stage_{name}_ms": value for name, value in sorted(reply.stage_ms.items())}
    return record


class PolicyPoller:
    """Asks the edge at ``address`` for its policy (``GetPolicy``) every ``every_s`` while the load runs.

    The records say who answered each request, not which thresholds or split were in force; these samples
    do, with what the controller expected of them and the measurements behind it. Times are seconds since
    the poller started, which is when the load's clock starts too (within a millisecond).
    """

    def __init__(self, address: str, every_s: float | None) -> None:
        self.address, self.every_s = address, every_s
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="policy-poller", daemon=True)

    def __enter__(self) -> PolicyPoller:
        if self.every_s:
            self._t0 = time.perf_counter()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        assert self.every_s
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.EdgeStub(channel)
            next_at = self._t0
            while not self._stop.is_set():
                t = time.perf_counter() - self._t0
                try:
                    self.samples.append(policy_sample(t, stub.GetPolicy(pb.GetPolicyRequest(), timeout=2.0)))
                except grpc.RpcError as e:
                    log.warning("GetPolicy at %s: %s", self.address, e.code().name)
                next_at += self.every_s
                self._stop.wait(max(0.0, next_at - time.perf_counter()))


def policy_sample(t_s: float, policy: pb.Policy) -> dict[str, Any]:
    """One poll: the thresholds and split in force, and the controller's expectations (NaN where unset)."""
    s = policy.state

    def opt(name: str) -> float:
        return getattr(s, name) if s.HasField(name) else math.nan

    split = policy.split_block if policy.HasField("split_block") else (s.split_block or -1)
    decided = bool(s.latency_slo_ms) and bool(s.reason)  # before its first decision the controller expects nothing
    return {"t_s": t_s, "thresholds": [float(t) for t in policy.thresholds], "offload_enabled": policy.offload_enabled,
            "adaptive": policy.adaptive, "split_block": int(split),
            "route": policy.route or ("split" if policy.offload_enabled else "local"),
            "expected_accuracy": s.expected_accuracy if decided else math.nan,
            "expected_offload": s.expected_offload if decided else math.nan,
            "predicted_p95_ms": s.predicted_p95_ms if decided else math.nan,
            "target_met": s.target_met, "changes": s.changes, "reason": s.reason,
            "rtt_ms": opt("rtt_ms"), "transfer_ms": opt("transfer_ms"), "cloud_ms": opt("cloud_ms"),
            "request_rate": s.request_rate}


def drive_cloud(address: str, steps: tuple[tuple[float, float], ...], duration_s: float, seed: int,
                timeout_s: float) -> list[Record]:
    """Send offloads straight to the cloud at ``address`` on the rate schedule ``steps``: the other edges.

    Each carries random int8 tokens of the shape the cloud expects at its split (the tail's compute does
    not depend on the values); a record per request (arrival, latency, status) tells what the load got.
    """
    from offramp.core.codec.tensor_codec import CodecConfig, encode

    arrivals = stepped_poisson(np.random.default_rng([seed, 2]), steps, duration_s)
    with grpc.insecure_channel(address, options=_CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.OffloadStub(channel)
        describe = stub.Describe(pb.DescribeRequest(), timeout=30)
        x = np.random.default_rng([seed, 3]).standard_normal((1, *describe.token_shape)).astype(np.float32)
        tokens = encode(x, CodecConfig(dtype="int8"))
        sent: dict[int, float] = {}
        answers: dict[int, tuple[float, str]] = {}
        finished = threading.Event()
        t0 = time.perf_counter()

        def requests() -> Iterator[pb.OffloadRequest]:
            for i, at in due(arrivals, t0, stop=finished):
                sent[i] = at
                yield pb.OffloadRequest(request_id=i, model_fingerprint=describe.fingerprint,
                                        split_block=describe.split_block, tokens=tokens)

        error = ""
        try:
            for reply in stub.Infer(requests(), timeout=duration_s + timeout_s):
                answers[reply.request_id] = (time.perf_counter(), status_code(reply.status).name)
        except grpc.RpcError as e:
            error = f"stream ended: {e.code().name}"
            log.warning("cloud load on %s: %s", address, error)
        finally:
            finished.set()
    return [{"request_id": i, "sent_s": at - t0,
             "latency_ms": (answers[i][0] - at) * 1e3 if i in answers else math.nan,
             "status": answers[i][1] if i in answers else (error or "NO_REPLY")} for i, at in sorted(sent.items())]
