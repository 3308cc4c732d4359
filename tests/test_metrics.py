"""Tests for aff_lightning.metrics: reference values from scikit-learn and NumPy."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)
from torch.testing import assert_close

from aff_lightning.metrics import (
    Accuracy,
    BalancedAccuracy,
    ConfusionMatrixMetric,
    GroupAccuracy,
    MacroF1,
    MicroF1,
    PerClassF1,
    build_metrics,
    per_class_report,
)

KEYS = [
    "acc",
    "micro_f1",
    "macro_f1",
    "balanced_acc",
    "minority_acc",
    "majority_acc",
    "per_class_f1",
]


def _random_case(num_classes: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced targets and ~60 % correct predictions, as int64 arrays."""
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.05, 1.0, num_classes)
    target = rng.choice(num_classes, size=n, p=weights / weights.sum())
    preds = np.where(rng.random(n) < 0.6, target, rng.integers(0, num_classes, n))
    return preds.astype(np.int64), target.astype(np.int64)


def _group_acc(preds: np.ndarray, target: np.ndarray, group: list[int]) -> float:
    sel = np.isin(target, group)
    return float((preds[sel] == target[sel]).mean()) if sel.any() else 0.0


def _reference(
    preds: np.ndarray, target: np.ndarray, num_classes: int, minority: list[int]
) -> dict[str, torch.Tensor]:
    labels = list(range(num_classes))
    majority = [c for c in labels if c not in minority]
    with warnings.catch_warnings():
        # sklearn warns (and drops the class) when a class is predicted but never true.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = balanced_accuracy_score(target, preds)
    ref = {
        "acc": accuracy_score(target, preds),
        "micro_f1": f1_score(target, preds, average="micro", labels=labels, zero_division=0),
        "macro_f1": f1_score(target, preds, average="macro", labels=labels, zero_division=0),
        "balanced_acc": balanced,
        "minority_acc": _group_acc(preds, target, minority),
        "majority_acc": _group_acc(preds, target, majority),
        "per_class_f1": f1_score(target, preds, average=None, labels=labels, zero_division=0),
    }
    return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in ref.items()}


def _assert_results(result: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert sorted(result) == sorted(ref)
    for key, value in ref.items():
        assert_close(result[key], value, atol=1e-6, rtol=1e-5, msg=key)
        assert torch.isfinite(result[key]).all(), key


def _scores(preds: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """(N, C) float scores whose argmax is ``preds``."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(preds.shape[0], num_classes, generator=g)
    return scores.scatter(1, preds[:, None], 2.0)


@pytest.mark.parametrize(
    ("num_classes", "n", "seed"), [(2, 50, 0), (3, 7, 1), (5, 200, 2), (10, 1000, 3), (10, 13, 4)]
)
def test_against_sklearn_random(num_classes: int, n: int, seed: int) -> None:
    preds, target = _random_case(num_classes, n, seed)
    minority = list(range(0, num_classes, 2))
    metrics = build_metrics(num_classes, minority)
    metrics.update(torch.from_numpy(preds), torch.from_numpy(target))
    result = metrics.compute()
    _assert_results(result, _reference(preds, target, num_classes, minority))
    assert_close(result["micro_f1"], result["acc"])


def test_fixed_case_never_predicted_and_absent_class() -> None:
    # C = 4: class 2 is never predicted, class 3 never appears in the targets (only predicted).
    target = np.array([0, 0, 0, 1, 1, 2, 2, 0])
    preds = np.array([0, 0, 1, 1, 3, 0, 1, 3])
    metrics = build_metrics(4, minority_classes=[1, 2])
    metrics.update(torch.from_numpy(preds), torch.from_numpy(target))
    result = metrics.compute()
    _assert_results(result, _reference(preds, target, 4, [1, 2]))
    # Hand values: per-class F1 = 2TP / (support + predicted).
    assert_close(result["per_class_f1"], torch.tensor([4 / 7, 2 / 5, 0.0, 0.0]))
    assert_close(result["macro_f1"], torch.tensor((4 / 7 + 2 / 5) / 4))
    # Recall over classes present in the targets only: (2/4 + 1/2 + 0/2) / 3.
    assert_close(result["balanced_acc"], torch.tensor(1 / 3))
    assert_close(result["acc"], torch.tensor(3 / 8))
    assert_close(result["micro_f1"], torch.tensor(3 / 8))
    assert_close(result["minority_acc"], torch.tensor(1 / 4))
    assert_close(result["majority_acc"], torch.tensor(2 / 4))


def test_class_absent_from_targets_and_predictions() -> None:
    target = np.array([0, 1, 1, 0, 1])
    preds = np.array([0, 1, 0, 0, 1])
    metrics = build_metrics(3, minority_classes=[2])
    metrics.update(torch.from_numpy(preds), torch.from_numpy(target))
    result = metrics.compute()
    _assert_results(result, _reference(preds, target, 3, [2]))
    assert result["per_class_f1"][2] == 0
    assert result["minority_acc"] == 0  # group without samples: 0, not NaN


@pytest.mark.parametrize("num_classes", [2, 6])
def test_confusion_matrix_and_report_match_sklearn(num_classes: int) -> None:
    preds, target = _random_case(num_classes, 120, seed=num_classes)
    metric = ConfusionMatrixMetric(num_classes)
    metric.update(torch.from_numpy(preds), torch.from_numpy(target))
    confmat = metric.compute()
    labels = list(range(num_classes))
    expected = confusion_matrix(target, preds, labels=labels)
    assert confmat.dtype == torch.int64
    assert_close(confmat, torch.from_numpy(expected).long())

    report = per_class_report(confmat)
    precision, recall, f1, support = precision_recall_fscore_support(
        target, preds, labels=labels, zero_division=0
    )
    assert_close(report["count"], torch.from_numpy(support).long())
    for key, value in (("precision", precision), ("recall", recall), ("f1", f1)):
        assert_close(report[key], torch.from_numpy(value).float(), msg=key)


def test_per_class_report_zero_division_and_float_input() -> None:
    confmat = torch.tensor([[3.0, 0.0, 1.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    report = per_class_report(confmat)
    assert report["f1"].dtype == torch.float64
    assert_close(report["count"], torch.tensor([4.0, 0.0, 2.0], dtype=torch.float64))
    assert_close(report["precision"], torch.tensor([0.6, 0.0, 0.0], dtype=torch.float64))
    assert_close(report["recall"], torch.tensor([0.75, 0.0, 0.0], dtype=torch.float64))
    assert_close(report["f1"], torch.tensor([6 / 9, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("num_classes", [2, 5])
def test_mask_ignores_padding(num_classes: int) -> None:
    preds, target = _random_case(num_classes, 37, seed=10 + num_classes)
    minority = [0]
    reference = build_metrics(num_classes, minority)
    reference.update(torch.from_numpy(preds), torch.from_numpy(target))
    expected = reference.compute()

    # Pad to 64 rows with garbage predictions and labels, including out-of-range values.
    pad = 64 - len(preds)
    rng = np.random.default_rng(0)
    garbage_preds = rng.integers(-3, num_classes + 3, pad)
    garbage_target = rng.integers(-3, num_classes + 3, pad)
    preds_p = torch.from_numpy(np.concatenate([preds, garbage_preds]))
    target_p = torch.from_numpy(np.concatenate([target, garbage_target]))
    mask = torch.arange(64) < len(preds)
    # Interleave real and padding rows too: the mask, not the position, decides.
    perm = torch.from_numpy(rng.permutation(64))
    metrics = build_metrics(num_classes, minority)
    metrics.update(preds_p[perm], target_p[perm], mask=mask[perm])
    _assert_results(metrics.compute(), expected)
    _assert_results(metrics.compute(), _reference(preds, target, num_classes, minority))


def test_all_masked_batch_changes_nothing_and_gives_zeros() -> None:
    metrics = build_metrics(3, [1])
    metrics.update(
        torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0]), mask=torch.zeros(3, dtype=bool)
    )
    result = metrics.compute()
    for key in KEYS:
        assert torch.equal(result[key], torch.zeros_like(result[key])), key


def test_accumulating_updates_equals_one_call() -> None:
    preds, target = _random_case(7, 300, seed=5)
    one = build_metrics(7, [1, 3])
    one.update(torch.from_numpy(preds), torch.from_numpy(target))
    many = build_metrics(7, [1, 3])
    for idx in np.array_split(np.arange(300), [10, 11, 150, 299]):
        many.update(torch.from_numpy(preds[idx]), torch.from_numpy(target[idx]))
    _assert_results(many.compute(), one.compute())
    assert torch.equal(many["acc"].confmat, one["acc"].confmat)


def test_forward_returns_batch_values_and_accumulates() -> None:
    preds, target = _random_case(4, 80, seed=6)
    metrics = build_metrics(4, [0, 1])
    first = metrics(torch.from_numpy(preds[:40]), torch.from_numpy(target[:40]))
    _assert_results(first, _reference(preds[:40], target[:40], 4, [0, 1]))
    metrics.update(torch.from_numpy(preds[40:]), torch.from_numpy(target[40:]))
    _assert_results(metrics.compute(), _reference(preds, target, 4, [0, 1]))


def test_scores_and_indices_agree() -> None:
    preds, target = _random_case(5, 90, seed=7)
    p = torch.from_numpy(preds)
    by_index = build_metrics(5, [4])
    by_index.update(p, torch.from_numpy(target))
    by_score = build_metrics(5, [4])
    by_score.update(_scores(p, 5, seed=0), torch.from_numpy(target))
    _assert_results(by_score.compute(), by_index.compute())


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16])
def test_other_integer_dtypes(dtype: torch.dtype) -> None:
    preds, target = _random_case(4, 50, seed=8)
    metric = Accuracy(4)
    metric.update(torch.from_numpy(preds).to(dtype), torch.from_numpy(target).to(dtype))
    assert_close(metric.compute(), torch.tensor(accuracy_score(target, preds), dtype=torch.float32))


def test_clone_prefix_gives_independent_states() -> None:
    base = build_metrics(3, [0])
    val = base.clone(prefix="val/")
    test = base.clone(prefix="test/")
    assert sorted(val.keys()) == sorted(f"val/{k}" for k in KEYS)
    val.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 1]))
    test.update(torch.tensor([1, 1]), torch.tensor([0, 0]))
    assert_close(val.compute()["val/acc"], torch.tensor(0.75))
    assert_close(test.compute()["test/acc"], torch.tensor(0.0))
    assert int(base["acc"].confmat.sum()) == 0
    val.reset()
    assert int(val["acc"].confmat.sum()) == 0
    assert int(test["acc"].confmat.sum()) == 2


def test_build_metrics_keys_and_single_compute_group() -> None:
    metrics = build_metrics(10, minority_classes=(0, 2, 4, 6, 8))
    assert sorted(metrics.keys()) == sorted(KEYS)  # MetricCollection sorts a dict's keys
    assert [sorted(g) for g in metrics.compute_groups.values()] == [sorted(KEYS)]
    assert metrics["minority_acc"].classes == (0, 2, 4, 6, 8)
    assert metrics["majority_acc"].classes == (1, 3, 5, 7, 9)
    metrics.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    # One shared confusion matrix: only the group leader was updated, the others reference it.
    leader = metrics.__getitem__("acc", copy_state=False).confmat
    for key in KEYS:
        assert metrics.__getitem__(key, copy_state=False).confmat is leader


def test_empty_minority_group_is_allowed() -> None:
    metrics = build_metrics(3, minority_classes=())
    metrics.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]))
    result = metrics.compute()
    assert result["minority_acc"] == 0
    assert_close(result["majority_acc"], torch.tensor(2 / 3))


def test_individual_metric_classes() -> None:
    preds, target = _random_case(6, 150, seed=9)
    p, t = torch.from_numpy(preds), torch.from_numpy(target)
    ref = _reference(preds, target, 6, [2, 5])
    cases = {
        "acc": Accuracy(6),
        "micro_f1": MicroF1(6),
        "macro_f1": MacroF1(6),
        "balanced_acc": BalancedAccuracy(6),
        "minority_acc": GroupAccuracy(6, classes=[2, 5]),
        "per_class_f1": PerClassF1(6),
    }
    for key, metric in cases.items():
        metric.update(p, t)
        assert_close(metric.compute(), ref[key], msg=key)


def test_state_is_int32_and_exact_under_low_precision() -> None:
    metric = Accuracy(2)
    assert metric.confmat.dtype == torch.int32
    metric.to(dtype=torch.bfloat16)  # what Lightning's "bf16-true" precision does to modules
    assert metric.confmat.dtype == torch.int32
    n = 1001  # not representable in bfloat16 (nearest: 1000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        metric.update(torch.zeros(n, 2).bfloat16(), torch.zeros(n, dtype=torch.long))
    assert metric.confmat[0, 0] == n
    assert metric.compute() == 1.0


def test_merge_state_sums_like_distributed_sync() -> None:
    preds, target = _random_case(4, 60, seed=11)
    a, b, full = BalancedAccuracy(4), BalancedAccuracy(4), BalancedAccuracy(4)
    a.update(torch.from_numpy(preds[:25]), torch.from_numpy(target[:25]))
    b.update(torch.from_numpy(preds[25:]), torch.from_numpy(target[25:]))
    full.update(torch.from_numpy(preds), torch.from_numpy(target))
    a.merge_state(b)
    assert_close(a.compute(), full.compute())


def test_validate_args_checks_values() -> None:
    strict = Accuracy(3, validate_args=True)
    with pytest.raises(ValueError, match=r"target values must be in \[0, 3\), got min 0 and max 3"):
        strict.update(torch.tensor([0, 1]), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"preds values must be in \[0, 3\), got min -1 and max 1"):
        strict.update(torch.tensor([-1, 1]), torch.tensor([0, 1]))
    # Without validation, out-of-range rows are simply not counted.
    lenient = Accuracy(3)
    lenient.update(torch.tensor([0, 1, 7]), torch.tensor([0, 3, 2]))
    assert int(lenient.confmat.sum()) == 1


def _labels(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.long)


@pytest.mark.parametrize(
    ("preds", "target", "mask", "error", "message"),
    [
        (_labels(4), _labels(5), None, ValueError,
         r"preds and target must have the same length N, got preds \(4,\) and target \(5,\)"),
        (torch.zeros(5, 4), _labels(5), None, ValueError,
         r"preds scores must have shape \(N, 3\), got \(5, 4\)"),
        (torch.zeros(5, 3, 1), _labels(5), None, ValueError,
         r"preds must have shape \(N,\) \(class indices\) or \(N, 3\) \(scores\), "
         r"got \(5, 3, 1\)"),
        (torch.zeros(5), _labels(5), None, TypeError,
         r"preds of shape \(N,\) must be an integer tensor of class indices, "
         r"got dtype torch.float32"),
        (_labels(5), torch.zeros(5), None, TypeError,
         r"target must be an integer tensor of class indices, got dtype torch.float32"),
        (_labels(5), torch.zeros(5, dtype=torch.bool), None, TypeError,
         r"target must be an integer tensor of class indices, got dtype torch.bool"),
        (_labels(5), _labels(5, 1), None, ValueError,
         r"target must have shape \(N,\), got \(5, 1\)"),
        (_labels(5), _labels(5), _labels(5), TypeError,
         r"mask must be a bool tensor, got dtype torch.int64"),
        (_labels(5), _labels(5), torch.ones(4, dtype=torch.bool), ValueError,
         r"mask must have shape \(5,\) like target, got \(4,\)"),
        ([0, 1], _labels(2), None, TypeError, r"preds must be a torch.Tensor, got list"),
        (_labels(2), _labels(2), [True, False], TypeError,
         r"mask must be a torch.Tensor or None, got list"),
    ],
)  # fmt: skip
def test_bad_update_inputs(
    preds: Any, target: Any, mask: Any, error: type[Exception], message: str
) -> None:
    metrics = build_metrics(3, [0])
    with pytest.raises(error, match=message):
        metrics.update(preds, target, mask=mask)


@pytest.mark.parametrize(
    ("num_classes", "minority", "error", "message"),
    [
        (1, [0], ValueError, r"num_classes must be an int >= 2, got 1"),
        (True, [0], ValueError, r"num_classes must be an int >= 2, got True"),
        (2.0, [0], ValueError, r"num_classes must be an int >= 2, got 2.0"),
        (3, [0, 3], ValueError, r"minority_classes must be in \[0, 3\), got 3 in \[0, 3\]"),
        (3, [-1], ValueError, r"minority_classes must be in \[0, 3\), got -1 in \[-1\]"),
        (3, [1, 1], ValueError, r"must not repeat a class, got 1 twice in \[1, 1\]"),
        (3, [0.0], TypeError, r"minority_classes must contain ints, got 0.0 in \[0.0\]"),
        (3, 1, TypeError, r"minority_classes must be a sequence of ints, got 1"),
        (3, "01", TypeError, r"minority_classes must be a sequence of ints, got '01'"),
    ],
)
def test_bad_build_metrics_args(
    num_classes: Any, minority: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        build_metrics(num_classes, minority)


def test_bad_group_accuracy_classes() -> None:
    with pytest.raises(ValueError, match=r"classes must be in \[0, 4\), got 9 in \[9\]"):
        GroupAccuracy(4, classes=[9])


@pytest.mark.parametrize(
    ("confmat", "error", "message"),
    [
        (np.zeros((2, 2)), TypeError, r"confmat must be a torch.Tensor, got ndarray"),
        (torch.zeros(2, 3), ValueError, r"must have shape \(C, C\) with C >= 1, got \(2, 3\)"),
        (torch.zeros(4), ValueError, r"confmat must have shape \(C, C\) with C >= 1, got \(4,\)"),
    ],
)
def test_bad_per_class_report_input(confmat: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        per_class_report(confmat)
