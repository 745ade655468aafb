"""A backbone with early exits attached: what is trained, checkpointed and split."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .backbone import SplittableBackbone, Task, head_outputs
from .exits import EXIT_TYPES, create_exit
from .registry import create_backbone


@dataclass(frozen=True)
class ExitConfig:
    """One exit: its architecture, the block it follows, and its keyword options."""

    type: str
    position: int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.type}@{self.position}"


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["img_size"] = tuple(d["img_size"])
        d["exits"] = tuple(ExitConfig(**e) for e in d.get("exits", ()))
        return cls(**d)


def parse_exits(spec: str) -> tuple[ExitConfig, ...]:
    """Parse ``"slvit@2,cnn@4"`` (type defaults to slvit: ``"2,4"``) into exit configs."""
    exits = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, pos = item.rpartition("@")
        kind = kind or "slvit"
        if kind not in EXIT_TYPES:
            raise ValueError(f"unknown exit type {kind!r} in {item!r}; choose from {', '.join(EXIT_TYPES)}")
        if not pos.isdigit():
            raise ValueError(f"exit {item!r} needs a block position, e.g. 'slvit@2'")
        exits.append(ExitConfig(kind, int(pos)))
    return tuple(exits)


class MultiExitModel(nn.Module):
    """Backbone plus exits, ordered by position (cheapest first)."""

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
        self.exit_configs = tuple(sorted(config.exits, key=lambda e: e.position))
        for e in self.exit_configs:
            if not 1 <= e.position <= self.backbone.num_blocks:
                raise ValueError(f"exit {e.name}: position must be in 1..{self.backbone.num_blocks}")
        self.exits = nn.ModuleList(
            create_exit(e.type, self.backbone.feature_spec(e.position), n_out, **e.options) for e in self.exit_configs
        )

    @property
    def exit_names(self) -> list[str]:
        return [e.name for e in self.exit_configs]

    @property
    def num_blocks(self) -> int:
        return self.backbone.num_blocks

    def run_exit(self, index: int, feats: torch.Tensor) -> torch.Tensor:
        """Exit ``index`` on the representation after its position."""
        pos = self.exit_configs[index].position
        return self.exits[index](self.backbone.to_grid(feats, pos))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One full pass: every exit's output and the final head's output."""
        feats, pos, outs = self.backbone.embed(x), 0, []
        for i, e in enumerate(self.exit_configs):
            feats, pos = self.backbone.forward_blocks(feats, pos, e.position), e.position
            outs.append(self.run_exit(i, feats))
        return outs, self.backbone.tail(feats, pos)
