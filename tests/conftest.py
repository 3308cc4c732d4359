"""Shared pytest fixtures: tiny fake datasets on disk, written once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tests/ is not a package; make `import fakedata` work under every pytest import mode.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import fakedata  # noqa: E402


@pytest.fixture(scope="session")
def fake_cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data_dir with a fake CIFAR-10 (60 train / 12 test images per class, seed 0)."""
    return fakedata.write_fake_cifar10(tmp_path_factory.mktemp("fake_cifar10"))


@pytest.fixture(scope="session")
def fake_fmnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data_dir with a fake Fashion-MNIST as gzipped IDX files (60 train / 12 test per class)."""
    return fakedata.write_fake_idx(tmp_path_factory.mktemp("fake_fmnist"), "fashion_mnist")


@pytest.fixture(scope="session")
def fake_mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data_dir with a fake MNIST as raw (uncompressed) IDX files in torchvision's layout."""
    root = tmp_path_factory.mktemp("fake_mnist")
    fakedata.write_fake_idx(root / "MNIST" / "raw", "mnist", gz=False)
    return root
