"""Class-imbalanced CIFAR-10 / MNIST / Fashion-MNIST as a LightningDataModule.

The reference "1000:k" protocol of Hayat et al. (arXiv 1901.07711): every minority class keeps
its first ``k`` test images and its first ``k * r`` train images in the dataset's own order
(r = 5 for CIFAR-10, 6 for the MNIST-like sets); majority classes keep everything, so the test
set is imbalanced too.

Whole splits live in memory as uint8 tensors (CIFAR-10 is 180 MB) and, on CUDA/CPU, on the
training device: batches are index slices of device tensors, with no workers, no per-sample
Python and no per-step host copies. :class:`TensorLoader` yields ``(images, labels, mask)``
with static shapes (full train batches; padded eval batches whose ``mask`` marks the real rows)
and :meth:`ImbalancedDataModule.on_after_batch_transfer` turns the uint8 images into float32 on
the device, with the batched random crop + flip augmentation of :func:`random_crop_flip`.
"""

from __future__ import annotations

import gzip
import math
import numbers
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = [
    "DATASETS",
    "CorruptDatasetError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "DatasetTensors",
    "ImbalancedDataModule",
    "TensorLoader",
    "crop_flip",
    "download_dataset",
    "first_per_class",
    "load_dataset",
    "longtail_counts",
    "random_crop_flip",
    "read_idx",
    "stratified_holdout",
]

PROTOCOLS = ("reference", "step", "longtail")
SPLITS = ("train", "val", "test")

# Debian/Ubuntu package dataset-fashion-mnist installs the four IDX .gz files here.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dims (N, H, W)
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dim (N,)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are not where they were looked for (the message says where and how)."""


class CorruptDatasetError(ValueError):
    """A dataset file exists but does not hold what its format promises."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a supported dataset.

    Attributes:
        name: key in :data:`DATASETS`.
        title: human-readable name for messages.
        num_classes: C.
        in_channels: image channels.
        image_size: height == width in pixels.
        train_ratio: r of the reference protocol (a minority class keeps k*r train images).
        mean: per-channel mean of the training set, in [0, 1] pixel units.
        std: per-channel standard deviation of the training set, in [0, 1] pixel units.
    """

    name: str
    title: str
    num_classes: int
    in_channels: int
    image_size: int
    train_ratio: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


# mean/std: per-channel statistics of the full 50k/60k training images scaled to [0, 1] (the
# usual published constants; CIFAR-10 std is the per-pixel one, not the 0.2023 variant).
DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        "cifar10", "CIFAR-10", 10, 3, 32, 5, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    "mnist": DatasetInfo("mnist", "MNIST", 10, 1, 28, 6, (0.1307,), (0.3081,)),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", "Fashion-MNIST", 10, 1, 28, 6, (0.2860,), (0.3530,)
    ),
}


class DatasetTensors(NamedTuple):
    """A whole dataset in memory.

    Attributes:
        train_images: (N, C, H, W) uint8.
        train_labels: (N,) int64.
        test_images: (M, C, H, W) uint8.
        test_labels: (M,) int64.
    """

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


# --------------------------------------------------------------------------------------------
# File loading
# --------------------------------------------------------------------------------------------


def _dataset_info(name: str) -> DatasetInfo:
    key = name.lower().replace("-", "_") if isinstance(name, str) else None
    if key not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[key]


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or raw, into a uint8 array.

    Header: two zero bytes, a type byte (0x08 = unsigned byte), the number of dims, then one
    big-endian uint32 per dim; the data follow in C order.

    Args:
        path: file path; a ``.gz`` suffix means gzip.

    Returns:
        uint8 array with the shape from the header, e.g. (N, 28, 28) or (N,).

    Raises:
        CorruptDatasetError: on a bad magic number or a size that does not match the header.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise CorruptDatasetError(f"cannot read IDX file {path}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise CorruptDatasetError(
            f"{path} is not an unsigned-byte IDX file (magic {int.from_bytes(raw[:4], 'big')})"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDatasetError(f"{path} is truncated inside its IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(shape)
    if len(raw) - header != expected:
        raise CorruptDatasetError(
            f"{path} header promises shape {shape} ({expected} bytes) but holds "
            f"{len(raw) - header} bytes of data"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()  # writable


def _idx_search_dirs(info: DatasetInfo, data_dir: Path) -> list[Path]:
    """Folders searched, in order, for the four IDX files."""
    if info.name == "mnist":
        return [data_dir, data_dir / "MNIST" / "raw"]
    return [data_dir, data_dir / "FashionMNIST" / "raw", FASHION_MNIST_SYSTEM_DIR]


def _find_idx_files(info: DatasetInfo, data_dir: Path) -> dict[str, Path]:
    """The four IDX files from the first searched folder that holds all of them."""
    partial: list[str] = []
    dirs = _idx_search_dirs(info, data_dir)
    for folder in dirs:
        found: dict[str, Path] = {}
        for key, stem in IDX_FILES.items():
            for candidate in (folder / stem, folder / f"{stem}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(IDX_FILES):
            return found
        if found:
            missing = [IDX_FILES[k] for k in IDX_FILES if k not in found]
            partial.append(f"{folder} lacks {', '.join(missing)}")
    if info.name == "mnist":
        how = (
            "Pass download=True (--data.download=true) when online; torchvision then saves "
            f"the files to {data_dir / 'MNIST' / 'raw'}."
        )
    else:
        how = (
            "Pass download=True (--data.download=true) when online; torchvision then saves the "
            f"files to {data_dir / 'FashionMNIST' / 'raw'}. Offline on Debian/Ubuntu, "
            f"`apt-get install dataset-fashion-mnist` installs them to {FASHION_MNIST_SYSTEM_DIR}."
        )
    names = ", ".join(f"{stem}[.gz]" for stem in IDX_FILES.values())
    detail = f" ({'; '.join(partial)})" if partial else ""
    raise DatasetNotFoundError(
        f"{info.title} not found: searched {', '.join(str(d) for d in dirs)} for {names}"
        f"{detail}. {how}"
    )


def _find_cifar10_files(data_dir: Path) -> dict[str, Path]:
    folder = data_dir / CIFAR10_FOLDER
    wanted = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
    missing = [name for name in wanted if not (folder / name).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"CIFAR-10 not found: expected the python-version batches in {folder} "
            f"(missing: {', '.join(missing)}). Pass download=True (--data.download=true) when "
            f"online, or download {CIFAR10_URL} and extract it into {data_dir} so that "
            f"{folder} exists."
        )
    return {name: folder / name for name in wanted}


def _locate(info: DatasetInfo, data_dir: Path) -> dict[str, Path]:
    if info.name == "cifar10":
        return _find_cifar10_files(data_dir)
    return _find_idx_files(info, data_dir)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> ((n, 3072) uint8, (n,) int64), checked."""
    try:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as err:
        raise CorruptDatasetError(f"cannot unpickle CIFAR-10 batch {path}: {err}") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise CorruptDatasetError(f"{path} is not a CIFAR-10 batch (no b'data'/b'labels' keys)")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CorruptDatasetError(
            f"{path}: b'data' must be a (N, 3072) uint8 array, got {data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],):
        raise CorruptDatasetError(
            f"{path}: {labels.shape[0] if labels.ndim else 'scalar'} labels for "
            f"{data.shape[0]} images"
        )
    return data, labels.astype(np.int64)


def _check_split(
    title: str, where: str, images: np.ndarray, labels: np.ndarray, shape: tuple[int, ...]
) -> None:
    if images.shape[0] == 0:
        raise CorruptDatasetError(f"{title} {where} holds no images")
    if images.shape[1:] != shape:
        raise CorruptDatasetError(
            f"{title} {where}: images must have shape (N, {', '.join(map(str, shape))}), "
            f"got {images.shape}"
        )
    if labels.shape != (images.shape[0],):
        raise CorruptDatasetError(
            f"{title} {where}: {labels.shape} labels for {images.shape[0]} images"
        )
    if labels.min() < 0 or labels.max() >= 10:
        raise CorruptDatasetError(
            f"{title} {where}: labels must be in [0, 10), got min {labels.min()} and max "
            f"{labels.max()}"
        )


@lru_cache(maxsize=2)
def _load_files(name: str, files: tuple[tuple[str, str, int, int], ...]) -> DatasetTensors:
    """Parse and check located files. ``files``: (key, path, size, mtime_ns) — the cache key."""
    info = DATASETS[name]
    paths = {key: Path(path) for key, path, _, _ in files}
    if name == "cifar10":
        train = [_read_cifar_batch(paths[f]) for f in CIFAR10_TRAIN_FILES]
        test_x, test_y = _read_cifar_batch(paths[CIFAR10_TEST_FILE])
        train_x = np.concatenate([x for x, _ in train])
        train_y = np.concatenate([y for _, y in train])
        train_x = train_x.reshape(-1, 3, 32, 32)  # (N, 3072) -> (N, C, H, W), channel-major rows
        test_x = test_x.reshape(-1, 3, 32, 32)
        folder = paths[CIFAR10_TEST_FILE].parent
        _check_split(info.title, f"train set in {folder}", train_x, train_y, (3, 32, 32))
        _check_split(info.title, f"test set in {folder}", test_x, test_y, (3, 32, 32))
    else:
        arrays = {key: read_idx(path) for key, path in paths.items()}
        train_x, test_x = arrays["train_images"], arrays["test_images"]
        train_y = arrays["train_labels"].astype(np.int64)
        test_y = arrays["test_labels"].astype(np.int64)
        for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
            where = f"{split} set ({paths[f'{split}_images']}, {paths[f'{split}_labels']})"
            if x.ndim != 3 or y.ndim != 1:
                raise CorruptDatasetError(
                    f"{info.title} {where}: expected (N, 28, 28) images and (N,) labels, got "
                    f"{x.shape} and {y.shape}"
                )
            _check_split(info.title, where, x, y, (28, 28))
        train_x = train_x[:, None]  # (N, H, W) -> (N, 1, H, W)
        test_x = test_x[:, None]
    return DatasetTensors(
        torch.from_numpy(np.ascontiguousarray(train_x)),
        torch.from_numpy(np.ascontiguousarray(train_y)),
        torch.from_numpy(np.ascontiguousarray(test_x)),
        torch.from_numpy(np.ascontiguousarray(test_y)),
    )


def load_dataset(name: str, data_dir: str | os.PathLike[str] = "data") -> DatasetTensors:
    """Load a whole dataset from disk (no download), checking shapes and label ranges.

    CIFAR-10 comes from ``data_dir/cifar-10-batches-py/`` (the python-version pickles). MNIST
    and Fashion-MNIST come from the four IDX files (gzipped or raw), searched in ``data_dir``,
    then torchvision's layout ``data_dir/MNIST/raw`` or ``data_dir/FashionMNIST/raw``, then,
    for Fashion-MNIST, :data:`FASHION_MNIST_SYSTEM_DIR`. The two most recently loaded datasets
    stay cached in the process (keyed by the files' paths, sizes and modification times); the
    returned tensors are shared, so do not modify them in place.

    Args:
        name: "cifar10", "mnist" or "fashion_mnist".
        data_dir: root data folder.

    Returns:
        :class:`DatasetTensors` with uint8 (N, C, H, W) images and int64 labels.

    Raises:
        DatasetNotFoundError: files missing; the message names the paths and how to get them.
        CorruptDatasetError: a file with the wrong format, shape or label range.
    """
    info = _dataset_info(name)
    found = _locate(info, Path(data_dir).expanduser())
    key = []
    for k, path in sorted(found.items()):
        stat = path.resolve().stat()
        key.append((k, str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    return _load_files(info.name, tuple(key))


def download_dataset(name: str, data_dir: str | os.PathLike[str] = "data") -> None:
    """Fetch a dataset with torchvision into ``data_dir`` unless it is already there.

    Needs internet. CIFAR-10 lands in ``data_dir/cifar-10-batches-py``, MNIST in
    ``data_dir/MNIST/raw``, Fashion-MNIST in ``data_dir/FashionMNIST/raw``.
    """
    info = _dataset_info(name)
    root = Path(data_dir).expanduser()
    try:
        _locate(info, root)
        return
    except DatasetNotFoundError:
        pass
    import torchvision  # deferred: only needed to download

    cls = {
        "cifar10": torchvision.datasets.CIFAR10,
        "mnist": torchvision.datasets.MNIST,
        "fashion_mnist": torchvision.datasets.FashionMNIST,
    }[info.name]
    for train in (True, False):
        cls(root=str(root), train=train, download=True)


# --------------------------------------------------------------------------------------------
# Split logic (pure functions on label tensors; run once at setup on the host)
# --------------------------------------------------------------------------------------------


def first_per_class(labels: Tensor, counts: Sequence[int | None]) -> Tensor:
    """Indices of the first ``counts[c]`` samples of every class c, in dataset order.

    Args:
        labels: (N,) integer labels in [0, C).
        counts: length C; ``None`` keeps every sample of that class.

    Returns:
        (K,) int64 indices, sorted ascending (dataset order).
    """
    keep = []
    for c, n in enumerate(counts):
        idx = torch.nonzero(labels == c).flatten()  # host-side, setup only
        keep.append(idx if n is None else idx[:n])
    return torch.cat(keep).sort().values if keep else torch.zeros(0, dtype=torch.long)


def stratified_holdout(
    indices: Tensor, labels: Tensor, fraction: float, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Split ``indices`` into (kept, held-out) with ``round(n_c * fraction)`` held out per class.

    A class with at least 2 samples gives at least 1 and keeps at least 1; a class with one
    sample stays whole. Rounding is Python's ``round`` (half to even). The held-out samples of
    each class are a uniformly random subset drawn with a ``torch.Generator`` seeded by
    ``seed``, classes in increasing order.

    Args:
        indices: (K,) indices into ``labels``, the pool to split.
        labels: (N,) labels of the whole dataset.
        fraction: share held out, in [0, 1).
        seed: generator seed.

    Returns:
        (kept, held_out): disjoint, sorted (dataset order) int64 index tensors whose union is
        ``indices``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    pool_labels = labels[indices]
    kept, held = [], []
    for c in range(int(labels.max()) + 1 if labels.numel() else 0):
        idx = indices[pool_labels == c]
        n = idx.numel()
        n_held = min(max(round(n * fraction), 1), n - 1) if n >= 2 and fraction > 0 else 0
        perm = torch.randperm(n, generator=generator)
        held.append(idx[perm[:n_held]])
        kept.append(idx[perm[n_held:]])
    empty = torch.zeros(0, dtype=torch.long)
    return (
        torch.cat([empty, *kept]).sort().values,
        torch.cat([empty, *held]).sort().values,
    )


def longtail_counts(class_counts: Sequence[int], imbalance_ratio: float) -> list[int]:
    """Per-class sizes of an exponential long-tail set (the CIFAR-10-LT recipe of Cao et al.).

    Class c keeps ``int(n_max * imbalance_ratio ** (-c / (C - 1)))`` images, where ``n_max`` is
    the largest class, capped at what the class has: class 0 keeps ``n_max``, class C-1 keeps
    ``n_max / imbalance_ratio``.

    Args:
        class_counts: images available per class, length C >= 2.
        imbalance_ratio: largest over smallest class size, >= 1.

    Returns:
        Length-C list of ints.
    """
    if not imbalance_ratio >= 1 or not math.isfinite(imbalance_ratio):
        raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
    n_classes = len(class_counts)
    n_max = max(class_counts)
    return [
        min(n, int(n_max * imbalance_ratio ** (-c / max(n_classes - 1, 1))))
        for c, n in enumerate(class_counts)
    ]


# --------------------------------------------------------------------------------------------
# Batched augmentation (tensor ops on the device, static shapes)
# --------------------------------------------------------------------------------------------


def crop_flip(images: Tensor, top: Tensor, left: Tensor, flip: Tensor, padding: int = 4) -> Tensor:
    """Crop every image from its zero-padded version at a given offset, then maybe flip it.

    Output pixel (i, j) of sample n is ``padded[n, :, top[n] + i, left[n] + jj]`` with
    ``jj = W - 1 - j`` where ``flip[n]`` and ``jj = j`` otherwise. Two gathers, no loop over
    samples, no data-dependent shapes.

    Args:
        images: (N, C, H, W), any dtype.
        top: (N,) integer row offsets in [0, 2 * padding].
        left: (N,) integer column offsets in [0, 2 * padding].
        flip: (N,) bool, True flips the crop horizontally.
        padding: zero border added on each side.

    Returns:
        (N, C, H, W), same dtype and device as ``images``.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))  # (N, C, H+2p, W+2p)
    device = images.device
    rows = top.to(device).long()[:, None] + torch.arange(h, device=device)  # (N, H)
    cols = torch.arange(w, device=device).expand(n, w)  # (N, W)
    cols = torch.where(flip.to(device)[:, None], w - 1 - cols, cols)
    cols = left.to(device).long()[:, None] + cols  # (N, W)
    rows = rows[:, None, :, None].expand(n, c, h, w + 2 * padding)
    out = padded.gather(2, rows)  # (N, C, H+2p, W+2p) -> (N, C, H, W+2p)
    cols = cols[:, None, None, :].expand(n, c, h, w)
    return out.gather(3, cols)  # (N, C, H, W+2p) -> (N, C, H, W)


def random_crop_flip(
    images: Tensor, padding: int = 4, generator: torch.Generator | None = None, flip: bool = True
) -> Tensor:
    """Random crop of the zero-padded images plus a random horizontal flip, per sample.

    The batched equivalent of torchvision's ``RandomCrop(size, padding)`` followed by
    ``RandomHorizontalFlip()``: offsets are uniform in [0, 2 * padding] and each sample flips
    with probability 1/2. Draws ``top``, ``left``, then ``flip`` (each (N,)) from ``generator``
    (or the global RNG of ``images``' device) and calls :func:`crop_flip`.

    Args:
        images: (N, C, H, W) float images (padding value 0).
        padding: zero border on each side, >= 0.
        generator: optional RNG; its device is used to draw the offsets.
        flip: also flip; False gives crops only (the flips are still drawn, so the crops are
            the same as with ``flip=True`` under the same RNG state).

    Returns:
        (N, C, H, W), same dtype and device.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    n = images.shape[0]
    device = generator.device if generator is not None else images.device
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    flips = torch.randint(0, 2, (n,), generator=generator, device=device).bool()
    return crop_flip(images, top, left, flips & flip, padding)


# --------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed from (seed, epoch)."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class TensorLoader:
    """Batches from in-memory tensors as ``(images, labels, mask)``, with static shapes.

    Training mode (``drop_last=True``) yields only full batches (the ragged tail is dropped; with
    ``shuffle=True`` each epoch drops different samples) and ``mask`` is all True. Evaluation mode
    (``drop_last=False``) yields every sample exactly once in fixed-size batches; the last batch
    is padded with zero images, label 0 and ``mask`` False.

    Batches are index slices of ``images``/``labels`` on their device; if those live on the
    GPU, nothing is copied from the host per step (one small index tensor per epoch when
    shuffling). With ``world_size > 1`` every rank walks the same permutation (seeded by
    ``seed`` and the epoch) and takes a disjoint, equal-length slice of it; evaluation shards
    are padded to the same number of batches on every rank.

    Args:
        images: (N, ...) tensor, usually uint8 (N, C, H, W).
        labels: (N,) int64.
        batch_size: samples per batch (per rank), >= 1.
        shuffle: new permutation every epoch, from a ``torch.Generator`` seeded with
            (``seed``, epoch).
        drop_last: True: drop the ragged tail (train); False: pad it and mask it (eval).
        seed: shuffle seed, >= 0.
        rank: this process' rank in [0, world_size).
        world_size: number of processes sharing the data.
        epoch_fn: returns the current epoch when an iteration starts (the data module passes
            the trainer's epoch, which survives checkpoint restarts); without it the loader
            counts its own iterations, see :meth:`set_epoch`.
        name: split name used in error messages.

    Raises:
        ValueError: ``drop_last=True`` and fewer than ``batch_size`` samples per rank.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch_fn: Callable[[], int] | None = None,
        name: str = "dataset",
    ) -> None:
        if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
            raise TypeError(
                f"images and labels must be torch.Tensors, got {type(images).__name__} and "
                f"{type(labels).__name__}"
            )
        if labels.dim() != 1 or images.dim() < 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"labels must have shape (N,) matching images (N, ...), got images "
                f"{tuple(images.shape)} and labels {tuple(labels.shape)}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch_fn = epoch_fn
        self.name = name
        self.epoch = 0
        # torch_xla's MpDeviceLoader (what Lightning's XLA strategy wraps loaders in) reads this.
        self.dataset = TensorDataset(images, labels)
        n = labels.shape[0]
        if drop_last:
            self.samples_per_rank = n // world_size
            self.num_batches = self.samples_per_rank // batch_size
            if self.num_batches == 0:
                per_rank = f" per rank ({n} over {world_size} ranks)" if world_size > 1 else ""
                raise ValueError(
                    f"batch_size={batch_size} is larger than the {self.samples_per_rank} "
                    f"{name} images{per_rank}, so no full batch fits and full batches are "
                    f"needed for static shapes; lower batch_size to at most "
                    f"{self.samples_per_rank}"
                )
        else:
            self.num_batches = math.ceil(math.ceil(n / world_size) / batch_size)
            self.samples_per_rank = self.num_batches * batch_size  # padded slots
        self._fixed: tuple[Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch whose permutation the next iteration uses (then it counts up by one)."""
        self.epoch = epoch

    def _order(self, epoch: int) -> tuple[Tensor, Tensor]:
        """This rank's (slots,) sample indices (padding rows point at 0) and real-sample mask."""
        n = self.labels.shape[0]
        if self.shuffle:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        total = self.samples_per_rank * self.world_size
        if self.drop_last:
            order = order[:total]
            mask = torch.ones(total, dtype=torch.bool)
        else:
            mask = torch.arange(total) < n
            order = torch.cat([order, torch.zeros(total - n, dtype=torch.long)])
        start = self.rank * self.samples_per_rank
        sl = slice(start, start + self.samples_per_rank)
        device = self.labels.device
        return order[sl].to(device), mask[sl].to(device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else self.epoch
        self.epoch = epoch + 1
        if self.shuffle:
            order, mask = self._order(epoch)
        else:  # fixed order: build it once, on the data's device
            if self._fixed is None:
                self._fixed = self._order(0)
            order, mask = self._fixed
        return self._batches(order, mask)

    def _batches(self, order: Tensor, mask: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        b = self.batch_size
        # Number of real samples on this rank, known on the host: batches past it are padded.
        n_real = self.samples_per_rank
        if not self.drop_last:
            n = self.labels.shape[0]
            n_real = min(max(n - self.rank * self.samples_per_rank, 0), self.samples_per_rank)
        for i in range(self.num_batches):
            idx = order[i * b : (i + 1) * b]
            images = self.images.index_select(0, idx)
            labels = self.labels.index_select(0, idx)
            batch_mask = mask[i * b : (i + 1) * b]
            if (i + 1) * b > n_real:  # padded batch: zero the padding rows
                keep = batch_mask.view(-1, *([1] * (images.dim() - 1)))
                images = images * keep.to(images.dtype)
                labels = labels * batch_mask.to(labels.dtype)
            yield images, labels, batch_mask

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, samples={self.labels.shape[0]}, "
            f"batch_size={self.batch_size}, batches={self.num_batches}, shuffle={self.shuffle}, "
            f"drop_last={self.drop_last}, rank={self.rank}/{self.world_size}, "
            f"device={self.labels.device})"
        )


# --------------------------------------------------------------------------------------------
# Data module
# --------------------------------------------------------------------------------------------


class ImbalancedDataModule(L.LightningDataModule):
    """Class-imbalanced CIFAR-10 / MNIST / Fashion-MNIST with in-memory, device-resident splits.

    Protocols:

    * ``"reference"`` (Hayat et al.'s "1000:k"): every class in ``minority_classes`` keeps its
      first ``minority_count * r`` train images and first ``minority_count`` test images in the
      dataset's own order (r = 5 for CIFAR-10, 6 for MNIST and Fashion-MNIST); the other
      classes keep everything. The test set is imbalanced too.
    * ``"step"``: the same train set, the full balanced test set.
    * ``"longtail"``: exponential long-tail train set (class c keeps its first
      ``n_max * imbalance_ratio ** (-c / (C - 1))`` images, see :func:`longtail_counts`), full
      balanced test set. ``minority_count`` is ignored; ``minority_classes`` does not shape the
      split but is still what the minority/majority metrics group by (e.g. pass the tail
      classes ``(5, 6, 7, 8, 9)``).

    With ``val_fraction > 0`` a stratified random share of the (imbalanced) train set is held
    out as "val". Every loader yields ``(images uint8 (B, C, H, W), labels int64 (B,), mask
    bool (B,))``; :meth:`on_after_batch_transfer` converts images to float32 in [0, 1], applies
    the augmentation in training and the optional normalisation, on the device.

    Args:
        dataset: "cifar10", "mnist" or "fashion_mnist".
        data_dir: root data folder (see :func:`load_dataset` for where files are looked for).
        minority_count: k of the reference and step protocols, >= 1 (required for them).
        minority_classes: class indices in [0, 10), no duplicates.
        batch_size: training batch size per process, >= 1. Train batches are always full.
        eval_batch_size: val/test batch size per process; None uses ``batch_size``.
        augment: random crop (4-pixel zero padding) + horizontal flip in training.
        normalize: subtract the per-channel training-set mean and divide by the std.
        val_fraction: share of the train set held out for validation, in [0, 1).
        monitor_test: also evaluate the test set in every validation epoch (the reference
            protocol's curves).
        protocol: "reference", "step" or "longtail".
        imbalance_ratio: largest over smallest class size for "longtail", >= 1; ignored by the
            other protocols.
        seed: seeds the validation split and the per-epoch shuffles, >= 0; None (the default)
            follows the global seed of ``seed_everything`` (``PL_GLOBAL_SEED``), 0 if none is set,
            so ``--seed_everything=3`` gives a full replicate: new weights, new data order.
        flip: random horizontal flips in the augmentation; None (the default) flips for
            CIFAR-10 and Fashion-MNIST but not for MNIST (digits are not mirror-symmetric).
        download: let :meth:`prepare_data` fetch the dataset with torchvision (needs internet).
        device_resident: keep the splits on the trainer's root device (CUDA/CPU) so batches are
            device slices; on XLA they stay on the host and Lightning transfers each batch.

    Example:
        >>> dm = ImbalancedDataModule("cifar10", "data", minority_count=50)
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> dm.class_counts("train")  # doctest: +SKIP
        [250, 5000, 250, 5000, 250, 5000, 250, 5000, 250, 5000]
    """

    def __init__(
        self,
        dataset: str = "cifar10",
        data_dir: str = "data",
        minority_count: int | None = None,
        minority_classes: Sequence[int] = (0, 2, 4, 6, 8),
        batch_size: int = 640,
        eval_batch_size: int | None = None,
        augment: bool = False,
        normalize: bool = False,
        val_fraction: float = 0.0,
        monitor_test: bool = True,
        protocol: str = "reference",
        imbalance_ratio: float | None = None,
        seed: int | None = None,
        download: bool = False,
        device_resident: bool = True,
        flip: bool | None = None,
    ) -> None:
        super().__init__()
        info = _dataset_info(dataset)
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
        if protocol == "longtail":
            if imbalance_ratio is None:
                raise ValueError(
                    "imbalance_ratio must be set (>= 1) for protocol='longtail', got None"
                )
        elif minority_count is None:
            raise ValueError(
                f"minority_count (k of the 1000:k protocol) is required for "
                f"protocol={protocol!r}, got None"
            )
        if minority_count is not None and (
            isinstance(minority_count, bool)
            or not isinstance(minority_count, int)
            or minority_count < 1
        ):
            raise ValueError(f"minority_count must be an int >= 1, got {minority_count!r}")
        if imbalance_ratio is not None and (
            not imbalance_ratio >= 1 or not math.isfinite(imbalance_ratio)
        ):
            raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
        if isinstance(minority_classes, (str, bytes)) or not isinstance(minority_classes, Sequence):
            raise TypeError(
                f"minority_classes must be a sequence of class indices, got {minority_classes!r}"
            )
        for c in minority_classes:
            if (
                isinstance(c, bool)
                or not isinstance(c, numbers.Integral)
                or not 0 <= c < info.num_classes
            ):
                raise ValueError(
                    f"minority_classes must hold class indices in [0, {info.num_classes}), got "
                    f"{c!r} in {minority_classes!r}"
                )
        if len(set(minority_classes)) != len(minority_classes):
            raise ValueError(f"minority_classes has duplicates: {minority_classes!r}")
        for arg, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be an int >= 0 or None, got {seed!r}")
        self.save_hyperparameters()

        self.info = info
        self.dataset = info.name
        self.data_dir = str(data_dir)
        self.minority_count = minority_count
        self.minority_classes: tuple[int, ...] = tuple(sorted(int(c) for c in minority_classes))
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.augment = augment
        self.normalize = normalize
        self.val_fraction = float(val_fraction)
        self.monitor_test = monitor_test
        self.protocol = protocol
        self.imbalance_ratio = imbalance_ratio
        self.seed = seed
        self.flip = info.name != "mnist" if flip is None else bool(flip)
        self.download = download
        self.device_resident = device_resident

        self.num_classes: int = info.num_classes
        self.in_channels: int = info.in_channels
        self.image_size: int = info.image_size
        self.eval_splits: list[str] = (["val"] if self.val_fraction > 0 else []) + (
            ["test"] if monitor_test else []
        )

        self._indices: dict[str, Tensor] | None = None
        self._splits: dict[str, tuple[Tensor, Tensor]] = {}
        self._on_device: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
        self._norm: dict[str, tuple[Tensor, Tensor]] = {}

    # ---------------------------------------------------------------- preparing and splitting
    def prepare_data(self) -> None:
        """Download the dataset with torchvision if ``download=True`` and it is not there."""
        if self.download:
            download_dataset(self.dataset, self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        """Load the dataset (no download) and build the train/val/test splits, once.

        Raises:
            DatasetNotFoundError: the files are missing.
            ValueError: a minority class has fewer than ``minority_count * r`` train images or
                (reference protocol) fewer than ``minority_count`` test images.
        """
        if self._indices is not None:
            return
        try:
            data = load_dataset(self.dataset, self.data_dir)
        except DatasetNotFoundError as err:
            if self.download:
                raise DatasetNotFoundError(
                    f"{err} (download=True is set: prepare_data() downloads; the Trainer calls "
                    "it, plain code must call dm.prepare_data() before dm.setup())"
                ) from err
            raise
        c = self.num_classes
        train_counts = torch.bincount(data.train_labels, minlength=c).tolist()
        test_counts = torch.bincount(data.test_labels, minlength=c).tolist()
        all_test = torch.arange(data.test_labels.shape[0])
        if self.protocol == "longtail":
            assert self.imbalance_ratio is not None  # checked in __init__
            train_idx = first_per_class(
                data.train_labels, longtail_counts(train_counts, self.imbalance_ratio)
            )
            test_idx = all_test
        else:
            k = self.minority_count
            assert k is not None  # checked in __init__
            r = self.info.train_ratio
            for m in self.minority_classes:
                if train_counts[m] < k * r:
                    raise ValueError(
                        f"minority_count={k} needs minority_count * {r} = {k * r} train images "
                        f"of class {m}, but the {self.info.title} train set has only "
                        f"{train_counts[m]}; use minority_count <= {train_counts[m] // r}"
                    )
                if self.protocol == "reference" and test_counts[m] < k:
                    raise ValueError(
                        f"minority_count={k} needs {k} test images of class {m}, but the "
                        f"{self.info.title} test set has only {test_counts[m]}; use "
                        f"minority_count <= {test_counts[m]}"
                    )
            keep_train = [k * r if cls in self.minority_classes else None for cls in range(c)]
            train_idx = first_per_class(data.train_labels, keep_train)
            if self.protocol == "reference":
                keep_test = [k if cls in self.minority_classes else None for cls in range(c)]
                test_idx = first_per_class(data.test_labels, keep_test)
            else:
                test_idx = all_test
        train_idx, val_idx = stratified_holdout(
            train_idx, data.train_labels, self.val_fraction, self.data_seed
        )
        self._indices = {"train": train_idx, "val": val_idx, "test": test_idx}
        self._splits = {
            "train": (data.train_images[train_idx], data.train_labels[train_idx]),
            "val": (data.train_images[val_idx], data.train_labels[val_idx]),
            "test": (data.test_images[test_idx], data.test_labels[test_idx]),
        }
        self._on_device = {}

    def teardown(self, stage: str | None = None) -> None:
        """Drop the device copies of the splits (the host tensors stay for the next stage)."""
        self._on_device = {}
        self._norm = {}

    def _ensure_setup(self) -> None:
        if self._indices is None:
            if self.trainer is None:  # plain use: nobody called prepare_data for us
                self.prepare_data()
            self.setup()

    def _validate_split_name(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")

    def class_counts(self, split: str) -> list[int]:
        """Images per class in ``split`` ("train", "val" or "test"); sets up lazily.

        Returns:
            Length-C list of ints ("val" is all zeros when ``val_fraction == 0``).
        """
        self._validate_split_name(split)
        self._ensure_setup()
        labels = self._splits[split][1]
        return torch.bincount(labels, minlength=self.num_classes).tolist()

    def indices(self, split: str) -> Tensor:
        """(K,) sorted indices of ``split`` into the source set (train set for train/val)."""
        self._validate_split_name(split)
        self._ensure_setup()
        assert self._indices is not None
        return self._indices[split]

    def split_tensors(self, split: str) -> tuple[Tensor, Tensor]:
        """The host tensors of ``split``: (images (K, C, H, W) uint8, labels (K,) int64)."""
        self._validate_split_name(split)
        self._ensure_setup()
        return self._splits[split]

    # ---------------------------------------------------------------- loaders
    def _target_device(self) -> torch.device | None:
        """Where to keep the splits: the trainer's root device, unless XLA, CPU or no trainer."""
        if not self.device_resident or self.trainer is None:
            return None
        device = self.trainer.strategy.root_device
        if device.type in ("xla", "cpu"):
            return None
        return device

    def _tensors(self, split: str) -> tuple[Tensor, Tensor]:
        self._ensure_setup()
        device = self._target_device()
        if device is None:
            return self._splits[split]
        key = (split, str(device))
        if key not in self._on_device:  # moved once, then every loader reuses it
            images, labels = self._splits[split]
            self._on_device[key] = (images.to(device), labels.to(device))
        return self._on_device[key]

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _trainer_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _eval_loader(self, split: str) -> TensorLoader:
        images, labels = self._tensors(split)
        rank, world = self._rank_world()
        return TensorLoader(
            images, labels, self.eval_batch_size, rank=rank, world_size=world, name=split
        )

    def train_dataloader(self) -> TensorLoader:
        """Shuffled full batches of ``batch_size`` (ragged tail dropped), sharded over ranks."""
        images, labels = self._tensors("train")
        rank, world = self._rank_world()
        # overfit_batches wants the same batches every epoch.
        overfit = self.trainer is not None and bool(getattr(self.trainer, "overfit_batches", 0))
        return TensorLoader(
            images,
            labels,
            self.batch_size,
            shuffle=not overfit,
            drop_last=True,
            seed=self.data_seed,
            rank=rank,
            world_size=world,
            epoch_fn=self._trainer_epoch if self.trainer is not None else None,
            name="train",
        )

    def val_dataloader(self) -> list[TensorLoader]:
        """One padded loader per name in :attr:`eval_splits`, in that order ([] when none)."""
        return [self._eval_loader(split) for split in self.eval_splits]

    def test_dataloader(self) -> TensorLoader:
        """The test split in padded batches of ``eval_batch_size``."""
        return self._eval_loader("test")

    def predict_dataloader(self) -> TensorLoader:
        """The test split, as for :meth:`test_dataloader` (drop the rows whose mask is False)."""
        return self._eval_loader("test")

    @property
    def data_seed(self) -> int:
        """The seed in use: ``seed``, else the global seed of ``seed_everything``, else 0."""
        if self.seed is not None:
            return self.seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    # ---------------------------------------------------------------- on-device transforms
    def _norm_constants(self, device: torch.device) -> tuple[Tensor, Tensor]:
        key = str(device)
        if key not in self._norm:  # one host->device copy per device, not per step
            mean = torch.tensor(self.info.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(self.info.std, dtype=torch.float32).view(1, -1, 1, 1)
            self._norm[key] = (mean.to(device), std.to(device))
        return self._norm[key]

    def on_after_batch_transfer(
        self, batch: tuple[Tensor, Tensor, Tensor], dataloader_idx: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """uint8 images -> float32 in [0, 1]; crop + flip when training with augment; normalise.

        Args:
            batch: (images (B, C, H, W) uint8, labels (B,), mask (B,)) on the device.
            dataloader_idx: index of the loader (unused).

        Returns:
            (images (B, C, H, W) float32, labels, mask), labels and mask unchanged.
        """
        images, labels, mask = batch
        if images.dtype == torch.uint8:
            images = images.to(torch.float32).div_(255.0)
        if self.augment and self.trainer is not None and self.trainer.training:
            images = random_crop_flip(images, padding=4, flip=self.flip)
        if self.normalize:
            mean, std = self._norm_constants(images.device)
            images = (images - mean.to(images.dtype)) / std.to(images.dtype)
        return images, labels, mask
