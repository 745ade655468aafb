"""``offramp cloud --workers N``: N processes on one port, connections spread over them, a dead worker
restarted, every worker drained by one SIGTERM; and the settings' errors."""
from __future__ import annotations

import os
import signal
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import free_ports, wait_for
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from cloud_node.workers import worker_config
from offramp.core.checkpoint import load_checkpoint
from offramp.core.halves import CloudHalf
from offramp.serving.config import CloudConfig
from offramp.serving.daemon_proc import DaemonProcess

MODEL = "tiny"


def answered(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith('offramp_cloud_requests_total{code="OK"}'))


def infer_once(address: str, shape: tuple[int, ...]) -> None:
    """One ModelInfer on a connection of its own (a local subchannel pool: channels do not share one)."""
    tokens = np.zeros((1, *shape), np.float32)
    request = oip.ModelInferRequest(model_name=MODEL, inputs=[oip.ModelInferRequest.InferInputTensor(
        name="TOKENS", datatype="FP32", shape=list(tokens.shape))], raw_input_contents=[tokens.tobytes()])
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        reply = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert reply.outputs[0].shape[0] == 1


def children(pid: int) -> list[int]:
    """The worker processes of supervisor ``pid`` (not multiprocessing's resource tracker)."""
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if b"spawn_main" in command:
            found.append(int(child))
    return found


def test_workers_share_the_port_restart_and_drain(tiny_checkpoint: Path) -> None:
    model, card = load_checkpoint(tiny_checkpoint)
    shape = CloudHalf(model, card.split_block).spec.shape
    metrics = free_ports(2)
    with DaemonProcess("cloud", ["--checkpoint", str(tiny_checkpoint), "--workers", "2", "--model-name", MODEL,
                                 "--metrics-port", str(metrics)], startup_timeout=120) as cloud:
        for _ in range(24):
            infer_once(cloud.address, shape)
        counts = [answered(metrics), answered(metrics + 1)]
        assert sum(counts) == 24 and min(counts) >= 1, counts  # the kernel spread the connections

        workers = children(cloud.proc.pid)
        assert len(workers) == 2
        dead = workers[0]
        os.kill(dead, signal.SIGKILL)
        wait_for(lambda: dead not in children(cloud.proc.pid) and len(children(cloud.proc.pid)) >= 2, 30,
                 what="the supervisor to restart the killed worker")
        for _ in range(8):  # served throughout: by the survivor, then by both
            infer_once(cloud.address, shape)
        wait_for(lambda: "serving again" in cloud.log_tail(200), 60, what="the restarted worker to serve")
        assert "died (status -9): restarting it" in cloud.log_tail(200)
        assert cloud.stop() == 0  # SIGTERM: every worker drained and exited cleanly
    assert all(not Path(f"/proc/{w}").exists() for w in workers[1:])


def test_worker_settings() -> None:
    with pytest.raises(ValueError, match="workers must be at least 1, not 0"):
        CloudConfig(checkpoint="x", workers=0)
    config = CloudConfig(checkpoint="x", workers=4, listen="0.0.0.0:0", metrics_port=9100)
    second = worker_config(config, 1, 50051)
    assert (second.listen, second.metrics_port, second.workers) == ("0.0.0.0:50051", 9101, 1)
    assert second.threads == max(1, (os.cpu_count() or 1) // 4)
    assert worker_config(CloudConfig(checkpoint="x", workers=2, metrics_port=0), 1, 7).metrics_port == 0
    assert worker_config(CloudConfig(checkpoint="x", workers=2, threads=3), 0, 7).threads == 3
