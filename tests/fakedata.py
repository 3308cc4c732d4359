"""Tiny, seeded, learnable fake datasets written in the real on-disk formats.

``write_fake_cifar10`` writes a ``cifar-10-batches-py`` folder (five data batches, test_batch,
batches.meta; pickled dicts with bytes keys, as the real one); ``write_fake_idx`` writes the four
MNIST/Fashion-MNIST IDX files. Labels come in a seeded shuffled order, so "the first k images
of a class in dataset order" is a real selection. Each class has its own coarse 4x4 brightness
pattern (upsampled to the image size) plus pixel noise: a small model separates the classes in
an epoch or two, and the noise makes every image unique (tests use that to identify images).

Run ``python tests/fakedata.py OUTDIR`` to write all three datasets under OUTDIR in the layout
``ImbalancedDataModule(data_dir=OUTDIR)`` reads (cifar-10-batches-py/, MNIST/raw/,
FashionMNIST/raw/).
"""

from __future__ import annotations

import argparse
import gzip
import pickle
import sys
from pathlib import Path

import numpy as np

NUM_CLASSES = 10
_NOISE_STD = 24.0  # pixel noise, in uint8 units
_NAME_SEEDS = {"cifar10": 0, "mnist": 1, "fashion_mnist": 2}


def fake_images(
    labels: np.ndarray, channels: int, size: int, seed: int = 0, name: str = "cifar10"
) -> np.ndarray:
    """Learnable uint8 images for ``labels``: a per-class 4x4 pattern plus Gaussian noise.

    Args:
        labels: (N,) ints in [0, 10).
        channels: image channels.
        size: image height == width (a multiple of 4).
        seed: noise seed.
        name: dataset name; each name has its own class patterns.

    Returns:
        (N, channels, size, size) uint8.
    """
    pattern_rng = np.random.default_rng([_NAME_SEEDS[name], 12345])
    patterns = pattern_rng.uniform(40.0, 215.0, size=(NUM_CLASSES, channels, 4, 4))
    cell = size // 4
    protos = patterns.repeat(cell, axis=2).repeat(cell, axis=3)  # (10, C, 4, 4) -> (10, C, H, W)
    noise = np.random.default_rng([seed, 777]).normal(
        0.0, _NOISE_STD, size=(len(labels), channels, size, size)
    )
    return np.clip(protos[labels] + noise, 0, 255).round().astype(np.uint8)


def fake_labels(n_per_class: int, seed: int) -> np.ndarray:
    """(10 * n_per_class,) int64 labels, balanced, in a seeded shuffled order."""
    labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int64), n_per_class)
    return np.random.default_rng(seed).permutation(labels)


def write_fake_cifar10(
    root: str | Path, n_train_per_class: int = 60, n_test_per_class: int = 12, seed: int = 0
) -> Path:
    """Write a fake CIFAR-10 ``cifar-10-batches-py`` folder under ``root``.

    Args:
        root: data_dir; the batches go to ``root/cifar-10-batches-py``.
        n_train_per_class: train images per class (split over the 5 data batches).
        n_test_per_class: test images per class.
        seed: seed of the label order and the noise.

    Returns:
        ``root`` (the data_dir to give ``ImbalancedDataModule``).
    """
    root = Path(root)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_y = fake_labels(n_train_per_class, seed)
    test_y = fake_labels(n_test_per_class, seed + 1)
    train_x = fake_images(train_y, 3, 32, seed, "cifar10").reshape(len(train_y), -1)
    test_x = fake_images(test_y, 3, 32, seed + 1, "cifar10").reshape(len(test_y), -1)

    def dump(name: str, label: str, x: np.ndarray, y: np.ndarray, offset: int) -> None:
        batch = {
            b"batch_label": label.encode(),
            b"labels": [int(v) for v in y],  # a list of ints, as in the real files
            b"data": np.ascontiguousarray(x),  # (n, 3072) uint8, channel-major rows
            b"filenames": [f"fake_{offset + i:05d}.png".encode() for i in range(len(y))],
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)

    bounds = np.linspace(0, len(train_y), 6).astype(int)
    for i in range(5):
        lo, hi = bounds[i], bounds[i + 1]
        dump(
            f"data_batch_{i + 1}",
            f"training batch {i + 1} of 5",
            train_x[lo:hi],
            train_y[lo:hi],
            lo,
        )
    dump("test_batch", "testing batch 1 of 1", test_x, test_y, 0)
    meta = {
        b"num_cases_per_batch": int(bounds[1] - bounds[0]),
        b"label_names": [
            n.encode()
            for n in (
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            )
        ],
        b"num_vis": 3072,
    }
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump(meta, fh, protocol=2)
    return root


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (magic 0x0000080N, big-endian uint32 dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_fake_idx(
    root: str | Path,
    name: str = "fashion_mnist",
    n_train_per_class: int = 60,
    n_test_per_class: int = 12,
    seed: int = 0,
    gz: bool = True,
) -> Path:
    """Write the four IDX files of a fake MNIST or Fashion-MNIST directly into ``root``.

    Args:
        root: folder for train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz],
            t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz].
        name: "fashion_mnist" or "mnist" (each has its own class patterns).
        n_train_per_class: train images per class.
        n_test_per_class: test images per class.
        seed: seed of the label order and the noise.
        gz: gzip the files (as distributed) or write them raw.

    Returns:
        ``root`` (the data_dir to give ``ImbalancedDataModule``).
    """
    if name not in ("fashion_mnist", "mnist"):
        raise ValueError(f"name must be 'fashion_mnist' or 'mnist', got {name!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    train_y = fake_labels(n_train_per_class, seed)
    test_y = fake_labels(n_test_per_class, seed + 1)
    files = {
        "train-images-idx3-ubyte": fake_images(train_y, 1, 28, seed, name)[:, 0],
        "train-labels-idx1-ubyte": train_y.astype(np.uint8),
        "t10k-images-idx3-ubyte": fake_images(test_y, 1, 28, seed + 1, name)[:, 0],
        "t10k-labels-idx1-ubyte": test_y.astype(np.uint8),
    }
    for stem, array in files.items():
        data = idx_bytes(array)
        if gz:
            with gzip.open(root / f"{stem}.gz", "wb") as fh:
                fh.write(data)
        else:
            (root / stem).write_bytes(data)
    return root


def main(argv: list[str] | None = None) -> None:
    """Write fake CIFAR-10, MNIST and Fashion-MNIST under OUTDIR in torchvision's layout."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--test-per-class", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = (args.train_per_class, args.test_per_class)
    write_fake_cifar10(args.outdir, *sizes, seed=args.seed)
    write_fake_idx(args.outdir / "MNIST" / "raw", "mnist", *sizes, seed=args.seed)
    write_fake_idx(args.outdir / "FashionMNIST" / "raw", "fashion_mnist", *sizes, seed=args.seed)
    print(f"wrote fake cifar10, mnist and fashion_mnist under {args.outdir}", file=sys.stderr)


if __name__ == "__main__":
    main()
