"""Single inputs for serving, through the very transform used for training."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from offramp.core.errors import DataError
from offramp.core.data.audio import wav_to_tensor
from offramp.core.data.images import decode_image, pixels_to_tensor

MODALITIES = ("image", "audio")


def _preprocess(data: bytes, modality: str, input_shape: tuple[int, int, int], what: str) -> torch.Tensor:
    shape = (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
    if modality == "image":
        return pixels_to_tensor(decode_image(data, shape, what)[np.newaxis])[0]
    if modality == "audio":
        return wav_to_tensor(data, shape, what)
    raise DataError(f"unknown modality '{modality}'; use one of: {', '.join(MODALITIES)}")


def preprocess_bytes(data: bytes, modality: str, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """Encoded file bytes (JPEG/PNG/... or WAV) -> (C, H, W) float32 model input."""
    return _preprocess(data, modality, input_shape, f"({len(data)} bytes)")


def preprocess_file(path: str | Path, modality: str, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """An image or WAV file -> (C, H, W) float32, exactly as it would be in training."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data path '{path}' does not exist") from None
    except OSError as e:
        raise DataError(f"cannot read '{path}': {e}") from None
    return _preprocess(data, modality, input_shape, f"'{path}'")


def encode_images(inputs: np.ndarray, image_format: Literal["jpeg", "png"] = "jpeg", quality: int = 90
                  ) -> tuple[bytes, ...]:
    """Each (C, H, W) image input in [-1, 1] as the file a camera would send: the exact inverse of decoding,
    up to the format's own loss (none for PNG; JPEG's at ``quality``)."""
    from PIL import Image

    pixels = np.clip(np.rint((np.asarray(inputs, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    files = []
    for sample in pixels:
        image = Image.fromarray(sample[0] if sample.shape[0] == 1 else sample.transpose(1, 2, 0))
        buffer = io.BytesIO()
        image.save(buffer, format=image_format.upper(), **({"quality": quality} if image_format == "jpeg" else {}))
        files.append(buffer.getvalue())
    return tuple(files)
