"""The image transform used by training and serving alike.

One function decodes a file to uint8 pixels and one maps pixels to floats,
so a served image goes through exactly the operations a training image did.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from offramp.core.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


# uint8 -> float32 in [-1, 1], i.e. (x/255 - 0.5) / 0.5; a table makes batch and single inputs agree bit for bit
_TO_FLOAT = np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def decode_image(data: bytes, input_shape: tuple[int, int, int], what: str) -> np.ndarray:
    """Encoded bytes -> (C, H, W) uint8, converted to L/RGB and resized if needed.

    ``what`` names the file in the error message (e.g. ``'cat/0012.jpg' in x.zip``).
    """
    channels, height, width = input_shape
    if channels not in (1, 3):
        raise ValueError(f"images have 1 or 3 channels, not {channels}")
    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size != (width, height):
                im.draft(mode, (width, height))  # JPEG: decode big photos at a reduced scale
            im = im.convert(mode) if im.mode != mode else im
            if im.size != (width, height):
                im = im.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(im, dtype=np.uint8)
    except UnidentifiedImageError:
        raise DataError(f"corrupt image {what}: cannot identify image file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # truncated, malformed, huge
        raise DataError(f"corrupt image {what}: {e}") from None
    return pixels.reshape(height, width, channels).transpose(2, 0, 1)


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(..., C, H, W) uint8 -> the same shape in float32, scaled to [-1, 1]."""
    return torch.from_numpy(_TO_FLOAT[pixels])
