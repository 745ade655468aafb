"""Images in class folders (``<class>/<image>``), from a folder or a zip.

The class of an image is the name of the folder that holds it, so a zip
that wraps everything in one top-level folder works as well.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np
import torch

from offramp.core.errors import DataError
from offramp.core.data.cache import cache_exists, cached_array, source_checksum
from offramp.core.data.files import FileSource
from offramp.core.data.images import IMAGE_SUFFIXES, decode_image, pixels_to_tensor
from offramp.core.data.listing import Listing

IMAGE_SHAPE = (3, 32, 32)


def list_imagefolder(path: str | Path, input_shape: tuple[int, int, int] = IMAGE_SHAPE) -> Listing:
    """List the images and their classes (sorted by name); decoding happens per subset."""
    source = FileSource(path)
    names = [n for n in source.names if n.lower().endswith(IMAGE_SUFFIXES)]
    if not names:
        source.close()
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {source.path}")
    classes = [PurePosixPath(n).parent.name for n in names]
    for name, cls in zip(names, classes):
        if not cls:
            source.close()
            raise DataError(f"image '{name}' in {source.path} is not inside a class folder "
                            "(expected <class>/<image>)")
    label_names = sorted(set(classes))
    index = {c: i for i, c in enumerate(label_names)}

    def decode_pixels(idx: np.ndarray) -> np.ndarray:
        pixels = np.empty((len(idx), *input_shape), dtype=np.uint8)
        with source:  # one pass over the files; a tight loop beats threads for small images
            for k, i in enumerate(idx):
                pixels[k] = decode_image(source.read(names[i]), input_shape, f"'{names[i]}' in {source.path}")
        return pixels

    def decode(idx: np.ndarray) -> torch.Tensor:
        # The whole set is decoded once and cached; a small subset of an uncached set is decoded alone.
        key = f"imagefolder-{source_checksum(source.path, names)[:24]}-{len(names)}-{'x'.join(map(str, input_shape))}"
        if len(idx) < len(names) and not cache_exists(key):
            return pixels_to_tensor(decode_pixels(idx))
        return pixels_to_tensor(cached_array(key, lambda: decode_pixels(np.arange(len(names))))[idx])

    return Listing(
        labels=np.array([index[c] for c in classes], dtype=np.int64),
        label_names=label_names,
        input_shape=input_shape,
        modality="image",
        decode=decode,
    )
