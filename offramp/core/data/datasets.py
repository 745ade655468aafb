"""Data specs (``digits``, ``imagefolder:PATH``, ``fsdd:PATH``, ``crowd-av[:N]``) -> train/val tensors."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

from offramp.core.errors import DataError
from offramp.core.data.crowd import CROWD_SPEC, load_crowd, parse_crowd_spec
from offramp.core.data.digits import list_digits
from offramp.core.data.fsdd import list_fsdd
from offramp.core.data.imagefolder import list_imagefolder
from offramp.core.data.listing import Listing

SPEC_KINDS = ("digits", "imagefolder:PATH", "fsdd:PATH", "crowd-av[:N]")


@dataclass(frozen=True)
class DataSplits:
    """A dataset ready to train on, with what a checkpoint needs to serve it later."""

    train: TensorDataset                # (x float32 (N, C, H, W), y int64 (N,)); audiovisual: (x, audio, y float32)
    val: TensorDataset
    label_names: list[str]              # regression: the quantity's name
    input_shape: tuple[int, int, int]   # (C, H, W)
    modality: str                       # "image", "audio" or "audiovisual"
    spec: str                           # the spec string it was loaded from
    task: str = "classification"        # or "regression"
    audio_shape: tuple[int, int, int] | None = None  # audiovisual: the log-mel's (1, mels, frames)
    # Held out of training, apart from validation: where thresholds and settings are chosen,
    # so that the validation split reports on data nothing was chosen on. Empty unless asked for.
    selection: TensorDataset | None = None


def _list(spec: str) -> Listing:
    """Resolve a spec string to its loader; every failure is a one-line ``DataError``."""
    kind, sep, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "digits" and not sep:
        return list_digits()
    if kind in ("imagefolder", "fsdd") and sep:
        if not path:
            raise DataError(f"data spec '{spec}' needs a path: {kind}:PATH")
        return list_imagefolder(path) if kind == "imagefolder" else list_fsdd(path)
    raise DataError(f"unknown data spec '{spec}'; use one of: {', '.join(SPEC_KINDS)}")


def load_data(spec: str, *, val_fraction: float = 0.1, seed: int = 0, limit: int | None = None,
              selection_fraction: float = 0.0) -> DataSplits:
    """Load a dataset and split it into train and validation, deterministically from ``seed``.

    ``selection_fraction`` holds a further share out of training (the
    selection split); the validation split is the same with or without it.

    ``limit`` keeps a random subset of at most that many samples before the
    split (for quick runs); only that subset is decoded.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"validation fraction must be in [0, 1), not {val_fraction}")
    if not 0.0 <= selection_fraction < 1.0 - val_fraction:
        raise DataError(f"selection fraction must be in [0, {1.0 - val_fraction:g}) beside a validation fraction "
                        f"of {val_fraction:g}, not {selection_fraction}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, not {limit}")
    if spec.partition(":")[0].strip().lower() == CROWD_SPEC:
        return _load_crowd(spec, seed, limit)
    listing = _list(spec)
    rng = np.random.default_rng(seed)
    n = len(listing.labels)
    chosen = np.arange(n) if limit is None or limit >= n else np.sort(rng.choice(n, size=limit, replace=False))
    x = listing.decode(chosen)
    y = torch.from_numpy(listing.labels[chosen])
    n = len(chosen)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)  # both sides non-empty whenever a split was asked for
    order = torch.from_numpy(rng.permutation(n))
    n_sel = min(round(n * selection_fraction), n - n_val - 1)
    val, selection, train = order[:n_val], order[n_val:n_val + n_sel], order[n_val + n_sel:]
    return DataSplits(
        train=TensorDataset(x[train], y[train]),
        val=TensorDataset(x[val], y[val]),
        selection=TensorDataset(x[selection], y[selection]) if n_sel > 0 else None,
        label_names=list(listing.label_names),
        input_shape=listing.input_shape,
        modality=listing.modality,
        spec=spec,
    )


def _load_crowd(spec: str, seed: int, limit: int | None) -> DataSplits:
    """The synthetic crowd scenes' own train/validation split (70/15; the test 15% is left out here).

    ``limit`` caps the number of scenes generated; the validation fraction is
    the generator's, so that every run validates on the same scenes.
    """
    n = parse_crowd_spec(spec)
    if limit is not None:
        n = min(n, limit)
    crowd = load_crowd(n, seed)
    return DataSplits(train=_without_lighting(crowd.train), val=_without_lighting(crowd.val), label_names=["count"],
                      input_shape=crowd.image_shape, modality="audiovisual", spec=spec, task="regression",
                      audio_shape=crowd.audio_shape)


def _without_lighting(data: TensorDataset) -> TensorDataset:
    """(x, audio, count, lighting) -> (x, audio, count): the lighting is for analysis, not training."""
    return TensorDataset(*data.tensors[:3])
