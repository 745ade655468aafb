"""Data specs, loaders and the shared train/serve transforms, on real files."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io.wavfile
import torch
from PIL import Image

from offramp.core.data import DataSplits, load_data, preprocess_bytes, preprocess_file
from offramp.core.errors import DataError

COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def all_x(splits: DataSplits) -> torch.Tensor:
    return torch.cat([splits.train.tensors[0], splits.val.tensors[0]])


def all_y(splits: DataSplits) -> torch.Tensor:
    return torch.cat([splits.train.tensors[1], splits.val.tensors[1]])


def write_images(root: Path) -> list[Path]:
    """Three colour classes, mixed sizes and modes, so resizing and conversion are exercised."""
    paths = []
    for cls, rgb in COLOURS.items():
        (root / cls).mkdir(parents=True)
        for i, size in enumerate([(32, 32), (48, 40), (20, 28)]):
            im = Image.new("RGB", size, rgb)
            im.putpixel((1, 1), (255, 255, 255))
            path = root / cls / f"{i:04d}.{'png' if i % 2 else 'jpg'}"
            im.save(path)
            paths.append(path)
    return paths


def wav_bytes(freq: float, rate: int = 8000, seconds: float = 0.8, channels: int = 1) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    x = (0.5 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)
    if channels == 2:
        x = np.stack([x, x], axis=1)
    buf = io.BytesIO()
    scipy.io.wavfile.write(buf, rate, x)
    return buf.getvalue()


def write_fsdd(root: Path) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for digit in range(3):
        for speaker in ("alice", "bob"):
            path = root / f"{digit}_{speaker}_{digit + 5}.wav"
            path.write_bytes(wav_bytes(300.0 + 200 * digit + (50 if speaker == "bob" else 0)))
            paths.append(path)
    return paths


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


# --- digits -----------------------------------------------------------------------------------

def test_digits_shapes_range_and_labels() -> None:
    d = load_data("digits")
    x, y = all_x(d), all_y(d)
    assert x.shape == (1797, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(d.val) == 180 and len(d.train) == 1617
    assert x.min() == -1.0 and x.max() == 1.0
    assert d.label_names == [str(i) for i in range(10)] and set(y.tolist()) == set(range(10))
    assert d.input_shape == (1, 32, 32) and d.modality == "image" and d.spec == "digits"
    assert x.mean() < -0.3  # mostly background: ink is high, paper is low


def test_split_is_deterministic_in_the_seed() -> None:
    a, b, c = load_data("digits", seed=1), load_data("digits", seed=1), load_data("digits", seed=2)
    assert torch.equal(a.val.tensors[0], b.val.tensors[0]) and torch.equal(a.train.tensors[1], b.train.tensors[1])
    assert not torch.equal(a.val.tensors[0], c.val.tensors[0])


def test_limit_keeps_a_deterministic_subset_before_splitting() -> None:
    a, b = load_data("digits", limit=100, seed=3), load_data("digits", limit=100, seed=3)
    assert len(a.train) + len(a.val) == 100 and len(a.val) == 10
    assert torch.equal(all_x(a), all_x(b))
    assert len(load_data("digits", limit=10_000).train) == 1617


@pytest.mark.parametrize("kwargs", [{"val_fraction": 1.0}, {"val_fraction": -0.1}, {"limit": 0}])
def test_bad_split_arguments(kwargs: dict) -> None:
    with pytest.raises(DataError):
        load_data("digits", **kwargs)


# --- imagefolder ------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["dir", "zip", "zip-with-root"])
def test_imagefolder_classes_from_folders(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "images"
    write_images(folder)
    source = {
        "dir": folder,
        "zip": zip_folder(folder, tmp_path / "a.zip"),
        "zip-with-root": zip_folder(folder, tmp_path / "b.zip", prefix="images/"),
    }[layout]
    d = load_data(f"imagefolder:{source}", val_fraction=0.0)
    x, y = all_x(d), all_y(d)
    assert d.label_names == sorted(COLOURS) and d.input_shape == (3, 32, 32) and d.modality == "image"
    assert x.shape == (9, 3, 32, 32) and x.min() >= -1.0 and x.max() <= 1.0 and len(d.val) == 0
    for img, label in zip(x, y):  # each image's dominant channel matches its folder's colour
        rgb = COLOURS[d.label_names[label]]
        assert img.mean(dim=(1, 2)).argmax().item() == int(np.argmax(rgb))


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    write_images(tmp_path)
    (tmp_path / "red" / "0099.jpg").write_bytes(b"not really a jpeg")
    with pytest.raises(DataError, match=r"corrupt image 'red/0099\.jpg' in .*cannot identify image file"):
        load_data(f"imagefolder:{tmp_path}")


def test_corrupt_image_in_zip_names_file_and_archive(tmp_path: Path) -> None:
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("root/cat/0012.jpg", b"\xff\xd8\xff\xe0garbage")
    with pytest.raises(DataError, match=r"'root/cat/0012\.jpg' in .*x\.zip"):
        load_data(f"imagefolder:{archive}")


@pytest.mark.parametrize("kind", ["imagefolder", "fsdd"])
def test_missing_path(tmp_path: Path, kind: str) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=f"data path '{missing}' does not exist"):
        load_data(f"{kind}:{missing}")


def test_empty_folder_and_loose_images(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no images"):
        load_data(f"imagefolder:{tmp_path}")
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
    with pytest.raises(DataError, match="'loose.png'.*not inside a class folder"):
        load_data(f"imagefolder:{tmp_path}")


def test_not_a_folder_or_zip(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(DataError, match="neither a folder nor a .zip"):
        load_data(f"imagefolder:{tmp_path / 'data.txt'}")


@pytest.mark.parametrize("spec", ["mnist", "digits:extra", "cifar:/tmp", ""])
def test_unknown_spec_lists_the_kinds(spec: str) -> None:
    with pytest.raises(DataError, match=r"digits, imagefolder:PATH, fsdd:PATH"):
        load_data(spec)


def test_spec_without_path() -> None:
    with pytest.raises(DataError, match="needs a path"):
        load_data("imagefolder:")


# --- fsdd / audio -----------------------------------------------------------------------------

def test_fsdd_from_synthesized_wavs(tmp_path: Path) -> None:
    write_fsdd(tmp_path / "wavs")
    for source in (tmp_path / "wavs", zip_folder(tmp_path / "wavs", tmp_path / "fsdd.zip")):
        d = load_data(f"fsdd:{source}", val_fraction=0.0)
        x, y = all_x(d), all_y(d)
        assert x.shape == (6, 1, 64, 64) and x.dtype == torch.float32 and torch.isfinite(x).all()
        assert sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
        assert d.label_names == [str(i) for i in range(10)]
        assert d.input_shape == (1, 64, 64) and d.modality == "audio"
        assert torch.allclose(x.mean(dim=(1, 2, 3)), torch.zeros(6), atol=1e-4)  # standardized per clip


def test_resampled_tone_matches_native_rate() -> None:
    native = preprocess_bytes(wav_bytes(440.0, rate=8000), "audio", (1, 64, 64))
    resampled = preprocess_bytes(wav_bytes(440.0, rate=16000), "audio", (1, 64, 64))
    assert resampled.shape == native.shape == (1, 64, 64)
    assert (native - resampled).abs().max() < 0.1


def test_stereo_is_averaged_to_mono() -> None:
    mono = preprocess_bytes(wav_bytes(500.0), "audio", (1, 64, 64))
    stereo = preprocess_bytes(wav_bytes(500.0, channels=2), "audio", (1, 64, 64))
    assert torch.equal(mono, stereo)


def test_bad_fsdd_name_is_named(tmp_path: Path) -> None:
    write_fsdd(tmp_path)
    (tmp_path / "hello.wav").write_bytes(wav_bytes(300.0))
    with pytest.raises(DataError, match=r"'hello\.wav'.*<digit>_<speaker>_<index>\.wav"):
        load_data(f"fsdd:{tmp_path}")


def test_corrupt_wav_is_named(tmp_path: Path) -> None:
    write_fsdd(tmp_path)
    (tmp_path / "7_carol_9.wav").write_bytes(b"RIFF\x00\x00garbage")
    with pytest.raises(DataError, match=r"corrupt WAV file '7_carol_9\.wav'"):
        load_data(f"fsdd:{tmp_path}")


# --- serving equals training ------------------------------------------------------------------

def test_preprocess_file_equals_training_transform(tmp_path: Path) -> None:
    images = write_images(tmp_path / "images")
    x = all_x(load_data(f"imagefolder:{tmp_path / 'images'}"))
    for path in images:
        served = preprocess_file(path, "image", (3, 32, 32))
        assert served.shape == (3, 32, 32) and served.dtype == torch.float32
        assert any(torch.equal(served, row) for row in x), path
        assert torch.equal(served, preprocess_bytes(path.read_bytes(), "image", (3, 32, 32)))

    wavs = write_fsdd(tmp_path / "wavs")
    x = all_x(load_data(f"fsdd:{tmp_path / 'wavs'}"))
    for path in wavs:
        served = preprocess_file(path, "audio", (1, 64, 64))
        assert any(torch.equal(served, row) for row in x), path


def test_preprocess_grayscale_keeps_white_high(tmp_path: Path) -> None:
    path = tmp_path / "digit.png"
    im = Image.new("RGB", (64, 64), (0, 0, 0))
    im.paste((255, 255, 255), (16, 16, 48, 48))
    im.save(path)
    x = preprocess_file(path, "image", (1, 32, 32))
    assert x.shape == (1, 32, 32) and x[0, 16, 16] == 1.0 and x[0, 0, 0] == -1.0


def test_preprocess_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        preprocess_file(tmp_path / "missing.png", "image", (3, 32, 32))
    with pytest.raises(DataError, match="unknown modality"):
        preprocess_bytes(b"", "video", (3, 32, 32))
    with pytest.raises(DataError, match="corrupt image"):
        preprocess_bytes(b"garbage", "image", (3, 32, 32))
    with pytest.raises(DataError, match="corrupt WAV"):
        preprocess_bytes(b"garbage", "audio", (1, 64, 64))


# --- the real archives ------------------------------------------------------------------------

@pytest.mark.parametrize("spec, shape", [
    ("imagefolder:cifar10-train.zip", (3, 32, 32)),
    ("fsdd:fsdd-train.zip", (1, 64, 64)),
])
def test_real_archives(shared_data: Path, spec: str, shape: tuple[int, int, int]) -> None:
    kind, name = spec.split(":")
    if not (shared_data / name).is_file():
        pytest.skip(f"{name} not present in {shared_data}")
    d = load_data(f"{kind}:{shared_data / name}", limit=500)
    assert len(d.train) == 450 and len(d.val) == 50
    assert d.train.tensors[0].shape[1:] == shape and d.input_shape == shape
    assert len(d.label_names) == 10 and len(set(all_y(d).tolist())) == 10
    assert torch.isfinite(all_x(d)).all()


def test_the_shipped_digits_are_scikit_learns() -> None:
    """The vendored arrays are byte for byte scikit-learn's load_digits() (checksums taken from it)."""
    import hashlib
    from importlib import resources

    with resources.files("offramp.core.data").joinpath("digits.npz").open("rb") as fh, np.load(fh) as arrays:
        images, target = arrays["images"], arrays["target"]
    assert images.shape == (1797, 8, 8) and target.shape == (1797,) and images.max() == 16
    assert hashlib.sha256(images.tobytes()).hexdigest() == \
        "8f26b2bd9d135c256808f68f14fdabddde6d9c7f869ae419704b051f0f14b3b3"
    assert hashlib.sha256(target.tobytes()).hexdigest() == \
        "8ba4f891220f5e4c9c819638d1602d74b83618f167043c6da52a2a247841ddf0"
