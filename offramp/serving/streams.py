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
    finished: asyncio.Queue[asyncio.Task[R] | None] = asyncio.Queue()  # None: reading ended
    running: set[asyncio.Task[R]] = set()

    async def read() -> None:
        async for item in items:
            task = asyncio.ensure_future(handle(item))
            running.add(task)
            task.add_done_callback(finished.put_nowait)

    reader = asyncio.create_task(read())
    reader.add_done_callback(lambda _: finished.put_nowait(None))
    stopper = asyncio.create_task((stop or asyncio.Event()).wait())
    stopper.add_done_callback(lambda _: reader.cancel())
    try:
        while not reader.done() or running:
            task = await finished.get()
            if task is not None:
                running.discard(task)
                yield task.result()
        if not reader.cancelled():
            reader.result()  # a broken stream raises here
        elif stop is not None and stop.is_set():
            raise StreamStopped
    finally:
        stopper.cancel()
        reader.cancel()
        for task in running:
            task.cancel()
