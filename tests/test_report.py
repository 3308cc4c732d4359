"""Tests for aff_lightning.experiments.report on a hand-made runs.csv with hand-computed tables.

All metric values are multiples of 1/16, so medians, maxima, differences and sums are exact in
float64 and can be compared with ``==``.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aff_lightning.experiments import report
from aff_lightning.experiments.report import (
    SUMMARY_COLUMNS,
    TOTALS_COLUMNS,
    bootstrap_median_diff_ci,
    load_runs,
    main,
    selection_rule,
    sign_flip_test,
    summarize,
    totals,
    write_report,
)

SOFTMAX, M1, M5 = "softmax", "affinity-m1", "affinity-m5"

# (condition, k, head) -> (acc per seed 0, 1, 2), (macro F1 per seed 0, 1, 2).
# micro_f1 equals acc (single-label classification), as in real runs.
CELLS = {
    ("plain", 100, SOFTMAX): ((0.5, 0.75, 0.625), (0.25, 0.5, 0.375)),
    ("plain", 100, M1): ((0.625, 0.875, 0.75), (0.5, 0.5, 0.25)),  # acc: softmax + 0.125
    ("plain", 100, M5): ((0.5, 0.5, 0.875), (0.375, 0.625, 0.5)),
    ("plain", 10, SOFTMAX): ((0.25, 0.5, 0.375), (0.125, 0.25, 0.0625)),
    ("plain", 10, M1): ((0.375, 0.375, 0.5), (0.25, 0.5, 0.125)),
    ("plain", 10, M5): ((0.5, 0.25, 0.625), (0.1875, 0.3125, 0.125)),  # F1: softmax + 0.0625
    ("aug", 100, SOFTMAX): ((0.75, 0.75, 0.75), (0.5, 0.625, 0.5)),
    ("aug", 100, M1): ((0.875, 0.75, 0.625), (0.625, 0.75, 0.5)),
    ("aug", 100, M5): ((0.75, 1.0, 0.875), (0.5, 0.5, 0.75)),
    ("aug", 10, SOFTMAX): ((0.5, 0.625, 0.5), (0.25, 0.375, 0.375)),
    ("aug", 10, M1): ((0.5, 0.5, 0.75), (0.375, 0.25, 0.5)),
    ("aug", 10, M5): ((0.625, 0.75, 0.5), (0.25, 0.5, 0.5)),
}

# Hand-computed: condition, head, k, acc median, acc max, diff acc median, diff acc max,
# f1 median, f1 max, diff f1 median, diff f1 max (macro F1). Sorted as summarize() sorts.
EXPECTED_MACRO = [
    ("aug", M1, 100, 0.75, 0.875, 0.0, 0.125, 0.625, 0.75, 0.125, 0.125),
    ("aug", M1, 10, 0.5, 0.75, 0.0, 0.125, 0.375, 0.5, 0.0, 0.125),
    ("aug", M5, 100, 0.875, 1.0, 0.125, 0.25, 0.5, 0.75, 0.0, 0.125),
    ("aug", M5, 10, 0.625, 0.75, 0.125, 0.125, 0.5, 0.5, 0.125, 0.125),
    ("plain", M1, 100, 0.75, 0.875, 0.125, 0.125, 0.5, 0.5, 0.125, 0.0),
    ("plain", M1, 10, 0.375, 0.5, 0.0, 0.0, 0.25, 0.5, 0.125, 0.25),
    ("plain", M5, 100, 0.5, 0.875, -0.125, 0.125, 0.5, 0.625, 0.125, 0.125),
    ("plain", M5, 10, 0.5, 0.625, 0.125, 0.125, 0.1875, 0.3125, 0.0625, 0.0625),
]

# Hand-computed sums over k of the median diffs: condition, head, acc, macro F1.
EXPECTED_TOTALS = [
    ("aug", M1, 0.0, 0.125),
    ("aug", M5, 0.25, 0.125),
    ("plain", M1, 0.125, 0.25),
    ("plain", M5, 0.0, 0.1875),
]

STAT_COLUMNS = [
    "acc_median",
    "acc_max",
    "diff_acc_median",
    "diff_acc_max",
    "f1_median",
    "f1_max",
    "diff_f1_median",
    "diff_f1_max",
]


def make_runs(selection: str = "best_test", seeds: tuple[int, ...] = (0, 1, 2)) -> pd.DataFrame:
    rows = []
    for (condition, k, head), (accs, f1s) in CELLS.items():
        for seed in seeds:
            rows.append(
                {
                    "condition": condition,
                    "minority_count": k,
                    "head": head,
                    "seed": seed,
                    "acc": accs[seed],
                    "micro_f1": accs[seed],
                    "macro_f1": f1s[seed],
                    "selection": selection,
                    "epochs": 3,
                    "wall_seconds": 60.0,
                    "notes": "extra columns are ignored",
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture
def runs_csv(tmp_path: Path) -> Path:
    path = tmp_path / "runs.csv"
    make_runs().to_csv(path, index=False)
    return path


def test_load_runs_dtypes(runs_csv: Path) -> None:
    runs = load_runs(runs_csv)
    assert len(runs) == 36
    assert runs["minority_count"].dtype == np.int64
    assert runs["seed"].dtype == np.int64
    assert runs["epochs"].dtype == np.int64
    assert runs["macro_f1"].dtype == np.float64
    assert set(runs["head"]) == {SOFTMAX, M1, M5}
    assert "notes" in runs.columns


def test_summarize_matches_hand_computed_values(runs_csv: Path) -> None:
    summary = summarize(load_runs(runs_csv), f1="macro", n_boot=200, seed=0)
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    keys = list(zip(summary["condition"], summary["head"], summary["minority_count"], strict=True))
    assert keys == [row[:3] for row in EXPECTED_MACRO]
    for (_, row), expected in zip(summary.iterrows(), EXPECTED_MACRO, strict=True):
        assert [row[c] for c in STAT_COLUMNS] == list(expected[3:]), expected[:3]
    assert (summary[["n_seeds", "n_softmax_seeds", "n_paired"]] == 3).all().all()


def test_summarize_micro_uses_micro_column(runs_csv: Path) -> None:
    summary = summarize(load_runs(runs_csv), f1="micro", n_boot=50)
    # micro_f1 == acc in the fixture, so every F1 statistic equals its accuracy twin.
    for stat in ("median", "max"):
        assert summary[f"f1_{stat}"].tolist() == summary[f"acc_{stat}"].tolist()
        assert summary[f"diff_f1_{stat}"].tolist() == summary[f"diff_acc_{stat}"].tolist()
    macro = summarize(load_runs(runs_csv), f1="macro", n_boot=50)
    assert summary["f1_median"].tolist() != macro["f1_median"].tolist()


def test_totals_matches_hand_computed_sums(runs_csv: Path) -> None:
    tot = totals(summarize(load_runs(runs_csv), n_boot=50))
    assert list(tot.columns) == list(TOTALS_COLUMNS)
    got = list(
        zip(
            tot["condition"],
            tot["head"],
            tot["sum_diff_acc_median"],
            tot["sum_diff_f1_median"],
            strict=True,
        )
    )
    assert got == EXPECTED_TOTALS
    assert tot["n_k"].tolist() == [2, 2, 2, 2]


def test_totals_rejects_a_table_that_is_not_a_summary() -> None:
    with pytest.raises(ValueError, match=r"missing column\(s\) \['diff_acc_median'"):
        totals(make_runs())
    assert list(totals(summarize(make_runs()[make_runs()["head"] == SOFTMAX])).columns) == list(
        TOTALS_COLUMNS
    )


def test_interval_contains_observed_and_is_degenerate_for_constant_diffs(runs_csv: Path) -> None:
    summary = summarize(load_runs(runs_csv), n_boot=300, seed=3)
    for metric in ("acc", "f1"):
        low, high = summary[f"diff_{metric}_ci_low"], summary[f"diff_{metric}_ci_high"]
        observed = summary[f"diff_{metric}_median"]
        assert ((low <= observed) & (observed <= high)).all(), metric
    cell = summary.set_index(["condition", "head", "minority_count"])
    # plain/m1/k=100: every seed's acc is softmax's + 0.125.
    assert cell.loc[("plain", M1, 100), "diff_acc_ci_low"] == 0.125
    assert cell.loc[("plain", M1, 100), "diff_acc_ci_high"] == 0.125
    # plain/m5/k=10: every seed's macro F1 is softmax's + 0.0625.
    assert cell.loc[("plain", M5, 10), "diff_f1_ci_low"] == 0.0625
    assert cell.loc[("plain", M5, 10), "diff_f1_ci_high"] == 0.0625


def test_summary_is_reproducible_per_seed(runs_csv: Path) -> None:
    runs = load_runs(runs_csv)
    a = summarize(runs, n_boot=100, seed=7)
    pd.testing.assert_frame_equal(a, summarize(runs, n_boot=100, seed=7))
    # A cell's interval does not depend on which other cells exist.
    only_plain = summarize(runs[runs["condition"] == "plain"], n_boot=100, seed=7)
    pd.testing.assert_frame_equal(only_plain, a[a["condition"] == "plain"].reset_index(drop=True))


def _sign_flip_reference(d: list[float]) -> float:
    """Loop port: share of the 2**n sign patterns with |sum| >= the observed |sum|."""
    observed = abs(sum(d))
    hits = 0
    patterns = list(itertools.product((1.0, -1.0), repeat=len(d)))
    for signs in patterns:
        if abs(sum(s * x for s, x in zip(signs, d, strict=True))) >= observed - 1e-12:
            hits += 1
    return hits / len(patterns)


@pytest.mark.parametrize(
    "d",
    [
        [0.125, 0.125, 0.125],
        [0.25, 0.0, -0.125],
        [0.01, 0.02, -0.03, 0.04, 0.05],
        [0.1, 0.2, 0.3, 0.4, 0.5],
        [0.0, 0.0],
        [-0.3, 0.1, 0.2, 0.05, -0.01, 0.07],
    ],
)
def test_sign_flip_test_matches_loop_reference(d: list[float]) -> None:
    assert sign_flip_test(np.array(d)) == pytest.approx(_sign_flip_reference(d), abs=1e-12)


def test_sign_flip_floor_and_summary_p_values(runs_csv: Path) -> None:
    assert sign_flip_test(np.full(5, 0.01)) == 2 / 2**5  # 0.0625: the 5-seed floor
    assert math.isnan(sign_flip_test(np.array([0.1])))
    summary = summarize(load_runs(runs_csv), n_boot=50).set_index(
        ["condition", "head", "minority_count"]
    )
    assert summary.loc[("plain", M1, 100), "diff_acc_p"] == 0.25  # diffs 0.125 x 3: 2/8
    assert summary.loc[("plain", M1, 100), "diff_f1_p"] == 1.0  # diffs 0.25, 0, -0.125
    assert summary["diff_f1_p"].between(0.25, 1.0).all()


def test_sign_flip_monte_carlo_above_exact_limit() -> None:
    rng = np.random.default_rng(0)
    p = sign_flip_test(np.full(report.MAX_EXACT_PAIRS + 4, 0.01), rng)
    assert p == 1 / (1 + report.MC_SIGN_FLIPS)


def test_bootstrap_interval_nan_below_two_pairs() -> None:
    rng = np.random.default_rng(0)
    low, high = bootstrap_median_diff_ci(np.array([0.5]), np.array([0.25]), 10, rng)
    assert math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError, match="equal length"):
        bootstrap_median_diff_ci(np.array([0.5, 0.2]), np.array([0.25]), 10, rng)


def test_one_seed_gives_nan_interval_and_p() -> None:
    summary = summarize(make_runs(seeds=(1,)), n_boot=50)
    assert (summary["n_seeds"] == 1).all() and (summary["n_paired"] == 1).all()
    for col in ("diff_f1_p", "diff_acc_p", "diff_f1_ci_low", "diff_f1_ci_high", "diff_acc_ci_low"):
        assert summary[col].isna().all(), col
    assert summary[["f1_median", "diff_f1_median", "diff_acc_max"]].notna().all().all()


def test_unpaired_seeds_use_only_shared_seeds() -> None:
    runs = make_runs()
    drop = (runs["head"] == SOFTMAX) & (runs["seed"] == 2)
    summary = summarize(runs[~drop], n_boot=50)
    assert (summary["n_seeds"] == 3).all()
    assert (summary["n_softmax_seeds"] == 2).all()
    assert (summary["n_paired"] == 2).all()


def test_missing_column_is_named(tmp_path: Path) -> None:
    path = tmp_path / "runs.csv"
    make_runs().drop(columns=["macro_f1"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['macro_f1'\]") as err:
        load_runs(path)
    assert str(path) in str(err.value)


def test_missing_softmax_names_condition_and_k() -> None:
    runs = make_runs()
    runs = runs[
        ~((runs["head"] == SOFTMAX) & (runs["condition"] == "aug") & (runs["minority_count"] == 10))
    ]
    with pytest.raises(ValueError, match=r"condition='aug' k=10"):
        summarize(runs, n_boot=10)


def test_duplicate_runs_are_named(tmp_path: Path) -> None:
    runs = make_runs()
    path = tmp_path / "runs.csv"
    pd.concat([runs, runs.iloc[[4]]]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"duplicate runs .*condition='plain', head='affinity-m1'"):
        load_runs(path)


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("acc", 87.5, r"'acc' must be in \[0, 1\]"),
        ("macro_f1", "oops", r"'macro_f1' must hold finite numbers"),
        ("seed", 1.5, r"'seed' must hold integers >= 0"),
        ("minority_count", 0, r"'minority_count' must hold integers >= 1"),
        ("selection", "best_loss", r"unknown rule\(s\) \['best_loss'\]"),
        ("head", "", r"'head' is empty"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, column: str, value: object, message: str) -> None:
    runs = make_runs().astype({column: object})
    runs.loc[3, column] = value
    path = tmp_path / "runs.csv"
    runs.to_csv(path, index=False)
    with pytest.raises(ValueError, match=message):
        load_runs(path)


def test_bad_options() -> None:
    runs = make_runs()
    with pytest.raises(
        ValueError, match=r"f1 must be one of \['macro', 'micro', 'auto'\], got 'weighted'"
    ):
        summarize(runs, f1="weighted")
    with pytest.raises(ValueError, match="n_boot must be an integer >= 1, got 0"):
        summarize(runs, n_boot=0)
    with pytest.raises(TypeError, match="runs must be a pandas DataFrame, got list"):
        summarize([1, 2])  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="runs file not found"):
        load_runs("/nonexistent/runs.csv")


def test_mixed_selection_is_an_error(tmp_path: Path) -> None:
    runs = make_runs()
    runs.loc[runs["condition"] == "aug", "selection"] = "last"
    assert selection_rule(make_runs()) == "best_test"
    with pytest.raises(ValueError, match=r"mix epoch-selection rules .*best_test.*last"):
        selection_rule(runs)
    path = tmp_path / "runs.csv"
    runs.to_csv(path, index=False)
    with pytest.raises(ValueError, match="mix epoch-selection rules"):
        write_report(path, tmp_path / "out", n_boot=10)


def test_write_report_writes_all_files(runs_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    paths = write_report(runs_csv, out, f1="macro", n_boot=50, seed=1)
    assert set(paths) == {"summary", "totals", "report", "figure"}
    assert {p.name for p in paths.values()} == {
        "summary.csv",
        "totals.csv",
        "report.md",
        "f1_vs_k.png",
    }
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0
    assert paths["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = pd.read_csv(paths["summary"])
    assert summary[STAT_COLUMNS].to_numpy().tolist() == [list(r[3:]) for r in EXPECTED_MACRO]
    tot = pd.read_csv(paths["totals"])
    assert tot["sum_diff_f1_median"].tolist() == [t[3] for t in EXPECTED_TOTALS]
    text = paths["report"].read_text()
    assert "`best_test`" in text and "macro F1" in text and "36 runs" in text
    assert "## Condition `aug`" in text and "## Condition `plain`" in text
    assert "| k | softmax Acc Median |" in text
    assert "affinity-m1 Diff F1 Median 95% CI" in text
    # plain, k=10 row: softmax 0.3750 0.5000 0.1250 0.2500 n=3, then m1 0.3750 0.5000 +0.0000 ...
    assert "| 10 | 0.3750 | 0.5000 | 0.1250 | 0.2500 | 3 | 0.3750 | 0.5000 | +0.0000 |" in text
    assert "## Totals" in text
    assert "| plain | 2 | +0.1250 | +0.2500 | +0.0000 | +0.1875 |" in text
    assert "0.0625" in text and "sign-flip" in text


def test_main_prints_totals_and_paths(
    runs_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(["--runs", str(runs_csv), "--out", str(out), "--f1", "micro", "--n-boot", "20"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "sum_diff_f1_median" in printed and "affinity-m5" in printed
    assert str(out / "report.md") in printed
    assert "micro F1" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runs", "/nonexistent/runs.csv", "--out", "OUT"], "runs file not found"),
        (["--runs", "RUNS", "--out", "OUT", "--f1", "weighted"], "invalid choice: 'weighted'"),
        (["--runs", "RUNS", "--out", "OUT", "--n-boot", "0"], "n_boot must be an integer >= 1"),
        (["--out", "OUT"], "--runs"),
    ],
)
def test_main_bad_input_returns_2(
    runs_csv: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    args = [
        str(runs_csv) if a == "RUNS" else str(tmp_path / "o") if a == "OUT" else a for a in args
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_report_module_imports_no_torch() -> None:
    # The package's __init__ imports torch for AffinityHead; the module itself must not, so it
    # is loaded here from its file alone.
    import subprocess
    import sys

    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('report', {report.__file__!r}); "
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); "
        "print([m for m in ('torch', 'lightning') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _with_f1_metric(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs.copy()
    runs["f1_metric"] = np.where(runs["condition"] == "aug", "micro", "macro")
    return runs


def test_auto_f1_uses_each_conditions_f1_metric() -> None:
    auto = summarize(_with_f1_metric(make_runs()), f1="auto", n_boot=50)
    macro = summarize(make_runs(), f1="macro", n_boot=50)
    micro = summarize(make_runs(), f1="micro", n_boot=50)
    stats = ["f1_median", "f1_max", "diff_f1_median", "diff_f1_max", "diff_f1_p"]
    is_aug = auto["condition"] == "aug"
    pd.testing.assert_frame_equal(auto.loc[is_aug, stats], micro.loc[is_aug, stats])
    pd.testing.assert_frame_equal(auto.loc[~is_aug, stats], macro.loc[~is_aug, stats])
    # Without an f1_metric column, auto is macro F1.
    pd.testing.assert_frame_equal(summarize(make_runs(), f1="auto", n_boot=50), macro)


def test_auto_f1_bad_or_mixed_f1_metric_is_an_error() -> None:
    runs = _with_f1_metric(make_runs())
    runs.loc[5, "f1_metric"] = "weighted"
    with pytest.raises(ValueError, match=r"'f1_metric' must be 'macro' or 'micro'.*rows \[5\]"):
        summarize(runs, f1="auto", n_boot=10)
    runs.loc[5, "f1_metric"] = "micro"  # row 5 is condition 'plain', otherwise macro
    with pytest.raises(ValueError, match=r"condition\(s\) \['plain'\] mix macro and micro"):
        summarize(runs, f1="auto", n_boot=10)
    summarize(runs, f1="macro", n_boot=10)  # an explicit F1 ignores the column


def test_write_report_auto_is_the_default(tmp_path: Path) -> None:
    path = tmp_path / "runs.csv"
    _with_f1_metric(make_runs()).to_csv(path, index=False)
    paths = write_report(path, tmp_path / "out", n_boot=20)
    text = paths["report"].read_text()
    assert "micro F1 for `aug`; macro F1 for `plain`" in text
    assert "F1 columns: micro F1." in text and "F1 columns: macro F1." in text
    summary = pd.read_csv(paths["summary"])
    expected = summarize(_with_f1_metric(make_runs()), f1="auto", n_boot=20)
    assert summary["f1_median"].tolist() == expected["f1_median"].tolist()
    assert main(["--runs", str(path), "--out", str(tmp_path / "cli"), "--n-boot", "5"]) == 0
    assert "micro F1 for `aug`" in (tmp_path / "cli" / "report.md").read_text()
