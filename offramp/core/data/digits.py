"""The 8x8 handwritten digits scikit-learn bundles, shipped here (digits.npz, DIGITS_NOTICE.txt): the data that
needs no download, and no scikit-learn."""
from __future__ import annotations

from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F

from offramp.core.data.listing import Listing

DIGITS_SHAPE = (1, 32, 32)


def list_digits() -> Listing:
    """1,797 digits, upsampled to 32x32 so they fit the image models; ink is high (+1)."""
    with resources.files(__package__).joinpath("digits.npz").open("rb") as fh, np.load(fh) as arrays:
        images, target = arrays["images"], arrays["target"]
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=DIGITS_SHAPE[1:], mode="bilinear", align_corners=False) * 2.0 - 1.0
    return Listing(
        labels=target.astype(np.int64),
        label_names=[str(d) for d in range(10)],
        input_shape=DIGITS_SHAPE,
        modality="image",
        decode=lambda idx: x[torch.from_numpy(idx)],
    )
