"""SYNTHETIC audiovisual crowd scenes for the paper's crowd-counting experiment.

Nothing here is a real crowd and nothing is downloaded: every scene is drawn
by this module from a seed, so ``crowd-av`` (``crowd-av:N`` for N scenes)
needs no files and is the same on every run.

What it models. A 32x32 RGB picture of ``count`` (0..60) people-like figures
-- a body ellipse, a hair disc and a face disc, smaller and higher up the
further away they stand, overlapping and drawn far-to-near -- on a cluttered
background of muted rectangles, lines and texture that is never people-shaped.
Lighting is ``bright`` (full contrast, little noise), ``dim`` (~0.4 of the
light, some sensor noise) or ``dark`` (~0.12 of the light, strong shot, read
and row noise and a colour cast), so counting from the picture alone goes
from easy to hard. With it, one second of 8 kHz audio mixes one voice-like
source per figure -- a harmonic series on a 90-300 Hz fundamental with
vibrato and drift, gated by syllable-like bursts at random onsets, louder
the nearer the figure -- over pink-to-brown background noise, so RMS grows
roughly as sqrt(count) before a soft clip. The audio never depends on the
lighting: that is what lets audio carry the count where the picture fails,
the property the fusion experiment needs.

What it does not model. Real faces, bodies, poses or clothing; scenes larger
than 32x32; real speech, language, reverberation, music or traffic;
any correlation between lighting and crowd size; people heard but not seen
(or seen but silent). The log-mel front end standardises every clip, so the
absolute loudness does not reach a model: the count shows there as the
voices' level over the noise floor and how much of the time-frequency plane
they fill. Numbers learned here say how the method behaves, not how it
would do on real crowds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io.wavfile
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from offramp.core.errors import DataError
from offramp.core.data.audio import AUDIO_SHAPE, SAMPLE_RATE, log_mel, single_threaded
from offramp.core.data.images import pixels_to_tensor

CROWD_SPEC = "crowd-av"
MAX_COUNT = 60
LIGHTING_NAMES = ("bright", "dim", "dark")
IMAGE_SIZE = 32                           # matches the small ViT default
IMAGE_SHAPE = (3, IMAGE_SIZE, IMAGE_SIZE)
CLIP_SAMPLES = SAMPLE_RATE                # one second
DEFAULT_SCENES = 3000
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)      # train, val, test



@dataclass(frozen=True)
class _Camera:
    """How one lighting condition reaches the sensor; noise in units of full scale.

    Ranges rather than constants, drawn per scene, so the exposure level and
    the noise level are no giveaway of the count.
    """

    gain: tuple[float, float]          # light reaching the sensor, relative to a bright scene
    read_noise: tuple[float, float]    # sigma of signal-independent noise
    shot_noise: float                  # noise variance per unit of signal (photon noise)
    row_noise: float                   # sigma of per-row banding, which averaging over a row cannot remove
    colour_cast: float                 # +- spread of per-channel gains (poor white balance in low light)


_CAMERAS = {
    "bright": _Camera(gain=(0.85, 1.05), read_noise=(0.004, 0.008), shot_noise=0.0, row_noise=0.0, colour_cast=0.0),
    "dim": _Camera(gain=(0.32, 0.48), read_noise=(0.015, 0.03), shot_noise=0.00125, row_noise=0.004,
                   colour_cast=0.08),
    "dark": _Camera(gain=(0.08, 0.16), read_noise=(0.035, 0.06), shot_noise=0.00375, row_noise=0.012,
                    colour_cast=0.25),
}

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + np.float32(0.5)  # pixel centres

_SKIN = np.array([[0.96, 0.80, 0.69], [0.91, 0.71, 0.58], [0.80, 0.58, 0.44],
                  [0.65, 0.45, 0.32], [0.48, 0.32, 0.22], [0.33, 0.22, 0.15]], dtype=np.float32)
_HAIR = np.array([[0.08, 0.06, 0.05], [0.25, 0.16, 0.09], [0.45, 0.30, 0.15],
                  [0.80, 0.68, 0.42], [0.60, 0.60, 0.60], [0.15, 0.12, 0.10]], dtype=np.float32)


# ---------------------------------------------------------------- image

def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (each (K,), in [0, 1]) -> (K, 3) RGB."""
    k = (np.array([5.0, 3.0, 1.0], dtype=np.float32) + h[:, None] * 6.0) % 6.0
    return (v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)).astype(np.float32)


def _composite(base: np.ndarray, alpha: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Paint K shapes over ``base`` (H, W, 3) in order; alpha (K, H, W), colours (K, 3).

    Shape k shows through with weight alpha_k * prod_{j>k}(1 - alpha_j): one
    running product (a loop over K rows, faster than ``np.cumprod`` along axis
    0) and one contraction replace painting the shapes one by one.
    """
    k = len(alpha)
    if k == 0:
        return base
    a = alpha.reshape(k, -1)                                          # (K, P)
    weight = np.empty_like(a)
    clear = np.ones(a.shape[1], dtype=a.dtype)                        # prod of (1 - alpha) over shapes above
    for i in range(k - 1, -1, -1):
        weight[i] = a[i] * clear
        clear *= 1.0 - a[i]
    paint = np.einsum("kc,kp->pc", colours, weight)                   # (P, 3)
    return base * clear.reshape(base.shape[:2])[..., None] + paint.reshape(base.shape)


def _ellipse_alpha(cx: np.ndarray, cy: np.ndarray, ax: np.ndarray, ay: np.ndarray) -> np.ndarray:
    """(K,) centres and semi-axes -> (K, H, W) anti-aliased coverage of axis-aligned ellipses."""
    dx = (_XX - cx[:, None, None]) / ax[:, None, None]
    dy = (_YY - cy[:, None, None]) / ay[:, None, None]
    rho = np.sqrt(dx * dx + dy * dy) + 1e-6
    grad = np.sqrt((dx / ax[:, None, None]) ** 2 + (dy / ay[:, None, None]) ** 2) / rho + 1e-6
    return np.clip(0.5 - (rho - 1.0) / grad, 0.0, 1.0)               # ~signed distance in pixels


def _box_alpha(x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """(K,) corners -> (K, H, W) anti-aliased coverage of axis-aligned rectangles."""
    cov_x = np.clip(np.minimum(_XX - x0[:, None, None], x1[:, None, None] - _XX) + 0.5, 0.0, 1.0)
    cov_y = np.clip(np.minimum(_YY - y0[:, None, None], y1[:, None, None] - _YY) + 0.5, 0.0, 1.0)
    return cov_x * cov_y


def _line_alpha(p: np.ndarray, q: np.ndarray, width: np.ndarray) -> np.ndarray:
    """(K, 2) end points (x, y) and (K,) widths -> (K, H, W) coverage of thick segments."""
    d = q - p
    t = ((_XX - p[:, 0, None, None]) * d[:, 0, None, None] + (_YY - p[:, 1, None, None]) * d[:, 1, None, None])
    t = np.clip(t / ((d * d).sum(1)[:, None, None] + 1e-6), 0.0, 1.0)
    ex = _XX - (p[:, 0, None, None] + t * d[:, 0, None, None])
    ey = _YY - (p[:, 1, None, None] + t * d[:, 1, None, None])
    return np.clip(width[:, None, None] / 2 + 0.5 - np.sqrt(ex * ex + ey * ey), 0.0, 1.0)


def _muted(rng: np.random.Generator, k: int, s_max: float, v: tuple[float, float]) -> np.ndarray:
    """k low-saturation colours: clutter must not look like clothing or skin."""
    return _hsv_to_rgb(rng.random(k, dtype=np.float32), rng.uniform(0.0, s_max, k).astype(np.float32),
                       rng.uniform(*v, k).astype(np.float32))


def _low_freq(rng: np.random.Generator, cells: int, amp: float) -> np.ndarray:
    """(H, W) smooth texture: a coarse random grid, upsampled bilinearly."""
    grid = rng.uniform(-amp, amp, (cells + 1, cells + 1)).astype(np.float32)
    pos = (np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5) * (cells / IMAGE_SIZE)
    i = np.minimum(pos.astype(np.int64), cells - 1)
    f = pos - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]                 # (H, cells+1)
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _background(rng: np.random.Generator, horizon: float) -> np.ndarray:
    """(H, W, 3) in [0, 1]: wall/sky above the horizon, ground below, muted clutter over both."""
    upper, ground = _muted(rng, 2, 0.25, (0.35, 0.8))
    img = np.where((_YY < horizon)[..., None], upper, ground).astype(np.float32)
    img = img + _low_freq(rng, 4, 0.08)[..., None] + _low_freq(rng, 16, 0.03)[..., None]
    n_box = int(rng.integers(3, 9))
    x0 = rng.uniform(-4, IMAGE_SIZE, n_box).astype(np.float32)
    y0 = rng.uniform(-4, IMAGE_SIZE, n_box).astype(np.float32)
    w = rng.uniform(2, 12, n_box).astype(np.float32)
    h = rng.uniform(2, 10, n_box).astype(np.float32)
    img = _composite(img, _box_alpha(x0, y0, x0 + w, y0 + h) * rng.uniform(0.5, 1.0, n_box)[:, None, None],
                     _muted(rng, n_box, 0.3, (0.2, 0.9)))
    n_line = int(rng.integers(2, 7))
    p = rng.uniform(-2, IMAGE_SIZE + 2, (n_line, 2)).astype(np.float32)
    q = rng.uniform(-2, IMAGE_SIZE + 2, (n_line, 2)).astype(np.float32)
    width = rng.uniform(0.4, 1.2, n_line).astype(np.float32)
    img = _composite(img, _line_alpha(p, q, width), _muted(rng, n_line, 0.15, (0.1, 0.95)))
    return img


def _figures(rng: np.random.Generator, count: int, horizon: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shapes for ``count`` figures, far to near: (3*count, H, W) alpha, (3*count, 3) colours, and
    each figure's nearness in [0.08, 1] (scale on screen, which also sets its voice's loudness)."""
    foot = np.sort(horizon + (IMAGE_SIZE + 3 - horizon) * rng.uniform(0.08, 1.0, count)).astype(np.float32)
    near = (foot - horizon) / (IMAGE_SIZE + 3 - horizon)                    # sorted: far first, painter's order
    size = near * rng.uniform(0.85, 1.15, count).astype(np.float32)
    cx = rng.uniform(-1, IMAGE_SIZE + 1, count).astype(np.float32)
    body_h = 0.8 + 3.2 * size                                               # semi-axes, in pixels
    body_w = body_h * rng.uniform(0.40, 0.55, count).astype(np.float32)
    head_r = 0.45 + 1.25 * size
    body_cy = foot - body_h
    head_cy = body_cy - body_h - 0.7 * head_r
    clothes = _hsv_to_rgb(rng.random(count, dtype=np.float32), rng.uniform(0.35, 1.0, count).astype(np.float32),
                          rng.uniform(0.3, 1.0, count).astype(np.float32))
    dark_coat = rng.random(count) < 0.2
    clothes[dark_coat] = rng.uniform(0.05, 0.3, (int(dark_coat.sum()), 1)).astype(np.float32)
    skin = _SKIN[rng.integers(0, len(_SKIN), count)]
    hair = _HAIR[rng.integers(0, len(_HAIR), count)]
    # per figure: body, then hair, then face (a slightly smaller disc, lower), interleaved far to near
    cxs = np.stack([cx, cx, cx], 1).ravel()
    cys = np.stack([body_cy, head_cy - 0.15 * head_r, head_cy + 0.15 * head_r], 1).ravel()
    axs = np.stack([body_w, head_r, 0.85 * head_r], 1).ravel()
    ays = np.stack([body_h, head_r, 0.85 * head_r], 1).ravel()
    colours = np.stack([clothes, hair, skin], 1).reshape(-1, 3)
    return _ellipse_alpha(cxs, cys, axs, ays), colours, near


def _expose(rng: np.random.Generator, img: np.ndarray, lighting: str) -> np.ndarray:
    """Scene radiance (H, W, 3) in ~[0, 1] -> uint8 as a camera sees it in that light."""
    cam = _CAMERAS[lighting]
    colour = 1.0 + rng.uniform(-cam.colour_cast, cam.colour_cast, 3).astype(np.float32)
    x = img * np.float32(rng.uniform(*cam.gain)) * colour
    sigma = np.sqrt(np.float32(rng.uniform(*cam.read_noise)) ** 2 + cam.shot_noise * np.clip(x, 0.0, None))
    x = x + sigma * rng.standard_normal(x.shape, dtype=np.float32)
    x = x + np.float32(cam.row_noise) * rng.standard_normal((IMAGE_SIZE, 1, 1), dtype=np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- audio

_TABLE = 2048                              # wavetable length for one period (a power of two)
_HARMONICS = 12                            # 12 x 300 Hz x (1 + 6 % excursion) stays below 4 kHz
_CTRL = 32                                 # pitch and envelope control step in samples (4 ms)
_H = np.arange(1, _HARMONICS + 1, dtype=np.float32)
_T_CTRL = np.arange(CLIP_SAMPLES // _CTRL + 1, dtype=np.float32) * np.float32(_CTRL / SAMPLE_RATE)
_STEP = np.arange(_CTRL, dtype=np.float32) / np.float32(_CTRL)    # how far into its control step a sample is


def _voices(rng: np.random.Generator, near: np.ndarray) -> np.ndarray:
    """The sum of one harmonic voice per figure, each gated by syllable bursts: (samples,) float32.

    Pitch and loudness move slowly, so both are computed every ``_CTRL`` samples
    and interpolated; only the wavetable look-up runs at the full rate.
    """
    n = len(near)
    f0 = rng.uniform(90.0, 300.0, (n, 1)).astype(np.float32)
    # vibrato and slow drift as two sinusoids per voice, stacked: (n, 2, ctrl)
    rate = rng.uniform((4.0, 0.3), (7.0, 1.5), (n, 2)).astype(np.float32)
    depth = rng.uniform((0.005, 0.0), (0.025, 0.03), (n, 2)).astype(np.float32)
    offset = rng.uniform(0, 2 * np.pi, (n, 2)).astype(np.float32)
    wobble = (depth[..., None] * np.sin(np.float32(2 * np.pi) * rate[..., None] * _T_CTRL + offset[..., None])).sum(1)
    freq = f0 * (1.0 + wobble)                                                             # (n, ctrl) Hz
    phase_ctrl = np.cumsum(freq * np.float32(_CTRL / SAMPLE_RATE), axis=1) + rng.random((n, 1), dtype=np.float32)
    # a per-voice timbre: harmonic amplitudes falling as h^-p with jitter and random phases
    amp = (_H ** -rng.uniform(0.6, 1.4, (n, 1)) * rng.uniform(0.4, 1.0, (n, _HARMONICS))).astype(np.float32)
    amp[_H[None, :] * f0 * 1.06 > 0.49 * SAMPLE_RATE] = 0.0
    spectrum = np.zeros((n, _TABLE // 2 + 1), dtype=np.complex64)
    spectrum[:, 1:_HARMONICS + 1] = amp * np.exp(1j * rng.uniform(0, 2 * np.pi, (n, _HARMONICS)))
    table = np.fft.irfft(spectrum, _TABLE, axis=1).astype(np.float32)                     # (n, table): one period
    table /= np.abs(table).max(axis=1, keepdims=True) + np.float32(1e-6)
    # syllables: up to 6 per voice, each a raised-cosine burst of 80-300 ms at a random onset
    talk = rng.uniform(0.4, 0.9, (n, 1))
    on = rng.random((n, 6)) < talk
    onset = rng.uniform(-0.15, 1.0, (n, 6, 1)).astype(np.float32)
    dur = rng.uniform(0.08, 0.30, (n, 6, 1)).astype(np.float32)
    loud = (rng.uniform(0.5, 1.0, (n, 6)) * on).astype(np.float32)
    u = np.clip((_T_CTRL - onset) / dur, 0.0, 1.0)                                         # (n, 6, ctrl)
    env_ctrl = (np.sin(np.float32(np.pi) * u) ** 2 * loud[..., None]).max(axis=1)          # (n, ctrl)
    gain = (0.06 * (0.5 + near) * rng.uniform(0.7, 1.3, n)).astype(np.float32)            # nearer is louder
    env_ctrl *= gain[:, None]
    # to the full rate: pitch and envelope interpolated linearly inside each control step (broadcast,
    # no gathers), then a nearest-sample look-up in a fine wavetable (-39 dB error at the 12th harmonic)
    phase_ctrl *= np.float32(_TABLE)                                                       # in table samples
    start = phase_ctrl[:, :-1] - np.floor(phase_ctrl[:, :-1] / _TABLE) * _TABLE
    pos = (start[..., None] + np.diff(phase_ctrl, axis=1)[..., None] * _STEP).reshape(n, CLIP_SAMPLES)
    idx = pos.astype(np.int32) & (_TABLE - 1)
    idx += (np.arange(n, dtype=np.int32) * _TABLE)[:, None]
    env = (env_ctrl[:, :-1, None] + np.diff(env_ctrl, axis=1)[..., None] * _STEP).reshape(n, CLIP_SAMPLES)
    return np.einsum("nt,nt->t", table.ravel()[idx], env)                                # mixed


def _noise(rng: np.random.Generator) -> np.ndarray:
    """Pink-to-brown background noise (spectrum ~ 1/f^beta, beta in [1, 2]) at a random level."""
    spec = np.fft.rfft(rng.standard_normal(CLIP_SAMPLES))
    f = np.fft.rfftfreq(CLIP_SAMPLES, 1 / SAMPLE_RATE)
    spec *= np.maximum(f, 20.0) ** (-rng.uniform(1.0, 2.0) / 2)
    spec[0] = 0.0
    x = np.fft.irfft(spec, CLIP_SAMPLES)
    return (x * (10 ** rng.uniform(np.log10(0.006), np.log10(0.02)) / (x.std() + 1e-12))).astype(np.float32)


# ---------------------------------------------------------------- scenes

def generate_scene(count: int, lighting: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image uint8 (32, 32, 3), audio float32 (8000,) in [-1, 1] at 8 kHz).

    Deterministic given ``rng``'s state; ``count`` figures are seen and heard.
    ``lighting`` (one of ``LIGHTING_NAMES``) changes only the exposure: from the
    same ``rng`` state every lighting gives the same figures and the same audio.
    """
    if not 0 <= int(count) <= MAX_COUNT or int(count) != count:
        raise DataError(f"crowd count must be an integer in 0..{MAX_COUNT}, not {count}")
    if lighting not in _CAMERAS:
        raise DataError(f"unknown lighting '{lighting}'; use one of: {', '.join(LIGHTING_NAMES)}")
    horizon = float(rng.uniform(5.0, 11.0))
    scene = _background(rng, horizon)
    alpha, colours, near = _figures(rng, int(count), horizon)
    scene = _composite(scene, alpha, colours)
    image = _expose(rng, scene, lighting)
    mix = _noise(rng) + _voices(rng, near)
    audio = (0.95 * np.tanh(mix / 0.95)).astype(np.float32)                               # soft clip
    return image, audio


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """Scene ``index`` of ``seed`` has its own stream, so it is the same whatever N is asked for."""
    return np.random.default_rng([int(seed), int(index)])


def draw_scene(seed: int, index: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Scene ``index`` of ``seed``: (image, audio, count, lighting code); count uniform in 0..60,
    lighting uniform over ``LIGHTING_NAMES``."""
    rng = scene_rng(seed, index)
    count = int(rng.integers(0, MAX_COUNT + 1))
    light = int(rng.integers(0, len(LIGHTING_NAMES)))
    image, audio = generate_scene(count, LIGHTING_NAMES[light], rng)
    return image, audio, count, light


@dataclass(frozen=True)
class CrowdSet:
    """Train/val/test splits of synthetic scenes; each split is a TensorDataset of
    (image float32 (N, 3, 32, 32) in [-1, 1], audio log-mel float32 (N, 1, 64, 64),
    count float32 (N,), lighting int64 (N,) indexing ``lighting_names``)."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    lighting_names: list[str]
    image_shape: tuple[int, int, int]     # (C, H, W)
    audio_shape: tuple[int, int, int]     # (1, mels, frames)
    max_count: int
    spec: str


def parse_crowd_spec(spec: str) -> int:
    """``crowd-av`` or ``crowd-av:N`` -> the number of scenes; anything else is a ``DataError``."""
    kind, sep, n = spec.partition(":")
    if kind.strip().lower() != CROWD_SPEC:
        raise DataError(f"not a crowd spec: '{spec}'; use {CROWD_SPEC} or {CROWD_SPEC}:N")
    if not sep:
        return DEFAULT_SCENES
    try:
        return int(n)
    except ValueError:
        raise DataError(f"data spec '{spec}': N must be a whole number of scenes, not '{n}'") from None


def load_crowd(n: int = DEFAULT_SCENES, seed: int = 0) -> CrowdSet:
    """Generate ``n`` SYNTHETIC scenes from ``seed`` and split them 70/15/15 into train/val/test.

    Same ``(n, seed)`` -> identical tensors. Scene i is the same for every n,
    only the split assignment depends on n. Audio goes through ``audio.log_mel``
    and pixels through ``images.pixels_to_tensor``: the serving transforms.
    """
    if int(n) != n or n < 3:
        raise DataError(f"crowd-av needs at least 3 scenes (one per split), not {n}")
    n = int(n)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    audio = torch.empty((n, *AUDIO_SHAPE), dtype=torch.float32)
    counts = np.empty(n, dtype=np.float32)
    lights = np.empty(n, dtype=np.int64)
    with single_threaded():
        for i in range(n):
            images[i], clip, counts[i], lights[i] = draw_scene(seed, i)
            audio[i] = log_mel(clip)
    x = pixels_to_tensor(images.transpose(0, 3, 1, 2))
    n_val = max(1, round(n * SPLIT_FRACTIONS[1]))
    n_test = max(1, round(n * SPLIT_FRACTIONS[2]))
    order = torch.from_numpy(np.random.default_rng([int(seed), n]).permutation(n))
    parts = order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test]
    y, light = torch.from_numpy(counts), torch.from_numpy(lights)
    train, val, test = (TensorDataset(x[p], audio[p], y[p], light[p]) for p in parts)
    return CrowdSet(train=train, val=val, test=test, lighting_names=list(LIGHTING_NAMES), image_shape=IMAGE_SHAPE,
                    audio_shape=AUDIO_SHAPE, max_count=MAX_COUNT,
                    spec=CROWD_SPEC if n == DEFAULT_SCENES else f"{CROWD_SPEC}:{n}")


def save_crowd_samples(directory: str | Path, n: int = 6, seed: int = 0) -> list[tuple[Path, Path]]:
    """Write scenes 0..n-1 of ``seed`` as ``scene_III_count_C_LIGHTING.png`` + ``.wav`` pairs.

    The WAV is float32, so serving it through the front end gives the very
    log-mel that ``load_crowd`` trains on.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create '{directory}': {e}") from None
    written = []
    for i in range(n):
        image, audio, count, light = draw_scene(seed, i)
        stem = directory / f"scene_{i:03d}_count_{count:02d}_{LIGHTING_NAMES[light]}"
        png, wav = stem.with_suffix(".png"), stem.with_suffix(".wav")
        Image.fromarray(image, "RGB").save(png)
        scipy.io.wavfile.write(wav, SAMPLE_RATE, audio)
        written.append((png, wav))
    return written
