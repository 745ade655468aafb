"""Overhead of a module: parameters, and MACs measured by PyTorch's own FlopCounterMode."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def count_macs(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass per sample (FlopCounterMode counts 2 FLOPs per MAC)."""
    was_training = module.training
    module.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            module(*inputs)
    finally:
        module.train(was_training)
    batch = inputs[0].shape[0]
    return counter.get_total_flops() // 2 // batch
