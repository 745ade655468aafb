"""A backbone with early exits attached: what is trained, checkpointed and split.

Audiovisual models add an audio encoder (on the edge, before any exit): its
tokens feed audio-only and fused exits, and join the backbone's token
sequence before block ``fuse_at``, so the final head (in the cloud) fuses
them too.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from offramp.core.models.audio_encoder import AudioEncoder
from offramp.core.models.backbone import SplittableBackbone, Task, head_outputs
from offramp.core.models.bottleneck import Bottleneck, BottleneckConfig
from offramp.core.models.exits import EXIT_TYPES, MODALITIES, create_exit
from offramp.core.models.registry import create_backbone


@dataclass(frozen=True)
class ExitConfig:
    """One exit: its architecture, the block it follows, what it attends over, and its keyword options."""

    type: str
    position: int
    options: dict[str, Any] = field(default_factory=dict)
    modality: str = "visual"  # visual, audio or fused (audiovisual models only for the last two)

    @property
    def name(self) -> str:
        return f"{self.type}@{self.position}" + ("" if self.modality == "visual" else f":{self.modality}")

    @property
    def uses_audio(self) -> bool:
        return self.modality != "visual"

    @property
    def uses_visual(self) -> bool:
        return self.modality != "audio"


@dataclass(frozen=True)
class AudioConfig:
    """The audio encoder of an audiovisual model and where its tokens join the backbone."""

    input_shape: tuple[int, int, int]  # log-mel (1, mels, frames)
    fuse_at: int  # audio tokens join the visual sequence before this block (the edge splits no later)
    patch_size: int = 16
    depth: int = 1
    num_heads: int = 4


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the model; stored in the checkpoint card."""

    backbone: str
    img_size: tuple[int, int]
    in_chans: int
    num_classes: int
    task: Task = "classification"
    exits: tuple[ExitConfig, ...] = ()
    backbone_options: dict[str, Any] = field(default_factory=dict)
    audio: AudioConfig | None = None
    # Regression: every head predicts (value - loc) / scale and its log-variance in those
    # units, and the model reports them in the target's own units. Same gradients as
    # training on standardised targets, answers in counts.
    target_stats: tuple[float, float] | None = None
    # A learned bottleneck at one split (``offramp bottleneck``): the edge sends its code, the cloud decodes it.
    bottleneck: BottleneckConfig | None = None

    @property
    def exits_in_order(self) -> tuple[ExitConfig, ...]:
        """The exits by position, cheapest first: the order models index them in."""
        return tuple(sorted(self.exits, key=lambda e: e.position))

    def to_dict(self) -> dict[str, Any]:
        """As stored in the card; settings at their defaults are left out, so older cards keep their fingerprint."""
        d = asdict(self)
        for e in d["exits"]:
            if e["modality"] == "visual":
                del e["modality"]
        for key in ("audio", "target_stats", "bottleneck"):
            if d[key] is None:
                del d[key]
        if self.bottleneck is not None:
            d["bottleneck"] = self.bottleneck.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["img_size"] = tuple(d["img_size"])
        d["exits"] = tuple(ExitConfig(**e) for e in d.get("exits", ()))
        if d.get("audio") is not None:
            audio = dict(d["audio"])
            audio["input_shape"] = tuple(audio["input_shape"])
            d["audio"] = AudioConfig(**audio)
        if d.get("target_stats") is not None:
            d["target_stats"] = tuple(d["target_stats"])
        if d.get("bottleneck") is not None:
            d["bottleneck"] = BottleneckConfig(**d["bottleneck"])
        return cls(**d)


def parse_exits(spec: str) -> tuple[ExitConfig, ...]:
    """Parse ``"slvit@2,cnn@4"`` (type defaults to slvit: ``"2,4"``; ``"none"``: no exits) into exit configs.

    A ``:visual``, ``:audio`` or ``:fused`` suffix says what an exit attends
    over (``slvit@2:fused``); audio-only exits need no visual block and may sit
    at position 0 (``slvit@0:audio``).
    """
    if spec.strip().lower() == "none":  # a bare backbone (a teacher, or exits trained later)
        return ()
    exits = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        where, _, modality = item.partition(":")
        kind, _, pos = where.rpartition("@")
        kind = kind or "slvit"
        modality = modality or "visual"
        if kind not in EXIT_TYPES:
            raise ValueError(f"unknown exit type {kind!r} in {item!r}; choose from {', '.join(EXIT_TYPES)}")
        if not pos.isdigit():
            raise ValueError(f"exit {item!r} needs a block position, e.g. 'slvit@2'")
        if modality not in MODALITIES:
            raise ValueError(f"exit {item!r}: unknown modality {modality!r}; choose from {', '.join(MODALITIES)}")
        exits.append(ExitConfig(kind, int(pos), modality=modality))
    return tuple(exits)


class MultiExitModel(nn.Module):
    """Backbone plus exits, ordered by position (cheapest first), plus an audio encoder when audiovisual."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone: SplittableBackbone = create_backbone(
            config.backbone,
            img_size=config.img_size,
            in_chans=config.in_chans,
            num_classes=config.num_classes,
            task=config.task,
            **config.backbone_options,
        )
        n_out = head_outputs(config.task, config.num_classes)
        self.exit_configs = config.exits_in_order
        self.audio_encoder: AudioEncoder | None = None
        self.audio_type_embed: nn.Parameter | None = None
        audio_spec = None
        if config.audio is not None:
            a = config.audio
            if not 0 <= a.fuse_at < self.backbone.num_blocks:  # the head reads the class token only
                raise ValueError(f"audio must join before a block: fuse_at in 0..{self.backbone.num_blocks - 1}, "
                                 f"not {a.fuse_at}")
            spec = self.backbone.feature_spec(a.fuse_at)
            if spec.kind != "tokens":
                raise ValueError(f"audiovisual models need a token backbone; {config.backbone} gives feature maps")
            self.audio_encoder = AudioEncoder(a.input_shape, spec.channels, a.patch_size, a.depth, a.num_heads)
            # Tells the backbone's blocks which tokens are audio once they share one sequence.
            self.audio_type_embed = nn.Parameter(torch.zeros(1, 1, spec.channels))
            nn.init.trunc_normal_(self.audio_type_embed, std=0.02)
            audio_spec = (self.audio_encoder.num_tokens, self.audio_encoder.dim)
        for e in self.exit_configs:
            self._check_exit(e)
        self.exits = nn.ModuleList(
            create_exit(e.type, self.backbone.feature_spec(e.position), n_out, **self._exit_kwargs(e, audio_spec))
            for e in self.exit_configs
        )
        if config.target_stats is not None:
            if config.task != "regression":
                raise ValueError("target_stats apply to regression models only")
            loc, scale = config.target_stats
            if not scale > 0:
                raise ValueError(f"target scale must be positive, not {scale}")
        self._target = config.target_stats
        self.bottleneck: Bottleneck | None = None
        if config.bottleneck is not None:
            b = config.bottleneck
            if not 1 <= b.position < self.backbone.num_blocks:
                raise ValueError(f"a bottleneck sits at a split: position in 1..{self.backbone.num_blocks - 1}, "
                                 f"not {b.position}")
            if config.audio is not None:
                raise ValueError("bottlenecks are for visual-only models: audiovisual tails take audio tokens too")
            self.bottleneck = Bottleneck(b, self.backbone.feature_spec(b.position))

    def _check_exit(self, e: ExitConfig) -> None:
        low = 0 if e.modality == "audio" else 1
        if not low <= e.position <= self.backbone.num_blocks:
            raise ValueError(f"exit {e.name}: position must be in {low}..{self.backbone.num_blocks}")
        if e.uses_audio and self.audio_encoder is None:
            raise ValueError(f"exit {e.name} attends over audio, but the model is not audiovisual")
        if e.uses_audio and e.type != "slvit":
            raise ValueError(f"exit {e.name}: only slvit exits can attend over audio")
        if self.config.audio is not None and e.position > self.config.audio.fuse_at:
            raise ValueError(f"exit {e.name} sits after block {self.config.audio.fuse_at}, where audio joins "
                             "the backbone; audiovisual exits must come before the fusion point")

    @staticmethod
    def _exit_kwargs(e: ExitConfig, audio_spec: tuple[int, int] | None) -> dict[str, Any]:
        if e.type != "slvit" or audio_spec is None:
            return dict(e.options)
        return {**e.options, "modality": e.modality, "audio_spec": audio_spec}

    @property
    def exit_names(self) -> list[str]:
        return [e.name for e in self.exit_configs]

    @property
    def num_blocks(self) -> int:
        return self.backbone.num_blocks

    @property
    def audiovisual(self) -> bool:
        return self.audio_encoder is not None

    @property
    def num_audio_tokens(self) -> int:
        return 0 if self.audio_encoder is None else self.audio_encoder.num_tokens

    def trunk_parameters(self) -> list[nn.Parameter]:
        """Everything but the exits and the bottleneck: what phase 1 trains and phases 2-3 freeze."""
        others = {id(p) for m in (self.exits, self.bottleneck) if m is not None for p in m.parameters()}
        return [p for p in self.parameters() if id(p) not in others]

    def encode_audio(self, audio: torch.Tensor | None) -> torch.Tensor | None:
        """Spectrograms (B, 1, mels, frames) -> audio tokens (B, N, D); None for models without audio."""
        if self.audio_encoder is None:
            return None
        if audio is None:
            raise ValueError("this model is audiovisual: it needs the audio input too")
        return self.audio_encoder(audio)

    def forward_blocks(self, feats: torch.Tensor, start: int, stop: int | None = None,
                       audio_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone blocks ``[start, stop)``; audio tokens, when given, join the sequence before block ``fuse_at``.

        Without them an audiovisual model runs visual-only (phase 1 does so on
        some batches, so that the visual pathway learns to count on its own).
        """
        stop = self.num_blocks if stop is None else stop
        fuse_at = None if self.config.audio is None else self.config.audio.fuse_at
        if audio_tokens is None or fuse_at is None or not start <= fuse_at < stop:
            return self.backbone.forward_blocks(feats, start, stop)
        feats = self.backbone.forward_blocks(feats, start, fuse_at)
        feats = torch.cat([feats, audio_tokens + self.audio_type_embed], dim=1)
        return self.backbone.forward_blocks(feats, fuse_at, stop)

    def tail(self, feats: torch.Tensor, start: int, audio_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks ``[start, L)`` and the final head: the cloud's half."""
        return self._in_target_units(self.backbone.forward_head(self.forward_blocks(feats, start, None, audio_tokens)))

    def run_exit(self, index: int, feats: torch.Tensor | None, audio_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Exit ``index`` on the representation after its position (and the audio tokens, if it uses them)."""
        e = self.exit_configs[index]
        grid = self.backbone.to_grid(feats, e.position) if e.uses_visual else None
        if not e.uses_audio:
            return self._in_target_units(self.exits[index](grid))
        if audio_tokens is None:
            raise ValueError(f"exit {e.name} needs the audio tokens")
        return self._in_target_units(self.exits[index](grid, audio_tokens))

    def _in_target_units(self, out: torch.Tensor) -> torch.Tensor:
        if self._target is None:
            return out
        loc, scale = self._target
        return torch.stack([out[:, 0] * scale + loc, out[:, 1] + 2 * math.log(scale)], dim=1)

    def final(self, x: torch.Tensor, audio: torch.Tensor | None = None, drop_audio: bool = False) -> torch.Tensor:
        """The whole model without exits (what phase 1 trains and baselines run); ``drop_audio``
        runs an audiovisual model on the picture alone."""
        return self.tail(self.backbone.embed(x), 0, None if drop_audio else self.encode_audio(audio))

    def forward(self, x: torch.Tensor, audio: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One full pass: every exit's output and the final head's output."""
        audio_tokens = self.encode_audio(audio)
        feats, pos, outs = self.backbone.embed(x), 0, []
        for i, e in enumerate(self.exit_configs):
            feats, pos = self.forward_blocks(feats, pos, e.position, audio_tokens), e.position
            outs.append(self.run_exit(i, feats, audio_tokens))
        return outs, self.tail(feats, pos, audio_tokens)
