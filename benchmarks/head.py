"""Benchmark 3: the affinity head + loss, forward and backward.

Three formulations of a training step's head work on the same (N, D) features and labels:

- ours: :class:`aff_lightning.heads.AffinityHead` (one matmul for all N x C*M distances) and its
  loss (max-margin term + diversity regulariser), as the model runs it (``validate_args=False``);
- naive: :mod:`benchmarks.naive`, the (N, C, M, D) difference tensor of the public ports, with
  the same loss;
- linear: ``nn.Linear(D, C)`` + cross-entropy, the softmax head.

Each timing runs forward + backward (gradients into the features and the parameters) ``inner``
times between device syncs; the row reports the median over repeats, in float32. The head's
share of a training step divides by the time of a full cnn10 step (forward, loss, backward, Adam)
at the same batch, in the precision training uses on that device (float32 on the CPU, bf16
autocast + channels_last on CUDA): on the CPU a batch-640 cnn10 step takes about a minute, so it
is measured at ``step_batch`` images and scaled linearly to the head's batch (the backbone's cost
is linear in the batch; the row says when this was done).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from aff_lightning.heads import AffinityHead
from aff_lightning.model import AffinityClassifier
from benchmarks.common import BackboneName, Row, median, time_call
from benchmarks.naive import naive_affinity, naive_loss

__all__ = ["bench_head", "cnn10_step_seconds", "head_step_fns"]

SIGMA = 90.0
MARGIN = 0.43
TARGET_SPEEDUP = 5.0  # ours >= 5x faster than the naive formulation
TARGET_SHARE = 0.03  # head + loss < 3 % of a cnn10 training step


def head_step_fns(
    batch: int,
    dim: int,
    num_classes: int,
    n_centers: int,
    device: torch.device,
    seed: int = 0,
) -> dict[str, Callable[[], torch.Tensor]]:
    """Forward+backward closures ``{"ours", "naive", "linear"}`` on shared features and labels.

    Each call clears the gradients it writes, computes the loss, backpropagates and returns the
    loss. ``ours`` and ``naive`` share one center tensor, so they compute the same loss.
    """
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, dim, generator=g).to(device).requires_grad_(True)
    target = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    torch.manual_seed(seed)
    head = AffinityHead(
        dim, num_classes, n_centers, sigma=SIGMA, margin=MARGIN, validate_args=False
    ).to(device)
    linear = nn.Linear(dim, num_classes).to(device)

    def clear(*params: torch.Tensor) -> None:
        for p in params:
            p.grad = None

    def ours() -> torch.Tensor:
        clear(feats, head.centers)
        loss = head.loss(head(feats), target)
        loss.backward()
        return loss

    def naive() -> torch.Tensor:
        clear(feats, head.centers)
        aff = naive_affinity(feats, head.centers, SIGMA)
        loss = naive_loss(aff, target, head.centers, MARGIN, head.reg_weight)
        loss.backward()
        return loss

    def softmax() -> torch.Tensor:
        clear(feats, linear.weight, linear.bias)
        loss = F.cross_entropy(linear(feats), target)
        loss.backward()
        return loss

    return {"ours": ours, "naive": naive, "linear": softmax}


def cnn10_step_seconds(
    batch: int, device: torch.device, repeats: int, backbone: BackboneName = "cnn10"
) -> float:
    """Median seconds of one full training step of the affinity model at ``batch`` images.

    Forward, loss, backward and an Adam step, plain PyTorch; on CUDA in bf16 autocast with
    channels_last (the fast training setting), on the CPU in float32.
    """
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = AffinityClassifier(backbone=backbone, head="affinity", channels_last=cuda).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.rand(batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            aff, logits = model.scores(model.features(images))
            loss = model._loss(aff, logits, labels)
        loss.backward()
        opt.step()

    return median(time_call(step, device, repeats=repeats, warmup=1 if not cuda else 3))


def bench_head(
    device: torch.device,
    *,
    repeats: int,
    quick: bool = False,
    batch: int = 640,
    dim: int = 256,
    num_classes: int = 10,
    step_batch: int | None = None,
) -> list[Row]:
    """Rows: ours vs naive (m=1, m=5), ours vs the linear head, ours as a share of a cnn10 step.

    Args:
        device: where to run.
        repeats: timings per formulation (each a loop of ``inner`` calls).
        quick: smaller loops (a CI-sized run).
        batch: N of the head benchmark (640, the reference batch).
        dim: feature width D (256, cnn10's).
        num_classes: C.
        step_batch: batch of the cnn10 step; None: ``batch`` on CUDA, 32 (quick: 4) on the CPU.
    """
    inner = 3 if quick else 10
    head_repeats = max(3, 3 * repeats)
    rows: list[Row] = []
    times: dict[int, dict[str, float]] = {}
    for m in (1, 5):
        fns = head_step_fns(batch, dim, num_classes, m, device)
        times[m] = {
            name: median(time_call(fn, device, repeats=head_repeats, warmup=2, inner=inner))
            for name, fn in fns.items()
        }
    where = f"N={batch}, D={dim}, C={num_classes}, float32, forward+backward"
    how = f"median of {head_repeats} timings of {inner} calls"
    for m in (1, 5):
        t = times[m]
        speedup = t["naive"] / t["ours"]
        rows.append(
            Row(
                benchmark=f"head+loss m={m}: one matmul vs naive (N,C,M,D)",
                ours=1e3 * t["ours"],
                baseline=1e3 * t["naive"],
                unit="ms",
                ratio=speedup,
                ratio_kind="speedup",
                target=f">= {TARGET_SPEEDUP:g}x",
                passed=speedup >= TARGET_SPEEDUP,
                note=f"{where}; both with the regulariser; {how}",
            )
        )
    for m in (1, 5):
        t = times[m]
        rows.append(
            Row(
                benchmark=f"head+loss m={m} vs linear softmax head",
                ours=1e3 * t["ours"],
                baseline=1e3 * t["linear"],
                unit="ms",
                ratio=t["ours"] / t["linear"],
                ratio_kind="cost",
                note=f"{where}; linear = nn.Linear(D, C) + cross-entropy; {how}",
            )
        )

    cuda = device.type == "cuda"
    if step_batch is None:
        step_batch = batch if cuda else (4 if quick else 32)
    step_repeats = max(2, repeats // 2) if not cuda else max(5, repeats)
    step = cnn10_step_seconds(step_batch, device, step_repeats) * batch / step_batch
    scaled = (
        f"measured at batch {step_batch} and scaled x{batch / step_batch:g} to {batch}"
        if step_batch != batch
        else f"measured at batch {batch}"
    )
    precision = "bf16 autocast + channels_last" if cuda else "float32"
    for m in (1, 5):
        share = times[m]["ours"] / step
        rows.append(
            Row(
                benchmark=f"head+loss m={m} share of a cnn10 step (batch {batch})",
                ours=1e3 * times[m]["ours"],
                baseline=1e3 * step,
                unit="ms",
                ratio=share,
                ratio_kind="fraction",
                target=f"< {100 * TARGET_SHARE:g} %",
                passed=share < TARGET_SHARE,
                note=(
                    f"cnn10 step = forward, loss, backward, Adam ({precision}), median of "
                    f"{step_repeats}, {scaled}; head+loss in float32 as above"
                ),
                extra={"step_batch": step_batch},
            )
        )
    return rows
