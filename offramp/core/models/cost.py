"""Overhead of a module: parameters, and MACs measured by PyTorch's own FlopCounterMode."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def count_macs(fn: Callable[..., object], *inputs: torch.Tensor) -> int:
    """Multiply-accumulates per sample of ``fn(*inputs)`` (FlopCounterMode counts 2 FLOPs per MAC).

    ``fn`` is a module or any callable (e.g. ``lambda x: backbone.head(x, 2)``);
    modules are measured in eval mode.
    """
    was_training = isinstance(fn, nn.Module) and fn.training
    if isinstance(fn, nn.Module):
        fn.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            fn(*inputs)
    finally:
        if was_training:
            fn.train()
    return counter.get_total_flops() // 2 // inputs[0].shape[0]


class StepFlops:
    """Counts the FLOPs of one training step (forward and backward) with FlopCounterMode, as PyTorch
    sees them. Each ``with`` block adds to the count, so the forward and the backward pass may be
    counted in two blocks; then ``per_sample(batch)``. Training budgets are compared in FLOPs because
    wall time differs from one machine (and one day) to the next."""

    def __init__(self) -> None:
        self.total = 0

    def __enter__(self) -> "StepFlops":
        self._counter = FlopCounterMode(display=False)
        self._counter.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._counter.__exit__(*exc)
        self.total += self._counter.get_total_flops()

    def per_sample(self, batch_size: int) -> float:
        return self.total / batch_size
