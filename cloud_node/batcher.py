"""Dynamic batching across every stream: one queue, one batch on the device at a time.

Requests from all edges join one queue. The worker takes the oldest, then
gathers more of the same token shape (top-k selection makes token counts
differ, and only equal shapes stack) until the batch holds ``max_batch``
samples or ``max_wait_s`` has passed since that oldest request arrived.
While a batch computes in the worker thread, new requests are decoded and
queued on the event loop; when it finishes, the oldest waiting request has
usually waited past the window already, so under load the next batch is
taken at once and fills without waiting.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass

import grpc
import torch

from .errors import RequestError
from .metrics import CloudMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchResult:
    """One request's share of a batch."""

    output: torch.Tensor  # (B, num_outputs): this request's rows only
    queue_s: float  # submission to the start of its batch's forward pass
    compute_s: float  # the whole batch's forward pass
    batch_size: int  # samples in that batch


@dataclass(eq=False)
class _Job:
    tokens: torch.Tensor  # (B, *token_shape)
    deadline: float | None  # time.perf_counter() after which nobody waits for the answer
    submitted: float  # time.perf_counter()
    future: asyncio.Future[BatchResult]

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tokens.shape[1:])


class Batcher:
    """Batches ``model`` calls across concurrent ``submit`` calls; refuses work beyond ``max_queue``."""

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        metrics: CloudMetrics,
    ) -> None:
        self._model = model
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._max_queue = max_queue
        self._metrics = metrics
        self._pending: deque[_Job] = deque()
        self._waiting = 0  # samples submitted and not yet computing, pending or gathered
        self._arrived = asyncio.Event()
        self._flushing = False
        # One thread: one batch on the device at a time; torch releases the GIL meanwhile.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offramp-tail")
        self._worker: asyncio.Task[None] | None = None
        metrics.queue_depth.set_function(lambda: self._waiting)

    @property
    def depth(self) -> int:
        """Samples waiting for a batch."""
        return self._waiting

    def start(self) -> None:
        self._worker = asyncio.create_task(self._work(), name="offramp-batcher")

    def flush(self) -> None:
        """Stop waiting for company: a draining server wants its queue empty soon."""
        self._flushing = True
        self._arrived.set()

    async def close(self) -> None:
        """Stop the worker; call once nothing awaits a result any more (the server has stopped)."""
        if self._worker is not None:
            self._worker.cancel()
            with suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, tokens: torch.Tensor, deadline: float | None = None) -> BatchResult:
        """Run ``tokens`` (B, *token_shape) in some batch; raises RequestError when refused or failed."""
        size = tokens.shape[0]
        if size > self._max_batch:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{size} samples exceed the max batch of {self._max_batch}"
            )
        if self._waiting + size > self._max_queue:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"the queue is full ({self._waiting} samples waiting)"
            )
        job = _Job(tokens, deadline, time.perf_counter(), asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._waiting += size
        self._arrived.set()
        return await job.future

    async def _work(self) -> None:
        while True:
            batch = self._admit(await self._collect())
            if batch:
                await self._compute(batch)

    async def _collect(self) -> list[_Job]:
        """The oldest request and as many of the same shape as fit, within the wait window."""
        while not self._pending:
            await self._wait_for_arrival(None)
        first = self._pending.popleft()
        batch, size = [first], first.size
        close_at = first.submitted + self._max_wait_s
        while size < self._max_batch:
            job = self._take(first.shape, self._max_batch - size)
            if job is not None:
                batch.append(job)
                size += job.size
            elif self._flushing or not await self._wait_for_arrival(close_at - time.perf_counter()):
                break
        return batch

    def _take(self, shape: tuple[int, ...], room: int) -> _Job | None:
        """Remove and return the oldest pending job of ``shape`` with at most ``room`` samples."""
        for i, job in enumerate(self._pending):
            if job.shape == shape and job.size <= room:
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

    def _admit(self, batch: list[_Job]) -> list[_Job]:
        """The jobs still worth computing: drop abandoned ones, answer expired ones DEADLINE_EXCEEDED."""
        now = time.perf_counter()
        live = []
        for job in batch:
            self._waiting -= job.size
            if job.future.done():  # cancelled: its stream went away
                continue
            if job.deadline is not None and now >= job.deadline:
                late_ms = (now - job.deadline) * 1e3
                job.future.set_exception(RequestError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline passed {late_ms:.1f} ms before a batch slot"
                ))
                continue
            live.append(job)
        return live

    async def _compute(self, batch: list[_Job]) -> None:
        tokens = torch.cat([job.tokens for job in batch])  # (sum of B, *token_shape)
        size = tokens.shape[0]
        started = time.perf_counter()
        try:
            output = await asyncio.get_running_loop().run_in_executor(self._executor, self._model, tokens)
        except Exception:
            log.exception("the tail model failed on a batch of %d samples", size)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(
                        RequestError(grpc.StatusCode.INTERNAL, "the tail model failed on this request's batch")
                    )
            return
        compute_s = time.perf_counter() - started
        self._metrics.batch_size.observe(size)
        for job, rows in zip(batch, output.split([job.size for job in batch])):
            if not job.future.done():
                job.future.set_result(BatchResult(rows, started - job.submitted, compute_s, size))
