"""``cli.py tune``: a real tiny search, pruning, resuming a study, and every bad input."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from aff_lightning import cli
from aff_lightning.experiments import tune
from aff_lightning.model import SELECTION_METRICS

# Every trial: 2 epochs of the 3-layer CNN on 4 batches of fake Fashion-MNIST (~5 s on 2 cores).
BASE = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_checkpointing": False,
    },
    "model": {"backbone": "cnn3", "head": "affinity", "lr": 0.01, "milestones": [100]},
}
TINY = {"extends": "base.yaml", "data": {"dataset": "fashion_mnist", "batch_size": 32}}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-file config chain (``extends``) with no validation split."""
    root = tmp_path_factory.mktemp("tune_configs")
    (root / "base.yaml").write_text(yaml.safe_dump(BASE))
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return root / "tiny.yaml"


def _fit_overrides(data_dir: Path) -> list[str]:
    return [
        f"--data.data_dir={data_dir}",
        "--data.minority_count=2",
        "--trainer.limit_train_batches=4",
    ]


def _study(out: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'tune.db'}")


# ------------------------------------------------------------------------------- space


def test_default_space_is_the_reference_one():
    space = tune.DEFAULT_SPACE
    assert space["model.margin"] == tune.ParamSpec("float", 0.01, 1.0, log=False)
    assert space["model.sigma"] == tune.ParamSpec("float", 10.0, 100.0, log=True)
    assert space["model.n_centers"] == tune.ParamSpec("int", 1, 30)
    assert space["model.sigma"].describe() == "log-uniform [10, 100]"
    assert set(tune.OBJECTIVES) == set(SELECTION_METRICS)


def test_space_file_and_range_flags(tmp_path):
    path = tmp_path / "space.json"  # JSON is YAML
    path.write_text(
        '{"model.margin": {"type": "float", "low": 0.1, "high": 0.9},'
        ' "model.head": {"type": "categorical", "choices": ["affinity", "joint"]}}'
    )
    space = tune.load_space(path)
    assert space["model.head"].choices == ("affinity", "joint")
    space = tune.with_ranges(space, {"model.margin": (0.2, 0.5), "model.n_centers": (1.0, 5.0)})
    assert space["model.margin"] == tune.ParamSpec("float", 0.2, 0.5)
    assert space["model.n_centers"] == tune.ParamSpec("int", 1, 5)  # default type kept
    trial = optuna.trial.FixedTrial({"model.margin": 0.3, "model.head": "joint"})
    assert space["model.margin"].suggest(trial, "model.margin") == 0.3


def test_resolve_config_merges_the_chain_and_overrides(tiny_config, tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  n_centers: 3\n")
    config = tune.resolve_config(
        tiny_config,
        ["--trainer.max_epochs=5", "--data.minority_classes", "[1, 3]", "--config", str(extra)],
    )
    assert config["trainer"]["max_epochs"] == 5
    assert config["trainer"]["accelerator"] == "cpu"  # from base.yaml
    assert config["data"]["minority_classes"] == [1, 3]
    assert config["model"]["n_centers"] == 3
    assert "extends" not in config


# ------------------------------------------------------------------------------- bad input

SPACE_ERRORS = [
    pytest.param(
        "model.margin: {type: float, low: 0.9, high: 0.1}",
        r"model.margin range is inverted: low=0.9 > high=0.1",
        id="inverted",
    ),
    pytest.param(
        "model.sigma: {type: float, low: 20, high: 20}",
        r"model.sigma range is empty: low=20 == high=20 \(to fix the value instead, pass "
        r"--model.sigma=20\)",
        id="empty",
    ),
    pytest.param(
        "model.n_centers: {type: int, low: 3, high: 3}",
        r"model.n_centers range is empty: low=3 == high=3",
        id="empty-int",
    ),
    pytest.param(
        "model.sigma: {type: flaot, low: 1, high: 2}",
        r"model.sigma has unknown type 'flaot'; expected one of \['float', 'int', 'categorical'\]",
        id="unknown-type",
    ),
    pytest.param(
        "model.sigma: {type: float, low: 0, high: 10, log: true}",
        r"model.sigma is log-scaled but low=0 <= 0",
        id="log-low-zero",
    ),
    pytest.param(
        "model.margin: {type: float, low: 0.5, high: 1.5}",
        r"model.margin must be in \(0, 1\].*got the range \[0.5, 1.5\]",
        id="margin-domain",
    ),
    pytest.param(
        "model.sigma: {type: float, low: 1, hgih: 2}",
        r"model.sigma has unknown field\(s\) \['hgih'\]",
        id="unknown-field",
    ),
    pytest.param(
        "model.n_centers: {type: int, low: 1.5, high: 4}",
        r"model.n_centers is int but low=1.5 is not an integer",
        id="int-bound",
    ),
    pytest.param(
        "model.head: {type: categorical, choices: []}",
        r"model.head needs a non-empty list of 'choices', got \[\]",
        id="no-choices",
    ),
    pytest.param(
        "model.sigma: {type: float, low: a, high: 2}",
        r"model.sigma low must be a finite number, got 'a'",
        id="not-a-number",
    ),
    pytest.param("[1, 2]", r"must map override names to ranges", id="not-a-mapping"),
]


@pytest.mark.parametrize(("text", "message"), SPACE_ERRORS)
def test_bad_space_file(text, message, tiny_config, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(text)
    args = ["--config", str(tiny_config), "--trials", "1", "--space", str(space)]
    assert tune.main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: space")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()  # rejected before any study was made


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--objective", "f2"], "objective must be one of ['macro_f1', 'micro_f1', 'acc', "),
        (["--objective-split", "train"], "objective split must be one of ['val', 'test'], got"),
        (["--margin", "0.9", "0.1"], "model.margin range is inverted: low=0.9 > high=0.1"),
        (["--sigma", "50", "50"], "model.sigma range is empty: low=50.0 == high=50.0"),
        (["--n-centers", "0", "4"], "model.n_centers must be >= 1 (centers per class)"),
        (["--pruner", "hyperband"], "pruner must be one of ['median', 'none'], got 'hyperband'"),
        (["--trials", "-1"], "trials must be >= 0, got -1"),
        (["--total-trials", "5"], "give either --trials or --total-trials, not both"),
        (["--model.sigma=50"], "model.sigma is both searched and fixed by an override"),
        (["--trainer.max_epochs"], "override --trainer.max_epochs needs a value"),
        (["stray"], "unexpected argument 'stray'"),
        (["--storage", "tune.db"], "storage must be an Optuna storage URL"),
        (["--storage", "nosuchdb://u:secret@host/db"], "cannot open the study storage"),
    ],
)
def test_bad_arguments(args, message, tiny_config, tmp_path, capsys):
    base = ["--config", str(tiny_config), "--trials", "1", "--out", str(tmp_path / "out")]
    assert tune.main(base + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err and "secret" not in err


def test_argparse_errors_return_2(tiny_config, capsys):
    assert tune.main(["--config", str(tiny_config), "--trials", "many"]) == 2
    assert "argument --trials: invalid int value: 'many'" in capsys.readouterr().err
    assert tune.main(["--help"]) == 0
    assert "--objective-split" in capsys.readouterr().out


def test_missing_config_and_trials(tmp_path, tiny_config, capsys):
    assert tune.main(["--config", str(tmp_path / "nope.yaml"), "--trials", "1"]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert tune.main(["--config", str(tiny_config)]) == 2
    assert "give the number of trials" in capsys.readouterr().err


def test_through_the_cli_entry_point(tmp_path, capsys):
    assert cli.main(["tune", "--config", str(tmp_path / "nope.yaml"), "--trials", "1"]) == 2
    assert "error: config file not found" in capsys.readouterr().err


def test_tuning_on_the_test_set_says_so(tiny_config, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--config", str(tiny_config), "--trials", "0", "--out", str(out)]
    assert tune.main([*args, "--objective-split", "test"]) == 1  # no trial ran: no best.yaml
    text = capsys.readouterr().out
    assert "TUNING ON THE TEST SET (test/macro_f1)" in text
    assert "no trial completed" in text and "val_fraction" not in text
    assert _study(out, "tiny").user_attrs["objective"] == "test/macro_f1"


# ------------------------------------------------------------------------------- real searches


@pytest.fixture(scope="module")
def search(tiny_config, fake_fmnist_dir, tmp_path_factory):
    """One real 3-trial search (default space, val/macro_f1): its output folder and stdout."""
    out = tmp_path_factory.mktemp("tune_search") / "out"
    args = ["--config", str(tiny_config), "--trials", "3", "--out", str(out), "--study", "s"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = tune.main(args + _fit_overrides(fake_fmnist_dir))
    return rc, out, buffer.getvalue()


@pytest.mark.slow
def test_search_writes_a_usable_best_config(search, fake_fmnist_dir, tmp_path):
    rc, out, text = search
    assert rc == 0, text
    study = _study(out, "s")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    best = study.best_trial
    # The output: the added validation split, the best values, the trials table.
    assert "trials use --data.val_fraction=0.1" in text
    assert f"best trial {best.number}: val/macro_f1 = {best.value:.4f}" in text
    assert f"--model.sigma={best.params['model.sigma']}" in text
    assert "trials (3: 3 complete)" in text
    # Trial values are the best epoch's objective; every epoch was reported.
    for t in study.trials:
        assert len(t.intermediate_values) == 2
        assert t.value == max(t.intermediate_values.values())
    table = pd.read_csv(out / "trials.csv")
    assert table["number"].tolist() == [0, 1, 2]
    assert set(table["state"]) == {"COMPLETE"}
    assert {"value", "duration_s", "model.margin", "model.sigma", "model.n_centers"} <= set(table)
    # best.yaml: self-contained, the best values and the overrides applied.
    config = yaml.safe_load((out / "best.yaml").read_text())
    assert "extends" not in config
    assert config["model"]["sigma"] == best.params["model.sigma"]
    assert config["model"]["margin"] == best.params["model.margin"]
    assert config["model"]["n_centers"] == best.params["model.n_centers"]
    assert config["data"]["val_fraction"] == 0.1
    assert config["data"]["data_dir"] == str(fake_fmnist_dir)
    assert config["trainer"]["limit_train_batches"] == 4
    args = ["fit", "--config", str(out / "best.yaml"), "--trainer.max_epochs=1"]
    assert cli.main([*args, f"--trainer.default_root_dir={tmp_path}"]) == 0


@pytest.mark.slow
def test_second_invocation_continues_the_study(search, tiny_config, fake_fmnist_dir, tmp_path):
    _, first, _ = search
    out = tmp_path / "out"
    shutil.copytree(first, out)
    args = ["--config", str(tiny_config), "--out", str(out), "--study", "s"]
    # Another objective on the same study is refused before any trial runs.
    assert tune.main([*args, "--trials", "1", "--objective", "acc"]) == 2
    assert tune.main([*args, "--trials", "1", *_fit_overrides(fake_fmnist_dir)]) == 0
    trials = _study(out, "s").trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert trials[3].state == optuna.trial.TrialState.COMPLETE
    assert trials[3].params not in [t.params for t in trials[:3]]  # no replayed draw
    assert len(pd.read_csv(out / "trials.csv")) == 4
    # --total-trials reaches a total rather than adding.
    assert tune.main([*args, "--total-trials", "4", *_fit_overrides(fake_fmnist_dir)]) == 0
    assert len(_study(out, "s").trials) == 4


@pytest.mark.slow
def test_pruning_stops_a_bad_trial_early(tiny_config, fake_fmnist_dir, tmp_path):
    """A good trial, then one whose sigma makes every affinity exp(-d/1e-3) == 0: it always
    predicts class 0 (accuracy ~1/35 against a majority class's ~6/35), so the median pruner,
    allowed to start after one trial, stops it after its first epoch."""
    out = tmp_path / "out"
    out.mkdir()
    space = tmp_path / "space.yaml"
    space.write_text("model.sigma: {type: float, low: 1.0e-4, high: 100, log: true}\n")
    storage = f"sqlite:///{out / 'tune.db'}"
    study = optuna.create_study(study_name="p", storage=storage, direction="maximize")
    study.enqueue_trial({"model.sigma": 20.0})
    study.enqueue_trial({"model.sigma": 1e-3})
    args = ["--config", str(tiny_config), "--trials", "2", "--out", str(out), "--study", "p"]
    args += ["--space", str(space), "--objective", "acc", "--n-startup-trials", "1"]
    max_epochs = 3
    args += ["--storage", storage, f"--trainer.max_epochs={max_epochs}"]
    assert tune.main(args + _fit_overrides(fake_fmnist_dir)) == 0
    good, bad = _study(out, "p").trials
    assert good.state == optuna.trial.TrialState.COMPLETE
    assert len(good.intermediate_values) == max_epochs
    assert bad.state == optuna.trial.TrialState.PRUNED
    assert len(bad.intermediate_values) < max_epochs
    assert bad.value < min(good.intermediate_values.values())
    table = pd.read_csv(out / "trials.csv")
    assert table.loc[table["number"] == 1, "state"].item() == "PRUNED"
