"""The data a checkpoint's card records: its own validation split, and the selection split held out beside it.

Benchmarks, calibration and the orchestrator evaluate a checkpoint on exactly the samples its training
held out; the card names the data spec, seed and fractions that recreate them.
"""
from __future__ import annotations

from torch.utils.data import TensorDataset

from offramp.core.checkpoint import Card
from offramp.core.data.datasets import load_data
from offramp.core.errors import OfframpError


def load_validation(card: Card, data: str | None = None) -> tuple[TensorDataset, tuple[int, int, int]]:
    """The card's own validation split (same spec, seed, fraction, limit), or all of another data spec."""
    if data is not None:
        splits = load_data(data, val_fraction=0.0)
        return splits.train, splits.input_shape
    d = card.data
    if not d.get("spec"):
        raise OfframpError("the checkpoint's card names no data; pass --data")
    splits = load_data(d["spec"], val_fraction=d.get("val_fraction", 0.1), seed=d.get("seed", 0), limit=d.get("limit"),
                       selection_fraction=d.get("selection_fraction", 0.0))
    return splits.val, splits.input_shape


def load_selection(card: Card) -> TensorDataset:
    """The card's selection split: held out of training and of validation, for choosing thresholds."""
    d = card.data
    if not d.get("spec") or not d.get("selection_fraction"):
        raise OfframpError("the checkpoint was trained without a selection split (offramp train "
                           "--selection-fraction); choose on --data instead")
    return load_data(d["spec"], val_fraction=d.get("val_fraction", 0.1), seed=d.get("seed", 0), limit=d.get("limit"),
                     selection_fraction=d["selection_fraction"]).selection
