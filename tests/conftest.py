"""Shared pytest fixtures."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from helpers import CloudFactory, LoopThread

if TYPE_CHECKING:
    from cloud_node.server import CloudServer


def worker_threads() -> int | None:
    """Torch threads for one pytest-xdist worker: its share of the cores. Two workers each training with a
    thread per core oversubscribe the machine, and spinning OpenMP threads make that several times slower
    than sharing it; None outside xdist (torch's default)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    return max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None


@pytest.fixture(autouse=True)
def torch_threads() -> Iterator[None]:
    """In-process daemons set torch's thread count for the whole process; each test starts from the same."""
    import torch

    threads = worker_threads() or torch.get_num_threads()
    torch.set_num_threads(threads)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of development data archives (cifar10-train.zip, fsdd-train.zip).

    Set OFFRAMP_DATA to point elsewhere; by default it is the data folder
    beside the checkout. Tests that need it are skipped where it is absent.
    """
    path = Path(os.environ.get("OFFRAMP_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"development data archives not present at {path} (set OFFRAMP_DATA)")
    return path


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    """An event loop in a background thread, one per test module, for in-process daemons."""
    with LoopThread() as loop:
        yield loop


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small trained checkpoint, built once per session: vit_micro_32 on 200 digits,
    SL-ViT exits at blocks 2 and 4, split after block 4. Tests must not modify it."""
    from offramp.training.pipeline import TrainJob, run_training
    from offramp.training.train import TrainConfig

    out = tmp_path_factory.mktemp("tiny") / "checkpoint"
    job = TrainJob(data="digits", model="vit_micro_32", exits="slvit@2,slvit@4", out=str(out), limit=200)
    run_training(job, TrainConfig(epochs=1, exit_epochs=1, progress=False))
    return out


# Small limits so tests reach them cheaply; a short grace so teardown never waits long.
CLOUD_TEST_SETTINGS: dict[str, Any] = {"max_batch": 8, "max_queue": 64, "max_message_mb": 1, "grace_s": 2.0}


@pytest.fixture
def start_cloud(tiny_checkpoint: Path) -> Iterator[CloudFactory]:
    """``start_cloud(**settings) -> (address, server)``: in-process cloud servers for one test."""
    with CloudFactory(tiny_checkpoint, CLOUD_TEST_SETTINGS) as factory:
        yield factory


@pytest.fixture(scope="module")
def cloud(tiny_checkpoint: Path) -> Iterator[tuple[str, CloudServer]]:
    """One in-process cloud server per module with the test settings, as ``(address, server)``.

    Shared: tests must not count on its metrics or queue starting empty."""
    with CloudFactory(tiny_checkpoint, CLOUD_TEST_SETTINGS) as factory:
        yield factory()


# The longest test files, longest first (pytest --durations). They start first, so that with several workers
# (make test: pytest-xdist, a file each at a time) no long file starts last and holds the suite up alone.
LONGEST_FIRST = ("test_recipes", "test_audiovisual", "test_train_cli", "test_bench_cnn_capacity", "test_audio_serving",
                 "test_cloud", "test_timm_byo", "test_bench_overload_soak", "test_edge", "test_pool", "test_faults",
                 "test_onnx", "test_workers", "test_adaptive", "test_orchestrator")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: order within a file is kept


@pytest.fixture(scope="module")
def first_inputs(tiny_checkpoint: Path) -> Any:
    """The first 32 validation inputs of the tiny checkpoint, (32, 1, 32, 32)."""
    from offramp.core.checkpoint import read_card
    from offramp.core.data.card_data import load_validation

    return load_validation(read_card(tiny_checkpoint))[0].tensors[0][:32]
