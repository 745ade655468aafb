"""The codec's settings, apart from the codec itself so that a daemon's config can hold them without loading
torch (the edge's ``[codec]`` group)."""
from __future__ import annotations

import typing
from dataclasses import dataclass

import zstandard

from offramp.core.codec.names import CodecName
from offramp.core.settings import setting


@dataclass(frozen=True)
class CodecConfig:
    """How the edge encodes the tokens it offloads; the edge's ``[codec]`` settings."""

    dtype: CodecName = setting(
        "Precision of offloaded tokens: int8 (per-token scale) is 4x smaller than float32 for almost no accuracy; "
        "float16 halves them; float32 is lossless; bottleneck sends the checkpoint's learned code (`offramp "
        "bottleneck` adds one), a few bits per token value.", "int8", flat="codec", group="codec")
    top_k: int | None = setting("Send only the k patch tokens the class token attends to most (prefix tokens are "
                                "always kept); unset: all.", None, metavar="K", example=32, group="codec")
    zstd_level: int = setting("zstd level of offloaded tokens: 3 is fast and gets most of the gain on quantized "
                              "tokens; 0 disables compression (for links faster than the compressor); negative "
                              "levels are zstd's faster, weaker ones.", 3,
                              metavar="N", group="codec")

    def __post_init__(self) -> None:
        if self.dtype not in typing.get_args(CodecName):
            raise ValueError(f"codec must be one of {', '.join(typing.get_args(CodecName))}, not {self.dtype!r}")
        if self.dtype == "bottleneck" and self.top_k is not None:
            raise ValueError("top_k does not apply to a bottleneck code: it already sends few values per token")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1 (or None to keep every token), not {self.top_k}")
        if self.zstd_level > zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(f"zstd_level must be at most {zstandard.MAX_COMPRESSION_LEVEL}, not {self.zstd_level}")
