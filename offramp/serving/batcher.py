"""Dynamic batching without a fixed timer: a batch is whatever waited while the last one ran.

Edge, cloud and the experiment baselines share this one batcher. A job is a
tuple of tensors of B samples each (visual tokens and audio tokens travel
side by side, never glued together); jobs whose shapes agree stack into one
batch, oldest first, up to ``max_batch`` samples.

An idle server starts a lone request at once: waiting for company that is
not coming only adds latency. Under load, requests queue up while the device
computes, and the next batch takes all of them the moment it is free, so
batches grow with the load without any timer. ``max_wait_s`` adds an optional
window after the first request, for devices (GPUs) where a fuller batch is
worth a fixed delay.

A lone request on an idle CPU server runs on the event loop's own thread:
the hop to a worker thread and back costs more than a small model's
batch-1 forward pass (measured: 1.7 -> 0.9 ms per request at batch 1). It
runs in its caller's own task, after one pass of the loop that lets requests
arriving together join it: waking the batching task and handing the result
back would cost two more passes, each slow on a core whose caches the model
has just flushed. A
batch runs in one worker thread, so the loop keeps reading, decoding and
queueing the next requests while torch computes (measured under 16 x 4
streams: 1,660 req/s with the thread vs 1,410 on the loop). Models on an
accelerator, and emulated slow devices that sleep, always use the thread.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
import torch

from offramp.serving.errors import RequestError

log = logging.getLogger(__name__)
R = TypeVar("R", bound=Sequence)  # the model's result: one row per sample (a tensor or a list)
Inputs = tuple[torch.Tensor | None, ...]


def lone_on_loop(device: torch.device, sleeps: bool = False) -> bool:
    """Whether lone requests for a model on ``device`` may run on the event loop's thread.

    Not on accelerators (the loop serves the network while they work) nor for
    models that sleep (the emulated slow device): either would stall the loop.
    """
    return device.type == "cpu" and not sleeps


@dataclass(frozen=True)
class Batched(Generic[R]):
    """One job's share of a batch."""

    rows: R  # the model's result for this job's samples only
    queue_s: float  # submission to its batch slot (the batch formed, its deadline checked)
    compute_s: float  # the whole batch
    batch_size: int  # samples in that batch


@dataclass(eq=False)
class _Job:
    inputs: Inputs  # each (B, ...) or None
    size: int
    shapes: tuple[tuple[int, ...] | None, ...]  # per input, without the batch: jobs stack when these agree
    deadline: float | None  # perf_counter after which nobody wants the answer
    submitted: float
    future: asyncio.Future


class Batcher(Generic[R]):
    """Runs ``model(*inputs) -> result`` on batches gathered across concurrent ``submit`` calls.

    Refuses work beyond ``max_queue`` samples (RESOURCE_EXHAUSTED at once),
    answers jobs that would finish after their deadline with
    DEADLINE_EXCEEDED at their batch slot (judged by the compute time per
    sample measured so far), and never computes for a caller who gave up.
    """

    def __init__(self, model: Callable[..., R], max_batch: int, *, max_queue: int | None = None,
                 max_wait_s: float = 0.0, lone_on_loop: bool = False, on_batch: Callable[[int], None] | None = None,
                 name: str = "compute") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self._model = model
        self.max_batch = max_batch
        self._max_queue = max_queue
        self._max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._name = name
        self._pending: deque[_Job] = deque()
        self._waiting = 0  # samples submitted and not yet computing
        self._arrived = asyncio.Event()
        self._flushing = False
        self._lone_on_loop = lone_on_loop
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._worker: asyncio.Task[None] | None = None
        self._busy = False  # the batching task is forming or computing a batch
        self._per_sample_s = 0.0  # moving average of compute time per sample: a batch's expected duration

    def depth(self) -> int:
        """Samples waiting for a batch."""
        return self._waiting

    def start(self) -> None:
        """Start the batching task (needs the running event loop)."""
        self._worker = asyncio.get_running_loop().create_task(self._work(), name=self._name)

    def flush(self) -> None:
        """Stop waiting for company: a draining server wants its queue empty soon."""
        self._flushing = True
        self._arrived.set()

    async def close(self) -> None:
        """Stop batching; callers still waiting are cancelled, none is left hanging."""
        if self._worker is not None:
            self._worker.cancel()
            with suppress(asyncio.CancelledError):
                await self._worker
        while self._pending:
            self._pending.popleft().future.cancel()
        self._waiting = 0
        self._executor.shutdown(wait=False, cancel_futures=True)

    def check_room(self, size: int) -> None:
        """Refuse ``size`` more samples now (RESOURCE_EXHAUSTED) if they cannot be queued: callers check
        before decoding, so that refusing under overload costs next to nothing."""
        if size > self.max_batch:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{size} samples exceed the max batch of {self.max_batch}")
        if self._max_queue is not None and self._waiting + size > self._max_queue:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the queue is full ({self._waiting} samples waiting)")

    async def submit(self, *inputs: torch.Tensor | None, deadline: float | None = None) -> Batched[R]:
        """Run ``inputs`` (each (B, ...), or None) in some batch; ``RequestError`` when refused or failed."""
        size = next(t for t in inputs if t is not None).shape[0]
        self.check_room(size)
        shapes = tuple(None if t is None else tuple(t.shape[1:]) for t in inputs)
        job = _Job(inputs, size, shapes, deadline, time.perf_counter(), asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._waiting += size
        if size == 1 and self._lone_on_loop and not self._max_wait_s and not self._busy and len(self._pending) == 1:
            result = await self._lead(job)
            if result is not None:
                return result
        self._arrived.set()
        return await job.future

    async def _lead(self, job: _Job) -> Batched[R] | None:
        """Compute ``job`` here if it is still alone after one pass of the loop; None if others joined it
        (the batching task takes them all) or a batch started meanwhile."""
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            if job in self._pending:
                self._pending.remove(job)
                self._waiting -= job.size
            raise
        if self._busy or len(self._pending) != 1:
            return None
        self._pending.popleft()
        formed = time.perf_counter()
        if self._live([job], formed + self._per_sample_s * job.size):
            await self._compute([job], formed)  # alone on an idle batcher: on this thread, with no pass
        return await job.future  # answered by now (or refused), so no pass either

    async def _work(self) -> None:
        while True:
            while not self._pending:
                await self._wait_for_arrival(None)
            self._busy = True
            try:
                batch = await self._gather()
                formed = time.perf_counter()  # the batch slot: each job's wait ends here
                batch = self._live(batch, formed + self._per_sample_s * sum(job.size for job in batch))
                if batch:
                    await self._compute(batch, formed)
            finally:
                self._busy = False

    async def _gather(self) -> list[_Job]:
        """The oldest job and every waiting one of the same shapes that fits; with ``max_wait_s``, more."""
        first = self._pending.popleft()
        batch, size, shapes = [first], first.size, first.shapes
        close_at = first.submitted + self._max_wait_s
        while size < self.max_batch:
            job = self._take(shapes, self.max_batch - size)
            if job is not None:
                batch.append(job)
                size += job.size
            elif self._flushing or not await self._wait_for_arrival(close_at - time.perf_counter()):
                break
        return batch

    def _take(self, shapes: tuple, room: int) -> _Job | None:
        """Remove and return the oldest waiting job of ``shapes`` with at most ``room`` samples."""
        for i, job in enumerate(self._pending):
            if job.size <= room and job.shapes == shapes:
                del self._pending[i]
                return job
        return None

    async def _wait_for_arrival(self, timeout: float | None) -> bool:
        """Wait for the next submission (or flush); False when ``timeout`` seconds pass first."""
        if timeout is not None and timeout <= 0:
            return False
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _live(self, batch: list[_Job], done_by: float) -> list[_Job]:
        """The jobs still worth computing if the batch ends at ``done_by``: callers that gave up are dropped,
        those it would answer too late are answered now."""
        live = []
        for job in batch:
            self._waiting -= job.size
            if job.future.done():
                continue
            if job.deadline is not None and done_by >= job.deadline:
                job.future.set_exception(RequestError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"its batch would end {(done_by - job.deadline) * 1e3:.1f} ms after its deadline"))
                continue
            live.append(job)
        return live

    async def _compute(self, batch: list[_Job], formed: float) -> None:
        inputs = batch[0].inputs if len(batch) == 1 else tuple(
            None if batch[0].inputs[k] is None else torch.cat([job.inputs[k] for job in batch])
            for k in range(len(batch[0].inputs)))
        size = sum(job.size for job in batch)
        started = time.perf_counter()
        try:
            if size == 1 and self._lone_on_loop and not self._pending:
                result = self._run(inputs, size)
            else:
                result = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, inputs, size)
        except RequestError as e:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        compute_s = time.perf_counter() - started
        per_sample = compute_s / size
        self._per_sample_s = per_sample if not self._per_sample_s else 0.8 * self._per_sample_s + 0.2 * per_sample
        offset = 0
        for job in batch:
            if not job.future.done():
                rows = result if len(batch) == 1 else result[offset:offset + job.size]
                job.future.set_result(Batched(rows, formed - job.submitted, compute_s, size))
            offset += job.size

    def _run(self, inputs: Inputs, size: int) -> R:
        """The model on one batch; a failure becomes INTERNAL for every caller in it, so none hangs."""
        try:
            result = self._model(*inputs)
        except Exception:
            log.exception("%s failed on a batch of %d samples", self._name, size)
            raise RequestError(grpc.StatusCode.INTERNAL, "the model failed on this request's batch") from None
        if self._on_batch is not None:
            self._on_batch(size)
        return result
