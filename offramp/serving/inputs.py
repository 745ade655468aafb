"""Turning an ``InferRequest`` into the model's input, or saying precisely why not.

Encoded files go through the very transform the model was trained with; raw
tensors must already have the card's input shape. Audiovisual models take the
picture in ``encoded_file``/``tensor`` and the clip as a WAV in ``audio``.
Anything else is the caller's mistake and becomes INVALID_ARGUMENT with the
reason.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from offramp.core.data import preprocess_bytes
from offramp.core.errors import DataError, OfframpError
from offramp.core.wire import pb


class InputError(OfframpError):
    """An input the edge cannot use; the message goes back to the caller as is."""


def request_inputs(request: pb.InferRequest, modality: str, input_shape: tuple[int, ...],
                   audio_shape: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (C, H, W) input a request carries and, for audiovisual models, its (1, mels, frames) log-mel."""
    if modality != "audiovisual":
        if request.HasField("audio"):
            raise InputError("this model is not audiovisual: leave the audio field unset")
        return request_tensor(request, modality, input_shape), None
    if not request.HasField("audio"):
        raise InputError("this model is audiovisual: set audio to a WAV clip beside the image")
    if request.WhichOneof("input") is None:
        raise InputError("this model is audiovisual: set encoded_file (or tensor) to the image beside the audio")
    if file_kind(request.audio) != ("audio", "a WAV file"):
        got = file_kind(request.audio)
        raise InputError(f"audio must be a WAV file, got {got[1] if got else 'unrecognised bytes'}")
    try:
        audio = preprocess_bytes(request.audio, "audio", tuple(audio_shape))
    except (DataError, ValueError) as e:
        raise InputError(f"cannot decode audio: {e}") from None
    return request_tensor(request, "image", input_shape), audio


def request_tensor(request: pb.InferRequest, modality: str, input_shape: tuple[int, ...]) -> torch.Tensor:
    """The (C, H, W) float32 input in ``encoded_file`` or ``tensor``."""
    kind = request.WhichOneof("input")
    if kind == "encoded_file":
        got = file_kind(request.encoded_file)
        if got is not None and got[0] != modality:
            takes, expected = ("audio", "a WAV file") if modality == "audio" else ("images", "an image file")
            raise InputError(f"cannot decode encoded_file: the model takes {takes}, expected {expected} "
                             f"but got {got[1]}")
        try:
            return preprocess_bytes(request.encoded_file, modality, input_shape)
        except (DataError, ValueError) as e:
            raise InputError(f"cannot decode encoded_file as {modality}: {e}") from None
    if kind == "tensor":
        return _raw_tensor(request.tensor, tuple(input_shape))
    raise InputError("the request carries no input: set encoded_file or tensor")


_IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF",
                b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


def file_kind(data: bytes) -> tuple[str, str] | None:
    """``(modality, description)`` of a file recognised by its first bytes, or None."""
    if data[:4] in (b"RIFF", b"RIFX", b"RF64") and data[8:12] == b"WAVE":
        return "audio", "a WAV file"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image", "a WebP image"
    for magic, name in _IMAGE_MAGIC.items():
        if data.startswith(magic):
            return "image", f"a {name} image"
    return None


def _raw_tensor(raw: pb.RawTensor, expected: tuple[int, ...]) -> torch.Tensor:
    shape = tuple(raw.shape)
    if shape != expected:
        raise InputError(f"tensor has shape {list(shape)}, the model takes {list(expected)}")
    want = math.prod(shape) * 4
    if len(raw.data) != want:
        raise InputError(f"tensor data has {len(raw.data)} bytes, shape {list(shape)} in float32 needs {want}")
    array = np.frombuffer(raw.data, dtype="<f4").reshape(shape)
    if not np.isfinite(array).all():
        raise InputError("tensor contains NaN or infinite values")
    return torch.from_numpy(array.astype(np.float32))  # a writable, native-endian copy
