"""Load for the serving benchmarks: what the requests carry, closed loops of workers, and the results file."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99 and mean of ``values`` (NaN when there are none)."""
    a = np.asarray(values if len(values) else [float("nan")])
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


async def closed_loop(request: Callable[[int, int], Awaitable[None]], workers: int, seconds: float) -> float:
    """Run ``workers`` loops of ``await request(worker, i)`` (i counts that worker's requests) for ``seconds``.

    Returns the wall time, from the start to the last answer: every worker
    finishes the request it has in flight when time is up.
    """
    stop_at = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        i = 0
        while time.perf_counter() < stop_at:
            await request(k, i)
            i += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(workers)))
    return time.perf_counter() - start


def load_summary(edges: int, window: int, wall: float, latencies: Sequence[float], compute: Sequence[float],
                 batch_sizes: Sequence[int]) -> dict[str, float | int | dict[str, float]]:
    """One row of a load run, the same keys for every server measured."""
    return {"edges": edges, "window": window, "requests": len(latencies), "throughput_rps": len(latencies) / wall,
            "latency_ms": percentiles(latencies), "cloud_compute_ms": percentiles(compute),
            "mean_batch": float(np.mean(batch_sizes)) if len(batch_sizes) else 0.0}


@torch.no_grad()
def offload_tokens(checkpoint: str, samples: int, per_request: int = 1) -> tuple[Any, torch.Tensor, list[Any]]:
    """(card, inputs, encoded tokens): the edge half's split tokens for ``samples`` validation inputs, every
    exit told never to answer, int8 + zstd, ``per_request`` samples per message."""
    from offramp.core.checkpoint import load_checkpoint
    from offramp.core.codec import CodecConfig, encode
    from offramp.core.exit_rule import never_leave
    from offramp.core.data.card_splits import load_validation
    from offramp.core.halves import EdgeHalf

    model, card = load_checkpoint(checkpoint)
    x = load_validation(card)[0].tensors[0][:samples]
    edge = EdgeHalf(model, card.split_block)
    tokens = edge.run(x, [never_leave("max_prob")] * edge.num_exits, "max_prob").tokens
    codec = CodecConfig(dtype="int8", zstd_level=3)
    return card, x, [encode(tokens[i:i + per_request], codec) for i in range(0, len(x) - per_request + 1, per_request)]


def write_result(result: dict[str, Any], out: str | Path) -> Path:
    """The benchmark's JSON, its folder made if need be."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({result.get('wall_s', 0):.0f} s)")
    return out
