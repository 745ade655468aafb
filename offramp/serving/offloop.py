"""Small work on the event loop, large work on a thread: the hop costs more than small work does."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

# Messages up to this size are parsed on the event loop. Measured on one core: decoding an
# int8+zstd request or a small image takes 10-60 us, the round trip to a worker thread ~80 us;
# a message this large takes a few milliseconds, long enough to hold up every other stream.
INLINE_BYTES = 256 << 10


async def call_by_size(size: int, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``fn(*args)`` here when ``size`` bytes of input are cheap to handle, else in a worker thread."""
    if size <= INLINE_BYTES:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)
