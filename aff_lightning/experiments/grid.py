"""The seed grid of the reference study: conditions x minority counts x heads x seeds.

``python cli.py grid --conditions baseline cnn3 --minority-counts 500 200 100 50 20 10
--heads softmax affinity-m1 affinity-m5 --seeds 5 --out runs/grid [FIT OVERRIDES]``

Each run is one ``fit`` of a condition's config file (``configs/<condition>.yaml``) with
``--data.minority_count=k``, the head's arguments and ``--seed_everything=seed
--data.seed=seed`` (a seed fixes the initialisation, the data order and the validation split,
so a seed is a full replicate), plus the user's fit overrides (any ``--x.y=z`` argument the grid
does not know, or everything after ``--``). The defaults are the reference grid: its ten
conditions, k in {500, 200, 100, 50, 20, 10}, softmax / affinity m=1 / affinity m=5, five
seeds: 900 runs.

Scheduling goes through an Optuna study in a database (SQLite ``OUT/grid.db`` by default, or
any SQLAlchemy URL with ``--storage``, e.g. PostgreSQL shared by several machines each running
the same command). Every worker:

1. adds a WAITING trial for each run of its grid that has no WAITING, RUNNING or COMPLETE trial
   (a first start, a run whose worker died, a run that raised);
2. claims a WAITING trial (WAITING -> RUNNING is atomic: row locks on server databases, and
   ``BEGIN IMMEDIATE`` transactions on SQLite), heartbeats it from a thread, trains, and tells
   it COMPLETE with the selected metrics, the run's config, epochs, wall seconds and a compact
   per-epoch history as user attributes;
3. fails the RUNNING trials whose heartbeat is older than the grace period (a killed worker:
   Optuna's ``fail_stale_trials``), which step 1 then re-adds;
4. stops when every run of its grid has a COMPLETE trial, writes ``OUT/runs.csv`` (one row per
   run, the earliest COMPLETE trial if there were ever two) and the report.

Duplicate trials of a run (two workers adding the same missing run at once) are harmless: a
claimed trial is skipped, and told PRUNED with ``duplicate_of``, when its run already has a
COMPLETE trial or a WAITING/RUNNING trial with a lower number. A run that raises is told FAIL
with the error and stops its worker (exit status 1; start it again to retry).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import random
import re
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from aff_lightning.experiments.report import SELECTION_RULES

__all__ = [
    "DEFAULT_CONDITIONS",
    "DEFAULT_HEADS",
    "DEFAULT_MINORITY_COUNTS",
    "RUNS_COLUMNS",
    "GridError",
    "GridSpec",
    "RunKey",
    "default_config_dir",
    "head_args",
    "known_conditions",
    "main",
    "run_grid",
    "runs_table",
]

DEFAULT_CONDITIONS = (
    "long_training",
    "mobilenet",
    "resnet50",
    "cnn3",
    "batch128",
    "no_bn",
    "joint",
    "augment",
    "microf1",
    "da_microf1",
)
"""The reference study's ten conditions (each a config file extending baseline.yaml)."""

DEFAULT_MINORITY_COUNTS = (500, 200, 100, 50, 20, 10)
DEFAULT_HEADS = ("softmax", "affinity-m1", "affinity-m5")
SELECTIONS = SELECTION_RULES  # one definition, in the torch-free report module
DEFAULT_VAL_FRACTION = 0.1  # added for --selection best_val unless the overrides set one

RUNS_COLUMNS = (
    "condition",
    "minority_count",
    "head",
    "seed",
    "acc",
    "micro_f1",
    "macro_f1",
    "balanced_acc",
    "minority_acc",
    "majority_acc",
    "selection",
    "selection_metric",
    "f1_metric",
    "selected_epoch",
    "epochs",
    "wall_seconds",
    "trial",
    "worker",
    "log_dir",
)
"""Columns of ``runs.csv``, in order (report.py reads the first ten it needs)."""

# Fit arguments the grid sets per run; overriding them would mislabel every run.
_GRID_KEYS = (
    "config",
    "data.minority_count",
    "model.head",
    "model.n_centers",
    "seed_everything",
    "data.seed",
    "trainer.default_root_dir",
)
_HEAD_RE = re.compile(r"^(affinity|joint)-m([0-9]+)$")
_KEY_ATTR = "run_key"


class GridError(ValueError):
    """Bad grid input (unknown condition or head, bad overrides, ...), reported as one line."""


# --------------------------------------------------------------------------------------------
# The grid: runs and their fit arguments
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class RunKey:
    """One run of the grid."""

    condition: str
    minority_count: int
    head: str
    seed: int

    @property
    def name(self) -> str:
        """``condition/k<k>/<head>/seed<s>``: the run's id in the study and its folder."""
        return f"{self.condition}/k{self.minority_count}/{self.head}/seed{self.seed}"

    def attrs(self) -> dict[str, Any]:
        return {
            _KEY_ATTR: self.name,
            "condition": self.condition,
            "minority_count": self.minority_count,
            "head": self.head,
            "seed": self.seed,
        }


def default_config_dir() -> Path:
    """The repository's ``configs/`` next to the package, else ``./configs``."""
    here = Path(__file__).resolve().parents[2] / "configs"
    return here if here.is_dir() else Path("configs")


def known_conditions(config_dir: str | Path) -> list[str]:
    """Condition names: the ``*.yaml`` files of ``config_dir``, without the suffix, sorted."""
    config_dir = Path(config_dir)
    if not config_dir.is_dir():
        raise GridError(f"config folder not found: {config_dir} (set it with --config-dir)")
    return sorted(p.stem for p in config_dir.glob("*.yaml"))


def _condition_config(path: Path) -> dict[str, Any]:
    """The merged config of a condition file (its ``extends`` chain applied in order)."""
    from aff_lightning.cli import _load_config

    merged: dict[str, Any] = {}

    def merge(into: dict[str, Any], new: dict[str, Any]) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    for text in _load_config(path):
        merge(merged, yaml.safe_load(text) or {})
    return merged


def parse_head(head: str) -> tuple[str, int | None]:
    """``"softmax"`` -> ("softmax", None); ``"affinity-m5"`` -> ("affinity", 5); joint-mN too."""
    if head == "softmax":
        return "softmax", None
    match = _HEAD_RE.match(head) if isinstance(head, str) else None
    if match is None or int(match.group(2)) < 1:
        raise GridError(
            f"unknown head {head!r}; expected 'softmax', 'affinity-mN' or 'joint-mN' with "
            "N >= 1 centers per class (e.g. affinity-m5)"
        )
    return match.group(1), int(match.group(2))


def head_args(head: str, condition_head: str = "affinity") -> list[str]:
    """Fit arguments of a grid head.

    ``affinity-mN`` trains the condition's own affinity-family head with N centers: the
    affinity head, or the joint head in a condition whose config sets ``model.head: joint``
    (the reference's joint condition compares softmax with joint m=1 and m=5). ``joint-mN``
    always trains the joint head, ``softmax`` the softmax head.

    Args:
        head: "softmax", "affinity-mN" or "joint-mN".
        condition_head: ``model.head`` of the condition's config.
    """
    kind, n = parse_head(head)
    if kind == "softmax":
        return ["--model.head=softmax"]
    if kind == "affinity" and condition_head == "joint":
        kind = "joint"
    return [f"--model.head={kind}", f"--model.n_centers={n}"]


def _override_name(arg: str) -> str | None:
    if not arg.startswith("--"):
        return None
    return arg[2:].split("=", 1)[0]


def check_overrides(overrides: Sequence[str]) -> list[str]:
    """The user's fit overrides, refusing those the grid sets per run."""
    out = [str(a) for a in overrides]
    for arg in out:
        name = _override_name(arg)
        if name in _GRID_KEYS or arg in ("-c",):
            raise GridError(
                f"fit override {arg!r} sets what the grid sets per run ({', '.join(_GRID_KEYS)}); "
                "use --conditions, --minority-counts, --heads, --seeds and --out instead"
            )
    return out


@dataclass(frozen=True)
class GridSpec:
    """What to run: the grid's axes, the epoch-selection rule and the fit overrides."""

    conditions: tuple[str, ...]
    minority_counts: tuple[int, ...]
    heads: tuple[str, ...]
    seeds: tuple[int, ...]
    out: Path
    selection: str = "best_test"
    overrides: tuple[str, ...] = ()
    config_dir: Path = Path("configs")

    def __post_init__(self) -> None:
        known = known_conditions(self.config_dir)
        unknown = [c for c in self.conditions if c not in known]
        if unknown:
            raise GridError(
                f"unknown condition(s) {unknown}; known conditions (config files in "
                f"{self.config_dir}): {', '.join(known)}"
            )
        if not self.conditions:
            raise GridError("--conditions must name at least one condition")
        for head in self.heads:
            parse_head(head)
        if not self.heads:
            raise GridError("--heads must name at least one head")
        bad = [k for k in self.minority_counts if isinstance(k, bool) or k < 1]
        if bad or not self.minority_counts:
            raise GridError(
                f"minority counts must be integers >= 1, got {list(self.minority_counts)}"
            )
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise GridError(f"seeds must be integers >= 0, got {list(self.seeds)}")
        if self.selection not in SELECTIONS:
            raise GridError(f"selection must be one of {list(SELECTIONS)}, got {self.selection!r}")
        check_overrides(self.overrides)

    def runs(self) -> list[RunKey]:
        """Every run, condition by condition, k descending as given, head, then seed."""
        return [
            RunKey(c, k, h, s)
            for c in self.conditions
            for k in self.minority_counts
            for h in self.heads
            for s in self.seeds
        ]

    def config_path(self, condition: str) -> Path:
        return self.config_dir / f"{condition}.yaml"

    def fit_args(self, key: RunKey) -> list[str]:
        """The ``fit`` arguments of one run (see :func:`aff_lightning.experiments.runner`)."""
        from aff_lightning.experiments.runner import fit_args

        path = self.config_path(key.condition)
        condition_head = str(_condition_config(path).get("model", {}).get("head", "affinity"))
        args = [
            f"--data.minority_count={key.minority_count}",
            *head_args(key.head, condition_head),
            f"--seed_everything={key.seed}",
            f"--data.seed={key.seed}",
            f"--trainer.default_root_dir={self.out / 'runs' / key.name}",
            "--trainer.enable_progress_bar=false",
            # 900 runs of checkpoints would be tens of GB; the metrics are what the grid keeps.
            # A user override (--trainer.enable_checkpointing=true) comes later and wins.
            "--trainer.enable_checkpointing=false",
        ]
        if self.selection == "best_val" and not any(
            _override_name(o) == "data.val_fraction" for o in self.overrides
        ):
            args.append(f"--data.val_fraction={DEFAULT_VAL_FRACTION}")
        return fit_args(path, [*args, *self.overrides])

    def default_study_name(self) -> str:
        """``grid-<hash>`` of the selection rule and the fit overrides.

        The grid's axes are not part of it, so a bigger grid (more seeds, conditions, ...)
        reuses the finished runs of a smaller one; different overrides give another study.
        """
        blob = json.dumps({"selection": self.selection, "overrides": list(self.overrides)})
        return "grid-" + hashlib.sha1(blob.encode()).hexdigest()[:10]


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


def _serialize_sqlite(engine: Any) -> None:
    """Make every SQLite transaction ``BEGIN IMMEDIATE``, so a read-then-write is atomic.

    pysqlite starts transactions at the first write, so two processes could both read a
    WAITING trial and both claim it; SELECT ... FOR UPDATE, which Optuna relies on, is a no-op
    on SQLite. Taking the write lock at BEGIN serialises the claim (SQLAlchemy's documented
    recipe for pysqlite transactions).
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy, not the driver, begins

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # pooled connections predate the listeners


def open_storage(url: str, heartbeat_seconds: int, grace_seconds: int) -> Any:
    """An Optuna ``RDBStorage`` with heartbeats; SQLite waits up to 60 s for its lock."""
    import optuna
    from sqlalchemy.exc import ArgumentError, DatabaseError

    sqlite = url.startswith("sqlite")
    kwargs = {"connect_args": {"timeout": 60}} if sqlite else {}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=kwargs,
                    heartbeat_interval=heartbeat_seconds,
                    grace_period=grace_seconds,
                )
            break
        except DatabaseError as exc:  # e.g. workers creating the tables at the same moment
            if attempt == 4:
                raise GridError(f"cannot open the study storage {_safe_url(url)}: {exc}") from exc
            time.sleep(0.5 + random.random())
        except (ImportError, ValueError, ArgumentError) as exc:  # no driver, malformed URL
            raise GridError(f"cannot open the study storage {_safe_url(url)}: {exc}") from exc
    if sqlite:
        _serialize_sqlite(storage.engine)
    return storage


def _retrying(fn: Callable[[], Any], what: str, attempts: int = 5) -> Any:
    from sqlalchemy.exc import DatabaseError

    for attempt in range(attempts):
        try:
            return fn()
        except DatabaseError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError(what)  # unreachable


# --------------------------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"[grid {_worker_id()}] {message}", flush=True)


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Heartbeat:
    """Records a trial's heartbeat every ``interval`` seconds from a daemon thread."""

    def __init__(self, storage: Any, trial_id: int, interval: float) -> None:
        self._storage, self._trial_id, self._interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="grid-heartbeat")

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            with contextlib.suppress(Exception):  # a busy database: try again next beat
                self._storage.record_heartbeat(self._trial_id)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _by_key(trials: Iterable[Any], names: set[str] | None = None) -> dict[str, list[Any]]:
    """Trials grouped by their run name (only names in ``names`` when given), by number."""
    out: dict[str, list[Any]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        name = t.user_attrs.get(_KEY_ATTR)
        if name is not None and (names is None or name in names):
            out.setdefault(name, []).append(t)
    return out


class _Worker:
    def __init__(
        self,
        spec: GridSpec,
        storage: Any,
        study_name: str,
        heartbeat_seconds: int,
        grace_seconds: int,
        run: Callable[[RunKey, list[str], Any], dict[str, Any]],
    ) -> None:
        import optuna

        self.spec, self.storage, self.study_name = spec, storage, study_name
        self.heartbeat, self.grace = heartbeat_seconds, grace_seconds
        self.run = run
        self.keys = {k.name: k for k in spec.runs()}
        self.study = _retrying(
            lambda: optuna.create_study(
                storage=storage,
                study_name=study_name,
                direction="maximize",
                sampler=optuna.samplers.RandomSampler(seed=0),
                load_if_exists=True,
            ),
            "create study",
        )
        self.study_id = storage.get_study_id_from_name(study_name)

    # ---------------------------------------------------------------- bookkeeping
    def trials(self) -> dict[str, list[Any]]:
        return _by_key(self.study.get_trials(deepcopy=False), set(self.keys))

    def enqueue_missing(self, trials: dict[str, list[Any]]) -> int:
        """Add a WAITING trial for each run without a WAITING/RUNNING/COMPLETE one."""
        from optuna.trial import TrialState

        live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
        added = 0
        for name, key in self.keys.items():
            mine = trials.get(name, [])
            if any(t.state in live for t in mine):
                continue
            attrs = key.attrs()
            failed = [t.number for t in mine if t.state == TrialState.FAIL]
            if failed:
                attrs["retry_of"] = failed
                _log(f"retry {name} after failed trial(s) {failed}")
            self.study.enqueue_trial({}, user_attrs=attrs)
            added += 1
        return added

    def fail_orphans(self, trials: dict[str, list[Any]]) -> None:
        """Fail RUNNING trials claimed by a worker that died before its first heartbeat."""
        from optuna.trial import TrialState

        limit = max(self.grace, 60)
        now = datetime.now()
        for mine in trials.values():
            for t in mine:
                if t.state != TrialState.RUNNING or "worker" in t.user_attrs:
                    continue
                if t.datetime_start and (now - t.datetime_start).total_seconds() > limit:
                    tid = self.storage.get_trial_id_from_study_id_trial_number(
                        self.study_id, t.number
                    )
                    with contextlib.suppress(RuntimeError):
                        self.storage.set_trial_state_values(tid, TrialState.FAIL)

    def claim(self, trials: dict[str, list[Any]]) -> tuple[int, int, RunKey] | None:
        """Atomically move one WAITING trial of this grid to RUNNING: (id, number, key)."""
        from optuna.trial import TrialState

        waiting = sorted(
            (t for mine in trials.values() for t in mine if t.state == TrialState.WAITING),
            key=lambda t: t.number,
        )
        for t in waiting:
            tid = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, t.number)
            try:
                if not self.storage.set_trial_state_values(tid, TrialState.RUNNING):
                    continue
            except RuntimeError:  # finished meanwhile
                continue
            self.storage.record_heartbeat(tid)
            self.storage.set_trial_user_attr(tid, "worker", _worker_id())
            return tid, t.number, self.keys[t.user_attrs[_KEY_ATTR]]
        return None

    def duplicate_of(self, number: int, key: RunKey) -> int | None:
        """A trial that makes trial ``number`` redundant: COMPLETE, or lower and not finished."""
        from optuna.trial import TrialState

        for t in self.trials().get(key.name, []):
            if t.number == number:
                continue
            if t.state == TrialState.COMPLETE:
                return t.number
            if t.state in (TrialState.WAITING, TrialState.RUNNING) and t.number < number:
                return t.number
        return None

    def prune_leftovers(self, trials: dict[str, list[Any]]) -> None:
        """Claim and prune the WAITING duplicates of finished runs, so none lingers."""
        from optuna.trial import TrialState

        for mine in trials.values():
            complete = [t.number for t in mine if t.state == TrialState.COMPLETE]
            for t in mine:
                if not complete or t.state != TrialState.WAITING:
                    continue
                tid = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, t.number)
                with contextlib.suppress(RuntimeError, ValueError):
                    if self.storage.set_trial_state_values(tid, TrialState.RUNNING):
                        self.storage.set_trial_user_attr(tid, "duplicate_of", complete[0])
                        self.study.tell(t.number, state=TrialState.PRUNED)

    # ---------------------------------------------------------------- running
    def tell(self, tid: int, attrs: dict[str, Any], number: int, value: float) -> bool:
        """Record a finished run on its trial; False if the trial was failed meanwhile."""
        try:
            for name, v in attrs.items():
                self.storage.set_trial_user_attr(tid, name, v)
            self.study.tell(number, value)
            return True
        except (RuntimeError, ValueError):  # failed as stale while this worker ran it
            return False

    def adopt(self, key: RunKey, attrs: dict[str, Any], value: float) -> int | None:
        """Put a result whose own trial was failed as stale on a fresh trial of its run.

        Skipped (None) when the run has a COMPLETE or RUNNING trial already: then someone
        else finishes it.
        """
        from optuna.trial import TrialState

        mine = self.trials().get(key.name, [])
        if any(t.state in (TrialState.COMPLETE, TrialState.RUNNING) for t in mine):
            return None
        if not any(t.state == TrialState.WAITING for t in mine):
            self.study.enqueue_trial({}, user_attrs=key.attrs())
        for t in self.trials().get(key.name, []):
            if t.state != TrialState.WAITING:
                continue
            tid = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, t.number)
            with contextlib.suppress(RuntimeError):
                if self.storage.set_trial_state_values(tid, TrialState.RUNNING):
                    self.storage.set_trial_user_attr(tid, "worker", _worker_id())
                    if self.tell(tid, attrs, t.number, value):
                        return t.number
        return None

    def run_one(self, tid: int, number: int, key: RunKey) -> bool:
        """Run a claimed trial; False if the run raised (the trial is told FAIL)."""
        from optuna.trial import TrialState

        with _Heartbeat(self.storage, tid, self.heartbeat):
            dup = self.duplicate_of(number, key)
            if dup is not None:
                with contextlib.suppress(RuntimeError, ValueError):  # failed as stale meanwhile
                    self.storage.set_trial_user_attr(tid, "duplicate_of", dup)
                    self.study.tell(number, state=TrialState.PRUNED)
                _log(f"skip {key.name}: trial {number} duplicates trial {dup}")
                return True
            _log(f"start {key.name} (trial {number})")
            try:
                attrs = self.run(key, self.spec.fit_args(key), self.spec)
            except (Exception, SystemExit) as exc:  # recorded on the trial; the worker stops
                message = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                if isinstance(exc, SystemExit):
                    message = f"the fit arguments were rejected (exit status {exc.code})"
                with contextlib.suppress(Exception):
                    self.storage.set_trial_user_attr(tid, "error", message)
                    self.study.tell(number, state=TrialState.FAIL)
                _log(f"FAILED {key.name} (trial {number}): {message}")
                return False
            value = float(attrs[attrs["selection_metric"]])
            told: int | None = number
            if not self.tell(tid, attrs, number, value):
                told = self.adopt(key, attrs, value)
        if told is None:
            _log(f"{key.name}: trial {number} was failed as stale and is rerun elsewhere")
            return True
        _log(
            f"done {key.name} (trial {told}): acc={attrs['acc']:.4f} "
            f"{attrs['f1_metric']}_f1={attrs[attrs['f1_metric'] + '_f1']:.4f} "
            f"{attrs['epochs']} epochs {attrs['wall_seconds']:.1f} s"
        )
        return True

    def loop(self, poll_seconds: float) -> bool:
        """Run until every run of the grid is COMPLETE (True) or one raised (False)."""
        import optuna
        from optuna.trial import TrialState

        waiting_msg = ""
        while True:
            with warnings.catch_warnings():  # "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)
            trials = self.trials()
            self.fail_orphans(trials)
            done = sum(
                any(t.state == TrialState.COMPLETE for t in trials.get(n, [])) for n in self.keys
            )
            if done == len(self.keys):
                _log(f"all {done} runs of the grid are complete")
                self.prune_leftovers(trials)
                return True
            added = self.enqueue_missing(trials)
            if added:
                _log(f"queued {added} run(s); {done}/{len(self.keys)} complete")
                trials = self.trials()
            claimed = self.claim(trials)
            if claimed is None:
                running = sum(
                    t.state == TrialState.RUNNING for mine in trials.values() for t in mine
                )
                msg = (
                    f"{done}/{len(self.keys)} complete, none waiting, {running} running in "
                    f"other workers; polling every {poll_seconds:g} s (a dead worker's run is "
                    f"retried {self.grace} s after its last heartbeat)"
                )
                if msg != waiting_msg:
                    _log(msg)
                    waiting_msg = msg
                time.sleep(poll_seconds)
                continue
            waiting_msg = ""
            if not self.run_one(*claimed):
                return False


def _train(key: RunKey, args: list[str], spec: GridSpec) -> dict[str, Any]:
    """Train one run and return the user attributes its trial records."""
    from aff_lightning.experiments.runner import run_fit, select_epoch

    result = run_fit(args)
    metric = str(result.config.get("model", {}).get("selection_metric") or "macro_f1")
    chosen = select_epoch(result.history, spec.selection, metric)
    history_keys = sorted({k for r in result.history for k in r})
    history = {k: [_round(r.get(k)) for r in result.history] for k in history_keys}
    attrs: dict[str, Any] = {
        **{m: v for m, v in chosen.items() if m != "epoch"},
        "selected_epoch": int(chosen["epoch"]),
        "selection": spec.selection,
        "selection_metric": metric,
        "f1_metric": "micro" if metric == "micro_f1" else "macro",
        "epochs": int(result.epochs),
        "wall_seconds": round(result.wall_seconds, 3),
        "log_dir": result.log_dir,
        "config": result.config,
        "history": history,  # column per metric: a few kB even for 250 epochs
    }
    if result.log_dir:
        with contextlib.suppress(OSError):
            Path(result.log_dir, "grid_result.json").write_text(
                json.dumps({**key.attrs(), **attrs}, indent=1) + "\n"
            )
    return attrs


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), 6)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def runs_table(study: Any, keys: Sequence[RunKey]) -> list[dict[str, Any]]:
    """One row per run of ``keys`` with a COMPLETE trial (the earliest), in ``keys`` order."""
    from optuna.trial import TrialState

    names = {k.name for k in keys}
    complete = _by_key(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), names)
    rows = []
    for key in keys:
        if key.name not in complete:
            continue
        t = complete[key.name][0]
        row = {**key.attrs(), **t.user_attrs, "trial": t.number}
        rows.append({c: row.get(c, "") for c in RUNS_COLUMNS})
    return rows


def write_runs_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write ``runs.csv`` atomically (several workers may finish at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(RUNS_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def run_grid(
    spec: GridSpec,
    storage_url: str | None = None,
    study_name: str | None = None,
    heartbeat_seconds: int = 60,
    grace_seconds: int | None = None,
    report: bool = True,
    train: Callable[[RunKey, list[str], GridSpec], dict[str, Any]] = _train,
) -> int:
    """Work on the grid until it is complete, then write ``runs.csv`` and the report.

    Args:
        spec: the grid.
        storage_url: SQLAlchemy URL of the study database (default ``sqlite:///OUT/grid.db``).
        study_name: default :meth:`GridSpec.default_study_name`.
        heartbeat_seconds: how often a running trial records that its worker is alive.
        grace_seconds: after this long without a heartbeat a trial is failed and retried
            (default 2 x ``heartbeat_seconds``).
        report: write the report (summary.csv, totals.csv, report.md, f1_vs_k.png) into OUT.
        train: runs one run and returns its trial's attributes (tests replace it).

    Returns:
        0 when the grid is complete, 1 when a run raised (this worker stopped).
    """
    import optuna

    if isinstance(heartbeat_seconds, bool) or int(heartbeat_seconds) < 1:
        raise GridError(f"heartbeat seconds must be an integer >= 1, got {heartbeat_seconds}")
    grace = 2 * int(heartbeat_seconds) if grace_seconds is None else int(grace_seconds)
    if grace <= heartbeat_seconds:
        raise GridError(
            f"grace seconds must be > heartbeat seconds ({heartbeat_seconds}), got {grace}"
        )
    spec.out.mkdir(parents=True, exist_ok=True)
    url = storage_url or f"sqlite:///{(spec.out / 'grid.db').resolve()}"
    name = study_name or spec.default_study_name()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url, int(heartbeat_seconds), grace)
    worker = _Worker(spec, storage, name, int(heartbeat_seconds), grace, train)
    _log(f"study {name!r} in {_safe_url(url)}: {len(worker.keys)} runs in this grid")
    poll = max(0.2, min(float(heartbeat_seconds), 10.0))
    ok = worker.loop(poll)
    rows = runs_table(worker.study, spec.runs())
    runs_csv = write_runs_csv(rows, spec.out / "runs.csv")
    _log(f"wrote {runs_csv} ({len(rows)} of {len(worker.keys)} runs)")
    if not ok:
        _log("stopped after a failed run; run the same command again to retry it")
        return 1
    if report:
        from aff_lightning.experiments import report as report_module

        try:
            paths = report_module.write_report(runs_csv, spec.out, f1="auto")
        except ValueError as exc:
            print(f"warning: no report written: {exc}", file=sys.stderr)
        else:
            _log(f"wrote {paths['report']}")
    return 0


def _safe_url(url: str) -> str:
    """The URL without its password."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cli.py grid",
        allow_abbrev=False,
        description="Run the seed grid (conditions x minority counts x heads x seeds), "
        "scheduled through an Optuna study so that several workers share it and a stopped "
        "grid picks up where it was. Any other --x.y=z argument (or everything after --) is "
        "passed to every run's fit.",
        epilog="example: python cli.py grid --conditions baseline --minority-counts 500 50 "
        "--heads softmax affinity-m1 --seeds 2 --out runs/grid --trainer.max_epochs=10",
    )
    parser.add_argument(
        "--conditions",
        nargs="+",
        default=list(DEFAULT_CONDITIONS),
        help="config file names in --config-dir (default: the reference's ten conditions)",
    )
    parser.add_argument(
        "--minority-counts",
        nargs="+",
        type=int,
        default=list(DEFAULT_MINORITY_COUNTS),
        metavar="K",
        help="minority counts k (default: 500 200 100 50 20 10)",
    )
    parser.add_argument(
        "--heads",
        nargs="+",
        default=list(DEFAULT_HEADS),
        help="softmax, affinity-mN (the condition's affinity or joint head with N centers), "
        "joint-mN (default: softmax affinity-m1 affinity-m5)",
    )
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from here")
    parser.add_argument(
        "--selection",
        choices=SELECTIONS,
        default="best_test",
        help="epoch whose test metrics a run reports: best_test (the reference: best test "
        "score, optimistic), last, or best_val (adds --data.val_fraction=0.1 unless set)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/grid"), help="output folder")
    parser.add_argument(
        "--storage",
        default=None,
        help="SQLAlchemy URL of the study database (default sqlite:///OUT/grid.db); e.g. "
        "postgresql://user:pass@host/db for workers on several machines",
    )
    parser.add_argument("--study", default=None, help="study name (default from the overrides)")
    parser.add_argument("--config-dir", type=Path, default=None, help="where conditions live")
    parser.add_argument(
        "--heartbeat-seconds",
        type=int,
        default=60,
        help="running trials record a heartbeat this often (default 60)",
    )
    parser.add_argument(
        "--grace-seconds",
        type=int,
        default=None,
        help="a run without heartbeat this long is retried (default 2 x heartbeat)",
    )
    parser.add_argument("--no-report", action="store_true", help="write runs.csv only")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and exit")
    return parser


def _dedupe(values: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(values))


def build_spec(args: argparse.Namespace, overrides: Sequence[str]) -> GridSpec:
    if args.seeds < 1:
        raise GridError(f"--seeds must be >= 1, got {args.seeds}")
    if args.first_seed < 0:
        raise GridError(f"--first-seed must be >= 0, got {args.first_seed}")
    bad = [o for o in overrides if o.startswith("-") and not o.startswith("--")]
    if bad:
        raise GridError(f"unknown argument(s) {bad}; fit overrides look like --data.batch_size=16")
    return GridSpec(
        conditions=_dedupe(args.conditions),
        minority_counts=_dedupe(args.minority_counts),
        heads=_dedupe(args.heads),
        seeds=tuple(range(args.first_seed, args.first_seed + args.seeds)),
        out=args.out,
        selection=args.selection,
        overrides=tuple(overrides),
        config_dir=args.config_dir or default_config_dir(),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python cli.py grid ...``; returns 0 when done, 1 after a failed run, 2 on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    try:
        args, unknown = _parser().parse_known_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        spec = build_spec(args, [*unknown, *extra])
        if args.dry_run:
            runs = spec.runs()
            for key in runs:
                print(key.name, " ".join(spec.fit_args(key)))
            print(f"{len(runs)} runs; study {args.study or spec.default_study_name()!r}")
            return 0
        return run_grid(
            spec,
            storage_url=args.storage,
            study_name=args.study,
            heartbeat_seconds=args.heartbeat_seconds,
            grace_seconds=args.grace_seconds,
            report=not args.no_report,
        )
    except GridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
