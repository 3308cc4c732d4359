"""Tests for aff_lightning.experiments.runner: epoch selection rules and one real in-process fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aff_lightning.experiments.runner import (
    TEST_METRICS,
    FitResult,
    fit_args,
    run_fit,
    select_epoch,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _epoch(e: int, val: float | None, test: float | None) -> dict[str, float]:
    """A history record whose test metrics are all ``test`` (acc offset by 0.5)."""
    record: dict[str, float] = {"epoch": float(e)}
    if val is not None:
        record.update({"val/macro_f1": val, "val/acc": val})
    if test is not None:
        record.update({f"test/{m}": test for m in TEST_METRICS})
        record["test/acc"] = test + 0.5
    return record


# val peaks at epoch 1 (tie with epoch 3: earliest wins), test peaks at epoch 2.
HISTORY = [_epoch(0, 0.1, 0.1), _epoch(1, 0.4, 0.2), _epoch(2, 0.3, 0.375), _epoch(3, 0.4, 0.25)]


@pytest.mark.parametrize(
    ("rule", "epoch", "test_value"),
    [("best_test", 2, 0.375), ("last", 3, 0.25), ("best_val", 1, 0.2)],
)
def test_select_epoch_rules(rule: str, epoch: int, test_value: float) -> None:
    chosen = select_epoch(HISTORY, rule, "macro_f1")
    assert chosen["epoch"] == epoch
    assert chosen["macro_f1"] == test_value
    assert chosen["acc"] == test_value + 0.5
    assert set(chosen) == {"epoch", *TEST_METRICS}


def test_select_epoch_ranks_by_the_given_metric_and_ties_go_earliest() -> None:
    history = [_epoch(0, 0.5, 0.25), _epoch(1, 0.5, 0.25)]
    assert select_epoch(history, "best_test", "macro_f1")["epoch"] == 0
    assert select_epoch(history, "best_val", "macro_f1")["epoch"] == 0
    # acc is offset by 0.5 in the test split: ranking by acc still finds epoch 2 in HISTORY.
    assert select_epoch(HISTORY, "best_test", "acc")["epoch"] == 2


def test_select_epoch_errors() -> None:
    no_val = [_epoch(0, None, 0.1), _epoch(1, None, 0.2)]
    with pytest.raises(ValueError, match=r"needs 'val/macro_f1'.*splits \['test'\].*val_fraction"):
        select_epoch(no_val, "best_val", "macro_f1")
    no_test = [_epoch(0, 0.1, None)]
    with pytest.raises(ValueError, match=r"needs 'test/macro_f1'.*splits \['val'\]"):
        select_epoch(no_test, "best_test", "macro_f1")
    with pytest.raises(ValueError, match=r"chose epoch 0.0 but it has no test metrics"):
        select_epoch(no_test, "last", "macro_f1")
    with pytest.raises(ValueError, match=r"chose epoch 0.0 but it has no test metrics"):
        select_epoch(no_test, "best_val", "macro_f1")
    with pytest.raises(
        ValueError, match=r"rule must be one of \['best_test', 'last', 'best_val'\]"
    ):
        select_epoch(HISTORY, "best_loss", "macro_f1")
    with pytest.raises(ValueError, match="history is empty"):
        select_epoch([], "last", "macro_f1")
    with pytest.raises(ValueError, match=r"needs 'test/f2'"):
        select_epoch(HISTORY, "best_test", "f2")


def test_fit_args() -> None:
    assert fit_args("configs/cnn3.yaml", ["--a=1", "--b=2"]) == [
        "--config",
        "configs/cnn3.yaml",
        "--a=1",
        "--b=2",
    ]
    with pytest.raises(TypeError, match="sequence of strings, got the string"):
        fit_args("configs/cnn3.yaml", "--a=1")


@pytest.mark.slow
def test_run_fit_trains_in_process(fake_cifar_dir: Path, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import Callback

    class CountEpochs(Callback):
        def __init__(self) -> None:
            self.epochs = 0

        def on_train_epoch_end(self, trainer: object, pl_module: object) -> None:
            self.epochs += 1

    counter = CountEpochs()
    args = fit_args(
        CONFIGS / "baseline.yaml",
        [
            f"--data.data_dir={fake_cifar_dir}",
            "--data.minority_count=10",
            "--data.batch_size=16",
            "--data.val_fraction=0.2",
            "--model.backbone=cnn3",
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=2",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    result = run_fit(args, callbacks=[counter])
    assert isinstance(result, FitResult)
    assert counter.epochs == 2  # the extra callback object was used
    assert result.epochs == 2 and len(result.history) == 2
    assert {"val/macro_f1", "test/macro_f1", "epoch"} <= set(result.history[0])
    assert result.config["model"]["backbone"] == "cnn3"
    assert result.config["data"]["minority_count"] == 10
    json.dumps(result.config)  # plain types only
    assert result.log_dir is not None and Path(result.log_dir).is_dir()
    assert result.wall_seconds > 0
    assert not (Path(result.log_dir) / "test_metrics.json").exists()  # no test after fit
    for rule in ("best_test", "last", "best_val"):
        assert 0.0 <= select_epoch(result.history, rule, "macro_f1")["macro_f1"] <= 1.0
