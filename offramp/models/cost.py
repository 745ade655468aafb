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
