"""The latency target end to end: an edge offloading through a real link proxy to a real cloud cuts its
offloads when the link slows and takes them up again when it recovers; pinning and unpinning over the
policy RPC and CLI; refused start-ups (a target no exit can meet, tables of another checkpoint); a cloud
serving two split blocks, and an edge choosing between them."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from edge_node.controller import INPUT
import torch
from helpers import CloudFactory, LoopThread, edge_servers, wait_for
from test_faults import Traffic

from edge_node.server import EdgeServer, build_engine
from offramp.core.checkpoint import load_checkpoint, read_card
from offramp.cli import main
from offramp.core.codec import CodecConfig, encode
from offramp.serving.config import CalibrationPoint, CalibrationTable, EdgeConfig, replace_settings
from offramp.serving.config_text import settings_toml
from offramp.core.errors import OfframpError
from offramp.netem import PROFILES, LinkProxy, ProxyThread
from offramp.core.data.card_data import load_validation
from offramp.core.halves import EdgeHalf
from offramp.core.wire import pb, pb_grpc, status_code

# Wi-Fi's offloads fit it (about 60 ms predicted at worst, with the suite's other worker on the second core),
# 3G's do not (150 ms round trip before any bytes).
SLO_MS = 100.0
EDGE_SETTINGS: dict[str, Any] = {"reconnect_initial_s": 0.05, "reconnect_max_s": 0.3, "grace_s": 2.0}


def table(fingerprint: str) -> CalibrationTable:
    """Two options the tiny model's own numbers would not tell apart: everything answered by the exits, or
    everything offloaded for more accuracy."""
    return CalibrationTable(fingerprint, 4, "max_prob", ("slvit@2", "slvit@4"), 100, (
        CalibrationPoint((2.0, 0.0), 0.80, 0.0, (0.0, 1.0, 0.0)),  # max_prob 0: the second exit takes all
        CalibrationPoint((2.0, 2.0), 0.95, 1.0, (0.0, 0.0, 1.0))))


@pytest.fixture(scope="module")
def inputs(tiny_checkpoint: Path) -> torch.Tensor:
    return load_validation(read_card(tiny_checkpoint))[0].tensors[0][:32]


@pytest.fixture
def start_edge(tiny_checkpoint: Path, loop: LoopThread) -> Iterator[Callable[..., EdgeServer]]:
    fingerprint = read_card(tiny_checkpoint).fingerprint
    with edge_servers(loop, tiny_checkpoint, {**EDGE_SETTINGS, "latency_slo_ms": SLO_MS,
                                              "calibration": (table(fingerprint),)}) as start:
        yield start


def offload_share(replies: list[pb.InferReply]) -> float:
    return sum(r.decided_by == "cloud" for r in replies) / max(1, len(replies))


def get_policy(edge: EdgeServer, **set_fields: Any) -> pb.Policy:
    with grpc.insecure_channel(edge.address) as channel:
        stub = pb_grpc.EdgeStub(channel)
        if set_fields:
            stub.SetPolicy(pb.Policy(**set_fields), timeout=10)
        return stub.GetPolicy(pb.GetPolicyRequest(), timeout=10)


def test_offloads_drop_when_the_link_slows_and_return_when_it_recovers(
        cloud: tuple[str, Any], start_edge: Callable[..., EdgeServer], inputs: torch.Tensor) -> None:
    address, _ = cloud
    with ProxyThread(LinkProxy("127.0.0.1:0", address, PROFILES["wifi"])) as link:
        edge = start_edge(cloud=(link.address,))
        with Traffic(edge, inputs, period_s=0.03) as traffic:
            wait_for(lambda: edge.engine.adaptive.decision is not None, 10, what="the first decision")
            wait_for(traffic.answered_by_cloud_after(0, 20), 10, what="offloads over Wi-Fi")
            fast = get_policy(edge)
            assert fast.adaptive and fast.state.target_met and fast.state.expected_offload == 1.0
            assert fast.state.rtt_ms < 30 and fast.state.cloud_ms > 0 and fast.state.compute_ms["split"] > 0
            # Judged per one-second window of ~30 requests: fewer than 5 % of answers may be slow.
            assert fast.state.slo_window_s == 1.0 and 0 < fast.state.planned_tail < 0.05

            link.set_link(PROFILES["3g"])
            slowed = time.monotonic()
            wait_for(lambda: edge.engine.adaptive.decision.option.local_only, 5, what="the edge to keep answers")
            settled = time.monotonic()
            time.sleep(1.5)
            slow = get_policy(edge)
            link.set_link(PROFILES["wifi"])
            recovered = time.monotonic()
            wait_for(traffic.answered_by_cloud_after(recovered + 0.5, 10), 20, what="offloads once Wi-Fi is back")
    assert traffic.error is None, traffic.error
    replies = [r for _, r in traffic.replies]
    assert sorted(r.request_id for r in replies) == list(range(traffic.sent))
    assert all(r.status.code == 0 for r in replies)
    before = [r for at, r in traffic.replies if at < slowed]
    during = [r for at, r in traffic.replies if settled + 0.3 < at < recovered]
    assert offload_share(before[-20:]) == 1.0 and len(during) >= 30 and offload_share(during) == 0.0
    assert all(not r.degraded for r in during)  # answering locally is the controller's choice, not a failure
    assert slow.state.target_met and slow.state.rtt_ms > 100 and slow.state.expected_offload == 0.0
    assert edge.engine.adaptive.decision.state.changes >= 2


def test_set_pins_and_unpin_hands_back(start_edge: Callable[..., EdgeServer], tiny_checkpoint: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    edge = start_edge()  # no cloud: nothing measured of a link yet, the configured thresholds stand
    assert main(["policy", "get", "--edge", edge.address]) == 0
    out = capsys.readouterr().out
    assert f"mode:       adaptive, p95 target {SLO_MS:g} ms per 1 s window" in out and "waiting for the first measurement" in out
    pinned = get_policy(edge, thresholds=[0.5, 0.5], score="max_prob", offload_enabled=True)
    assert not pinned.adaptive and list(pinned.thresholds) == [0.5, 0.5]
    assert main(["policy", "unpin", "--edge", edge.address]) == 0
    assert "mode:       adaptive" in capsys.readouterr().out
    assert get_policy(edge).adaptive


def test_start_up_refuses_what_cannot_work(tiny_checkpoint: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    fingerprint = read_card(tiny_checkpoint).fingerprint
    good = replace_settings(EdgeConfig(checkpoint=str(tiny_checkpoint)), latency_slo_ms=SLO_MS,
                            calibration=(table(fingerprint),))
    for config, message in [
        (replace_settings(good, latency_slo_ms=0.001), "latency_slo_ms 0.001 is below what this edge needs "
                                                          "to answer at all: its fastest exit, slvit@"),
        (dataclasses.replace(good, calibration=(table("ab" * 32),)),
         "the calibration table of split block 4 was made for another checkpoint"),
        (dataclasses.replace(good, calibration=()), "latency_slo_ms needs a calibration table for split block 4"),
        (dataclasses.replace(good, exits=("slvit@4",)), "is for exits slvit@2,slvit@4 with score max_prob; this "
                                                         "edge runs slvit@4"),
    ]:
        with pytest.raises(OfframpError, match=message):
            build_engine(config)
    path = tmp_path / "edge.toml"  # the command line: one line, status 2
    path.write_text(settings_toml(replace_settings(good, latency_slo_ms=0.001)))
    assert main(["edge", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "below what this edge needs to answer at all" in err and len(err.splitlines()) == 1


# -- several split blocks ------------------------------------------------------------------------------------------

def test_a_cloud_serving_two_split_blocks_answers_both_and_refuses_a_third(
        start_cloud: CloudFactory, tiny_checkpoint: Path) -> None:
    model, card = load_checkpoint(tiny_checkpoint)
    x = torch.randn(2, *card.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.backbone(x)
    address, _ = start_cloud(split_blocks=(2, 4))
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.OffloadStub(channel)
        described = stub.Describe(pb.DescribeRequest(), timeout=10)
        assert list(described.split_blocks) == [2, 4] and described.split_block == card.split_block == 4
        requests = []
        for i, split in enumerate((2, 4, 3)):
            half = EdgeHalf(model, split if split != 3 else 2)
            tokens = half.run(x, [2.0] * half.num_exits, "max_prob").tokens  # nobody leaves: all go on
            requests.append(pb.OffloadRequest(request_id=i, model_fingerprint=card.fingerprint, split_block=split,
                                              tokens=encode(tokens, CodecConfig(dtype="float32"))))
        replies = {r.request_id: r for r in stub.Infer(iter(requests), timeout=30)}
    for i in (0, 1):  # after block 2 or after block 4: the uninterrupted model's answer either way
        assert replies[i].status.code == 0
        torch.testing.assert_close(torch.tensor(list(replies[i].output)).view(2, -1), expected, atol=1e-4, rtol=1e-4)
    refused = replies[2].status
    assert status_code(refused) is grpc.StatusCode.FAILED_PRECONDITION
    assert refused.message == "tokens are from split block 3; this cloud resumes after blocks 2, 4 only"


def test_an_edge_with_two_split_blocks_pairs_only_with_a_cloud_serving_both(
        start_cloud: CloudFactory, start_edge: Callable[..., EdgeServer], tiny_checkpoint: Path,
        inputs: torch.Tensor) -> None:
    fingerprint = read_card(tiny_checkpoint).fingerprint
    both = (table(fingerprint), CalibrationTable(fingerprint, 2, "max_prob", ("slvit@2",), 100, (
        CalibrationPoint((0.0,), 0.7, 0.0, (1.0, 0.0)), CalibrationPoint((2.0,), 0.96, 1.0, (0.0, 1.0)))))
    one, _ = start_cloud()
    edge = start_edge(cloud=(one,), split_blocks=(2, 4), calibration=both)
    wait_for(lambda: "not served: 2" in edge.engine.offload.unavailable_reason(), 10, what="the refusal")
    assert edge.engine.offload.connected_to is None

    two, _ = start_cloud(split_blocks=(2, 4))
    edge = start_edge(cloud=(two,), split_blocks=(2, 4), calibration=both)
    wait_for(lambda: edge.engine.offload.connected_to == two, 10, what="the edge to pair")
    with Traffic(edge, inputs, period_s=0.02) as traffic:
        # A fast, idle link: the most accurate option is everything offloaded after block 2.
        wait_for(lambda: sum(r.decided_by == "cloud" for r in traffic.after(0)) >= 10, 10, what="offloads")
        chosen = get_policy(edge)
        pinned = get_policy(edge, thresholds=[2.0, 2.0], score="max_prob", offload_enabled=True, split_block=4)
        pinned_at = time.monotonic()
        wait_for(lambda: sum(r.decided_by == "cloud" for r in traffic.after(pinned_at)) >= 5, 10,
                 what="offloads after block 4")
    assert chosen.adaptive and chosen.split_block == 2 and chosen.state.split_block == 2
    assert chosen.state.compute_ms["2/split"] > 0 and chosen.state.compute_ms["4/slvit@4"] > 0
    assert not pinned.adaptive and pinned.split_block == 4 and list(pinned.thresholds) == [2.0, 2.0]
    cloud_metrics = edge.engine.measurements.snapshot().cloud_by_split
    assert set(cloud_metrics) == {2, 4, INPUT}  # the input route's estimated from theirs
