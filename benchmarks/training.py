"""Benchmark 5 (GPU): end-to-end cnn10 training throughput and the time of one study run.

A study run is 100 epochs of the reference protocol on CIFAR-10 (27k-37k train images; the
test split evaluated every epoch). This trains :class:`~aff_lightning.model.AffinityClassifier`
(cnn10, affinity head m=1) with the real :class:`~aff_lightning.data.ImbalancedDataModule`
(device-resident, ``augment=True``, batch 640) through the Trainer in ``bf16-mixed`` with
channels_last (``compile`` optional) on random CIFAR-10-shaped data, and times each training
epoch (training steps, device synced at both ends) and each whole epoch (with the test-split
evaluation). The first epoch (cuDNN autotuning, compilation) is left out of the medians.

It sets the result next to the compute limit: 50 % of the GPU's dense bf16 peak divided by the
training FLOPs of one image (3 x 2 x the multiply-adds of a forward pass, counted with hooks on
every conv and linear layer: about 1.6 GFLOP for cnn10 at 32x32), i.e. about 300k images/s on
an H100-class GPU. Runs by default only on CUDA (on the CPU one cnn10 epoch takes hours).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from aff_lightning.data import ImbalancedDataModule
from aff_lightning.model import AffinityClassifier
from benchmarks.common import BackboneName, Row, device_sync
from benchmarks.fakecifar import write_random_cifar10

__all__ = ["PEAK_BF16_TFLOPS", "bench_training", "peak_bf16_tflops", "training_flops_per_image"]

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
ISSUE_LIMIT_IMG_S = 300_000.0  # the issue's figure: 50 % of an H100's bf16 peak / 1.6 GFLOP
STUDY_RUN_EPOCHS = 100
STUDY_TRAIN_IMAGES = (26_250, 37_500)  # 1000:k CIFAR-10 train sets, k = 50 and k = 500


def peak_bf16_tflops(gpu_name: str) -> float | None:
    """The dense bf16 peak of a GPU whose name contains a known model, else None."""
    for model, peak in PEAK_BF16_TFLOPS.items():
        if model in gpu_name.upper():
            return peak
    return None


def training_flops_per_image(model: nn.Module, image_shape: tuple[int, int, int]) -> float:
    """3 x 2 x the multiply-adds of one forward pass through every Conv2d and Linear layer."""
    macs = 0

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            per_out = module.in_channels // module.groups * kh * kw
            macs += output[0].numel() * per_out
        elif isinstance(module, nn.Linear):
            macs += output[0].numel() * module.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *image_shape))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return 6.0 * macs  # forward 2*MACs, backward twice the forward


class _EpochClock(Callback):
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.train_seconds: list[float] = []
        self.epoch_seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device_sync(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if i + 1 == trainer.num_training_batches:
            device_sync(self.device)
            self.train_seconds.append(time.perf_counter() - self._start)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device_sync(self.device)  # after this epoch's validation
        self.epoch_seconds.append(time.perf_counter() - self._start)


def bench_training(
    device: torch.device,
    *,
    quick: bool = False,
    backbone: BackboneName = "cnn10",
    n_train: int | None = None,
    n_test: int | None = None,
    batch: int = 640,
    epochs: int | None = None,
    compile: bool = False,
    peak_tflops: float | None = None,
) -> list[Row]:
    """Rows: training images/s and seconds per 100-epoch study run, next to the compute limit.

    Args:
        device: the GPU (the CPU works for tests with a tiny setting).
        quick: 3 epochs of 6,400 images instead of 5 of 32,000.
        backbone: "cnn10" (the study's) or "cnn3".
        n_train: random train images per epoch (a multiple of 10).
        n_test: random test images evaluated every epoch.
        batch: training batch (640, the reference).
        epochs: epochs; the first is left out of the medians.
        compile: ``--model.compile=true``.
        peak_tflops: dense bf16 peak of the GPU; None: looked up by name, else the issue's
            300k images/s H100 figure is the limit.
    """
    n_train = n_train or (6_400 if quick else 32_000)
    n_test = n_test or (1_000 if quick else 5_000)
    epochs = epochs or (3 if quick else 5)
    cuda = device.type == "cuda"
    precision: Literal["bf16-mixed", "32-true"] = "bf16-mixed" if cuda else "32-true"
    with tempfile.TemporaryDirectory(prefix="aff_bench_train_") as tmp:
        write_random_cifar10(tmp, n_train=n_train, n_test=n_test)
        dm = ImbalancedDataModule(
            "cifar10",
            tmp,
            minority_count=1,
            minority_classes=(),
            batch_size=batch,
            eval_batch_size=1000 if n_test >= 1000 else n_test,
            augment=True,
            monitor_test=True,
        )
        torch.manual_seed(0)
        model = AffinityClassifier(
            backbone=backbone,
            minority_classes=(),
            channels_last=cuda,
            compile=compile,
            milestones=(10_000,),
        )
        flops = training_flops_per_image(model.backbone, (3, 32, 32))
        clock = _EpochClock(device)
        trainer = L.Trainer(
            accelerator=device.type,
            devices=1,
            precision=precision,
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[clock],
        )
        trainer.fit(model, datamodule=dm)
    per_epoch = (n_train // batch) * batch
    steady_train = statistics.median(clock.train_seconds[1:] or clock.train_seconds)
    steady_epoch = statistics.median(clock.epoch_seconds[1:] or clock.epoch_seconds)
    train_rate = per_epoch / steady_train
    epoch_rate = per_epoch / steady_epoch  # training images per second of a whole epoch
    gpu = torch.cuda.get_device_name(device) if cuda else "CPU"
    peak = peak_tflops or (peak_bf16_tflops(gpu) if cuda else None)
    if peak:
        limit = 0.5 * peak * 1e12 / flops
        limit_how = f"50 % of {peak:g} TFLOP/s bf16 / {flops / 1e9:.2f} GFLOP per image"
    else:
        limit = ISSUE_LIMIT_IMG_S
        limit_how = f"the issue's H100 figure (peak of {gpu} unknown)"
    setting = (
        f"{backbone}, affinity head m=1, {precision}"
        + (", channels_last" if cuda else "")
        + (", torch.compile" if compile else "")
        + f", batch {batch}, {per_epoch} random train images/epoch with augmentation, "
        f"{n_test} test images evaluated every epoch, median of epochs 1..{epochs - 1}"
    )
    lo, hi = (STUDY_RUN_EPOCHS * n / epoch_rate for n in STUDY_TRAIN_IMAGES)
    lo_limit, hi_limit = (STUDY_RUN_EPOCHS * n / limit for n in STUDY_TRAIN_IMAGES)
    return [
        Row(
            benchmark=f"train: {backbone} images/s on {gpu} vs compute limit",
            ours=train_rate,
            baseline=limit,
            unit="img/s",
            ratio=train_rate / limit,
            ratio_kind="fraction",
            note=f"{setting}; training steps only; limit = {limit_how}",
            extra={"flops_per_image": flops, "train_seconds": clock.train_seconds},
        ),
        Row(
            benchmark=f"train: s per 100-epoch {backbone} run ({STUDY_TRAIN_IMAGES[1]:,} img)",
            ours=hi,
            baseline=hi_limit,
            unit="s",
            ratio=hi_limit / hi,
            ratio_kind="fraction",
            note=(
                f"{setting}; whole epochs (training + test evaluation) at {epoch_rate:,.0f} "
                f"train img/s; {STUDY_TRAIN_IMAGES[0]:,} images: {lo:,.0f} s (limit "
                f"{lo_limit:,.0f} s); ratio = limit / ours"
            ),
            extra={"epoch_seconds": clock.epoch_seconds, "epoch_rate": epoch_rate},
        ),
    ]
