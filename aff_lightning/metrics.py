"""Classification metrics for imbalanced data, all computed from one (C, C) confusion matrix.

Every metric here is a :class:`ConfusionMatrixMetric`: its only state is ``confmat`` (rows = true
class, columns = predicted class), summed across processes. ``update(preds, target, mask)``
uses static shapes only (no boolean indexing, ``nonzero`` or ``.item()``), so it traces into a
fixed XLA graph, and padded evaluation rows (``mask`` False) contribute nothing.

State dtype: ``confmat`` is ``torch.int32`` and each batch is added with an integer
``scatter_add_``. Counts are then exact up to 2**31 - 1 per cell on every backend; int32 is
native on TPU (float64 is not available there and int64 is emulated); and integer states are left
alone by ``module.to(dtype=torch.bfloat16)`` (Lightning's ``"bf16-true"``/``"16-true"``
precision) and by autocast, either of which would make float counts inexact above 256. The
metrics are computed in float32. A cross-process ``"sum"`` sync stacks and sums the states, which
promotes them to int64 for the duration of ``compute``; the value is the same.

:func:`build_metrics` returns the :class:`~torchmetrics.MetricCollection` the model logs, with all
members in one compute group so a batch updates a single confusion matrix.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

__all__ = [
    "Accuracy",
    "BalancedAccuracy",
    "ConfusionMatrixMetric",
    "GroupAccuracy",
    "MacroF1",
    "MicroF1",
    "PerClassF1",
    "build_metrics",
    "per_class_report",
]

_CONFMAT_DTYPE = torch.int32
_COMPUTE_DTYPE = torch.float32


def _check_num_classes(num_classes: Any) -> int:
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, numbers.Integral)
        or num_classes < 2
    ):
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return int(num_classes)


def _check_classes(classes: Any, num_classes: int, name: str) -> tuple[int, ...]:
    """Validate a collection of distinct class indices in [0, num_classes)."""
    if isinstance(classes, (str, bytes, Tensor)) or not isinstance(classes, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {classes!r}")
    out: list[int] = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral):
            raise TypeError(f"{name} must contain ints, got {c!r} in {list(classes)!r}")
        index = int(c)
        if not 0 <= index < num_classes:
            raise ValueError(
                f"{name} must be in [0, {num_classes}), got {index} in {list(classes)!r}"
            )
        if index in out:
            raise ValueError(
                f"{name} must not repeat a class, got {index} twice in {list(classes)!r}"
            )
        out.append(index)
    return tuple(out)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den == 0`` (static shapes, no NaN, no host sync)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), 0.0)


def _as_float(confmat: Tensor) -> Tensor:
    """The counts as float32 for the ratio maths.

    On XLA the (C, C) integer counts are moved to the host first (one exact transfer per
    compute, once per epoch): with ``bf16-true`` Lightning sets ``XLA_USE_BF16=1``, which makes
    every float32 on the device bfloat16 and would round the ratios; host maths also keeps the
    epoch-end metric code out of the compiled XLA graphs.
    """
    if confmat.device.type == "xla":
        confmat = confmat.cpu()
    return confmat if confmat.dtype.is_floating_point else confmat.to(_COMPUTE_DTYPE)


def per_class_report(confmat: Tensor) -> dict[str, Tensor]:
    """Per-class support, precision, recall and F1 of a confusion matrix.

    Division by zero gives 0 (a class never predicted has precision 0, a class absent from the
    targets has recall 0), matching scikit-learn with ``zero_division=0``.

    Args:
        confmat: (C, C) counts, rows = true class, columns = predicted class.

    Returns:
        Dict of (C,) tensors: ``count`` (true samples per class, int64 for an integer
        ``confmat``), ``precision``, ``recall`` and ``f1`` (float32, or ``confmat``'s dtype when
        that is floating).
    """
    if not isinstance(confmat, Tensor):
        raise TypeError(f"confmat must be a torch.Tensor, got {type(confmat).__name__}")
    if confmat.dim() != 2 or confmat.shape[0] != confmat.shape[1] or confmat.shape[0] < 1:
        raise ValueError(f"confmat must have shape (C, C) with C >= 1, got {tuple(confmat.shape)}")
    if confmat.device.type == "xla":  # see _as_float
        confmat = confmat.cpu()
    cm = _as_float(confmat)
    tp = torch.diagonal(cm)  # (C,)
    support = cm.sum(dim=1)  # (C,) true samples per class
    predicted = cm.sum(dim=0)  # (C,) predictions per class
    return {
        "count": confmat.sum(dim=1),
        "precision": _safe_div(tp, predicted),
        "recall": _safe_div(tp, support),
        # 2TP / (2TP + FP + FN) = 2TP / (support + predicted); equals the harmonic mean of
        # precision and recall and is 0 when TP is 0 (scikit-learn's definition).
        "f1": _safe_div(2 * tp, support + predicted),
    }


class ConfusionMatrixMetric(Metric):
    """Accumulates a (C, C) confusion matrix with static shapes; subclasses compute from it.

    ``compute`` of this base class returns the confusion matrix itself as int64 counts.

    Args:
        num_classes: C >= 2.
        validate_args: also check that ``target`` (and integer ``preds``) values lie in
            [0, C) — one host sync per update, so leave it off in steps on XLA or CUDA. With it
            off, out-of-range values match no cell and are not counted. Shape and dtype checks
            always run (they read no tensor values).
        **kwargs: passed to :class:`torchmetrics.Metric` (``dist_sync_fn``,
            ``sync_on_compute``, ...).

    Example:
        >>> metric = Accuracy(num_classes=3)
        >>> metric.update(torch.tensor([0, 2, 1, 1]), torch.tensor([0, 1, 1, 2]))
        >>> metric.compute()
        tensor(0.5000)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    confmat: Tensor

    def __init__(self, num_classes: int, validate_args: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = _check_num_classes(num_classes)
        self.validate_args = bool(validate_args)
        self.add_state(
            "confmat",
            default=torch.zeros(self.num_classes, self.num_classes, dtype=_CONFMAT_DTYPE),
            dist_reduce_fx="sum",
        )

    def _check_inputs(self, preds: Tensor, target: Tensor, mask: Tensor | None) -> None:
        c = self.num_classes
        for name, value in (("preds", preds), ("target", target)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if target.dim() != 1:
            raise ValueError(f"target must have shape (N,), got {tuple(target.shape)}")
        if target.dtype.is_floating_point or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(
                f"target must be an integer tensor of class indices, got dtype {target.dtype}"
            )
        n = target.shape[0]
        if preds.dim() == 1:
            if preds.dtype.is_floating_point or preds.is_complex() or preds.dtype == torch.bool:
                raise TypeError(
                    "preds of shape (N,) must be an integer tensor of class indices, "
                    f"got dtype {preds.dtype} (pass (N, {c}) scores to take their argmax)"
                )
        elif preds.dim() == 2:
            if preds.shape[1] != c:
                raise ValueError(f"preds scores must have shape (N, {c}), got {tuple(preds.shape)}")
            if preds.is_complex() or preds.dtype == torch.bool:
                raise TypeError(f"preds scores must be real numbers, got dtype {preds.dtype}")
        else:
            raise ValueError(
                f"preds must have shape (N,) (class indices) or (N, {c}) (scores), "
                f"got {tuple(preds.shape)}"
            )
        if preds.shape[0] != n:
            raise ValueError(
                f"preds and target must have the same length N, got preds {tuple(preds.shape)} "
                f"and target {tuple(target.shape)}"
            )
        if mask is not None:
            if not isinstance(mask, Tensor):
                raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
            if mask.shape != target.shape:
                raise ValueError(
                    f"mask must have shape ({n},) like target, got {tuple(mask.shape)}"
                )
        if self.validate_args:  # host sync: reads values back
            checks = [("target", target)] + ([("preds", preds)] if preds.dim() == 1 else [])
            for name, value in checks:
                if value.numel() and (int(value.min()) < 0 or int(value.max()) >= c):
                    raise ValueError(
                        f"{name} values must be in [0, {c}), got min {int(value.min())} "
                        f"and max {int(value.max())}"
                    )

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Add a batch to the confusion matrix.

        Args:
            preds: (N,) integer predicted classes, or (N, C) scores whose argmax is taken.
            target: (N,) integer true classes.
            mask: (N,) bool, False for padding rows, which are not counted; None counts all.
        """
        self._check_inputs(preds, target, mask)
        c = self.num_classes
        if preds.dim() == 2:
            preds = preds.argmax(dim=1)  # (N, C) -> (N,)
        preds = preds.long()
        target = target.long()
        # Out-of-range labels (possible only with validate_args off) get weight 0 and a clamped,
        # harmless index instead of an out-of-bounds scatter.
        keep = (target >= 0) & (target < c) & (preds >= 0) & (preds < c)  # (N,)
        if mask is not None:
            keep = keep & mask
        index = target.clamp(0, c - 1) * c + preds.clamp(0, c - 1)  # (N,) flat cell index
        # An integer scatter-add rather than a one-hot matmul: autocast would round a matmul's
        # counts to bf16/fp16 (inexact above 256/2048), and bincount's output length is data
        # dependent.
        counts = torch.zeros(c * c, dtype=self.confmat.dtype, device=self.confmat.device)
        counts = counts.scatter_add(0, index, keep.to(counts.dtype))  # (C*C,)
        # Out of place, so a state shared by reference in a compute group is never bumped twice.
        self.confmat = self.confmat + counts.reshape(c, c)  # (C*C,) -> (C, C)

    def compute(self) -> Tensor:
        """The (C, C) confusion matrix as int64 counts, rows = true, columns = predicted."""
        return self.confmat.to(torch.int64)


class Accuracy(ConfusionMatrixMetric):
    """Fraction of samples predicted correctly: trace / sum (0 before any sample)."""

    def compute(self) -> Tensor:
        """Scalar accuracy."""
        cm = _as_float(self.confmat)
        return _safe_div(torch.trace(cm), cm.sum())


class MicroF1(ConfusionMatrixMetric):
    """Micro-averaged F1: 2TP / (2TP + FP + FN) over all classes pooled.

    For single-label classification every error is one false positive and one false negative,
    so this equals :class:`Accuracy`; it is computed from pooled TP/FP/FN all the same.
    """

    def compute(self) -> Tensor:
        """Scalar micro-F1."""
        cm = _as_float(self.confmat)
        tp = torch.diagonal(cm).sum()
        fp = (cm.sum(dim=0) - torch.diagonal(cm)).sum()  # predicted as c, true class not c
        fn = (cm.sum(dim=1) - torch.diagonal(cm)).sum()  # true class c, predicted not c
        return _safe_div(2 * tp, 2 * tp + fp + fn)


class PerClassF1(ConfusionMatrixMetric):
    """F1 of each class, 0 where it is undefined (scikit-learn ``zero_division=0``)."""

    def compute(self) -> Tensor:
        """(C,) per-class F1."""
        return per_class_report(self.confmat)["f1"]


class MacroF1(ConfusionMatrixMetric):
    """Unweighted mean of the per-class F1 over all C classes.

    A class with neither samples nor predictions counts as F1 = 0, like scikit-learn's
    ``f1_score(average="macro", labels=range(C), zero_division=0)``.
    """

    def compute(self) -> Tensor:
        """Scalar macro-F1."""
        return per_class_report(self.confmat)["f1"].mean()


class BalancedAccuracy(ConfusionMatrixMetric):
    """Mean per-class recall over the classes present in the targets.

    Classes with no true samples are left out of the mean, as in
    ``sklearn.metrics.balanced_accuracy_score``; 0 before any sample.
    """

    def compute(self) -> Tensor:
        """Scalar balanced accuracy."""
        report = per_class_report(self.confmat)
        present = (report["count"] > 0).to(report["recall"].dtype)  # (C,)
        return _safe_div((report["recall"] * present).sum(), present.sum())


class GroupAccuracy(ConfusionMatrixMetric):
    """Accuracy over the samples whose true class is in ``classes``.

    Correct predictions in the group's rows / all samples in the group's rows; 0 while the
    group has no samples (and always for an empty group). ``build_metrics`` uses it for
    ``minority_acc`` and ``majority_acc``.

    Args:
        num_classes: C >= 2.
        classes: distinct class indices in [0, C); may be empty.
        validate_args: see :class:`ConfusionMatrixMetric`.
        **kwargs: passed to :class:`torchmetrics.Metric`.
    """

    group: Tensor

    def __init__(
        self,
        num_classes: int,
        classes: Sequence[int],
        validate_args: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, validate_args=validate_args, **kwargs)
        self.classes = _check_classes(classes, self.num_classes, "classes")
        in_group = torch.zeros(self.num_classes, dtype=torch.bool)
        in_group[list(self.classes)] = True
        # A bool buffer: moves with .to(device), is never cast by .to(dtype), not checkpointed.
        self.register_buffer("group", in_group, persistent=False)

    def compute(self) -> Tensor:
        """Scalar accuracy over the group's true classes."""
        cm = _as_float(self.confmat)
        weight = self.group.to(cm.device, cm.dtype)  # (C,)
        correct = (torch.diagonal(cm) * weight).sum()
        total = (cm.sum(dim=1) * weight).sum()
        return _safe_div(correct, total)


def build_metrics(
    num_classes: int, minority_classes: Sequence[int], **kwargs: Any
) -> MetricCollection:
    """The metric collection for one stage; ``clone(prefix="val/")`` it per stage.

    Keys: ``acc``, ``micro_f1``, ``macro_f1``, ``balanced_acc``, ``minority_acc``,
    ``majority_acc`` (the classes not in ``minority_classes``) and ``per_class_f1`` (a (C,)
    vector, so log it yourself rather than through ``log_dict``). All members form one compute
    group: an ``update`` adds to one shared confusion matrix.

    Args:
        num_classes: C >= 2.
        minority_classes: distinct class indices in [0, C).
        **kwargs: passed to every metric (``validate_args``, ``dist_sync_fn``, ...).

    Returns:
        A :class:`~torchmetrics.MetricCollection` whose ``update(preds, target, mask=None)``
        takes (N,) class indices or (N, C) scores, (N,) targets and an optional (N,) bool mask.

    Example:
        >>> metrics = build_metrics(10, minority_classes=(0, 2, 4, 6, 8))
        >>> val_metrics = metrics.clone(prefix="val/")
    """
    num_classes = _check_num_classes(num_classes)
    minority = _check_classes(minority_classes, num_classes, "minority_classes")
    majority = tuple(c for c in range(num_classes) if c not in minority)
    metrics: dict[str, Metric | MetricCollection] = {
        "acc": Accuracy(num_classes, **kwargs),
        "micro_f1": MicroF1(num_classes, **kwargs),
        "macro_f1": MacroF1(num_classes, **kwargs),
        "balanced_acc": BalancedAccuracy(num_classes, **kwargs),
        "minority_acc": GroupAccuracy(num_classes, minority, **kwargs),
        "majority_acc": GroupAccuracy(num_classes, majority, **kwargs),
        "per_class_f1": PerClassF1(num_classes, **kwargs),
    }
    return MetricCollection(metrics, compute_groups=[list(metrics)])
