"""Log-mel front end for speech clips, used by training and serving alike.

A clip becomes a one-channel (mels x frames) "image" that a ViT can cut
into patches: read the WAV, resample to 8 kHz, fix the length to one
second, take a log-mel spectrogram and standardize it per clip.
"""
from __future__ import annotations

import contextlib
import functools
import io
import math
import warnings
from collections.abc import Iterator

import numpy as np
import scipy.io.wavfile
import torch

from offramp.core.errors import DataError

SAMPLE_RATE = 8000  # Hz; FSDD's own rate, enough for speech digits
CLIP_SECONDS = 1.0
N_FFT = 256
N_MELS = 64
N_FRAMES = 64
AUDIO_SHAPE = (1, N_MELS, N_FRAMES)
# Rates a clip may come at: below 4 kHz there is too little of the speech band
# left to resample from; above 384 kHz is no audio interface's rate.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 4000, 384000


def read_wav(data: bytes, what: str) -> tuple[np.ndarray, int]:
    """WAV bytes -> (mono float32 samples in [-1, 1], sample rate).

    ``what`` names the file in the error message. Refuses files without
    samples, with non-finite samples, or at a rate the front end cannot
    sensibly resample to ``SAMPLE_RATE`` from.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.io.wavfile.WavFileWarning)  # odd chunks are harmless
            rate, samples = scipy.io.wavfile.read(io.BytesIO(data))
    except ZeroDivisionError:  # scipy divides the block size by the channel count
        raise DataError(f"corrupt WAV file {what}: its header declares 0 channels or 0-byte samples") from None
    except Exception as e:  # scipy's parser lets odd errors escape on damaged headers; all mean "corrupt"
        raise DataError(f"corrupt WAV file {what}: {e or type(e).__name__}") from None
    if samples.dtype == np.uint8:
        x = (samples.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(samples.dtype, np.integer):
        x = samples.astype(np.float32) / float(-np.iinfo(samples.dtype).min)
    else:
        x = samples.astype(np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if x.ndim != 1 or rate <= 0:
        raise DataError(f"corrupt WAV file {what}: unexpected shape {samples.shape} at {rate} Hz")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise DataError(f"WAV file {what} has a sample rate of {rate} Hz; clips must be recorded at "
                        f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz (they are resampled to {SAMPLE_RATE} Hz)")
    if x.size == 0:
        raise DataError(f"WAV file {what} has no samples")
    if not np.isfinite(x).all():
        raise DataError(f"WAV file {what} contains NaN or infinite samples")
    return x, int(rate)


def fix_clip(samples: np.ndarray, rate: int) -> np.ndarray:
    """Resample to ``SAMPLE_RATE`` and trim or zero-pad to exactly one clip length."""
    if rate != SAMPLE_RATE:
        # Only the first clip length (and a margin for the filter) reaches the output: resampling
        # the rest of a long recording would cost time and change nothing.
        samples = samples[: math.ceil(rate * (CLIP_SECONDS + 64 / SAMPLE_RATE))]
        g = math.gcd(rate, SAMPLE_RATE)
        import scipy.signal  # here, not at the top: it is a third of a daemon's imports, and few clips need it

        samples = scipy.signal.resample_poly(samples, SAMPLE_RATE // g, rate // g).astype(np.float32)
    n = int(SAMPLE_RATE * CLIP_SECONDS)
    out = np.zeros(n, dtype=np.float32)
    out[: min(n, len(samples))] = samples[:n]
    return out


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + f / 700.0)  # HTK


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


@functools.lru_cache(maxsize=8)
def mel_filterbank(n_mels: int, n_fft: int = N_FFT, rate: int = SAMPLE_RATE) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters, evenly spaced on the HTK mel scale."""
    fft_hz = np.linspace(0.0, rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(np.array(rate / 2)), n_mels + 2))
    lo, centre, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (fft_hz - lo) / (centre - lo)
    falling = (hi - fft_hz) / (hi - centre)
    return torch.from_numpy(np.maximum(0.0, np.minimum(rising, falling)))  # float64


def log_mel(clip: np.ndarray, n_mels: int = N_MELS, n_frames: int = N_FRAMES) -> torch.Tensor:
    """One fixed-length clip -> (1, n_mels, n_frames) standardized log-mel spectrogram."""
    hop = (len(clip) - N_FFT) // (n_frames - 1)  # no centre padding: exactly n_frames frames
    spec = torch.stft(torch.from_numpy(clip), N_FFT, hop_length=hop, window=torch.hann_window(N_FFT),
                      center=False, return_complex=True)[:, :n_frames]  # (n_fft/2+1, frames)
    # float64 from here, so quiet frames keep their precision through the log
    power = spec.abs().square().to(torch.float64)
    mel = torch.log(mel_filterbank(n_mels) @ power + 1e-6)  # (n_mels, frames)
    mel = (mel - mel.mean()) / (mel.std() + 1e-5)
    return mel.to(torch.float32).unsqueeze(0)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run many one-clip transforms without intra-op threads, restoring the setting after.

    A clip's tensors are tiny, so threads only add synchronisation; on a busy
    two-core machine they made FSDD's 2,700 clips take 35 s instead of 1.7 s.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def wav_to_tensor(data: bytes, input_shape: tuple[int, int, int], what: str) -> torch.Tensor:
    """WAV bytes -> (1, mels, frames) float32, the whole front end."""
    channels, n_mels, n_frames = input_shape
    if channels != 1:
        raise ValueError(f"audio features have 1 channel, not {channels}")
    samples, rate = read_wav(data, what)
    return log_mel(fix_clip(samples, rate), n_mels, n_frames)
