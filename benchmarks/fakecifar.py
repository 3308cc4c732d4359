"""Random CIFAR-10-shaped data in the real ``cifar-10-batches-py`` format.

The benchmarks time the data path, not learning, so the images are uniform random bytes and the
labels a seeded balanced shuffle; writing them in the real pickle format lets the real loading
code (:func:`aff_lightning.data.load_dataset`) and :class:`~aff_lightning.data.ImbalancedDataModule`
run unchanged.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

__all__ = ["write_random_cifar10"]

_FOLDER = "cifar-10-batches-py"


def write_random_cifar10(root: str | Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write ``n_train`` train and ``n_test`` test random 3x32x32 images under ``root``.

    Args:
        root: the data_dir; batches go to ``root/cifar-10-batches-py``.
        n_train: train images, a multiple of 10 (balanced classes), >= 10.
        n_test: test images, a multiple of 10, >= 10.
        seed: seed of pixels and label order.

    Returns:
        ``root`` (the ``data_dir`` for ``ImbalancedDataModule``).
    """
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if n < 10 or n % 10:
            raise ValueError(f"{name} must be a multiple of 10 and >= 10, got {n}")
    rng = np.random.default_rng(seed)
    folder = Path(root) / _FOLDER
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, n: int) -> None:
        labels = rng.permutation(np.repeat(np.arange(10), n // 10))
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)  # channel-major rows
        bounds = np.linspace(0, n, 6).astype(int) if name == "train" else np.array([0, n])
        files = [f"data_batch_{i + 1}" for i in range(5)] if name == "train" else ["test_batch"]
        for i, file in enumerate(files):
            lo, hi = bounds[i], bounds[i + 1]
            batch = {b"data": data[lo:hi], b"labels": labels[lo:hi].tolist()}
            with open(folder / file, "wb") as fh:
                pickle.dump(batch, fh, protocol=4)

    dump("train", n_train)
    dump("test", n_test)
    return Path(root)
