"""Benchmark 1: images/s of the device-resident data path vs a per-image torchvision DataLoader.

Both sides deliver the same thing to a training step: shuffled full batches of float32 images
in [0, 1] on the device, randomly cropped from a 4-pixel zero padding and randomly flipped.

- ours: :class:`~aff_lightning.data.ImbalancedDataModule` (``augment=True``) on random
  CIFAR-10-shaped data in the real file format; ``train_dataloader()`` (a
  :class:`~aff_lightning.data.TensorLoader` over the uint8 split, moved to the device once) and
  ``on_after_batch_transfer`` (uint8 -> float, batched crop + flip on the device) for every
  batch, as the Trainer calls them. A stand-in trainer object supplies the three attributes
  the data module reads (training mode, epoch, root device), so no model runs.
- baseline: a map-style Dataset of PIL images with
  ``Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor()])``, a
  ``DataLoader`` with the same batch size, shuffling and dropped tail, at ``num_workers=0``
  and at a few worker counts (persistent workers, and pinned memory + a non-blocking copy to
  the device on CUDA); the best worker count is reported.

Each timing is one epoch after a warm-up epoch; rows give the median images/s over repeats.
"""

from __future__ import annotations

import os
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from aff_lightning.data import ImbalancedDataModule
from benchmarks.common import Row, device_sync, median
from benchmarks.fakecifar import write_random_cifar10

__all__ = ["PILCifar", "bench_data", "dataloader_rate", "project_rate", "worker_counts"]

TARGET_SPEEDUP = 5.0


class PILCifar(Dataset):
    """CIFAR-10-like map-style dataset: uint8 HWC arrays -> PIL image -> ``transform``.

    What ``torchvision.datasets.CIFAR10`` does per sample (it keeps the data as an (N, H, W, C)
    uint8 array and builds a PIL image in ``__getitem__``).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: object) -> None:
        self.images = images  # (N, H, W, C) uint8
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[i])
        return self.transform(image), int(self.labels[i])  # type: ignore[operator]


def worker_counts(cpu_count: int | None = None) -> list[int]:
    """0 plus powers of two up to the core count (0, 1, 2 on two cores)."""
    cores = cpu_count or os.cpu_count() or 1
    return [0] + [w for w in (1, 2, 4, 8, 16) if w <= cores]


def _stand_in_trainer(device: torch.device) -> SimpleNamespace:
    """The Trainer attributes ImbalancedDataModule reads, in training mode on ``device``."""
    return SimpleNamespace(
        training=True,
        global_rank=0,
        world_size=1,
        current_epoch=0,
        overfit_batches=0,
        strategy=SimpleNamespace(root_device=device),
    )


def project_rate(
    data_dir: str, batch: int, device: torch.device, repeats: int
) -> tuple[list[float], int]:
    """Images/s per epoch of the data module's train path, and the images per epoch."""
    dm = ImbalancedDataModule(
        "cifar10",
        data_dir,
        minority_count=1,
        minority_classes=(),  # keep every image: the plain random set
        batch_size=batch,
        augment=True,
    )
    trainer = _stand_in_trainer(device)
    dm.trainer = trainer  # type: ignore[assignment]

    def epoch() -> int:
        n = 0
        for images, labels, mask in dm.train_dataloader():
            x, _, _ = dm.on_after_batch_transfer((images, labels, mask), 0)
            n += x.shape[0]
        device_sync(device)
        trainer.current_epoch += 1
        return n

    epoch()  # warm-up: loads the files, moves the split to the device once
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = epoch()
        rates.append(n / (time.perf_counter() - start))
    return rates, n


def dataloader_rate(
    images: np.ndarray,
    labels: np.ndarray,
    batch: int,
    workers: int,
    device: torch.device,
    repeats: int,
) -> list[float]:
    """Images/s per epoch of the per-image torchvision pipeline with ``workers`` workers."""
    from torchvision import transforms as T

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    cuda = device.type == "cuda"
    loader = DataLoader(
        PILCifar(images, labels, transform),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=cuda,
    )

    def epoch() -> int:
        n = 0
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            n += x.shape[0]
        device_sync(device)
        return n

    epoch()  # warm-up: starts the workers
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = epoch()
        rates.append(n / (time.perf_counter() - start))
    return rates


def bench_data(
    device: torch.device,
    *,
    repeats: int,
    quick: bool = False,
    n_images: int | None = None,
    batch: int | None = None,
    workers: list[int] | None = None,
) -> list[Row]:
    """Rows: ours vs the DataLoader at 0 workers and at its best worker count.

    Args:
        device: where batches must end up.
        repeats: timed epochs per pipeline (after one warm-up epoch).
        quick: 2,560 images in batches of 256 instead of 10,000 in batches of 640.
        n_images: random CIFAR-10-shaped train images (a multiple of 10).
        batch: batch size of both pipelines.
        workers: DataLoader worker counts to try; None: :func:`worker_counts`.
    """
    n_images = n_images or (2_560 if quick else 10_000)
    batch = batch or (256 if quick else 640)
    workers = worker_counts() if workers is None else workers
    with tempfile.TemporaryDirectory(prefix="aff_bench_data_") as tmp:
        write_random_cifar10(tmp, n_train=n_images, n_test=10)
        ours, per_epoch = project_rate(tmp, batch, device, repeats)
        dm = ImbalancedDataModule("cifar10", tmp, minority_count=1, minority_classes=())
        images_t, labels_t = dm.split_tensors("train")
    images = images_t.permute(0, 2, 3, 1).contiguous().numpy()  # (N, C, H, W) -> (N, H, W, C)
    labels = labels_t.numpy()
    theirs = {
        w: median(dataloader_rate(images, labels, batch, w, device, repeats)) for w in workers
    }
    ours_rate = median(ours)
    best_w = max(theirs, key=lambda w: theirs[w])
    size = f"{n_images} random 3x32x32 uint8 images, batch {batch}, {per_epoch} images/epoch"
    how = f"median over {repeats} epochs after a warm-up epoch"
    ours_note = (
        f"ours = ImbalancedDataModule(augment=True).train_dataloader() + on_after_batch_transfer "
        f"on {device.type}"
    )
    tried = ", ".join(f"{w}: {theirs[w]:,.0f} img/s" for w in workers)
    rows = []
    pairs = [("0 workers", 0)] if 0 in theirs else []
    for label, w in [*pairs, (f"best of workers {workers}: {best_w}", best_w)]:
        ratio = ours_rate / theirs[w]
        rows.append(
            Row(
                benchmark=f"data: images/s vs DataLoader ({label})",
                ours=ours_rate,
                baseline=theirs[w],
                unit="img/s",
                ratio=ratio,
                ratio_kind="speedup",
                target=f">= {TARGET_SPEEDUP:g}x",
                passed=ratio >= TARGET_SPEEDUP,
                note=(
                    f"{size}; {ours_note}; baseline = PIL Dataset + RandomCrop(32, 4) + "
                    f"RandomHorizontalFlip + ToTensor, DataLoader(num_workers={w}); "
                    f"workers tried {{{tried}}}; {how}"
                ),
                extra={"workers": w, "dataloader_rates": {str(k): v for k, v in theirs.items()}},
            )
        )
    return rows
