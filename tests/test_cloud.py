"""Cloud daemon: real servers on port 0, real streams, and one real process drained by SIGTERM."""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from helpers import CloudFactory, wait_for
from prometheus_client.parser import text_string_to_metric_families

from cloud_node import server as cloud_server
from cloud_node.server import CloudServer
from offramp.core.checkpoint import Card, load_checkpoint
from offramp.cli import main
from offramp.core.codec import CodecConfig, decode, encode
from offramp.core.halves import CloudHalf, EdgeHalf
from offramp.core.wire import OFFLOAD_SERVICE, pb, pb_grpc, status_code

ROOT = Path(__file__).resolve().parent.parent
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FLOAT32 = CodecConfig(dtype="float32")  # lossless: cloud outputs must match the full model
STREAM_TIMEOUT = 30.0  # no stream here lives longer; a hang fails the test instead of blocking the run


@dataclass(frozen=True)
class Offloads:
    """What an edge sends for a few inputs, and what the uninterrupted model answers for them."""

    card: Card
    half: CloudHalf  # a local tail, to compute expected outputs of reduced (top-k) tokens
    tokens: torch.Tensor  # (8, N, D) at the split
    scores: torch.Tensor  # (8, N - num_prefix): class-token attention, ranks tokens for top-k
    num_prefix: int
    expected: torch.Tensor  # (8, num_classes): model.backbone(x)

    def request(
        self, request_id: int, sample: int = 0, count: int = 1, codec: CodecConfig = FLOAT32, deadline_ms: int = 0
    ) -> pb.OffloadRequest:
        rows = slice(sample, sample + count)
        return pb.OffloadRequest(
            request_id=request_id,
            model_fingerprint=self.card.fingerprint,
            split_block=self.card.split_block,
            tokens=encode(self.tokens[rows], codec, self.scores[rows], self.num_prefix),
            deadline_ms=deadline_ms,
        )


@pytest.fixture(scope="module")
def offloads(tiny_checkpoint: Path) -> Offloads:
    model, card = load_checkpoint(tiny_checkpoint)
    x = torch.randn(8, *card.input_shape, generator=torch.Generator().manual_seed(0))
    edge = EdgeHalf(model, card.split_block)
    # No exit is 200% sure: every sample goes on to the cloud.
    result = edge.run(x, thresholds=[2.0] * edge.num_exits, score="max_prob", with_scores=True)
    assert result.scores is not None and len(result.offload) == len(x)
    with torch.no_grad():
        expected = model.backbone(x)
    half = CloudHalf(model, card.split_block)
    return Offloads(card, half, result.tokens, result.scores, edge.spec.num_prefix, expected)


class Stream:
    """One Infer stream driven step by step from a plain test: send, receive, half-close."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._outbox: queue.Queue[pb.OffloadRequest | None] = queue.Queue()
        self._replies: Iterator[pb.OffloadReply] = pb_grpc.OffloadStub(channel).Infer(
            iter(self._outbox.get, None), timeout=STREAM_TIMEOUT
        )

    def send(self, *requests: pb.OffloadRequest) -> None:
        for request in requests:
            self._outbox.put(request)

    def receive(self, count: int) -> list[pb.OffloadReply]:
        return [next(self._replies) for _ in range(count)]

    def close(self) -> list[pb.OffloadReply]:
        """Half-close and collect every reply still to come."""
        self._outbox.put(None)
        return list(self._replies)

    def cancel(self) -> None:
        self._outbox.put(None)  # lets gRPC's request-reading thread finish
        self._replies.cancel()


@pytest.fixture
def open_stream() -> Iterator[Callable[[str], Stream]]:
    """``open_stream(address)``: a stream on a channel of its own, as each edge has; all closed after the test."""
    opened: list[tuple[grpc.Channel, Stream]] = []

    def open_(address: str) -> Stream:
        channel = grpc.insecure_channel(address)
        stream = Stream(channel)
        opened.append((channel, stream))
        return stream

    yield open_
    for channel, stream in opened:
        stream.cancel()
        channel.close()


class Gate:
    """Holds every tail forward pass until opened, so a test can fill the queue deterministically."""

    def __init__(self) -> None:
        self.calls = 0
        self.opened = threading.Event()


@pytest.fixture
def gate(start_cloud: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    """Gates CloudHalf.run for servers started after it (depends on start_cloud so it opens before they stop)."""
    gate = Gate()
    run = CloudHalf.run

    def gated_run(half: CloudHalf, tokens: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
        gate.calls += 1
        gate.opened.wait(STREAM_TIMEOUT)
        return run(half, tokens, audio)

    monkeypatch.setattr(CloudHalf, "run", gated_run)
    # Lone requests would run on the event loop's thread, and a held one would stop the loop
    # from queueing the rest: gated servers compute every batch in their worker thread.
    monkeypatch.setattr(cloud_server, "lone_on_loop", lambda device: False)
    monkeypatch.setattr(cloud_server, "_warm_up", lambda *args: None)  # the gate holds served batches only
    yield gate
    gate.opened.set()


def outputs(reply: pb.OffloadReply) -> np.ndarray:
    return np.asarray(reply.output, dtype=np.float32).reshape(tuple(reply.output_shape))


def by_id(replies: list[pb.OffloadReply]) -> dict[int, pb.OffloadReply]:
    assert len({r.request_id for r in replies}) == len(replies), "a request was answered twice"
    return {r.request_id: r for r in replies}


# --------------------------------------------------------------------------- answers


def test_every_request_is_answered_once_with_the_full_models_output(
    cloud: tuple[str, CloudServer], offloads: Offloads, open_stream: Callable[[str], Stream]
) -> None:
    address, _ = cloud
    ids = [1000 + 7 * i for i in range(24)]
    stream = open_stream(address)
    stream.send(*(offloads.request(rid, sample=i % 8) for i, rid in enumerate(ids)))
    replies = by_id(stream.close())
    assert sorted(replies) == ids
    for i, rid in enumerate(ids):
        reply = replies[rid]
        assert status_code(reply.status) == OK, reply.status.message
        np.testing.assert_allclose(outputs(reply), offloads.expected[i % 8 : i % 8 + 1], atol=1e-4)
        t = reply.timings
        assert t.decode_ms > 0 and t.compute_ms > 0 and t.total_ms >= t.queue_ms + t.compute_ms
        assert 1 <= reply.batch_size <= 8


def test_top_k_and_multi_sample_requests(
    cloud: tuple[str, CloudServer], offloads: Offloads, open_stream: Callable[[str], Stream]
) -> None:
    address, _ = cloud
    top_k = CodecConfig(dtype="float32", top_k=6)
    requests = [
        offloads.request(1, sample=0, codec=top_k),
        offloads.request(2, sample=1, codec=top_k),
        offloads.request(3, sample=2),  # all tokens: another shape, batched apart
        offloads.request(4, sample=3, count=3),  # three samples in one request
    ]
    stream = open_stream(address)
    stream.send(*requests)
    replies = by_id(stream.close())
    for request in requests:
        reply = replies[request.request_id]
        assert status_code(reply.status) == OK, reply.status.message
        sent = torch.from_numpy(decode(request.tokens))  # (B, num_prefix + k, D) or (B, N, D)
        np.testing.assert_allclose(outputs(reply), offloads.half.run(sent), atol=1e-4)
    assert list(replies[4].output_shape) == [3, offloads.expected.shape[1]]
    np.testing.assert_allclose(outputs(replies[4]), offloads.expected[3:6], atol=1e-4)


def test_requests_from_several_streams_share_a_batch(
    start_cloud: CloudFactory, gate: Gate, offloads: Offloads,
    open_stream: Callable[[str], Stream],
) -> None:
    address, server = start_cloud(max_batch=8)
    streams = [open_stream(address) for _ in range(3)]
    streams[0].send(offloads.request(0))
    wait_for(lambda: gate.calls == 1, 10, what="the first batch to reach the model")
    for s, stream in enumerate(streams):  # while it computes, two requests from every stream queue up
        stream.send(offloads.request(10 * s + 1, sample=s), offloads.request(10 * s + 2, sample=s + 3))
    wait_for(lambda: server.queue_depth == 6, 10, what="six queued samples")
    gate.opened.set()
    replies = by_id([reply for stream in streams for reply in stream.close()])
    assert sorted(replies) == [0, 1, 2, 11, 12, 21, 22]
    assert all(status_code(r.status) == OK for r in replies.values())
    assert replies[0].batch_size == 1
    assert {r.batch_size for rid, r in replies.items() if rid} == {6}
    assert gate.calls == 2


# --------------------------------------------------------------------------- refusals


BAD_REQUESTS: dict[str, tuple[grpc.StatusCode, Callable[[pb.OffloadRequest, torch.Tensor], None]]] = {
    "fingerprint mismatch": (PRECONDITION, lambda r, t: setattr(r, "model_fingerprint", "0" * 64)),
    "other split block": (PRECONDITION, lambda r, t: setattr(r, "split_block", r.split_block + 1)),
    "token shape": (INVALID, lambda r, t: r.tokens.CopyFrom(encode(t[:1, :5], FLOAT32))),
    "garbage payload": (INVALID, lambda r, t: setattr(r.tokens, "payload", b"\x28\xb5\x2f\xfd not zstd")),
    "no dtype": (INVALID, lambda r, t: setattr(r.tokens, "dtype", pb.EncodedTensor.DTYPE_UNSPECIFIED)),
    "no tokens": (INVALID, lambda r, t: r.ClearField("tokens")),
    "audio tokens": (INVALID, lambda r, t: r.audio_tokens.CopyFrom(r.tokens)),
    "declared raw size": (EXHAUSTED, lambda r, t: setattr(r.tokens, "raw_size", 1 << 40)),
    "more samples than max_batch": (EXHAUSTED, lambda r, t: r.tokens.CopyFrom(encode(t.repeat(2, 1, 1)[:9],
                                                                                      CodecConfig("int8")))),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_bad_request_gets_its_own_status_and_the_stream_goes_on(
    case: str, cloud: tuple[str, CloudServer], offloads: Offloads, open_stream: Callable[[str], Stream]
) -> None:
    code, spoil = BAD_REQUESTS[case]
    bad = offloads.request(1)
    spoil(bad, offloads.tokens)
    stream = open_stream(cloud[0])
    stream.send(bad, offloads.request(2))
    replies = by_id(stream.close())
    assert status_code(replies[1].status) == code and replies[1].status.message
    assert not replies[1].output
    assert status_code(replies[2].status) == OK


def test_a_message_over_the_channel_limit_ends_only_its_stream(
    cloud: tuple[str, CloudServer], offloads: Offloads, open_stream: Callable[[str], Stream]
) -> None:
    address, server = cloud
    bystander = open_stream(address)
    bystander.send(offloads.request(1))
    assert status_code(bystander.receive(1)[0].status) == OK
    oversize = offloads.request(2)
    oversize.tokens.payload = os.urandom(2 * server.config.max_message_bytes)
    victim = open_stream(address)
    victim.send(oversize)
    with pytest.raises(grpc.RpcError) as info:
        victim.receive(1)
    assert info.value.code() == EXHAUSTED
    bystander.send(offloads.request(3))
    assert status_code(bystander.receive(1)[0].status) == OK
    newcomer = open_stream(address)
    newcomer.send(offloads.request(4))
    assert status_code(newcomer.receive(1)[0].status) == OK


def test_a_full_queue_refuses_with_resource_exhausted(
    start_cloud: CloudFactory, gate: Gate, offloads: Offloads,
    open_stream: Callable[[str], Stream],
) -> None:
    address, server = start_cloud(max_batch=1, max_queue=2)
    stream = open_stream(address)
    stream.send(offloads.request(0))
    wait_for(lambda: gate.calls == 1, 10, what="the first batch to reach the model")
    stream.send(offloads.request(1), offloads.request(2))
    wait_for(lambda: server.queue_depth == 2, 10, what="a full queue")
    stream.send(offloads.request(3), offloads.request(4))
    refused = by_id(stream.receive(2))
    assert sorted(refused) == [3, 4]
    assert all(status_code(r.status) == EXHAUSTED and "queue is full" in r.status.message for r in refused.values())
    gate.opened.set()
    served = by_id(stream.close())
    assert sorted(served) == [0, 1, 2] and all(status_code(r.status) == OK for r in served.values())


def test_a_stream_may_not_reuse_an_id_in_flight_nor_exceed_its_share(
    start_cloud: CloudFactory, gate: Gate, offloads: Offloads, open_stream: Callable[[str], Stream],
) -> None:
    address, server = start_cloud(max_batch=1, max_in_flight_per_stream=2)
    greedy, other = open_stream(address), open_stream(address)
    greedy.send(offloads.request(0))
    wait_for(lambda: gate.calls == 1, 10, what="the first batch to reach the model")
    greedy.send(offloads.request(0), offloads.request(1), offloads.request(2))  # a reused id, then one too many
    refused = greedy.receive(2)
    assert [status_code(r.status) for r in refused] == [grpc.StatusCode.INVALID_ARGUMENT, EXHAUSTED]
    assert "request id 0 is already in flight" in refused[0].status.message
    assert refused[1].request_id == 2 and "2 requests in flight on this stream" in refused[1].status.message
    other.send(offloads.request(0))  # ids and shares are per stream
    gate.opened.set()
    assert sorted(by_id(greedy.close())) == [0, 1] and status_code(other.close()[0].status) == OK
    refused_count = server.metrics.registry.get_sample_value(
        "offramp_cloud_requests_total", {"code": "RESOURCE_EXHAUSTED"})
    assert refused_count == 1


def test_requests_past_their_deadline_are_not_computed(
    start_cloud: CloudFactory, offloads: Offloads, open_stream: Callable[[str], Stream]
) -> None:
    address, _ = start_cloud(max_wait_ms=300)  # a lone batch waits 300 ms for company: past a 20 ms deadline
    stream = open_stream(address)
    stream.send(offloads.request(1, deadline_ms=20), offloads.request(2, deadline_ms=60_000), offloads.request(3))
    replies = by_id(stream.close())
    assert status_code(replies[1].status) == grpc.StatusCode.DEADLINE_EXCEEDED and not replies[1].output
    assert status_code(replies[2].status) == OK and status_code(replies[3].status) == OK
    assert replies[2].batch_size == 2


# --------------------------------------------------------------------------- operations


def test_health_describe_and_reflection(cloud: tuple[str, CloudServer], offloads: Offloads) -> None:
    address, _ = cloud
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", OFFLOAD_SERVICE):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == SERVING
        described = pb_grpc.OffloadStub(channel).Describe(pb.DescribeRequest(), timeout=10)
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    card = offloads.card
    assert described.fingerprint == card.fingerprint and described.split_block == card.split_block
    assert Card.from_dict(json.loads(described.card_json)).fingerprint == card.fingerprint
    assert tuple(described.token_shape) == tuple(offloads.tokens.shape[1:])
    assert described.max_batch_size == 8 and described.max_message_bytes == 1 << 20
    assert list(described.modalities) == ["visual"]
    assert {OFFLOAD_SERVICE, "grpc.health.v1.Health"} <= set(services)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on a /metrics page, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_requests_bytes_batches_and_stages(
    start_cloud: CloudFactory, offloads: Offloads, open_stream: Callable[[str], Stream]
) -> None:
    address, server = start_cloud(metrics_port=0)
    requests = [offloads.request(i, sample=i) for i in range(3)]
    bad = offloads.request(3)
    bad.model_fingerprint = "elsewhere"
    stream = open_stream(address)
    stream.send(*requests, bad)
    assert len(stream.close()) == 4
    assert server.metrics_port
    m = scrape(server.metrics_port)
    assert m["offramp_cloud_requests_total", (("code", "OK"),)] == 3
    assert m["offramp_cloud_requests_total", (("code", "FAILED_PRECONDITION"),)] == 1
    assert m["offramp_cloud_received_bytes_total", ()] == sum(r.ByteSize() for r in [*requests, bad])
    assert m["offramp_cloud_batch_size_sum", ()] == 3
    for stage in ("decode", "queue", "compute"):
        assert m["offramp_cloud_stage_seconds_count", (("stage", stage),)] == 3
    assert m["offramp_cloud_stage_seconds_count", (("stage", "total"),)] == 4
    assert m["offramp_cloud_queue_depth", ()] == 0


def test_stop_answers_in_flight_requests_then_ends_streams(
    start_cloud: CloudFactory, offloads: Offloads, open_stream: Callable[[str], Stream]
) -> None:
    address, server = start_cloud(max_wait_ms=60_000, grace_s=10)  # only the drain closes this batch window
    stream = open_stream(address)
    with grpc.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=OFFLOAD_SERVICE), timeout=STREAM_TIMEOUT
        )
        assert next(watch).status == SERVING
        stream.send(offloads.request(1))
        wait_for(lambda: server.queue_depth == 1, 10, what="the request to be queued")
        started = time.monotonic()
        stopping = start_cloud.stop_soon(server)
        assert next(watch).status == NOT_SERVING
        watch.cancel()  # a health watcher would hold the drain open for the whole grace
    assert status_code(stream.receive(1)[0].status) == OK
    with pytest.raises(grpc.RpcError) as info:
        stream.receive(1)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    stopping.result(timeout=10)
    assert time.monotonic() - started < 5


def test_cli_reports_a_bad_setting_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cloud.toml"
    config.write_text('checkpoint = "model"\nmax_batch = "big"\n')
    assert main(["cloud", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(config) in err and "max_batch" in err


def test_the_daemon_drains_on_sigterm_and_exits_0(
    tiny_checkpoint: Path, offloads: Offloads, open_stream: Callable[[str], Stream], tmp_path: Path
) -> None:
    config = tmp_path / "cloud.toml"
    # A batch window no request outlives unless the drain closes it, so one stays in flight.
    config.write_text(f'checkpoint = "{tiny_checkpoint}"\nmax_wait_ms = 60000.0\nmetrics_port = 0\ngrace_s = 8.0\n')
    port_file, out, err = tmp_path / "port", tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "offramp.cli", "cloud", "--config", str(config), "--port-file", str(port_file)],
            cwd=ROOT, stdout=stdout, stderr=stderr,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
        )
    try:
        listening = wait_for(lambda: re.search(r"^offramp cloud listening on (\S+)$", out.read_text(), re.M),
                             60, process=process, what="the listening line")
        address = listening.group(1)
        assert address.endswith(f":{port_file.read_text().strip()}")
        metrics_port = int(wait_for(lambda: re.search(r"metrics on http://\S+:(\d+)/metrics", err.read_text()),
                                    10, process=process, what="the metrics address").group(1))
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            wait_for(lambda: _serving(health), 10, process=process, what="health SERVING")

        stream = open_stream(address)
        stream.send(offloads.request(1, sample=5))
        wait_for(lambda: scrape(metrics_port)["offramp_cloud_queue_depth", ()] == 1, 10, process=process,
                 what="the request to be queued")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        reply = stream.receive(1)[0]
        assert status_code(reply.status) == OK
        np.testing.assert_allclose(outputs(reply), offloads.expected[5:6], atol=1e-4)
        with pytest.raises(grpc.RpcError) as info:
            stream.receive(1)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert process.wait(timeout=8) == 0
        assert time.monotonic() - started < 8
        assert "SIGTERM received" in err.read_text() and "draining" in err.read_text()
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _serving(health: health_pb2_grpc.HealthStub) -> bool:
    try:
        return health.Check(health_pb2.HealthCheckRequest(service=OFFLOAD_SERVICE), timeout=1).status == SERVING
    except grpc.RpcError:
        return False
