"""Tests for aff_lightning.experiments.grid.

Fast tests drive the scheduler in-process with a fake ``train`` (no torch); the slow ones run a
tiny real grid (fake CIFAR-10, cnn3, one short epoch, 2 k x 2 heads x 2 seeds = 8 runs) with
worker processes sharing one SQLite study, one of them killed mid-run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from aff_lightning.experiments import grid
from aff_lightning.experiments.grid import GridError, GridSpec, RunKey, head_args, main, run_grid
from aff_lightning.experiments.report import REQUIRED_COLUMNS, load_runs

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
AXES = ["--conditions", "baseline", "--minority-counts", "10", "5"]
AXES += ["--heads", "softmax", "affinity-m1", "--seeds", "2"]


def make_spec(out: Path, **kwargs: Any) -> GridSpec:
    values: dict[str, Any] = {
        "conditions": ("baseline",),
        "minority_counts": (10, 5),
        "heads": ("softmax", "affinity-m1"),
        "seeds": (0, 1),
        "out": out,
        "config_dir": CONFIGS,
    }
    return GridSpec(**{**values, **kwargs})


class FakeTrain:
    """Stands in for a training run: metrics derived from the key, calls counted."""

    def __init__(self, fail: set[str] | None = None, exit_on: set[str] | None = None) -> None:
        self.calls: list[str] = []
        self.fail = fail or set()
        self.exit_on = exit_on or set()

    def __call__(self, key: RunKey, args: list[str], spec: GridSpec) -> dict[str, Any]:
        self.calls.append(key.name)
        if key.name in self.fail:
            raise RuntimeError(f"boom in {key.name}")
        if key.name in self.exit_on:
            raise SystemExit(2)
        assert f"--data.minority_count={key.minority_count}" in args
        assert f"--seed_everything={key.seed}" in args and f"--data.seed={key.seed}" in args
        acc = 0.5 + 0.125 * key.seed + (0.125 if key.head != "softmax" else 0.0)
        return {
            "acc": acc,
            "micro_f1": acc,
            "macro_f1": acc - 0.25,
            "balanced_acc": acc,
            "minority_acc": acc,
            "majority_acc": acc,
            "selected_epoch": 0,
            "selection": spec.selection,
            "selection_metric": "macro_f1",
            "f1_metric": "macro",
            "epochs": 1,
            "wall_seconds": 0.5,
            "log_dir": None,
            "config": {"model": {"head": key.head}},
            "history": {"epoch": [0.0], "test/macro_f1": [acc - 0.25]},
        }


def _storage_url(out: Path) -> str:
    return f"sqlite:///{out / 'grid.db'}"


def _load(out: Path, study: str) -> Any:
    import optuna

    storage = optuna.storages.RDBStorage(
        _storage_url(out), engine_kwargs={"connect_args": {"timeout": 60}}
    )
    return optuna.load_study(study_name=study, storage=storage)


def _states_by_key(study: Any) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {}
    for t in study.get_trials(deepcopy=False):
        out.setdefault(t.user_attrs["run_key"], Counter())[t.state.name] += 1
    return out


def _check_complete(out: Path, study_name: str, n_runs: int = 8) -> pd.DataFrame:
    """runs.csv has one row per run and the study one COMPLETE trial per run."""
    runs = load_runs(out / "runs.csv")  # also rejects duplicate runs
    assert len(runs) == n_runs
    keys = runs[["condition", "minority_count", "head", "seed"]].apply(tuple, axis=1)
    assert keys.is_unique
    states = _states_by_key(_load(out, study_name))
    assert len(states) == n_runs
    assert all(c["COMPLETE"] == 1 for c in states.values()), states
    return runs


# --------------------------------------------------------------------------------------------
# The grid's runs and their arguments
# --------------------------------------------------------------------------------------------


def test_head_args() -> None:
    assert head_args("softmax") == ["--model.head=softmax"]
    assert head_args("affinity-m5") == ["--model.head=affinity", "--model.n_centers=5"]
    assert head_args("joint-m1") == ["--model.head=joint", "--model.n_centers=1"]
    # In the joint condition the affinity columns train the joint head, as the reference did.
    assert head_args("affinity-m5", "joint") == ["--model.head=joint", "--model.n_centers=5"]
    assert head_args("softmax", "joint") == ["--model.head=softmax"]


@pytest.mark.parametrize("head", ["affinity", "affinity-m0", "softmax-m1", "joint-mx", "m5"])
def test_bad_head_is_an_error(head: str) -> None:
    with pytest.raises(GridError, match=rf"unknown head '{head}'; expected 'softmax', 'affin"):
        head_args(head)


def test_runs_and_fit_args(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, overrides=("--trainer.max_epochs=1",))
    runs = spec.runs()
    assert len(runs) == 8 and len({r.name for r in runs}) == 8
    assert runs[0] == RunKey("baseline", 10, "softmax", 0)
    assert runs[0].name == "baseline/k10/softmax/seed0"
    args = spec.fit_args(RunKey("baseline", 5, "affinity-m1", 1))
    assert args[:2] == ["--config", str(CONFIGS / "baseline.yaml")]
    for expected in (
        "--data.minority_count=5",
        "--model.head=affinity",
        "--model.n_centers=1",
        "--seed_everything=1",
        "--data.seed=1",
        f"--trainer.default_root_dir={tmp_path / 'runs' / 'baseline/k5/affinity-m1/seed1'}",
    ):
        assert expected in args
    assert args[-1] == "--trainer.max_epochs=1"  # user overrides come last
    assert not any(a.startswith("--data.val_fraction") for a in args)
    joint = make_spec(tmp_path, conditions=("joint",)).fit_args(
        RunKey("joint", 5, "affinity-m5", 0)
    )
    assert "--model.head=joint" in joint and "--model.n_centers=5" in joint


def test_best_val_adds_a_validation_split_unless_overridden(tmp_path: Path) -> None:
    key = RunKey("baseline", 10, "softmax", 0)
    assert "--data.val_fraction=0.1" in make_spec(tmp_path, selection="best_val").fit_args(key)
    spec = make_spec(tmp_path, selection="best_val", overrides=("--data.val_fraction=0.25",))
    assert [a for a in spec.fit_args(key) if "val_fraction" in a] == ["--data.val_fraction=0.25"]


def test_study_name_depends_on_overrides_not_axes(tmp_path: Path) -> None:
    a = make_spec(tmp_path).default_study_name()
    assert a == make_spec(tmp_path / "x", seeds=(0, 1, 2, 3)).default_study_name()
    assert a != make_spec(tmp_path, overrides=("--trainer.max_epochs=1",)).default_study_name()
    assert a != make_spec(tmp_path, selection="last").default_study_name()


def test_bad_spec_values(tmp_path: Path) -> None:
    with pytest.raises(GridError, match=r"unknown condition\(s\) \['nope'\]; known .*baseline"):
        make_spec(tmp_path, conditions=("baseline", "nope"))
    with pytest.raises(GridError, match="minority counts must be integers >= 1"):
        make_spec(tmp_path, minority_counts=(10, 0))
    with pytest.raises(GridError, match="selection must be one of"):
        make_spec(tmp_path, selection="best")
    with pytest.raises(GridError, match="config folder not found"):
        make_spec(tmp_path, config_dir=tmp_path / "missing")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--conditions", "nope"], "error: unknown condition(s) ['nope']; known conditions"),
        (["--heads", "softmax", "affinity-mx"], "error: unknown head 'affinity-mx'"),
        (["--data.minority_count=3"], "sets what the grid sets per run"),
        (["--", "--seed_everything=3"], "sets what the grid sets per run"),
        (["--trainer.default_root_dir", "x"], "sets what the grid sets per run"),
        (["--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["--first-seed", "-1"], "--first-seed must be >= 0"),
        (["--heartbeat-seconds", "0"], "heartbeat seconds must be an integer >= 1"),
        (["--heartbeat-seconds", "5", "--grace-seconds", "5"], "grace seconds must be >"),
        (["--storage", "nosuchdb://x/y"], "error: cannot open the study storage nosuchdb://"),
        (["--selection", "best"], "invalid choice: 'best'"),
        (["-x"], "unknown argument(s) ['-x']"),
    ],
)
def test_main_bad_input_returns_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    base = ["--conditions", "baseline", "--out", str(tmp_path / "out")]
    assert main([*base, *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_dry_run_lists_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main([*AXES, "--out", str(tmp_path), "--dry-run", "--", "--trainer.max_epochs=1"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 9 and lines[-1].startswith("8 runs; study 'grid-")
    assert lines[0].startswith("baseline/k10/softmax/seed0 --config ")
    assert lines[0].endswith("--trainer.max_epochs=1")
    assert not (tmp_path / "grid.db").exists()


def test_cli_dispatches_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aff_lightning.cli import main as cli_main

    assert cli_main(["grid", *AXES, "--out", str(tmp_path), "--dry-run"]) == 0
    assert "8 runs" in capsys.readouterr().out


def test_runs_columns_cover_the_report() -> None:
    assert set(REQUIRED_COLUMNS) <= set(grid.RUNS_COLUMNS)
    assert "f1_metric" in grid.RUNS_COLUMNS


# --------------------------------------------------------------------------------------------
# Scheduling, in-process with a fake train
# --------------------------------------------------------------------------------------------


def test_grid_runs_each_run_once_and_writes_runs_and_report(tmp_path: Path) -> None:
    train = FakeTrain()
    spec = make_spec(tmp_path)
    assert run_grid(spec, study_name="s", heartbeat_seconds=1, train=train) == 0
    assert sorted(train.calls) == sorted(k.name for k in spec.runs())
    runs = _check_complete(tmp_path, "s")
    assert set(runs["selection"]) == {"best_test"} and set(runs["f1_metric"]) == {"macro"}
    assert runs.loc[runs["head"] == "affinity-m1", "acc"].tolist() == [0.625, 0.75, 0.625, 0.75]
    for name in ("report.md", "summary.csv", "totals.csv", "f1_vs_k.png"):
        assert (tmp_path / name).is_file(), name
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert (summary["diff_acc_median"] == 0.125).all()
    # A finished grid is never rerun: a second start only rewrites runs.csv and the report.
    again = FakeTrain()
    assert run_grid(spec, study_name="s", heartbeat_seconds=1, train=again) == 0
    assert again.calls == []
    # A bigger grid reuses the finished runs.
    bigger = FakeTrain()
    spec3 = make_spec(tmp_path, seeds=(0, 1, 2))
    assert run_grid(spec3, study_name="s", heartbeat_seconds=1, train=bigger) == 0
    assert sorted(bigger.calls) == sorted(k.name for k in spec3.runs() if k.seed == 2)
    _check_complete(tmp_path, "s", n_runs=12)


def test_duplicate_trials_are_skipped(tmp_path: Path) -> None:
    import optuna

    spec = make_spec(tmp_path)
    storage = grid.open_storage(_storage_url(tmp_path), 1, 2)
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    for key in spec.runs():  # two workers that queued the same runs at the same moment
        study.enqueue_trial({}, user_attrs=key.attrs())
        study.enqueue_trial({}, user_attrs=key.attrs())
    train = FakeTrain()
    assert run_grid(spec, study_name="s", heartbeat_seconds=1, train=train) == 0
    assert sorted(train.calls) == sorted(k.name for k in spec.runs())  # each trained once
    _check_complete(tmp_path, "s")
    pruned = [t for t in _load(tmp_path, "s").get_trials() if t.state.name == "PRUNED"]
    assert len(pruned) == 8 and all("duplicate_of" in t.user_attrs for t in pruned)
    assert not [t for t in _load(tmp_path, "s").get_trials() if t.state.name == "WAITING"]


def test_failed_run_stops_the_worker_and_is_retried(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    bad = "baseline/k10/affinity-m1/seed0"
    train = FakeTrain(fail={bad})
    assert run_grid(spec, study_name="s", heartbeat_seconds=1, train=train) == 1
    assert train.calls[-1] == bad
    failed = [t for t in _load(tmp_path, "s").get_trials() if t.state.name == "FAIL"]
    assert len(failed) == 1 and "boom in" in failed[0].user_attrs["error"]
    assert len(pd.read_csv(tmp_path / "runs.csv")) == len(train.calls) - 1  # finished ones
    # Started again, the worker retries the failed run and finishes the grid.
    train2 = FakeTrain()
    assert run_grid(spec, study_name="s", heartbeat_seconds=1, train=train2) == 0
    finished = set(train.calls) - {bad}
    assert sorted(train2.calls) == sorted(k.name for k in spec.runs() if k.name not in finished)
    _check_complete(tmp_path, "s")
    retried = [
        t
        for t in _load(tmp_path, "s").get_trials()
        if t.state.name == "COMPLETE" and t.user_attrs["run_key"] == bad
    ]
    assert retried[0].user_attrs["retry_of"] == [failed[0].number]


def test_rejected_fit_arguments_are_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = "baseline/k10/softmax/seed0"
    assert run_grid(make_spec(tmp_path), study_name="s", train=FakeTrain(exit_on={key})) == 1
    assert "the fit arguments were rejected (exit status 2)" in capsys.readouterr().out


def test_stale_trial_of_a_dead_worker_is_retried(tmp_path: Path) -> None:
    import optuna

    spec = make_spec(tmp_path)
    storage = grid.open_storage(_storage_url(tmp_path), 1, 2)
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    stale = spec.runs()[3]
    study.enqueue_trial({}, user_attrs=stale.attrs())
    # A worker claimed it, beat once and died.
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name("s"), 0
    )
    assert storage.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING)
    storage.record_heartbeat(trial_id)
    storage.set_trial_user_attr(trial_id, "worker", "elsewhere:1")
    train = FakeTrain()
    start = time.monotonic()
    assert run_grid(spec, study_name="s", heartbeat_seconds=1, grace_seconds=2, train=train) == 0
    assert time.monotonic() - start < 60
    assert sorted(train.calls) == sorted(k.name for k in spec.runs())
    assert train.calls[-1] == stale.name  # retried once its heartbeat went stale
    _check_complete(tmp_path, "s")
    assert _states_by_key(_load(tmp_path, "s"))[stale.name]["FAIL"] == 1


# --------------------------------------------------------------------------------------------
# A tiny real grid with worker processes sharing one SQLite study
# --------------------------------------------------------------------------------------------


def _worker_command(out: Path, data_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "aff_lightning.experiments.grid",
        *AXES,
        "--out",
        str(out),
        "--study",
        "tiny",
        "--heartbeat-seconds",
        "1",
        "--grace-seconds",
        "3",
        f"--data.data_dir={data_dir}",
        "--data.batch_size=16",
        "--model.backbone=cnn3",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",
        "--trainer.log_every_n_steps=1",
    ]


def _start(command: list[str], log: Path, cwd: Path, **env_vars: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "GRID_TEST_PAUSE"}
    env.update(PYTHONUNBUFFERED="1", **env_vars)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(cwd), env.get("PYTHONPATH")) if p)
    with log.open("wb") as f:
        return subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env)


def _wait(proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"worker timed out; log:\n{log.read_text()[-3000:]}") from None
    assert code == 0, f"worker exited {code}; log:\n{log.read_text()[-3000:]}"


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(fake_cifar_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid"
    command = _worker_command(out, fake_cifar_dir)
    logs = [tmp_path / "worker0.log", tmp_path / "worker1.log"]
    procs = [_start(command, log, tmp_path) for log in logs]
    for proc, log in zip(procs, logs, strict=True):
        _wait(proc, log)
    texts = [log.read_text() for log in logs]
    # Every run was trained exactly once over both workers.
    done = [line for t in texts for line in t.splitlines() if "] done " in line]
    assert len(done) == 8, "\n".join(done)
    for text in texts:
        assert "all 8 runs of the grid are complete" in text
    runs = _check_complete(out, "tiny")
    assert set(runs["epochs"]) == {1}
    assert (out / "report.md").is_file()


# Importable by the worker (its cwd is on sys.path): with GRID_TEST_PAUSE set, the worker's
# second run writes that file and sleeps inside training, so the test kills it mid-run.
PAUSE_CALLBACK = """
import os, time
from pathlib import Path
from lightning.pytorch.callbacks import Callback

FITS = 0


class PauseSecondRun(Callback):
    def on_train_start(self, trainer, pl_module):
        global FITS
        FITS += 1
        marker = os.environ.get("GRID_TEST_PAUSE")
        if marker and FITS == 2:
            Path(marker).write_text(str(os.getpid()))
            time.sleep(300)
"""


@pytest.mark.slow
def test_killed_worker_is_restarted_and_finishes(fake_cifar_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "grid_pause.py").write_text(PAUSE_CALLBACK)
    out = tmp_path / "grid"
    command = [
        *_worker_command(out, fake_cifar_dir),
        "--trainer.callbacks+=grid_pause.PauseSecondRun",
    ]
    marker = tmp_path / "paused"
    first = _start(command, tmp_path / "first.log", tmp_path, GRID_TEST_PAUSE=str(marker))
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the worker never started its second run"
            time.sleep(0.2)
        running = [t for t in _load(out, "tiny").get_trials() if t.state.name == "RUNNING"]
        assert len(running) == 1 and running[0].user_attrs["worker"].endswith(f":{first.pid}")
        killed = running[0]
    finally:
        first.send_signal(signal.SIGKILL)  # mid-run: inside its second training
        first.wait()
    study = _load(out, "tiny")
    assert study.get_trials()[killed.number].state.name == "RUNNING"  # left behind
    assert sum(t.state.name == "COMPLETE" for t in study.get_trials()) == 1
    second = _start(command, tmp_path / "second.log", tmp_path)
    _wait(second, tmp_path / "second.log")
    assert (
        f"retry {killed.user_attrs['run_key']} after failed trial(s) [{killed.number}]"
        in (tmp_path / "second.log").read_text()
    )
    runs = _check_complete(out, "tiny")
    key = killed.user_attrs["run_key"]
    states = _states_by_key(_load(out, "tiny"))[key]
    assert states["FAIL"] == 1 and states["COMPLETE"] == 1, states
    names = [
        RunKey(r.condition, r.minority_count, r.head, r.seed).name
        for r in runs.itertuples(index=False)
    ]
    row = runs[[n == key for n in names]]
    assert len(row) == 1 and int(row["trial"].iloc[0]) != killed.number
    retried = _load(out, "tiny").get_trials()[int(row["trial"].iloc[0])]
    assert retried.user_attrs["retry_of"] == [killed.number]
