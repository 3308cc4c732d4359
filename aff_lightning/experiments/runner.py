"""Run one training in-process through the real CLI and read its result (grid and tuner share it).

A run is exactly what ``python cli.py fit --config CONFIG OVERRIDES...`` would do (configs may
use ``extends:``), except that the final test pass is skipped: with ``data.monitor_test`` the
test set is evaluated every epoch and recorded in the model's history, and the epoch whose
test metrics a run reports is chosen afterwards by :func:`select_epoch`.

Example:
    >>> args = fit_args("configs/cnn3.yaml", ["--trainer.max_epochs=2"])
    >>> result = run_fit(args)  # doctest: +SKIP
    >>> select_epoch(result.history, "best_val", "macro_f1")["macro_f1"]  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aff_lightning.experiments.report import SELECTION_RULES

__all__ = ["EPOCH_RULES", "TEST_METRICS", "FitResult", "fit_args", "run_fit", "select_epoch"]

EPOCH_RULES = SELECTION_RULES  # one definition, in the torch-free report module
"""How the reported epoch is chosen: highest test/<metric> (the reference protocol), the last
epoch, or highest val/<metric> (needs a validation split); ties go to the earliest epoch."""

TEST_METRICS = ("acc", "micro_f1", "macro_f1", "balanced_acc", "minority_acc", "majority_acc")
"""Test metrics :func:`select_epoch` returns for the chosen epoch."""


@dataclass
class FitResult:
    """What one training run left behind.

    Attributes:
        history: per validation epoch, ``{"epoch": e, "val/acc": ..., "test/macro_f1": ...}``
            (the model's ``history``; "val/*" only with a validation split, "test/*" only
            with ``data.monitor_test``).
        epochs: epochs trained (the trainer's epoch counter at the end of fit).
        wall_seconds: wall-clock time of the whole run (parsing, data, fit).
        config: the parsed ``fit`` config as plain YAML-able types (paths as strings).
        log_dir: the trainer's log folder (where config.yaml and the CSV logs are), or None.
    """

    history: list[dict[str, float]]
    epochs: int
    wall_seconds: float
    config: dict[str, Any] = field(default_factory=dict)
    log_dir: str | None = None


def fit_args(config: str | Path, overrides: Sequence[str] = ()) -> list[str]:
    """The ``fit`` arguments for a config file plus LightningCLI overrides (later ones win).

    Args:
        config: a config file (may use ``extends:``).
        overrides: e.g. ``["--data.minority_count=50", "--model.n_centers=5"]``.

    Returns:
        ``["--config", CONFIG, *overrides]``.
    """
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a sequence of strings, got the string {overrides!r}")
    return ["--config", str(config), *[str(o) for o in overrides]]


def _plain(value: Any) -> Any:
    """Namespaces, mappings, sequences and paths -> dicts, lists, strings (JSON/YAML-able)."""
    if hasattr(value, "as_dict") and callable(value.as_dict):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_fit(args: Sequence[str], callbacks: Sequence[Any] = ()) -> FitResult:
    """Train once in this process through :func:`aff_lightning.cli.run_lightning_cli`.

    Runs ``fit --test_after_fit=false *args`` (``args`` may set ``--test_after_fit=true``).

    Args:
        args: ``fit`` arguments, e.g. from :func:`fit_args`.
        callbacks: extra Lightning ``Callback`` objects (e.g. a pruning callback), added to
            the CLI's default callbacks.

    Returns:
        The run's :class:`FitResult`.

    Raises:
        RuntimeError: the fit was interrupted (e.g. Ctrl-C) rather than finished.
        SystemExit: LightningCLI rejected the arguments (it printed why).
        Exception: whatever the run raised (bad config values, missing data, ...).
    """
    from aff_lightning.cli import run_lightning_cli

    if isinstance(args, str):
        raise TypeError(f"args must be a sequence of strings, got the string {args!r}")
    start = time.perf_counter()
    cli = run_lightning_cli(
        ["fit", "--test_after_fit=false", *[str(a) for a in args]],
        extra_callbacks=list(callbacks),
    )
    wall = time.perf_counter() - start
    trainer = cli.trainer
    if trainer.interrupted:
        raise RuntimeError(f"the run was interrupted at epoch {trainer.current_epoch}")
    config = _plain(cli.config.get(cli.subcommand, cli.config))
    config.pop("config", None)  # the config file paths; their content is in the rest
    log_dir = trainer.log_dir
    return FitResult(
        history=[dict(r) for r in getattr(cli.model, "history", [])],
        epochs=int(trainer.current_epoch),
        wall_seconds=float(wall),
        config=config,
        log_dir=None if log_dir is None else str(log_dir),
    )


def select_epoch(
    history: Sequence[Mapping[str, float]], rule: str, metric: str
) -> dict[str, float]:
    """The test metrics of the epoch ``rule`` picks from a run's history.

    Args:
        history: per-epoch records as in :attr:`FitResult.history`.
        rule: "best_test" (highest ``test/<metric>``, the reference protocol), "last" (the
            last epoch) or "best_val" (highest ``val/<metric>``); ties go to the earliest epoch.
        metric: the metric best_* rules rank epochs by, e.g. "macro_f1" or "micro_f1".

    Returns:
        ``{"epoch": e, "acc": ..., "micro_f1": ..., "macro_f1": ..., ...}``: the chosen epoch
        and its test values of :data:`TEST_METRICS` (those it recorded).

    Raises:
        ValueError: unknown rule, empty history, or a history without the split the rule
            needs (e.g. best_val without a validation split, any rule without test metrics).
    """
    if rule not in EPOCH_RULES:
        raise ValueError(f"rule must be one of {list(EPOCH_RULES)}, got {rule!r}")
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"metric must be a metric name such as 'macro_f1', got {metric!r}")
    rows = [dict(r) for r in history]
    if not rows:
        raise ValueError("history is empty: the run recorded no validation epoch")
    splits = sorted({k.split("/", 1)[0] for r in rows for k in r if "/" in k})
    if rule == "last":
        chosen = rows[-1]
    else:
        split = "test" if rule == "best_test" else "val"
        key = f"{split}/{metric}"
        ranked = [(i, r) for i, r in enumerate(rows) if key in r]
        if not ranked:
            hint = (
                " (add a validation split, e.g. --data.val_fraction=0.1)" if split == "val" else ""
            )
            raise ValueError(
                f"rule {rule!r} needs {key!r} in the history, but the run recorded splits "
                f"{splits}{hint}"
            )
        # Highest value, ties to the earliest epoch.
        chosen = max(ranked, key=lambda ir: (ir[1][key], -ir[0]))[1]
    values = {m: float(chosen[f"test/{m}"]) for m in TEST_METRICS if f"test/{m}" in chosen}
    if not values:
        raise ValueError(
            f"rule {rule!r} chose epoch {chosen.get('epoch')} but it has no test metrics; the "
            f"run recorded splits {splits} (evaluate the test set every epoch with "
            "--data.monitor_test=true)"
        )
    return {"epoch": float(chosen.get("epoch", rows.index(chosen))), **values}
