"""Free Spoken Digit Dataset: ``<digit>_<speaker>_<index>.wav`` in a folder or zip.

The label is in the file name, so a name that does not follow the pattern
is an error rather than a silently dropped sample.
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from offramp.core.errors import DataError
from offramp.core.data.audio import AUDIO_SHAPE, single_threaded, wav_to_tensor
from offramp.core.data.files import FileSource
from offramp.core.data.listing import Listing

_NAME = re.compile(r"(\d)_([^_]+)_(\d+)\.wav", re.IGNORECASE)


def list_fsdd(path: str | Path) -> Listing:
    """List the WAV files and their digits; decoding runs the log-mel front end per subset."""
    source = FileSource(path)
    names = [n for n in source.names if n.lower().endswith(".wav")]
    if not names:
        source.close()
        raise DataError(f"no .wav files found in {source.path}")
    labels = []
    for name in names:
        match = _NAME.fullmatch(PurePosixPath(name).name)
        if match is None:
            source.close()
            raise DataError(f"WAV file '{name}' in {source.path} is not named <digit>_<speaker>_<index>.wav")
        labels.append(int(match.group(1)))

    def decode(idx: np.ndarray) -> torch.Tensor:
        out = torch.empty((len(idx), *AUDIO_SHAPE), dtype=torch.float32)
        with source, single_threaded():
            for k, i in enumerate(idx):
                out[k] = wav_to_tensor(source.read(names[i]), AUDIO_SHAPE, f"'{names[i]}' in {source.path}")
        return out

    return Listing(
        labels=np.array(labels, dtype=np.int64),
        label_names=[str(d) for d in range(10)],
        input_shape=AUDIO_SHAPE,
        modality="audio",
        decode=decode,
    )
