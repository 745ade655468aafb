"""Checkpoints: safetensors weights plus a JSON card, never pickle.

The card holds the architecture, split point, exits, label names, input
description, validation metrics and a SHA-256 fingerprint over the config and
the weights. Edge and cloud compare fingerprints to refuse mismatched halves.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from offramp.core.errors import CheckpointError
from offramp.core.models import ModelConfig, MultiExitModel

WEIGHTS = "model.safetensors"
CARD = "card.json"
FORMAT_VERSION = 1


@dataclass
class Card:
    """What a checkpoint says about itself (``card.json``)."""

    config: ModelConfig
    label_names: list[str]
    modality: str
    input_shape: tuple[int, int, int]
    split_block: int
    data: dict[str, Any] = field(default_factory=dict)  # spec, seed, val_fraction, limit: rebuilds the val split
    metrics: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "label_names": self.label_names,
            "modality": self.modality,
            "input_shape": list(self.input_shape),
            "split_block": self.split_block,
            "data": self.data,
            "metrics": self.metrics,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Card":
        return cls(
            config=ModelConfig.from_dict(d["config"]),
            label_names=list(d["label_names"]),
            modality=d["modality"],
            input_shape=tuple(d["input_shape"]),
            split_block=int(d["split_block"]),
            data=d.get("data", {}),
            metrics=d.get("metrics", {}),
            fingerprint=d.get("fingerprint", ""),
        )


def fingerprint(config: ModelConfig, state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the canonical config JSON and every tensor (name, dtype, shape, bytes)."""
    return _digest(config.to_dict(), state)


def bottleneck_id(model: MultiExitModel) -> str:
    """What a bottleneck's codes are labelled with on the wire, e.g. ``c8b4@2:1f0c2a9e55d41b07``:
    its settings and a digest of them and its weights, so no other bottleneck decodes them."""
    if model.bottleneck is None:
        return ""
    config = model.config.bottleneck
    state = {k: v for k, v in model.bottleneck.state_dict().items()}
    return f"{config.name}:{_digest(config.to_dict(), state)[:16]}"


def _digest(header: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(directory: str | Path, model: MultiExitModel, card: Card) -> Card:
    """Write weights and card; returns the card with its fingerprint filled in."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    card.config = model.config
    card.fingerprint = fingerprint(model.config, state)
    save_file(state, directory / WEIGHTS)
    (directory / CARD).write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    return card


def read_card(directory: str | Path) -> Card:
    path = Path(directory) / CARD
    if not Path(directory).is_dir():
        raise CheckpointError(f"checkpoint directory '{directory}' does not exist (train one with 'offramp train')")
    if not path.is_file():
        raise CheckpointError(f"'{directory}' is not an Offramp checkpoint: {CARD} is missing")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: unsupported format_version {raw.get('format_version')!r}")
        return Card.from_dict(raw)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid model card: {e}") from None


def load_checkpoint(directory: str | Path, verify: bool = True) -> tuple[MultiExitModel, Card]:
    """Rebuild the model from its card and load the weights (no pickle anywhere)."""
    card = read_card(directory)
    weights = Path(directory) / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"'{directory}' has a card but no {WEIGHTS}")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {e}") from None
    try:
        model = MultiExitModel(card.config)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, ImportError) as e:
        raise CheckpointError(f"weights in '{directory}' do not match its card: {str(e).splitlines()[0]}") from None
    if verify and card.fingerprint != fingerprint(card.config, state):
        raise CheckpointError(f"'{directory}': fingerprint mismatch, the weights or card were modified")
    return model.eval(), card
