"""The synthetic audiovisual crowd scenes: determinism, shapes, and the properties the fusion experiment needs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from offramp.core.data.audio import log_mel, single_threaded
from offramp.core.data.crowd import (
    LIGHTING_NAMES,
    CrowdSet,
    MAX_COUNT,
    draw_scene,
    generate_scene,
    load_crowd,
    parse_crowd_spec,
    save_crowd_samples,
)
from offramp.core.data.images import pixels_to_tensor
from offramp.core.data.preprocess import preprocess_file
from offramp.core.errors import DataError

COUNTS = np.arange(0, MAX_COUNT + 1, 2)  # 31 counts, evenly spread


@pytest.fixture(scope="module")
def paired() -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """The same 31 scenes (one per count in ``COUNTS``) under each lighting."""
    return {light: [generate_scene(int(c), light, np.random.default_rng([7, k])) for k, c in enumerate(COUNTS)]
            for light in LIGHTING_NAMES}


@pytest.fixture(scope="module")
def drawn() -> list[tuple[np.ndarray, np.ndarray, int, int]]:
    """200 scenes as the data set draws them: random counts and lightings."""
    return [draw_scene(17, i) for i in range(200)]


@pytest.fixture(scope="module")
def small() -> CrowdSet:
    return load_crowd(40, seed=3)


def all_of(crowd: CrowdSet, i: int) -> torch.Tensor:
    """Tensor ``i`` (image, audio, count, lighting) of every split, concatenated."""
    return torch.cat([crowd.train.tensors[i], crowd.val.tensors[i], crowd.test.tensors[i]])


def block_contrast(image: np.ndarray) -> float:
    """Spread of 4x4 block means: the scene's structure, with pixel noise averaged out."""
    return float(image.reshape(8, 4, 8, 4, 3).mean((1, 3)).std())


def test_same_seed_same_bytes_and_different_seed_differs() -> None:
    for i in range(3):
        a, b = draw_scene(5, i), draw_scene(5, i)
        assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes() and a[2:] == b[2:]
    assert draw_scene(5, 0)[0].tobytes() != draw_scene(6, 0)[0].tobytes()
    assert draw_scene(5, 0)[1].tobytes() != draw_scene(5, 1)[1].tobytes()
    one, two, other = load_crowd(12, seed=1), load_crowd(12, seed=1), load_crowd(12, seed=2)
    for i in range(4):
        assert torch.equal(all_of(one, i), all_of(two, i))
    assert not torch.equal(all_of(one, 0), all_of(other, 0))


def test_scene_shapes_and_ranges() -> None:
    image, audio = generate_scene(MAX_COUNT, "bright", np.random.default_rng(0))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert audio.shape == (8000,) and audio.dtype == np.float32
    assert np.abs(audio).max() <= 0.95  # the soft clip


def test_load_crowd_splits_shapes_and_labels(small: CrowdSet) -> None:
    sizes = [len(s) for s in (small.train, small.val, small.test)]
    assert sizes == [28, 6, 6]
    image, audio, count, light = (all_of(small, i) for i in range(4))
    assert image.shape == (40, 3, 32, 32) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert audio.shape == (40, 1, 64, 64) and audio.dtype == torch.float32 and torch.isfinite(audio).all()
    assert count.dtype == torch.float32 and light.dtype == torch.int64
    assert torch.equal(count, count.round()) and count.min() >= 0 and count.max() <= MAX_COUNT
    assert set(light.tolist()) <= set(range(len(LIGHTING_NAMES))) and small.lighting_names == list(LIGHTING_NAMES)
    # the splits hold exactly scenes 0..n-1 of the seed, whatever n is
    direct = sorted(draw_scene(3, i)[2] for i in range(40))
    assert sorted(int(c) for c in count) == direct


def test_counts_and_lighting_cover_their_ranges(drawn: list) -> None:
    counts = np.array([c for _, _, c, _ in drawn])
    assert counts.min() <= 2 and counts.max() >= 58
    assert np.bincount([light for _, _, _, light in drawn], minlength=3).min() >= 40


def test_dark_is_much_dimmer_and_flatter_than_bright(paired: dict) -> None:
    for (bright, _), (dark, _) in zip(paired["bright"], paired["dark"]):
        bright, dark = bright.astype(np.float32), dark.astype(np.float32)
        assert dark.mean() < 0.3 * bright.mean()
        assert block_contrast(dark) < 0.5 * block_contrast(bright)


def test_audio_ignores_lighting_and_grows_with_count(paired: dict, drawn: list) -> None:
    for light in ("dim", "dark"):
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(paired["bright"], paired[light]))
    rms = [float(np.sqrt(np.mean(audio**2))) for _, audio in paired["bright"]]
    assert spearmanr(rms, COUNTS)[0] > 0.8
    assert rms[0] < 0.03  # count 0: background noise only
    # scenes at random counts, as the data set draws them: RMS ~ sqrt(count)
    rms = [float(np.sqrt(np.mean(audio**2))) for _, audio, _, _ in drawn]
    assert pearsonr(rms, np.sqrt([c for _, _, c, _ in drawn]))[0] > 0.8


def test_image_counts_in_bright_light_but_not_in_the_dark(paired: dict) -> None:
    """A crude counter -- the fraction of strongly coloured pixels (clothes, skin; the clutter is muted) --
    tracks the count in bright scenes and loses it in dark ones: what fusing in the audio is for."""
    def coloured(image: np.ndarray) -> float:
        x = image.astype(np.int16)
        return float(((x.max(2) - x.min(2)) > 40).mean())

    r = {light: spearmanr([coloured(im) for im, _ in paired[light]], COUNTS)[0] for light in LIGHTING_NAMES}
    assert r["bright"] > 0.8
    assert abs(r["dark"]) < 0.4
    assert r["bright"] > r["dark"] + 0.5


def test_log_mel_features_still_carry_the_count(drawn: list) -> None:
    """The front end standardises each clip, so loudness itself is gone; a ridge regression on pooled
    log-mel features must still predict the count on held-out scenes."""
    with single_threaded():
        mels = np.stack([log_mel(audio)[0].numpy() for _, audio, _, _ in drawn])
    x = mels.reshape(len(mels), 8, 8, 8, 8).mean((2, 4)).reshape(len(mels), -1)   # (N, 64)
    y = np.array([c for _, _, c, _ in drawn], dtype=np.float64)
    train, test = slice(0, 140), slice(140, None)
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    z = (x - mu) / sd
    w = np.linalg.solve(z[train].T @ z[train] + 140 * np.eye(z.shape[1]), z[train].T @ (y[train] - y[train].mean()))
    assert pearsonr(z[test] @ w, y[test])[0] > 0.5


def test_saved_samples_serve_exactly_as_trained(tmp_path: Path) -> None:
    written = save_crowd_samples(tmp_path / "samples", 3, seed=4)
    assert len(written) == 3
    for i, (png, wav) in enumerate(written):
        image, audio, count, light = draw_scene(4, i)
        assert png.name == f"scene_{i:03d}_count_{count:02d}_{LIGHTING_NAMES[light]}.png" and wav.exists()
        expected = pixels_to_tensor(image.transpose(2, 0, 1))
        assert torch.equal(preprocess_file(png, "image", (3, 32, 32)), expected)
        assert torch.equal(preprocess_file(wav, "audio", (1, 64, 64)), log_mel(audio))


def test_bad_arguments_are_data_errors() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="lighting"):
        generate_scene(3, "twilight", rng)
    for count in (-1, MAX_COUNT + 1, 2.5):
        with pytest.raises(DataError, match="count"):
            generate_scene(count, "bright", rng)
    with pytest.raises(DataError, match="at least 3"):
        load_crowd(2)
    assert parse_crowd_spec("crowd-av") == 3000 and parse_crowd_spec("crowd-av:500") == 500
    for spec in ("crowd-av:lots", "crowd-av:", "crowd"):
        with pytest.raises(DataError):
            parse_crowd_spec(spec)
