"""Concurrent handling of one request stream: many in flight, answers as they finish."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


class StreamStopped(Exception):
    """``stop`` ended the stream while the peer was still sending."""


async def unordered_map(
    items: AsyncIterator[T], handle: Callable[[T], Awaitable[R]], stop: asyncio.Event | None = None
) -> AsyncIterator[R]:
    """``handle`` every item as soon as it arrives and yield the results in the order they finish.

    Ends when the input ends and every handler has finished. Once ``stop`` (if given) is
    set, no more items are read: the handlers already running finish and
    their results are yielded, then StreamStopped is raised if the input was
    still open, so the caller can tell the peer why its stream ended.
    """
    # Each handler hands in its own outcome as it returns: a done callback would do it one pass of the
    # event loop later, on every item. None: reading ended.
    finished: asyncio.Queue[tuple[asyncio.Task[None], R | None, BaseException | None] | None] = asyncio.Queue()
    running: set[asyncio.Task[None]] = set()

    async def run(item: T) -> None:
        task = asyncio.current_task()
        try:
            result = await handle(item)
        except asyncio.CancelledError as e:
            finished.put_nowait((task, None, e))
            raise
        except Exception as e:  # the consumer raises it, as a failed task's result() would
            finished.put_nowait((task, None, e))
        else:
            finished.put_nowait((task, result, None))

    async def read() -> None:
        async for item in items:
            running.add(asyncio.ensure_future(run(item)))

    reader = asyncio.create_task(read())
    reader.add_done_callback(lambda _: finished.put_nowait(None))
    stopper = asyncio.create_task((stop or asyncio.Event()).wait())
    stopper.add_done_callback(lambda _: reader.cancel())
    try:
        while not reader.done() or running:
            outcome = await finished.get()
            if outcome is not None:
                task, result, error = outcome
                running.discard(task)
                if error is not None:
                    raise error
                yield result
        if not reader.cancelled():
            reader.result()  # a broken stream raises here
        elif stop is not None and stop.is_set():
            raise StreamStopped
    finally:
        stopper.cancel()
        reader.cancel()
        for task in running:
            task.cancel()
