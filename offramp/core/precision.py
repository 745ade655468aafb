"""Where and in which number format training runs.

Recent x86 CPUs multiply bfloat16 matrices several times faster than float32
(AMX, AVX512-BF16), and GPUs do on their tensor cores; autocast keeps the
weights, the optimiser and the reductions in float32. Serving stays float32.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager

import torch

from offramp.core.errors import OfframpError

PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN runs bfloat16 matmuls natively (AMX or AVX512-BF16)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class Precision:
    """A device and the dtype autocast computes in (None: plain float32)."""

    device: torch.device
    dtype: torch.dtype | None

    @property
    def name(self) -> str:
        return "bf16" if self.dtype is torch.bfloat16 else "fp32"

    def autocast(self) -> ContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def resolve_precision(precision: str = "auto", device: str = "auto") -> Precision:
    """``auto`` picks CUDA when present and bfloat16 where the hardware runs it fast."""
    if precision not in PRECISIONS:
        raise OfframpError(f"unknown precision '{precision}'; choose from {', '.join(PRECISIONS)}")
    if device not in DEVICES:
        raise OfframpError(f"unknown device '{device}'; choose from {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise OfframpError("--device cuda asked for, but PyTorch sees no CUDA device; use --device cpu")
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    fast = torch.cuda.is_bf16_supported() if dev.type == "cuda" else cpu_has_fast_bf16()
    if precision == "bf16" and not fast:
        raise OfframpError(f"bf16 asked for, but this {dev.type.upper()} has no fast bfloat16 support "
                           "(AMX or AVX512-BF16 on CPUs); use --precision fp32")
    use_bf16 = precision == "bf16" or (precision == "auto" and fast)
    return Precision(dev, torch.bfloat16 if use_bf16 else None)
