"""Benchmark 2: time per training step of the LightningModule vs a plain PyTorch loop.

Both sides train a fresh, identically seeded :class:`~aff_lightning.model.AffinityClassifier`
(affinity head, m=1) on the same pre-made float32 batches, served by the same
:class:`~aff_lightning.data.TensorLoader` on the device:

- Lightning: ``Trainer(max_steps=warmup + steps, logger=False, enable_checkpointing=False,
  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
  limit_val_batches=0).fit(model, loader)`` -- the module's own ``training_step`` (with its
  per-step train-metric update and loss logging) and ``configure_optimizers`` (Adam);
- plain: ``zero_grad``, ``model.scores(model.features(x))``, the same loss, ``backward``,
  ``Adam.step`` in a for loop.

On CUDA both run bf16 autocast (Lightning's ``precision="bf16-mixed"``) with channels_last;
on the CPU float32. The clock starts at the end of the last warm-up step and stops at the end of
the last step, after a device sync at both ends, so the per-step time includes everything the
Trainer does between steps (batch fetch and transfer hooks, callbacks, logging, the optimizer
closure) but not its setup. Plain and Lightning runs alternate for ``repeats`` rounds; the rows
give the medians. Overhead = (Lightning - plain) / Lightning; noise can make it negative.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from aff_lightning.data import TensorLoader
from aff_lightning.model import AffinityClassifier
from benchmarks.common import BackboneName, Row, device_sync, median

__all__ = ["bench_lightning", "lightning_step_seconds", "plain_step_seconds"]

TARGET_OVERHEAD = 0.05


class _WindowTimer(Callback):
    """Clock from the end of training batch ``start_after`` to the end of the last batch."""

    def __init__(self, start_after: int, device: torch.device) -> None:
        self.start_after = start_after
        self.device = device
        self.start: float | None = None
        self.end: float | None = None
        self.steps = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if i == self.start_after or i + 1 == trainer.num_training_batches:
            device_sync(self.device)
            now = time.perf_counter()
            if i == self.start_after:
                self.start = now
            else:
                self.end = now
                self.steps = i - self.start_after


def _setup(
    backbone: BackboneName, batch: int, n_batches: int, device: torch.device, seed: int
) -> tuple[AffinityClassifier, TensorLoader]:
    torch.manual_seed(seed)
    model = AffinityClassifier(
        backbone=backbone, head="affinity", channels_last=device.type == "cuda"
    )
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n_batches * batch, 3, 32, 32, generator=g).to(device)
    labels = torch.randint(0, 10, (n_batches * batch,), generator=g).to(device)
    return model, TensorLoader(images, labels, batch, drop_last=True, name="bench")


def lightning_step_seconds(
    backbone: BackboneName, batch: int, steps: int, warmup: int, device: torch.device, seed: int = 0
) -> float:
    """Seconds per training step of ``Trainer.fit`` after ``warmup`` steps (>= 1)."""
    model, loader = _setup(backbone, batch, warmup + steps, device, seed)
    timer = _WindowTimer(warmup - 1, device)
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        max_steps=warmup + steps,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(model, train_dataloaders=loader)
    if timer.start is None or timer.end is None or timer.steps != steps:
        raise RuntimeError(
            f"the Trainer ran {trainer.global_step} steps, expected {warmup + steps}"
        )
    return (timer.end - timer.start) / steps


def plain_step_seconds(
    backbone: BackboneName, batch: int, steps: int, warmup: int, device: torch.device, seed: int = 0
) -> float:
    """Seconds per step of a plain PyTorch loop doing the same maths, after ``warmup`` steps."""
    model, loader = _setup(backbone, batch, warmup + steps, device, seed)
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=model.hparams["lr"])
    cuda = device.type == "cuda"
    start = 0.0
    for i, (images, labels, _) in enumerate(loader):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            aff, logits = model.scores(model.features(images))
            loss = model._loss(aff, logits, labels)
        loss.backward()
        opt.step()
        if i == warmup - 1:
            device_sync(device)
            start = time.perf_counter()
    device_sync(device)
    return (time.perf_counter() - start) / steps


def _one(
    backbone: BackboneName,
    batch: int,
    steps: int,
    warmup: int,
    rounds: int,
    device: torch.device,
    target: bool,
    label: str,
) -> Row:
    lightning, plain = [], []
    for r in range(rounds):  # alternate the order against drift in a busy machine's speed
        order = ("plain", "lightning") if r % 2 == 0 else ("lightning", "plain")
        for side in order:
            if side == "plain":
                plain.append(plain_step_seconds(backbone, batch, steps, warmup, device, seed=r))
            else:
                lightning.append(
                    lightning_step_seconds(backbone, batch, steps, warmup, device, seed=r)
                )
    t_l, t_p = median(lightning), median(plain)
    overhead = (t_l - t_p) / t_l
    precision = "bf16-mixed + channels_last" if device.type == "cuda" else "float32"
    return Row(
        benchmark=f"lightning: step time vs plain loop ({label})",
        ours=1e3 * t_l,
        baseline=1e3 * t_p,
        unit="ms/step",
        ratio=overhead,
        ratio_kind="fraction",
        target=f"<= {100 * TARGET_OVERHEAD:g} %" if target else None,
        passed=overhead <= TARGET_OVERHEAD if target else None,
        note=(
            f"{backbone}, affinity head m=1, batch {batch}, {precision}, {steps} timed steps "
            f"after {warmup} warm-up steps, median of {rounds} alternating rounds; ratio = "
            f"overhead (Lightning - plain) / Lightning = {1e3 * (t_l - t_p):+.2f} ms/step"
        ),
        extra={"overhead_ms": 1e3 * (t_l - t_p), "backbone": backbone, "batch": batch},
    )


def bench_lightning(device: torch.device, *, repeats: int, quick: bool = False) -> list[Row]:
    """Rows: Lightning overhead on the reference model; on a tiny step (fixed cost per step).

    Full run: cnn10 at batch 640 on CUDA (32 on the CPU, where a batch-640 cnn10 step takes
    about a minute) against the target, then cnn3 at batch 16 for the absolute per-step cost
    of the Trainer (informational). ``quick``: the cnn3 row only, against the target.
    """
    cuda = device.type == "cuda"
    rounds = max(2, repeats)
    tiny = _one(
        "cnn3", 16, 5 if quick else 20, 2 if quick else 3, rounds, device, quick, "cnn3, batch 16"
    )
    if quick:
        return [tiny]
    batch = 640 if cuda else 32
    steps, warmup = (30, 5) if cuda else (3, 1)
    main = _one("cnn10", batch, steps, warmup, rounds, device, True, f"cnn10, batch {batch}")
    return [main, tiny]
