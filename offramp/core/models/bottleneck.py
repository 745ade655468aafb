"""A learned bottleneck at the split: few small integers per token on the wire instead of D floats.

The edge-side encoder maps each (D,) token to ``channels`` values rounded to
integers in ``[-levels, levels]`` (``bits`` per value at most); the cloud-side
decoder maps them back to the (D,) token the tail expects. Trained by
distilling the frozen model (the tail's answers on the original tokens), so
the backbone, its exits and the uncompressed path are untouched. The code's
integers are what zstd then entropy-codes: the training nudges them towards
zero (a rate term), where they cost the fewest bits.

Split-computing work (BottleFit, sc2bench, FrankenSplit) trains such
encoder/decoder pairs; this one is per token, so it applies at any split of a
token backbone and keeps the token grid (top-k selection is then unnecessary).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from offramp.core.models.backbone import FeatureSpec

MAX_BITS = 8  # the code travels as int8


@dataclass(frozen=True)
class BottleneckConfig:
    """Where the bottleneck sits and how small its code is; stored in the card."""

    position: int  # the split block it encodes the tokens of
    channels: int  # code values per token
    bits: int = 4  # each value is an integer in [-(2^(bits-1) - 1), 2^(bits-1) - 1]
    hidden: int = 0  # width of the encoder's and decoder's hidden layer; 0: the token width
    dictionary_bytes: int = 0  # size of the zstd dictionary trained on its codes (0: none), shipped in the weights

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise ValueError(f"a bottleneck needs at least 1 channel, not {self.channels}")
        if not 2 <= self.bits <= MAX_BITS:
            raise ValueError(f"bottleneck bits must be in 2..{MAX_BITS}, not {self.bits}")
        if self.hidden < 0:
            raise ValueError(f"hidden width must be >= 0, not {self.hidden}")
        if self.dictionary_bytes < 0:
            raise ValueError(f"dictionary size must be >= 0, not {self.dictionary_bytes}")

    def to_dict(self) -> dict[str, int]:
        """As stored in the card; without a dictionary the key is left out (cards made before it keep their
        fingerprint)."""
        d = dataclasses.asdict(self)
        if not d["dictionary_bytes"]:
            del d["dictionary_bytes"]
        return d

    @property
    def levels(self) -> int:
        """Largest code magnitude (symmetric, so 0 is exact)."""
        return 2 ** (self.bits - 1) - 1

    @property
    def name(self) -> str:
        return f"c{self.channels}b{self.bits}@{self.position}"


class Bottleneck(nn.Module):
    """Per-token encoder to an integer code, and its decoder back to tokens."""

    def __init__(self, config: BottleneckConfig, spec: FeatureSpec) -> None:
        super().__init__()
        if spec.kind != "tokens":
            raise ValueError("a bottleneck applies to token representations (ViT-family backbones), "
                             f"not a {spec.kind}")
        self.config = config
        dim, hidden = spec.channels, config.hidden or spec.channels
        self.token_shape = spec.shape  # (N, D): what the decoder must give back
        self.code_shape = (spec.shape[0], config.channels)
        self.encoder = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(),
                                     nn.Linear(hidden, config.channels))
        self.decoder = nn.Sequential(nn.Linear(config.channels, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                     nn.GELU(), nn.Linear(hidden, dim))
        # zstd codes small messages far better with a dictionary of what they usually hold; it travels in
        # the checkpoint (and its fingerprint) so that both ends have the same one.
        self.register_buffer("zstd_dictionary", torch.zeros(config.dictionary_bytes, dtype=torch.uint8),
                             persistent=config.dictionary_bytes > 0)  # none: nothing stored, as before it existed

    def dictionary(self) -> bytes | None:
        """The trained zstd dictionary of its codes, or None."""
        return self.zstd_dictionary.numpy().tobytes() if self.zstd_dictionary.numel() else None

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> (B, N, channels) integer-valued code (float dtype, straight-through rounding)."""
        y = self.encoder(tokens).clamp(-self.config.levels, self.config.levels)
        if not torch.is_grad_enabled():  # serving: just round
            return torch.round(y)
        return y + (torch.round(y) - y).detach()  # rounds forward, passes gradients through unchanged

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """(B, N, channels) code -> (B, N, D) tokens for the tail."""
        return self.decoder(code)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(tokens))
