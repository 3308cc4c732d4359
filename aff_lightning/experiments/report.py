"""Tables, statistics and a figure for a finished grid of runs, in the reference study's layout.

A grid writes ``runs.csv``, one row per finished run (condition, head, minority count k, seed,
test metrics of the selected epoch, ...). This module summarises it as the reference Keras
study did: per condition, head and k, the median and the maximum over seeds of the accuracy
and of the F1, and "Diff", the head's statistic minus the softmax head's at the same condition
and k; then the sums of the median Diffs over k per condition and head.

Beyond the reference it reports the number of seeds behind each cell and, pairing runs by seed
(the same seed gives the same data order and initialisation in the grid):

- a 95% percentile-bootstrap interval of the Diff of medians that resamples seeds jointly for
  both heads (:func:`bootstrap_median_diff_ci`);
- the p-value of an exact two-sided paired sign-flip permutation test of the mean per-seed
  difference (:func:`sign_flip_test`). It enumerates all 2**n sign patterns of the n paired
  differences, so it is exact with ties and zero differences and uses their magnitudes, not
  only their ranks. Like the exact Wilcoxon signed-rank test its smallest attainable p-value is
  2 / 2**n: 0.0625 with 5 seeds, so no single cell of a 5-seed grid can reach p < 0.05.

Only NumPy, pandas and matplotlib (Agg canvas, imported when a figure is drawn) are used; no
torch or Lightning, so a report takes about a second.

Example:
    >>> paths = write_report("runs/grid/runs.csv", "runs/grid/report")  # doctest: +SKIP
    >>> sorted(paths)  # doctest: +SKIP
    ['figure', 'report', 'summary', 'totals']
"""

from __future__ import annotations

import argparse
import math
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "BASELINE_HEAD",
    "REQUIRED_COLUMNS",
    "SELECTION_RULES",
    "SUMMARY_COLUMNS",
    "TOTALS_COLUMNS",
    "bootstrap_median_diff_ci",
    "load_runs",
    "main",
    "plot_f1_vs_k",
    "selection_rule",
    "sign_flip_test",
    "summarize",
    "totals",
    "write_report",
]

BASELINE_HEAD = "softmax"
"""The head every other head is compared with (its rows give the "Diff" columns)."""

SELECTION_RULES = ("best_test", "last", "best_val")
"""Epoch-selection rules a run can report its metrics under (the ``selection`` column)."""

REQUIRED_COLUMNS = (
    "condition",
    "minority_count",
    "head",
    "seed",
    "acc",
    "micro_f1",
    "macro_f1",
    "selection",
    "epochs",
    "wall_seconds",
)
"""Columns ``runs.csv`` must have; further columns are kept and ignored."""

SUMMARY_COLUMNS = (
    "condition",
    "head",
    "minority_count",
    "n_seeds",
    "n_softmax_seeds",
    "n_paired",
    "acc_median",
    "acc_max",
    "diff_acc_median",
    "diff_acc_max",
    "diff_acc_ci_low",
    "diff_acc_ci_high",
    "diff_acc_p",
    "f1_median",
    "f1_max",
    "diff_f1_median",
    "diff_f1_max",
    "diff_f1_ci_low",
    "diff_f1_ci_high",
    "diff_f1_p",
)
"""Columns of :func:`summarize`'s table, in order."""

TOTALS_COLUMNS = ("condition", "head", "sum_diff_acc_median", "sum_diff_f1_median", "n_k")
"""Columns of :func:`totals`'s table, in order."""

F1_CHOICES = ("macro", "micro", "auto")
"""F1 to report: macro, micro, or auto: each run's own ``f1_metric`` column (the grid writes
micro for conditions selected on micro-F1, macro otherwise; macro when the column is absent)."""
F1_METRIC_COLUMN = "f1_metric"
CI_LEVEL = 0.95
# Sign patterns are enumerated exactly up to 2**16 = 65536 of them (n <= 16 paired seeds);
# beyond that a Monte Carlo sample of this many patterns estimates p as (1 + hits) / (1 + B).
MAX_EXACT_PAIRS = 16
MC_SIGN_FLIPS = 20_000

_KEY_COLUMNS = ("condition", "head", "minority_count", "seed")
_CELL_COLUMNS = ["condition", "head", "minority_count"]
_STRING_COLUMNS = ("condition", "head", "selection")
_INT_COLUMNS = {"minority_count": 1, "seed": 0, "epochs": 0}  # column -> smallest valid value
_UNIT_COLUMNS = ("acc", "micro_f1", "macro_f1")  # fractions in [0, 1]
_SELECTION_TEXT = {
    "best_test": "each run's metrics at the epoch with the best test score (the reference "
    "protocol; optimistic, the test set selects the epoch)",
    "last": "each run's metrics at its last epoch",
    "best_val": "each run's metrics at the epoch with the best validation score",
}


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def _rows(index: pd.Index, values: pd.Series | None = None, limit: int = 5) -> str:
    """Describe offending rows (pandas index labels) and optionally their values, briefly."""
    labels = list(index[:limit])
    more = f" and {len(index) - limit} more" if len(index) > limit else ""
    if values is None:
        return f"rows {labels}{more}"
    return f"rows {labels}{more} (values {list(values.loc[index[:limit]])})"


def _check_runs(runs: pd.DataFrame, source: str, columns: Sequence[str]) -> pd.DataFrame:
    """Validate ``columns`` of a runs table and return a copy with clean dtypes.

    Strings for condition/head/selection, int64 for minority_count/seed/epochs, float64 for
    the metrics and wall_seconds. Raises ``ValueError`` naming ``source``, the column and the
    offending rows (pandas index labels: 0 is the first data row of a CSV).
    """
    if not isinstance(runs, pd.DataFrame):
        raise TypeError(f"runs must be a pandas DataFrame, got {type(runs).__name__}")
    missing = [c for c in columns if c not in runs.columns]
    if missing:
        raise ValueError(
            f"{source} is missing required column(s) {missing}; it has {list(runs.columns)}"
        )
    if len(runs) == 0:
        raise ValueError(f"{source} has no runs (no data rows)")
    out = runs.copy()
    for col in columns:
        values = out[col]
        if col in _STRING_COLUMNS:
            bad = values.isna() | (values.astype(str).str.strip() == "")
            if bad.any():
                raise ValueError(f"{source}: column {col!r} is empty at {_rows(out.index[bad])}")
            out[col] = values.astype(str).str.strip()
            continue
        numbers = pd.to_numeric(values, errors="coerce").astype("float64")
        bad = ~np.isfinite(numbers)
        if bad.any():
            raise ValueError(
                f"{source}: column {col!r} must hold finite numbers, got "
                f"{_rows(out.index[bad], values)}"
            )
        if col in _INT_COLUMNS:
            smallest = _INT_COLUMNS[col]
            bad = (numbers != np.round(numbers)) | (numbers < smallest)
            if bad.any():
                raise ValueError(
                    f"{source}: column {col!r} must hold integers >= {smallest}, got "
                    f"{_rows(out.index[bad], values)}"
                )
            out[col] = numbers.astype("int64")
        else:
            low, high = (0.0, 1.0) if col in _UNIT_COLUMNS else (0.0, math.inf)
            bad = (numbers < low) | (numbers > high)
            if bad.any():
                span = "[0, 1] (fractions, not percentages)" if high == 1.0 else ">= 0"
                raise ValueError(
                    f"{source}: column {col!r} must be in {span}, got "
                    f"{_rows(out.index[bad], values)}"
                )
            out[col] = numbers
    if "selection" in columns:
        unknown = sorted(set(out["selection"]) - set(SELECTION_RULES))
        if unknown:
            raise ValueError(
                f"{source}: column 'selection' has unknown rule(s) {unknown}; "
                f"expected one of {list(SELECTION_RULES)}"
            )
    keys = [c for c in _KEY_COLUMNS if c in columns]
    if len(keys) == len(_KEY_COLUMNS):
        dup = out.duplicated(keys, keep=False)
        if dup.any():
            cells = sorted({tuple(r) for r in out.loc[dup, keys].itertuples(index=False)})
            shown = ", ".join(
                f"(condition={c!r}, head={h!r}, minority_count={k}, seed={s})"
                for c, h, k, s in cells[:5]
            )
            more = f" and {len(cells) - 5} more" if len(cells) > 5 else ""
            raise ValueError(
                f"{source} has duplicate runs (same condition, head, minority_count, seed): "
                f"{shown}{more} at {_rows(out.index[dup])}"
            )
    return out


def load_runs(path: str | Path) -> pd.DataFrame:
    """Read and validate a grid's ``runs.csv``.

    Args:
        path: CSV with one row per finished run and at least :data:`REQUIRED_COLUMNS`
            (condition, minority_count, head, seed, acc, micro_f1, macro_f1, selection,
            epochs, wall_seconds); extra columns are kept and ignored.

    Returns:
        The runs, one row each: strings for condition/head/selection, int64 for
        minority_count/seed/epochs, float64 for acc/micro_f1/macro_f1/wall_seconds.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a required column is missing (named with the file), a value has the wrong
            type or range (metrics are fractions in [0, 1]), a selection rule is unknown, or a
            (condition, head, minority_count, seed) run appears more than once (named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"runs file not found: {path}")
    try:
        raw = pd.read_csv(path, dtype={c: str for c in _STRING_COLUMNS})
    except pd.errors.EmptyDataError:
        raise ValueError(f"runs file {path} is empty (no header, no runs)") from None
    return _check_runs(raw, f"runs file {path}", REQUIRED_COLUMNS)


def selection_rule(runs: pd.DataFrame) -> str:
    """The single epoch-selection rule of ``runs``.

    Raises:
        ValueError: the runs mix several rules (a comparison across them means nothing) or
            have an unknown one.
    """
    runs = _check_runs(runs, "runs", ("selection",))
    counts = runs["selection"].value_counts().sort_index()
    if len(counts) > 1:
        raise ValueError(
            f"runs mix epoch-selection rules {dict(counts)} (rule: number of runs); a report "
            "compares runs selected the same way, so split the file by 'selection'"
        )
    return str(counts.index[0])


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def bootstrap_median_diff_ci(
    head: np.ndarray,
    baseline: np.ndarray,
    n_boot: int,
    rng: np.random.Generator,
    level: float = CI_LEVEL,
) -> tuple[float, float]:
    """Paired percentile-bootstrap interval of ``median(head) - median(baseline)``.

    Each resample draws n seed indices with replacement and applies the same indices to both
    heads (pairing by seed), so when every seed gives the same difference d the interval is
    [d, d]. With few seeds the bootstrap distribution takes few distinct values: read the
    interval as a spread of the statistic, not as a calibrated 95% interval.

    Args:
        head: (n,) the head's metric per paired seed.
        baseline: (n,) the baseline's metric for the same seeds, in the same order.
        n_boot: number of resamples, >= 1.
        rng: the generator to draw from.
        level: coverage of the central interval, in (0, 1).

    Returns:
        (low, high); (nan, nan) for fewer than 2 pairs.
    """
    head = np.asarray(head, dtype=np.float64)
    baseline = np.asarray(baseline, dtype=np.float64)
    if head.shape != baseline.shape or head.ndim != 1:
        raise ValueError(
            f"head and baseline must be (n,) arrays of equal length, got {head.shape} and "
            f"{baseline.shape}"
        )
    n = head.shape[0]
    if n < 2:
        return math.nan, math.nan
    idx = rng.integers(0, n, size=(n_boot, n))  # (B, n) seed indices, shared by both heads
    stats = np.median(head[idx], axis=1) - np.median(baseline[idx], axis=1)  # (B, n) -> (B,)
    alpha = 1.0 - level
    low, high = np.quantile(stats, [alpha / 2, 1.0 - alpha / 2])
    return float(low), float(high)


def sign_flip_test(differences: np.ndarray, rng: np.random.Generator | None = None) -> float:
    """Two-sided paired sign-flip permutation test of the mean difference.

    Under the null hypothesis the per-seed differences are symmetric about 0, so each sign is
    equally likely; p is the fraction of the 2**n sign patterns whose ``|mean|`` reaches the
    observed one. Exact for n <= :data:`MAX_EXACT_PAIRS` (ties and zero differences are handled
    as they come: a zero flips to itself); above that a Monte Carlo sample of
    :data:`MC_SIGN_FLIPS` patterns from ``rng`` gives ``(1 + hits) / (1 + B)``. The smallest
    exact p is 2 / 2**n (0.0625 for n = 5), the same floor as the exact Wilcoxon signed-rank
    test.

    Args:
        differences: (n,) head metric minus baseline metric, one per paired seed.
        rng: generator for the Monte Carlo case (default: seeded with 0).

    Returns:
        p in (0, 1]; nan for fewer than 2 differences.
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1:
        raise ValueError(f"differences must be a (n,) array, got shape {d.shape}")
    n = d.shape[0]
    if n < 2:
        return math.nan
    observed = abs(d.sum())
    tol = 1e-9 * max(float(np.abs(d).sum()), 1e-300)  # ties up to float rounding
    if n <= MAX_EXACT_PAIRS:
        bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1  # (2**n, n) all sign patterns
        sums = np.abs((1 - 2 * bits) @ d)  # (2**n, n) @ (n,) -> (2**n,)
        return float(np.mean(sums >= observed - tol))
    rng = np.random.default_rng(0) if rng is None else rng
    signs = rng.choice(np.array([-1.0, 1.0]), size=(MC_SIGN_FLIPS, n))  # (B, n)
    hits = int(np.sum(np.abs(signs @ d) >= observed - tol))
    return (1 + hits) / (1 + MC_SIGN_FLIPS)


def _cell_rng(seed: int, condition: str, head: str, k: int) -> np.random.Generator:
    """A generator per cell, so a cell's interval does not depend on which other cells exist."""
    key = zlib.crc32(f"{condition}\0{head}\0{k}".encode())
    return np.random.default_rng([seed, key])


def _check_options(f1: str, n_boot: int, seed: int) -> str:
    """Validate the shared options and return the F1 column name."""
    if not isinstance(f1, str) or f1 not in F1_CHOICES:
        raise ValueError(f"f1 must be one of {list(F1_CHOICES)}, got {f1!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return f"{f1}_f1"


def _add_auto_f1(runs: pd.DataFrame) -> pd.DataFrame:
    """Add column ``auto_f1``: each run's ``macro_f1`` or ``micro_f1`` as its ``f1_metric`` says.

    Without an ``f1_metric`` column every run uses macro F1. Raises ``ValueError`` for values
    other than "macro"/"micro" and for a condition whose runs name different F1 metrics.
    """
    out = runs.copy()
    if F1_METRIC_COLUMN not in out.columns:
        metric = pd.Series("macro", index=out.index)
    else:
        metric = out[F1_METRIC_COLUMN].astype(str).str.strip()
        bad = ~metric.isin(["macro", "micro"])
        if bad.any():
            raise ValueError(
                f"runs: column {F1_METRIC_COLUMN!r} must be 'macro' or 'micro' (for --f1 auto), "
                f"got {_rows(out.index[bad], out[F1_METRIC_COLUMN])}"
            )
        per_condition = metric.groupby(out["condition"]).nunique()
        mixed = sorted(per_condition.index[per_condition > 1])
        if mixed:
            raise ValueError(
                f"runs: condition(s) {mixed} mix macro and micro in column {F1_METRIC_COLUMN!r}; "
                "--f1 auto needs one F1 per condition (or pass --f1 macro / --f1 micro)"
            )
    out[F1_METRIC_COLUMN] = metric
    out["auto_f1"] = np.where(metric == "micro", out["micro_f1"], out["macro_f1"])
    return out


def _runs_with_f1(runs: pd.DataFrame, f1: str, columns: Sequence[str]) -> tuple[pd.DataFrame, str]:
    """Validate ``columns`` and the F1 column(s) ``f1`` needs; return runs and the F1 column."""
    f1_col = f"{f1}_f1"
    if f1 != "auto":
        return _check_runs(runs, "runs", (*columns, f1_col)), f1_col
    runs = _check_runs(runs, "runs", (*columns, "macro_f1", "micro_f1"))
    return _add_auto_f1(runs), f1_col


def _f1_by_condition(runs: pd.DataFrame, f1: str) -> dict[str, str]:
    """condition -> "macro"/"micro": the F1 each condition reports."""
    conditions = sorted(runs["condition"].unique())
    if f1 != "auto":
        return dict.fromkeys(conditions, f1)
    metric = runs.groupby("condition")[F1_METRIC_COLUMN].first()
    return {c: str(metric[c]) for c in conditions}


def _cells(runs: pd.DataFrame, f1_col: str) -> dict[tuple[str, str, int], pd.DataFrame]:
    """(condition, head, k) -> that cell's runs indexed by seed, columns ``acc`` and ``f1``."""
    cols = runs[[*_CELL_COLUMNS, "seed", "acc", f1_col]].rename(columns={f1_col: "f1"})
    return {
        (str(c), str(h), int(k)): g.set_index("seed")[["acc", "f1"]].sort_index()
        for (c, h, k), g in cols.groupby(_CELL_COLUMNS, sort=True)
    }


def summarize(
    runs: pd.DataFrame, f1: str = "macro", n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Per condition, non-softmax head and k: medians, maxima and Diffs to softmax over seeds.

    Medians and maxima are over each head's own seeds; ``diff_*_median`` is the head's median
    minus softmax's median and ``diff_*_max`` the head's maximum minus softmax's maximum at the
    same condition and k (as the reference). Intervals and p-values pair runs by seed and use
    only the seeds both heads have (``n_paired``): ``diff_*_ci_low/high`` come from
    :func:`bootstrap_median_diff_ci` (95%, ``n_boot`` resamples, one generator per cell seeded
    from ``seed`` and the cell), ``diff_*_p`` from :func:`sign_flip_test` on the per-seed
    differences (smallest attainable p: 2 / 2**n_paired, 0.0625 for 5 seeds). They are NaN
    with fewer than 2 paired seeds.

    Args:
        runs: one row per run with condition, head, minority_count, seed, acc and the F1
            column (see :func:`load_runs`).
        f1: which F1 to report, "macro" (column ``macro_f1``), "micro" (``micro_f1``) or
            "auto" (per run, as its ``f1_metric`` column says; macro without the column).
        n_boot: bootstrap resamples per cell, >= 1.
        seed: seed of the bootstrap, >= 0.

    Returns:
        :data:`SUMMARY_COLUMNS`, one row per (condition, non-softmax head, k), sorted by
        condition, head and k descending; empty when no head other than softmax ran.

    Raises:
        ValueError: unknown ``f1``, bad ``n_boot``/``seed``, invalid or duplicate runs, or a
            (condition, k) with other heads but no softmax runs (all such pairs are named).
    """
    _check_options(f1, n_boot, seed)
    runs, f1_col = _runs_with_f1(runs, f1, ("condition", "head", "minority_count", "seed", "acc"))
    cells = _cells(runs, f1_col)
    missing = sorted(
        {(c, k) for c, h, k in cells if h != BASELINE_HEAD and (c, BASELINE_HEAD, k) not in cells},
        key=lambda ck: (ck[0], -ck[1]),
    )
    if missing:
        named = ", ".join(f"condition={c!r} k={k}" for c, k in missing)
        raise ValueError(
            f"no {BASELINE_HEAD!r} runs to compare with at {named}; every (condition, k) with "
            f"another head needs {BASELINE_HEAD} runs"
        )
    rows = []
    for (condition, head, k), cell in cells.items():
        if head == BASELINE_HEAD:
            continue
        base = cells[(condition, BASELINE_HEAD, k)]
        paired = cell.index.intersection(base.index)
        row: dict[str, object] = {
            "condition": condition,
            "head": head,
            "minority_count": k,
            "n_seeds": len(cell),
            "n_softmax_seeds": len(base),
            "n_paired": len(paired),
        }
        rng = _cell_rng(seed, condition, head, k)
        for metric in ("acc", "f1"):
            mine, theirs = cell[metric].to_numpy(), base[metric].to_numpy()
            row[f"{metric}_median"] = float(np.median(mine))
            row[f"{metric}_max"] = float(np.max(mine))
            row[f"diff_{metric}_median"] = float(np.median(mine) - np.median(theirs))
            row[f"diff_{metric}_max"] = float(np.max(mine) - np.max(theirs))
            mine_p = cell.loc[paired, metric].to_numpy()  # (n_paired,), seed order
            theirs_p = base.loc[paired, metric].to_numpy()
            low, high = bootstrap_median_diff_ci(mine_p, theirs_p, n_boot, rng)
            row[f"diff_{metric}_ci_low"], row[f"diff_{metric}_ci_high"] = low, high
            row[f"diff_{metric}_p"] = sign_flip_test(mine_p - theirs_p, rng)
        rows.append(row)
    summary = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    summary = summary.sort_values(
        ["condition", "head", "minority_count"], ascending=[True, True, False], kind="stable"
    )
    for col in ("minority_count", "n_seeds", "n_softmax_seeds", "n_paired"):
        summary[col] = summary[col].astype("int64")
    return summary.reset_index(drop=True)


def _sum_or_nan(values: pd.Series) -> float:
    """Sum that stays NaN when any term is NaN (pandas' sum would skip it)."""
    return float(values.sum(min_count=len(values))) if not values.isna().any() else math.nan


def totals(summary: pd.DataFrame) -> pd.DataFrame:
    """Sums over k of the median Diffs, per condition and head (the reference's totals).

    Args:
        summary: :func:`summarize`'s table.

    Returns:
        :data:`TOTALS_COLUMNS`: condition, head, sum_diff_acc_median, sum_diff_f1_median and
        n_k (how many k values were summed), one row per condition x head, sorted.
    """
    if not isinstance(summary, pd.DataFrame):
        raise TypeError(f"summary must be a pandas DataFrame, got {type(summary).__name__}")
    needed = ["condition", "head", "minority_count", "diff_acc_median", "diff_f1_median"]
    missing = [c for c in needed if c not in summary.columns]
    if missing:
        raise ValueError(f"summary is missing column(s) {missing}; pass summarize()'s output")
    if len(summary) == 0:
        return pd.DataFrame(columns=list(TOTALS_COLUMNS))
    out = (
        summary.groupby(["condition", "head"], sort=True)
        .agg(
            sum_diff_acc_median=("diff_acc_median", _sum_or_nan),
            sum_diff_f1_median=("diff_f1_median", _sum_or_nan),
            n_k=("minority_count", "nunique"),
        )
        .reset_index()
    )
    out["n_k"] = out["n_k"].astype("int64")
    return out[list(TOTALS_COLUMNS)]


def _baseline_stats(runs: pd.DataFrame, f1_col: str) -> pd.DataFrame:
    """Softmax medians and maxima per (condition, k), for the report's softmax columns."""
    base = runs[runs["head"] == BASELINE_HEAD]
    return base.groupby(["condition", "minority_count"]).agg(
        acc_median=("acc", "median"),
        acc_max=("acc", "max"),
        f1_median=(f1_col, "median"),
        f1_max=(f1_col, "max"),
        n_seeds=("seed", "nunique"),
    )


# --------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------


def _head_order(heads: Sequence[str]) -> list[str]:
    """Softmax first, then the other heads sorted."""
    others = sorted(h for h in set(heads) if h != BASELINE_HEAD)
    return ([BASELINE_HEAD] if BASELINE_HEAD in set(heads) else []) + others


def plot_f1_vs_k(runs: pd.DataFrame, path: str | Path, f1: str = "macro") -> Path:
    """Save F1 against k per head, one panel per condition, with min-max bands over seeds.

    The line is the median over seeds, the band spans the minimum to the maximum; the x axis is
    logarithmic with k decreasing to the right (more imbalance to the right, as the tables
    read). Drawn on a matplotlib Agg canvas, so no display and no global pyplot state.

    Args:
        runs: validated runs (see :func:`load_runs`).
        path: the PNG to write.
        f1: "macro", "micro" or "auto" (see :func:`summarize`).

    Returns:
        ``path`` as a Path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    _check_options(f1, 1, 0)
    runs, f1_col = _runs_with_f1(runs, f1, ("condition", "head", "minority_count", "seed"))
    f1_of = _f1_by_condition(runs, f1)
    conditions = sorted(runs["condition"].unique())
    heads = _head_order(runs["head"].unique())
    ncols = min(3, len(conditions))
    nrows = math.ceil(len(conditions) / ncols)
    fig = Figure(figsize=(4.4 * ncols, 3.4 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False)
    stats = runs.groupby(["condition", "head", "minority_count"])[f1_col].agg(
        ["median", "min", "max"]
    )
    for ax, condition in zip(axes.ravel()[: len(conditions)], conditions, strict=True):
        for i, head in enumerate(heads):
            if (condition, head) not in stats.index.droplevel(2):
                continue
            cell = stats.loc[(condition, head)].sort_index()  # rows: k ascending
            ks = cell.index.to_numpy()
            color = f"C{i}"
            ax.plot(ks, cell["median"], marker="o", color=color, label=head)
            ax.fill_between(ks, cell["min"], cell["max"], color=color, alpha=0.15, linewidth=0)
        ks_all = sorted(runs.loc[runs["condition"] == condition, "minority_count"].unique())
        ax.set_xscale("log")
        ax.set_xticks(ks_all, [str(k) for k in ks_all])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(max(ks_all) * 1.25, min(ks_all) / 1.25)  # k decreasing to the right
        ax.set_title(f"{condition} ({f1_of[condition]} F1)" if f1 == "auto" else str(condition))
        ax.grid(True, alpha=0.3)
    for ax in axes.ravel()[len(conditions) :]:
        ax.set_visible(False)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=max(len(heads), 1))
    fig.supxlabel("minority count k (log scale; more imbalance to the right)")
    label = "F1 (per condition)" if f1 == "auto" else f"{f1} F1"
    fig.supylabel(f"{label}: median over seeds, band min-max")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


# --------------------------------------------------------------------------------------------
# Markdown report
# --------------------------------------------------------------------------------------------


def _num(x: float, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def _ci(low: float, high: float) -> str:
    if math.isnan(low) or math.isnan(high):
        return "n/a"
    return f"[{low:+.4f}, {high:+.4f}]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---:" if i else ":---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _condition_table(
    condition: str, summary: pd.DataFrame, base: pd.DataFrame, heads: list[str]
) -> str:
    """Rows k (descending), softmax columns, then per head the reference's eight + extras."""
    ks = sorted(
        set(summary.loc[summary["condition"] == condition, "minority_count"])
        | {k for c, k in base.index if c == condition},
        reverse=True,
    )
    header = ["k"]
    if BASELINE_HEAD in heads:
        header += [f"{BASELINE_HEAD} {c}" for c in ("Acc Median", "Acc Max", "F1 Median", "F1 Max")]
        header += [f"{BASELINE_HEAD} n"]
    others = [h for h in heads if h != BASELINE_HEAD]
    for head in others:
        header += [
            f"{head} {c}"
            for c in (
                "Acc Median",
                "Acc Max",
                "Diff Acc Median",
                "Diff Acc Max",
                "Diff Acc Median 95% CI",
                "F1 Median",
                "F1 Max",
                "Diff F1 Median",
                "Diff F1 Max",
                "Diff F1 Median 95% CI",
                "Diff F1 p",
                "n (paired)",
            )
        ]
    cells = summary.set_index(["condition", "head", "minority_count"])
    rows = []
    for k in ks:
        row = [str(k)]
        if BASELINE_HEAD in heads:
            if (condition, k) in base.index:
                b = base.loc[(condition, k)]
                row += [_num(b["acc_median"]), _num(b["acc_max"]), _num(b["f1_median"])]
                row += [_num(b["f1_max"]), str(int(b["n_seeds"]))]
            else:
                row += ["n/a"] * 5
        for head in others:
            if (condition, head, k) not in cells.index:
                row += ["n/a"] * 12
                continue
            s = cells.loc[(condition, head, k)]
            row += [
                _num(s["acc_median"]),
                _num(s["acc_max"]),
                _num(s["diff_acc_median"], signed=True),
                _num(s["diff_acc_max"], signed=True),
                _ci(s["diff_acc_ci_low"], s["diff_acc_ci_high"]),
                _num(s["f1_median"]),
                _num(s["f1_max"]),
                _num(s["diff_f1_median"], signed=True),
                _num(s["diff_f1_max"], signed=True),
                _ci(s["diff_f1_ci_low"], s["diff_f1_ci_high"]),
                _num(s["diff_f1_p"]),
                f"{int(s['n_seeds'])} ({int(s['n_paired'])})",
            ]
        rows.append(row)
    return _table(header, rows)


def _totals_table(tot: pd.DataFrame, conditions: list[str], heads: list[str]) -> str:
    """Rows condition, per head the sums over k of the median Diffs."""
    others = [h for h in heads if h != BASELINE_HEAD]
    header = ["condition", "k summed"]
    for head in others:
        header += [f"{head} Sum Diff Acc Median", f"{head} Sum Diff F1 Median"]
    indexed = tot.set_index(["condition", "head"])
    rows = []
    for condition in conditions:
        n_k = tot.loc[tot["condition"] == condition, "n_k"]
        row = [str(condition), "/".join(str(n) for n in sorted(set(n_k))) or "n/a"]
        for head in others:
            if (condition, head) in indexed.index:
                t = indexed.loc[(condition, head)]
                row += [
                    _num(t["sum_diff_acc_median"], signed=True),
                    _num(t["sum_diff_f1_median"], signed=True),
                ]
            else:
                row += ["n/a", "n/a"]
        rows.append(row)
    return _table(header, rows)


def _markdown(
    runs: pd.DataFrame,
    runs_path: Path,
    rule: str,
    summary: pd.DataFrame,
    tot: pd.DataFrame,
    f1: str,
    n_boot: int,
    seed: int,
    figure_name: str,
) -> str:
    f1_col = f"{f1}_f1"
    conditions = sorted(runs["condition"].unique())
    heads = _head_order(runs["head"].unique())
    ks = sorted(runs["minority_count"].unique(), reverse=True)
    per_cell = runs.groupby(_CELL_COLUMNS)["seed"].nunique()
    low, high = int(per_cell.min()), int(per_cell.max())
    seeds = f"{low}" if low == high else f"{low} to {high}"
    hours = runs["wall_seconds"].sum() / 3600.0
    n_min = int(summary["n_paired"].min()) if len(summary) else 0
    floor = f"{2.0 / 2**n_min:.4f}" if n_min >= 2 else "n/a"
    base = _baseline_stats(runs, f1_col)
    f1_of = _f1_by_condition(runs, f1)
    if f1 == "auto":
        groups = {m: [c for c in conditions if f1_of[c] == m] for m in ("micro", "macro")}
        f1_line = "- F1: per condition, as the runs' `f1_metric` column says: " + "; ".join(
            f"{m} F1 for {', '.join(f'`{c}`' for c in cs)}" for m, cs in groups.items() if cs
        )
        f1_line += ". All metrics are fractions in [0, 1], on the (imbalanced) test set."
        f1_name = "F1"
    else:
        f1_line = (
            f"- F1: {f1} F1 (column `{f1_col}`). All metrics are fractions in [0, 1], on the "
            "(imbalanced) test set."
        )
        f1_name = f"{f1} F1"
    parts = [
        "# Grid report",
        "",
        f"- Runs: `{runs_path}`: {len(runs)} runs, {len(conditions)} condition(s), "
        f"heads {', '.join(heads)}, k in {{{', '.join(str(k) for k in ks)}}}, "
        f"{seeds} seed(s) per cell, {hours:.2f} h of run wall time in total.",
        f"- Epoch selection: `{rule}`, {_SELECTION_TEXT[rule]}.",
        f1_line,
        f"- Figure: `{figure_name}` ({f1_name} median over seeds against k, band min-max).",
        "",
        "**How to read the tables.** Median and Max are over the seeds of a cell (n). Diff is "
        f"the head's statistic minus the {BASELINE_HEAD} head's at the same condition and k, "
        "each over its own seeds: the difference of medians and the difference of maxima, as "
        "in the reference study. n (paired) gives the head's seeds and, in brackets, how many "
        f"of them {BASELINE_HEAD} also has; the interval and p use only those paired seeds "
        "(same seed: same data order and initialisation).",
        "",
        "**Interval.** Diff Median 95% CI is a percentile bootstrap of the difference of "
        f"medians: {n_boot} resamples (seed {seed}) draw seeds with replacement and apply the "
        "same draw to both heads, so it is [d, d] when every seed gives the same difference d. "
        "With a handful of seeds (5 in the reference grid) the bootstrap distribution takes "
        "few distinct values: read the "
        "interval as the spread of the statistic across seeds, not as a calibrated 95% "
        "interval. It is n/a with fewer than 2 paired seeds.",
        "",
        "**p-value.** Diff F1 p is an exact two-sided paired sign-flip permutation test of the "
        "mean per-seed F1 difference: under the null hypothesis the differences are symmetric "
        "about 0, and p is the share of all 2^n sign patterns whose |mean| reaches the "
        "observed one (exact with ties and zero differences; it uses the magnitudes of the "
        "differences, not only their ranks as the Wilcoxon signed-rank test does). Its "
        "smallest attainable value is 2 / 2^n, as for the exact Wilcoxon test: 0.0625 with 5 "
        f"paired seeds (here at least {n_min} paired seed(s): floor {floor}), so a single cell "
        "of a 5-seed grid can never reach p < 0.05; the p-values are not corrected for the "
        f"{len(summary)} comparisons. It is n/a with fewer than 2 paired seeds.",
    ]
    for condition in conditions:
        parts += ["", f"## Condition `{condition}`", ""]
        if f1 == "auto":
            parts += [f"F1 columns: {f1_of[condition]} F1.", ""]
        parts.append(_condition_table(condition, summary, base, heads))
    parts += ["", "## Totals (sums over k of the median Diffs)", ""]
    parts.append(_totals_table(tot, conditions, heads))
    return "\n".join(parts) + "\n"


def _write_report(
    runs_path: str | Path, out_dir: str | Path, f1: str, n_boot: int, seed: int
) -> tuple[dict[str, Path], pd.DataFrame]:
    _check_options(f1, n_boot, seed)
    runs_path = Path(runs_path)
    runs = load_runs(runs_path)
    if f1 == "auto":
        runs = _add_auto_f1(runs)
    rule = selection_rule(runs)
    summary = summarize(runs, f1=f1, n_boot=n_boot, seed=seed)
    tot = totals(summary)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "summary": out / "summary.csv",
        "totals": out / "totals.csv",
        "report": out / "report.md",
        "figure": out / "f1_vs_k.png",
    }
    summary.to_csv(paths["summary"], index=False)
    tot.to_csv(paths["totals"], index=False)
    text = _markdown(runs, runs_path, rule, summary, tot, f1, n_boot, seed, paths["figure"].name)
    paths["report"].write_text(text, encoding="utf-8")
    plot_f1_vs_k(runs, paths["figure"], f1=f1)
    return paths, tot


def write_report(
    runs_path: str | Path,
    out_dir: str | Path,
    f1: str = "auto",
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Path]:
    """Write summary.csv, totals.csv, report.md and f1_vs_k.png for a grid's runs.csv.

    Args:
        runs_path: the grid's ``runs.csv`` (see :func:`load_runs`).
        out_dir: folder for the four files, created if needed; existing files are replaced.
        f1: "macro", "micro" or "auto" (each condition's own F1 from the ``f1_metric`` column,
            macro without it; see :func:`summarize`).
        n_boot: bootstrap resamples per cell, >= 1.
        seed: seed of the bootstrap, >= 0.

    Returns:
        ``{"summary": ..., "totals": ..., "report": ..., "figure": ...}`` paths.

    Raises:
        FileNotFoundError: ``runs_path`` does not exist.
        ValueError: invalid runs (see :func:`load_runs` and :func:`summarize`), or runs that
            mix epoch-selection rules (named).
    """
    return _write_report(runs_path, out_dir, f1, n_boot, seed)[0]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cli.py report",
        description="Summarise a grid's runs.csv into tables, a markdown report and a figure.",
    )
    parser.add_argument("--runs", required=True, type=Path, help="the grid's runs.csv")
    parser.add_argument("--out", required=True, type=Path, help="folder for the report files")
    parser.add_argument(
        "--f1",
        default="auto",
        choices=F1_CHOICES,
        help="F1 to report: macro, micro, or auto (default): per condition as the runs' "
        "f1_metric column says (micro for conditions selected on micro-F1), macro without it",
    )
    parser.add_argument("--n-boot", default=2000, type=int, help="bootstrap resamples per cell")
    parser.add_argument("--seed", default=0, type=int, help="seed of the bootstrap")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--runs PATH --out DIR [--f1 auto|macro|micro] [--n-boot N] [--seed S]``.

    Prints the totals table and the written paths. Returns 0 on success and 2 on bad
    arguments or bad input, with the message on stderr (no traceback).
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed usage and the message on stderr (or --help)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        paths, tot = _write_report(args.runs, args.out, args.f1, args.n_boot, args.seed)
    except (ValueError, TypeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(tot):
        print(tot.to_string(index=False, float_format=lambda x: f"{x:+.4f}"))
    else:
        print(f"no head other than {BASELINE_HEAD} in the runs: nothing to total")
    for path in paths.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
