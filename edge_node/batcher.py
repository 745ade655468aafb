"""Local batching: samples that arrive while the model is busy run together as one batch.

There is no timer: a batch is whatever has queued up by the time the compute
thread is free (at most ``max_batch``). An idle edge therefore adds no latency,
and a busy one gets bigger batches, which is when they pay off.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Runs ``fn(items) -> results`` (one result per item, same order) in one worker thread.

    One thread, because the model is one: the event loop stays free for the
    network while torch computes.
    """

    def __init__(self, fn: Callable[[list[T]], list[R]], max_batch: int, name: str = "edge-compute") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self._fn = fn
        self.max_batch = max_batch
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def close(self) -> None:
        """Stop taking batches; whatever is still queued fails with ``CancelledError``."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while not self._queue.empty():
            self._queue.get_nowait()[1].cancel()
        self._executor.shutdown(wait=True)

    def depth(self) -> int:
        """Samples waiting for the compute thread."""
        return self._queue.qsize()

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            while len(jobs) < self.max_batch and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            jobs = [(item, fut) for item, fut in jobs if not fut.done()]  # callers that gave up
            if not jobs:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._fn, [item for item, _ in jobs])
                for (_, future), result in zip(jobs, results):
                    if not future.done():
                        future.set_result(result)
            except Exception as e:  # a bug in fn: every caller in the batch hears about it, none hangs
                log.exception("batch of %d failed", len(jobs))
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(e)
            finally:  # closing while a batch runs: its callers are cancelled, not left waiting
                for _, future in jobs:
                    future.cancel()
