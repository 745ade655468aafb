"""The shared batcher: no timer at either end of the load, shapes kept apart, every caller answered once."""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from pathlib import Path
import torch

from offramp.serving.batcher import Batcher
from offramp.serving.errors import RequestError
from offramp.serving.streams import unordered_map


class Recorder:
    """A model that doubles its input, remembers each batch, and can be held in the worker thread."""

    def __init__(self) -> None:
        self.batches: list[tuple[tuple[int, ...], ...]] = []
        self.threads: list[str] = []
        self.release = threading.Event()
        self.release.set()
        self.fail = False

    def __call__(self, x: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
        self.batches.append((tuple(x.shape),) + (() if audio is None else (tuple(audio.shape),)))
        self.threads.append(threading.current_thread().name)
        self.release.wait(10)
        if self.fail:
            raise RuntimeError("boom")
        out = x.flatten(1).sum(1, keepdim=True) * 2
        return out if audio is None else out + audio.flatten(1).sum(1, keepdim=True)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_a_lone_request_on_an_idle_server_runs_at_once_without_a_thread_hop() -> None:
    model = Recorder()

    async def go():
        batcher = Batcher(model, 8, lone_on_loop=True, name="t")
        batcher.start()
        t0 = time.perf_counter()
        result = await batcher.submit(torch.ones(1, 3))
        waited = time.perf_counter() - t0
        await batcher.close()
        return result, waited

    result, waited = run(go())
    assert result.rows.tolist() == [[6.0]] and result.batch_size == 1 and result.queue_s < 0.1
    assert model.threads == [threading.main_thread().name]  # computed right there, on the loop's thread
    assert waited < 0.5


def test_a_lone_request_computes_in_its_callers_own_task_and_a_caller_gone_before_leaves_nothing_queued() -> None:
    model = Recorder()
    tasks: list[str] = []

    def traced(x: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
        tasks.append(asyncio.current_task().get_name())
        return model(x, audio)

    async def go():
        batcher = Batcher(traced, 8, lone_on_loop=True, name="t")
        batcher.start()
        result = await asyncio.create_task(batcher.submit(torch.ones(1, 3)), name="caller")
        gone = asyncio.create_task(batcher.submit(torch.ones(1, 3)))
        await asyncio.sleep(0)  # it is queued and waits one pass for company
        gone.cancel()
        await asyncio.sleep(0.01)
        depth = batcher.depth()
        after = await batcher.submit(torch.full((1, 3), 2.0))
        await batcher.close()
        return result, depth, after

    result, depth, after = run(go())
    assert tasks[0] == "caller" and "t" not in tasks  # no hand-off to the batching task ("t") and back
    assert result.rows.tolist() == [[6.0]] and depth == 0
    assert after.rows.tolist() == [[12.0]] and len(model.batches) == 2  # the cancelled one was never computed


def test_requests_arriving_together_share_a_batch_even_with_lone_requests_on_the_loop() -> None:
    model = Recorder()

    async def go():
        batcher = Batcher(model, 8, lone_on_loop=True, name="t")
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(torch.ones(1, 3)) for _ in range(5)))
        await batcher.close()
        return results

    results = run(go())
    assert [b[0][0] for b in model.batches] == [5]  # not five lone passes on the loop
    assert {r.batch_size for r in results} == {5}


def test_requests_that_queue_during_a_batch_form_the_next_one_without_a_timer() -> None:
    model = Recorder()

    async def go():
        batcher = Batcher(model, 8, lone_on_loop=True, name="t")
        batcher.start()
        model.release.clear()
        first = asyncio.create_task(batcher.submit(torch.ones(2, 3)))  # two samples: the worker thread
        while not model.batches:
            await asyncio.sleep(0.001)
        rest = [asyncio.create_task(batcher.submit(torch.full((1, 3), float(i)))) for i in range(5)]
        await asyncio.sleep(0.05)
        assert batcher.depth() == 5
        model.release.set()
        results = [await first] + [await r for r in rest]
        await batcher.close()
        return results

    results = run(go())
    assert [b[0][0] for b in model.batches] == [2, 5]
    assert [r.rows.flatten().tolist() for r in results[1:]] == [[6.0 * i] for i in range(5)]
    assert {r.batch_size for r in results[1:]} == {5}


def test_only_equal_shapes_share_a_batch_and_second_inputs_travel_beside_the_first() -> None:
    model = Recorder()

    async def go():
        batcher = Batcher(model, 8, name="t")
        batcher.start()
        model.release.clear()
        hold = asyncio.create_task(batcher.submit(torch.ones(2, 4, 2), torch.ones(2, 3)))
        while not model.batches:
            await asyncio.sleep(0.001)
        small = [asyncio.create_task(batcher.submit(torch.ones(1, 2, 2), torch.ones(1, 3))) for _ in range(2)]
        large = [asyncio.create_task(batcher.submit(torch.ones(1, 4, 2), torch.ones(1, 3))) for _ in range(3)]
        await asyncio.sleep(0.02)
        model.release.set()
        out = [await t for t in [hold, *small, *large]]
        await batcher.close()
        return out

    out = run(go())
    assert model.batches == [((2, 4, 2), (2, 3)), ((2, 2, 2), (2, 3)), ((3, 4, 2), (3, 3))]
    assert [r.rows.flatten().tolist() for r in out[1:3]] == [[11.0], [11.0]]  # 2 * 4 + 3
    assert [r.rows.flatten().tolist() for r in out[3:]] == [[19.0]] * 3  # 2 * 8 + 3


def test_refusals_deadlines_and_failures_each_answer_every_caller_once() -> None:
    model = Recorder()

    async def go():
        batcher = Batcher(model, 4, max_queue=3, name="t")
        batcher.start()
        with pytest.raises(RequestError) as too_big:
            await batcher.submit(torch.ones(5, 1))
        model.release.clear()
        hold = asyncio.create_task(batcher.submit(torch.ones(2, 1)))
        while not model.batches:
            await asyncio.sleep(0.001)
        late = asyncio.create_task(batcher.submit(torch.ones(1, 1), deadline=time.perf_counter() + 0.01))
        queued = [asyncio.create_task(batcher.submit(torch.ones(1, 1))) for _ in range(2)]
        await asyncio.sleep(0.001)
        with pytest.raises(RequestError) as full:
            await batcher.submit(torch.ones(1, 1))
        await asyncio.sleep(0.05)
        model.fail = True
        model.release.set()
        outcomes = await asyncio.gather(hold, late, *queued, return_exceptions=True)
        await batcher.close()
        return too_big.value, full.value, outcomes

    too_big, full, (hold, late, *queued) = run(go())
    assert too_big.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max batch of 4" in str(too_big)
    assert full.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in str(full)
    assert isinstance(hold, RequestError) and hold.code == grpc.StatusCode.INTERNAL
    assert isinstance(late, RequestError) and late.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert all(isinstance(q, RequestError) and q.code == grpc.StatusCode.INTERNAL for q in queued)
    assert [b[0][0] for b in model.batches] == [2, 2]  # the expired request took no slot


def test_a_job_its_batch_would_answer_too_late_takes_no_slot() -> None:
    calls: list[int] = []

    def slow(x: torch.Tensor) -> torch.Tensor:  # 40 ms per sample, whatever the batch
        calls.append(x.shape[0])
        time.sleep(0.04 * x.shape[0])
        return x

    async def go():
        batcher = Batcher(slow, 4, name="t")
        batcher.start()
        await batcher.submit(torch.ones(2, 1))  # teaches the batcher: ~40 ms per sample
        in_time = batcher.submit(torch.ones(1, 1), deadline=time.perf_counter() + 1.0)
        too_late = batcher.submit(torch.ones(2, 1), deadline=time.perf_counter() + 0.05)  # 2 x 40 ms > 50 ms
        outcomes = await asyncio.gather(in_time, too_late, return_exceptions=True)
        await batcher.close()
        return outcomes

    in_time, too_late = run(go())
    assert in_time.batch_size == 1
    assert isinstance(too_late, RequestError) and too_late.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "after its deadline" in str(too_late) and calls == [2, 1]  # it cost no compute


def test_unordered_map_yields_answers_as_they_finish() -> None:
    async def go():
        async def items():
            for delay in (0.05, 0.0, 0.02):
                yield delay

        async def handle(delay: float) -> float:
            await asyncio.sleep(delay)
            return delay

        return [r async for r in unordered_map(items(), handle)]

    assert run(go()) == [0.0, 0.02, 0.05]


def test_both_daemons_report_their_build_and_process() -> None:
    from prometheus_client import generate_latest

    from cloud_node.metrics import CloudMetrics
    from edge_node.metrics import EdgeMetrics
    from offramp import __version__

    for metrics, role in ((CloudMetrics("tiny", "ab12"), "cloud"), (EdgeMetrics(lambda: 1.0, "tiny", "ab12"), "edge")):
        text = generate_latest(metrics.registry).decode()
        assert f'role="{role}"' in text and f'version="{__version__}"' in text and "offramp_build_info{" in text
        assert 'model="tiny"' in text and 'fingerprint="ab12"' in text
        assert "process_resident_memory_bytes" in text and "python_info" in text


def test_a_daemon_logs_its_start_up_steps_and_a_timeout_names_the_step(tiny_checkpoint: Path) -> None:
    from offramp.core.errors import OfframpError
    from offramp.serving.config import CloudConfig
    from offramp.serving.daemon_proc import DaemonProcess

    with DaemonProcess("cloud", config=CloudConfig(checkpoint=str(tiny_checkpoint))) as cloud:
        steps = [line for line in cloud.log_tail().splitlines() if "start-up:" in line]
    assert [s.split("start-up: ", 1)[1].split(" (")[0].split(" ")[0] for s in steps] == \
        ["importing", "loading", "building", "warming", "binding"]
    assert all("s since the cloud daemon's process started" in s for s in steps)
    with pytest.raises(OfframpError, match=r"did not become ready in 1 s, (stuck at \w+|before it logged)"):
        DaemonProcess("cloud", config=CloudConfig(checkpoint=str(tiny_checkpoint)), startup_timeout=1.0).start()


def test_json_logs_are_one_object_per_line() -> None:
    import json
    import logging

    from offramp.serving.log import JsonFormatter

    try:
        raise ValueError("bad")
    except ValueError:
        import sys

        record = logging.LogRecord("cloud_node.server", logging.ERROR, __file__, 1, "lost %s", ("x\ny",), sys.exc_info())
    line = JsonFormatter(process="worker 1").format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["message"], entry["process"]) == (
        "ERROR", "cloud_node.server", "lost x\ny", "worker 1")
    assert "ValueError: bad" in entry["exception"] and entry["time"][4] == "-"


def _promtool() -> str | None:
    import shutil
    import sys

    beside = Path(sys.executable).parent / "promtool"  # where `make setup` unpacks it
    return str(beside) if beside.is_file() else shutil.which("promtool")


@pytest.mark.skipif(_promtool() is None, reason="promtool not found: `make test` fetches it from Debian's prometheus "
                                                "package where apt-get can, else put it on PATH")
def test_promtool_accepts_both_daemons_metrics() -> None:
    import subprocess

    from prometheus_client import generate_latest

    from cloud_node.metrics import CloudMetrics
    from edge_node.metrics import EdgeMetrics

    for metrics in (CloudMetrics("tiny", "ab12"), EdgeMetrics(lambda: 1.0, "tiny", "ab12")):
        page = generate_latest(metrics.registry)
        checked = subprocess.run([_promtool(), "check", "metrics"], input=page, capture_output=True, timeout=60)
        assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()
        assert b"offramp_build_info" in page
