"""Hyperparameter search with Optuna: ``python cli.py tune --config CONFIG --trials N``.

The reference tuned the affinity head with Optuna (200 trials at k=200: margin uniform in
[0.01, 1], sigma log-uniform in [10, 100], n_centers an integer in [1, 30], pruning on the
per-epoch macro-F1) and found that a new backbone needs new values. This module makes that
search one command for any config:

- **Space**: :data:`DEFAULT_SPACE` (the reference's), keyed by LightningCLI override names
  (``model.margin``, ``model.sigma``, ``model.n_centers``); ``--space FILE`` (YAML or JSON,
  see :func:`parse_space`) replaces it and ``--margin/--sigma/--n-centers LOW HIGH`` change
  one range. Ranges are validated before anything runs.
- **Sampler**: TPE (``TPESampler(seed=seed + trials already in the study)``, so a resumed study
  does not replay its first random draws; give concurrent workers different ``--seed``).
- **Objective**: ``{split}/{metric}``, by default ``val/macro_f1``. A trial's value is the
  objective at the trial's *best epoch* (the epoch a run would be selected at), and every
  epoch's value is reported to Optuna for pruning. With ``--objective-split val`` and a config
  without a validation split, trials hold out ``--data.val_fraction=0.1`` (said in the output
  and kept in ``best.yaml``). ``--objective-split test`` tunes on the test set, as the reference
  did; the output then says so loudly, as the result is optimistically biased.
- **Pruning**: Optuna's Lightning integration
  (``optuna_integration.PyTorchLightningPruningCallback``, which subclasses
  ``lightning.pytorch.Callback`` and so works with the ``lightning`` package) with a
  ``MedianPruner`` (``--pruner none`` turns it off; per-epoch values are still recorded).
- **Storage**: any Optuna storage URL (``--storage``), by default
  ``sqlite:///<out>/tune.db``, opened like the grid's (:func:`.grid.open_storage`: heartbeats,
  so a killed worker's trial is failed rather than left RUNNING; SQLite writers wait for the
  lock). A study is created or continued (``load_if_exists``): each
  invocation runs ``--trials N`` *more* trials, or, with ``--total-trials T``, trials until the
  study holds T finished ones (complete or pruned) across every worker sharing the storage. A
  server database (``postgresql://...``) shares a study across machines.
- **Outputs** in ``--out`` (default ``runs/tune/<study>``): ``best.yaml``, the config with the
  best trial's values applied, self-contained (``extends`` resolved, the overrides merged in),
  ready for ``python cli.py fit --config <out>/best.yaml``; ``trials.csv``, one row per trial;
  ``trials/NNNN/``, each trial's logs and config. The best values and the top of the trials
  table are printed.

Each trial is an in-process ``fit`` through :func:`aff_lightning.experiments.runner.run_fit`,
with the config's own seed, so trials differ only in the searched values.

Example:
    python cli.py tune --config configs/cnn3.yaml --trials 50 --data.minority_count=200
    python cli.py fit --config runs/tune/cnn3/best.yaml
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import numbers
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DEFAULT_SPACE",
    "DEFAULT_VAL_FRACTION",
    "HEARTBEAT_SECONDS",
    "OBJECTIVES",
    "OBJECTIVE_SPLITS",
    "PARAM_TYPES",
    "PRUNERS",
    "ParamSpec",
    "TuneError",
    "TuneResult",
    "load_space",
    "main",
    "make_param",
    "parse_space",
    "resolve_config",
    "tune",
    "with_ranges",
]

OBJECTIVES = ("macro_f1", "micro_f1", "acc", "balanced_acc", "minority_acc")
"""Metrics a search can maximise (the model's selection metrics)."""

OBJECTIVE_SPLITS = ("val", "test")
"""Where the objective is read: the held-out validation split (default) or the test set."""

PARAM_TYPES = ("float", "int", "categorical")
"""Parameter types of a search space."""

PRUNERS = ("median", "none")
"""``median``: Optuna's MedianPruner on the per-epoch objective; ``none``: never prune."""

DEFAULT_VAL_FRACTION = 0.1
"""Validation share trials hold out when the objective is on "val" and the config has none."""

HEARTBEAT_SECONDS = 60
"""Running trials record a heartbeat this often; one silent for twice as long is failed."""

_SPEC_FIELDS = {"type", "low", "high", "log", "choices"}
_NAME_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_TEST_WARNING = (
    "!!! TUNING ON THE TEST SET ({key}): the best value is optimistically biased; report a "
    "number from data the search never saw !!!"
)


class TuneError(ValueError):
    """A user error in a tuning request (space, objective, config); printed as one line."""


# --------------------------------------------------------------------------------------------
# Search space
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: a float or int range (optionally log-scaled) or a set of choices.

    Attributes:
        type: "float", "int" or "categorical".
        low: lower bound, inclusive (float and int).
        high: upper bound, inclusive (float and int).
        log: sample uniformly in log space (float and int; needs low > 0).
        choices: the values of a categorical parameter.
    """

    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = field(default=())

    def suggest(self, trial: Any, name: str) -> Any:
        """Draw this parameter's value for an Optuna ``trial``."""
        if self.type == "float":
            return trial.suggest_float(name, self.low, self.high, log=self.log)
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)  # type: ignore[arg-type]
        return trial.suggest_categorical(name, list(self.choices))

    def as_dict(self) -> dict[str, Any]:
        """The space-file form of this parameter."""
        if self.type == "categorical":
            return {"type": self.type, "choices": list(self.choices)}
        return {"type": self.type, "low": self.low, "high": self.high, "log": self.log}

    def describe(self) -> str:
        """E.g. ``log-uniform [10, 100]``, ``int [1, 30]``, ``one of ['a', 'b']``."""
        if self.type == "categorical":
            return f"one of {list(self.choices)}"
        kind = {"float": "uniform", "int": "int"}[self.type]
        return f"{'log-' if self.log else ''}{kind} [{self.low:g}, {self.high:g}]"


DEFAULT_SPACE: dict[str, ParamSpec] = {
    "model.margin": ParamSpec("float", 0.01, 1.0),
    "model.sigma": ParamSpec("float", 10.0, 100.0, log=True),
    "model.n_centers": ParamSpec("int", 1, 30),
}
"""The reference study's space: margin uniform in [0.01, 1], sigma log-uniform in [10, 100],
n_centers an integer in [1, 30]."""

# Values the model accepts, checked on the range bounds: (test, description).
_DOMAINS: dict[str, tuple[Any, str]] = {
    "model.margin": (lambda v: 0 < v <= 1, "in (0, 1] (the affinity head's margin)"),
    "model.sigma": (lambda v: v > 0, "> 0 (the Gaussian kernel width)"),
    "model.n_centers": (lambda v: v >= 1, ">= 1 (centers per class)"),
    "model.lr": (lambda v: v > 0, "> 0"),
    "model.reg_weight": (lambda v: v >= 0, ">= 0"),
    "model.weight_decay": (lambda v: v >= 0, ">= 0"),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def make_param(name: str, raw: Any) -> ParamSpec:
    """Validate one space entry and build its :class:`ParamSpec`.

    Args:
        name: the override name, e.g. "model.sigma".
        raw: ``{"type": "float"|"int", "low": .., "high": .., "log": bool}`` or
            ``{"type": "categorical", "choices": [..]}``.

    Raises:
        TuneError: with the parameter's name and the offending values.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise TuneError(
            f"space: parameter names are override keys such as 'model.sigma', got {name!r}"
        )
    if not isinstance(raw, Mapping):
        raise TuneError(
            f"space: {name} must be a mapping such as {{type: float, low: 0.1, high: 1}}, "
            f"got {raw!r}"
        )
    unknown = sorted(set(raw) - _SPEC_FIELDS)
    if unknown:
        raise TuneError(
            f"space: {name} has unknown field(s) {unknown}; expected {sorted(_SPEC_FIELDS)}"
        )
    kind = raw.get("type")
    if kind not in PARAM_TYPES:
        raise TuneError(
            f"space: {name} has unknown type {kind!r}; expected one of {list(PARAM_TYPES)}"
        )
    if kind == "categorical":
        choices = raw.get("choices")
        extra = sorted({"low", "high", "log"} & set(raw))
        if extra:
            raise TuneError(f"space: {name} is categorical and takes 'choices', not {extra}")
        if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence) or not choices:
            raise TuneError(f"space: {name} needs a non-empty list of 'choices', got {choices!r}")
        return ParamSpec("categorical", choices=tuple(choices))
    if "choices" in raw:
        raise TuneError(f"space: {name} is {kind} and takes 'low'/'high', not 'choices'")
    low: Any = raw.get("low")
    high: Any = raw.get("high")
    log: Any = raw.get("log", False)
    for bound, value in (("low", low), ("high", high)):
        if not _is_number(value) or not math.isfinite(value):
            raise TuneError(f"space: {name} {bound} must be a finite number, got {value!r}")
        if kind == "int" and float(value) != int(value):
            raise TuneError(f"space: {name} is int but {bound}={value!r} is not an integer")
    if not isinstance(log, bool):
        raise TuneError(f"space: {name} log must be true or false, got {log!r}")
    if low > high:
        raise TuneError(f"space: {name} range is inverted: low={low} > high={high}")
    if low == high:
        raise TuneError(
            f"space: {name} range is empty: low={low} == high={high} (to fix the value "
            f"instead, pass --{name}={low})"
        )
    if log and low <= 0:
        raise TuneError(
            f"space: {name} is log-scaled but low={low} <= 0; a log range needs low > 0"
        )
    if name in _DOMAINS:
        ok, what = _DOMAINS[name]
        if not (ok(low) and ok(high)):
            raise TuneError(f"space: {name} must be {what}, got the range [{low}, {high}]")
    if kind == "int":
        return ParamSpec("int", int(low), int(high), log)
    return ParamSpec("float", float(low), float(high), log)


def parse_space(mapping: Any, source: str = "space") -> dict[str, ParamSpec]:
    """Validate a whole space mapping ``{override name: entry}`` (see :func:`make_param`).

    Example (YAML)::

        model.margin: {type: float, low: 0.05, high: 1.0}
        model.sigma: {type: float, low: 5, high: 200, log: true}
        model.n_centers: {type: int, low: 1, high: 10}
        model.head: {type: categorical, choices: [affinity, joint]}
    """
    if not isinstance(mapping, Mapping) or not mapping:
        raise TuneError(
            f"{source} must map override names to ranges, e.g. "
            f"{{model.sigma: {{type: float, low: 10, high: 100, log: true}}}}, got {mapping!r}"
        )
    return {name: make_param(name, raw) for name, raw in mapping.items()}


def load_space(path: str | os.PathLike[str]) -> dict[str, ParamSpec]:
    """Read and validate a YAML or JSON space file (see :func:`parse_space`)."""
    path = Path(path)
    if not path.is_file():
        raise TuneError(f"space file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TuneError(f"space file {path} is not valid YAML/JSON: {err}") from None
    return parse_space(data, source=f"space file {path}")


def with_ranges(
    space: Mapping[str, ParamSpec], ranges: Mapping[str, Sequence[float] | None]
) -> dict[str, ParamSpec]:
    """``space`` with some ranges replaced (``--margin LOW HIGH`` and friends).

    A replaced parameter keeps its type and log scale (the default space's, when ``space``
    does not search it); the new range is validated like a space file's.
    """
    out = dict(space)
    for name, bounds in ranges.items():
        if bounds is None:
            continue
        base = out.get(name) or DEFAULT_SPACE[name]
        if base.type == "categorical":
            raise TuneError(f"--{name.split('.')[-1]}: {name} is categorical in the space")
        low, high = bounds
        if base.type == "int":
            low, high = (int(b) if float(b).is_integer() else b for b in bounds)
        out[name] = make_param(name, {"type": base.type, "low": low, "high": high, "log": base.log})
    return out


# --------------------------------------------------------------------------------------------
# Config: the chain of files plus overrides as one mapping (what best.yaml is built from)
# --------------------------------------------------------------------------------------------


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``top`` into ``base`` as repeated ``--config`` do: mappings merge, the rest
    (lists included) is replaced; a different ``class_path`` replaces the whole mapping."""
    for key, value in top.items():
        old = base.get(key)
        if (
            isinstance(old, dict)
            and isinstance(value, Mapping)
            and old.get("class_path", value.get("class_path")) == value.get("class_path")
        ):
            _merge(old, value)
        else:
            base[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
    return base


def _set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _get_dotted(config: Mapping[str, Any], key: str, default: Any = None) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _split_overrides(overrides: Sequence[str]) -> list[tuple[str, str]]:
    """``["--a.b=1", "--c", "x"]`` -> ``[("a.b", "1"), ("c", "x")]``, with clear errors."""
    pairs: list[tuple[str, str]] = []
    i = 0
    items = list(overrides)
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--") or arg == "--":
            raise TuneError(
                f"unexpected argument {arg!r}; fit overrides look like --trainer.max_epochs=5"
            )
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            key, value = arg[2:], items[i + 1]
            i += 2
        else:
            raise TuneError(f"override {arg} needs a value, e.g. {arg}=VALUE")
        if key.endswith("+") or not _NAME_RE.match(key):
            raise TuneError(
                f"override --{key} cannot be used with tune (only --name=value settings can be "
                "written into best.yaml); put it into the config file"
            )
        pairs.append((key, value))
    return pairs


def _config_layers(config: str | os.PathLike[str]) -> list[dict[str, Any]]:
    from aff_lightning.cli import CLIError, expand_config_args

    path = Path(config)
    if not path.is_file():
        raise TuneError(f"config file not found: {path}")
    try:
        args = expand_config_args(["--config", str(path)])
    except CLIError as err:
        raise TuneError(str(err)) from None
    layers = []
    for text in args[1::2]:  # ["--config", X, "--config", Y, ...]
        data = yaml.safe_load(Path(text).read_text() if text == str(path) else text) or {}
        if not isinstance(data, dict):
            raise TuneError(f"config file {path} must hold a mapping, got {type(data).__name__}")
        data.pop("extends", None)
        layers.append(data)
    return layers


def resolve_config(config: str | os.PathLike[str], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """One mapping for ``fit --config CONFIG OVERRIDES...``: ``extends`` chain, later files and
    ``--name=value`` overrides merged in order (``--config FILE`` among the overrides adds a
    layer). Values are parsed as YAML, as LightningCLI does.

    Raises:
        TuneError: a missing file or an override that cannot be expressed in a config file.
    """
    merged: dict[str, Any] = {}
    for layer in _config_layers(config):
        _merge(merged, layer)
    for key, raw in _split_overrides(overrides):
        if key == "config":
            for layer in _config_layers(raw):
                _merge(merged, layer)
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_dotted(merged, key, value)
    return merged


def _data_default(name: str) -> Any:
    import inspect

    from aff_lightning.data import ImbalancedDataModule

    return inspect.signature(ImbalancedDataModule.__init__).parameters[name].default


def _format_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------


@dataclass
class TuneResult:
    """What a search left behind.

    Attributes:
        study: the Optuna study (all its trials, from every invocation and worker).
        objective: the key maximised, e.g. "val/macro_f1".
        best_params: the best trial's values, keyed by override name (empty if none finished).
        best_value: the best trial's value (its best epoch's objective), or None.
        best_trial: the best trial's number, or None.
        best_config: path of ``best.yaml``, or None when no trial completed.
        trials_csv: path of ``trials.csv``.
        notes: what the tuner changed on its own (e.g. the added validation split).
    """

    study: Any
    objective: str
    best_params: dict[str, Any]
    best_value: float | None
    best_trial: int | None
    best_config: Path | None
    trials_csv: Path
    notes: list[str] = field(default_factory=list)


def _storage_url(storage: str | None, out: Path) -> str:
    if storage is None:
        return f"sqlite:///{(out / 'tune.db').resolve()}"
    if not isinstance(storage, str) or "://" not in storage:
        raise TuneError(
            f"storage must be an Optuna storage URL such as sqlite:///runs/tune.db or "
            f"postgresql://user@host/db, got {storage!r}"
        )
    return storage


def _prepare_sqlite(url: str) -> None:
    """Create the folder of a ``sqlite:///path`` database (SQLite does not)."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and url[len(prefix) :] not in ("", ":memory:"):
        Path(url[len(prefix) :]).parent.mkdir(parents=True, exist_ok=True)


def _safe_url(url: str) -> str:
    """The URL without its password (it is printed and written into best.yaml)."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def _open_storage(url: str) -> Any:
    """The grid's storage: an RDBStorage with heartbeats, so a killed worker's RUNNING trial
    is failed after the grace period instead of lingering, and SQLite transactions that wait
    for the lock instead of failing when several workers share the file."""
    from aff_lightning.experiments.grid import GridError, open_storage

    _prepare_sqlite(url)
    try:
        return open_storage(url, HEARTBEAT_SECONDS, 2 * HEARTBEAT_SECONDS)
    except GridError as err:
        raise TuneError(str(err)) from None


def _build_pruner(pruner: str, n_startup_trials: int, n_warmup_epochs: int) -> Any:
    import optuna

    if pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_epochs
    )


def _trials_frame(study: Any, space_names: Sequence[str]) -> Any:
    import pandas as pd

    rows = []
    names = list(space_names) + sorted(
        {p for t in study.trials for p in t.params} - set(space_names)
    )
    for t in study.trials:
        duration = t.duration.total_seconds() if t.duration is not None else None
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "best_epoch": t.user_attrs.get("best_epoch"),
            "epochs_reported": len(t.intermediate_values),
            "duration_s": None if duration is None else round(duration, 1),
        }
        row.update({name: t.params.get(name) for name in names})
        rows.append(row)
    columns = ["number", "state", "value", "best_epoch", "epochs_reported", "duration_s", *names]
    return pd.DataFrame(rows, columns=columns)


def _print_table(frame: Any, top: int = 10) -> None:
    import pandas as pd

    if frame.empty:
        print("(no trials)")
        return
    order = frame.assign(_done=frame["state"].eq("COMPLETE")).sort_values(
        ["_done", "value"], ascending=[False, False], na_position="last"
    )
    shown = order.drop(columns="_done").head(top)
    counts = frame["state"].value_counts()
    summary = ", ".join(f"{n} {s.lower()}" for s, n in counts.items())
    print(f"trials ({len(frame)}: {summary}); top {len(shown)} by value:")
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def _write_best_config(
    path: Path,
    base: Mapping[str, Any],
    params: Mapping[str, Any],
    header: Sequence[str],
) -> None:
    config = copy.deepcopy(dict(base))
    for name, value in params.items():
        _set_dotted(config, name, value)
    text = "".join(f"# {line}\n" for line in header)
    path.write_text(text + yaml.safe_dump(config, sort_keys=False))


def _check_request(
    objective: str,
    objective_split: str,
    pruner: str,
    trials: int | None,
    total_trials: int | None,
    counts: Mapping[str, int],
    timeout: float | None,
) -> None:
    if objective not in OBJECTIVES:
        raise TuneError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    if objective_split not in OBJECTIVE_SPLITS:
        raise TuneError(
            f"objective split must be one of {list(OBJECTIVE_SPLITS)}, got {objective_split!r}"
        )
    if pruner not in PRUNERS:
        raise TuneError(f"pruner must be one of {list(PRUNERS)}, got {pruner!r}")
    if trials is None and total_trials is None:
        raise TuneError("give the number of trials: --trials N (more trials) or --total-trials T")
    if trials is not None and total_trials is not None:
        raise TuneError("give either --trials or --total-trials, not both")
    for arg, value in {"trials": trials, "total_trials": total_trials, **counts}.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TuneError(f"{arg} must be an integer, got {value!r}")
        if value < 0:
            raise TuneError(f"{arg} must be >= 0, got {value}")
    if timeout is not None and not timeout > 0:
        raise TuneError(f"timeout must be > 0 seconds, got {timeout}")


def _split_settings(base: dict[str, Any], objective_split: str) -> tuple[list[str], list[str]]:
    """Overrides (and notes saying so) that make the objective's split exist; applied to
    ``base`` too, so best.yaml evaluates the same way."""
    if objective_split == "val":
        if _get_dotted(base, "data.val_fraction", _data_default("val_fraction")):
            return [], []
        _set_dotted(base, "data.val_fraction", DEFAULT_VAL_FRACTION)
        arg = f"--data.val_fraction={DEFAULT_VAL_FRACTION}"
        return [arg], [
            f"the config holds out no validation data: trials use {arg} (kept in best.yaml)"
        ]
    if _get_dotted(base, "data.monitor_test", _data_default("monitor_test")):
        return [], []
    _set_dotted(base, "data.monitor_test", True)
    arg = "--data.monitor_test=true"
    return [arg], [f"the test objective needs the test set every epoch: trials use {arg}"]


def _open_study(
    storage: Any,
    url: str,
    name: str,
    key: str,
    space: Mapping[str, ParamSpec],
    config: Path,
    seed: int,
    pruner: Any,
) -> tuple[Any, int, list[str]]:
    """Create or load the study; (study, trials it held before, notes)."""
    import optuna

    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    n_before = next((s.n_trials for s in summaries if s.study_name == name), 0)
    # Offsetting the seed keeps a resumed study from replaying its first random draws.
    sampler = optuna.samplers.TPESampler(seed=seed + n_before)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        direction="maximize",
        load_if_exists=True,
    )
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise TuneError(f"study {name!r} in {url} minimises; tune maximises its objective")
    stored = study.user_attrs.get("objective")
    if stored is not None and stored != key:
        raise TuneError(
            f"study {name!r} in {url} was created for objective {stored!r}, not {key!r}; "
            "use the same objective to continue it or --study NEW_NAME for a new one"
        )
    notes = []
    space_dict = {n: s.as_dict() for n, s in space.items()}
    if stored is None:
        study.set_user_attr("objective", key)
        study.set_user_attr("space", space_dict)
        study.set_user_attr("config", str(config))
    elif study.user_attrs.get("space") != space_dict:
        notes.append("this study was started with another search space; TPE learns from both")
    return study, n_before, notes


def _make_objective(
    config: Path, trial_args: Sequence[str], space: Mapping[str, ParamSpec], key: str, out: Path
) -> Any:
    """The Optuna objective: one in-process fit; value = the objective at the best epoch."""
    from optuna_integration import PyTorchLightningPruningCallback

    from aff_lightning.experiments.runner import fit_args, run_fit

    def objective(trial: Any) -> float:
        params = {name: spec.suggest(trial, name) for name, spec in space.items()}
        args = fit_args(
            config,
            [
                *trial_args,
                f"--trainer.default_root_dir={out / 'trials' / f'{trial.number:04d}'}",
                *(f"--{name}={_format_value(value)}" for name, value in params.items()),
            ],
        )
        # Reports every epoch's value and raises optuna.TrialPruned when the pruner says so.
        pruning = PyTorchLightningPruningCallback(trial, monitor=key)
        try:
            result = run_fit(args, callbacks=[pruning])
        except SystemExit as exc:  # LightningCLI rejected the arguments and said why
            raise TuneError(
                f"trial {trial.number}: the fit arguments were rejected (exit {exc.code}); "
                f"see the message above. Arguments: {' '.join(args)}"
            ) from None
        ranked = [(r[key], -i, r) for i, r in enumerate(result.history) if key in r]
        if not ranked:
            recorded = sorted({k for r in result.history for k in r})
            raise TuneError(f"trial {trial.number} recorded no {key!r}; it recorded {recorded}")
        value, _, record = max(ranked, key=lambda v: v[:2])  # ties to the earliest epoch
        trial.set_user_attr("best_epoch", int(record.get("epoch", 0)))
        trial.set_user_attr("epochs", int(result.epochs))
        trial.set_user_attr("log_dir", result.log_dir)
        return float(value)

    return objective


def tune(
    config: str | os.PathLike[str],
    trials: int | None = None,
    *,
    overrides: Sequence[str] = (),
    space: Mapping[str, ParamSpec] | None = None,
    objective: str = "macro_f1",
    objective_split: str = "val",
    study_name: str | None = None,
    storage: str | None = None,
    out: str | os.PathLike[str] | None = None,
    total_trials: int | None = None,
    pruner: str = "median",
    n_startup_trials: int = 5,
    n_warmup_epochs: int = 0,
    seed: int = 0,
    timeout: float | None = None,
) -> TuneResult:
    """Create or continue a study, run trials, and write ``best.yaml`` and ``trials.csv``.

    Args:
        config: the config every trial starts from (may use ``extends``).
        trials: trials to run in this call (more trials for a continued study).
        overrides: ``fit`` overrides for every trial (``--trainer.max_epochs=30``, ...);
            they are kept in ``best.yaml``.
        space: override name -> :class:`ParamSpec`; None uses :data:`DEFAULT_SPACE`.
        objective: a metric of :data:`OBJECTIVES`.
        objective_split: "val" (default) or "test".
        study_name: the study's name; default: the config file's stem.
        storage: an Optuna storage URL; default ``sqlite:///<out>/tune.db``.
        out: output folder; default ``runs/tune/<study_name>``.
        total_trials: instead of ``trials``, run until the study holds this many finished
            (complete or pruned) trials, counting every worker's.
        pruner: "median" or "none".
        n_startup_trials: the median pruner prunes nothing before this many trials finished.
        n_warmup_epochs: ... nor before a trial's epoch index reaches this.
        seed: TPE sampler seed (offset by the number of trials already in the study).
        timeout: stop starting trials after this many seconds.

    Returns:
        A :class:`TuneResult`.

    Raises:
        TuneError: bad input (checked before any trial runs), a study created for another
            objective, or trials that did not record the objective.
    """
    import optuna

    _check_request(
        objective,
        objective_split,
        pruner,
        trials,
        total_trials,
        {"n_startup_trials": n_startup_trials, "n_warmup_epochs": n_warmup_epochs, "seed": seed},
        timeout,
    )
    space = dict(DEFAULT_SPACE if space is None else space)
    if not space:
        raise TuneError("the search space is empty")
    for name, spec in space.items():
        if not isinstance(spec, ParamSpec):
            raise TuneError(f"space: {name} must be a ParamSpec, got {spec!r}")
    config = Path(config)
    overrides = [str(o) for o in overrides]
    base = resolve_config(config, overrides)  # what best.yaml is built from
    fixed = sorted(set(space) & {k for k, _ in _split_overrides(overrides)})
    if fixed:
        raise TuneError(
            f"{', '.join(fixed)} is both searched and fixed by an override; drop one of them"
        )
    key = f"{objective_split}/{objective}"
    split_args, notes = _split_settings(base, objective_split)
    study_name = study_name or config.stem
    if not isinstance(study_name, str) or not study_name.strip():
        raise TuneError(f"study name must be a non-empty string, got {study_name!r}")
    out_dir = Path(out) if out is not None else Path("runs") / "tune" / study_name
    url = _storage_url(storage, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    storage_obj = _open_storage(url)
    url = _safe_url(url)  # printed from here on
    study, n_before, study_notes = _open_study(
        storage_obj,
        url,
        study_name,
        key,
        space,
        config,
        seed,
        _build_pruner(pruner, n_startup_trials, n_warmup_epochs),
    )
    notes += study_notes

    if objective_split == "test":
        print(_TEST_WARNING.format(key=key))
    action = "continuing" if n_before else "creating"
    print(f"tune: {action} study {study_name!r} ({n_before} trials) in {url}")
    print(f"tune: maximising {key} (each trial's best epoch); space:")
    for name, spec in space.items():
        print(f"  {name}: {spec.describe()}")
    for note in notes:
        print(f"tune: note: {note}")

    # Quiet trials unless the overrides say otherwise; the tuner's own settings come last.
    trial_args = [
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",  # trials keep metrics, not weights
        *overrides,
        *split_args,
    ]
    n_trials, callbacks = trials, []
    if total_trials is not None:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        n_trials = max(total_trials - len(study.get_trials(deepcopy=False, states=states)), 0)
        callbacks.append(optuna.study.MaxTrialsCallback(total_trials, states=states))
    if n_trials:
        study.optimize(
            _make_objective(config, trial_args, space, key, out_dir),
            n_trials=n_trials,
            timeout=timeout,
            callbacks=callbacks,
        )
    result = _write_outputs(study, base, list(space), key, out_dir, config, url)
    result.notes = notes
    if objective_split == "test":
        print(_TEST_WARNING.format(key=key))
    return result


def _write_outputs(
    study: Any,
    base: Mapping[str, Any],
    names: Sequence[str],
    key: str,
    out: Path,
    config: Path,
    url: str,
) -> TuneResult:
    """Write trials.csv and best.yaml and print the summary."""
    import optuna

    frame = _trials_frame(study, names)
    trials_csv = out / "trials.csv"
    frame.to_csv(trials_csv, index=False)
    print()
    _print_table(frame)
    print(f"tune: wrote {trials_csv}")
    result = TuneResult(study, key, {}, None, None, None, trials_csv)
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        print("tune: no trial completed yet; no best.yaml written")
        return result
    best = study.best_trial
    value = float("nan") if best.value is None else float(best.value)
    best_config = out / "best.yaml"
    header = [
        f"Best trial {best.number} of Optuna study {study.study_name!r} ({url}):",
        f"{key} = {value:.6g} at epoch {best.user_attrs.get('best_epoch')} (its best epoch).",
        f"Written by `cli.py tune` from {config}; run: python cli.py fit --config {best_config}",
    ]
    if key.startswith("test/"):
        header.append("Tuned on the TEST set: its test numbers are optimistically biased.")
    _write_best_config(best_config, base, best.params, header)
    result.best_params = dict(best.params)
    result.best_value = value
    result.best_trial = best.number
    result.best_config = best_config
    print(f"tune: best trial {best.number}: {key} = {value:.4f}")
    for name, param in best.params.items():
        print(f"  --{name}={_format_value(param)}")
    print(f"tune: wrote {best_config} (python cli.py fit --config {best_config})")
    return result


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cli.py tune",
        description="Optuna search (TPE sampler, median pruning on the per-epoch objective) over "
        "the affinity head's hyperparameters, resumable through its storage. Arguments it does "
        "not know are fit overrides for every trial, e.g. --trainer.max_epochs=30 "
        "--data.minority_count=200; they are kept in best.yaml.",
        allow_abbrev=False,
    )
    add = parser.add_argument
    add("--config", "-c", required=True, metavar="FILE", help="config every trial starts from")
    add("--trials", type=int, metavar="N", help="run N more trials in this invocation")
    add(
        "--total-trials",
        type=int,
        metavar="T",
        help="instead of --trials: run until the study holds T finished trials (all workers)",
    )
    add("--storage", metavar="URL", help="Optuna storage URL (default: sqlite:///OUT/tune.db)")
    add("--study", metavar="NAME", help="study name (default: the config file's name)")
    add("--out", metavar="DIR", help="best.yaml, trials.csv, trials/ (default: runs/tune/NAME)")
    add(
        "--objective",
        default="macro_f1",
        metavar="METRIC",
        help=f"metric to maximise: {', '.join(OBJECTIVES)} (default: macro_f1)",
    )
    add(
        "--objective-split",
        default="val",
        metavar="SPLIT",
        help="val (default; adds --data.val_fraction=0.1 when the config has none) or test "
        "(the reference's protocol; optimistically biased, and the output says so)",
    )
    add("--space", metavar="FILE", help="YAML/JSON search space (default: the reference's)")
    for flag, name in (("--margin", "margin"), ("--sigma", "sigma"), ("--n-centers", "n_centers")):
        add(
            flag,
            nargs=2,
            type=float,
            metavar=("LOW", "HIGH"),
            help=f"search model.{name} in [LOW, HIGH] (scale and type as in the space)",
        )
    add("--pruner", default="median", metavar="NAME", help="median (default) or none")
    add(
        "--n-startup-trials",
        type=int,
        default=5,
        metavar="N",
        help="no pruning until N trials finished (default: 5)",
    )
    add(
        "--n-warmup-epochs",
        type=int,
        default=0,
        metavar="E",
        help="no pruning before a trial's epoch E (default: 0)",
    )
    add("--seed", type=int, default=0, help="TPE seed; give parallel workers different ones")
    add("--timeout", type=float, metavar="SECONDS", help="start no trial after SECONDS")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python cli.py tune ...``; returns 0, 1 (no trial completed) or 2 (bad input)."""
    try:
        args, overrides = _parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help, or argparse's own "error: ..." (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        space = load_space(args.space) if args.space else dict(DEFAULT_SPACE)
        space = with_ranges(
            space,
            {
                "model.margin": args.margin,
                "model.sigma": args.sigma,
                "model.n_centers": args.n_centers,
            },
        )
        result = tune(
            args.config,
            args.trials,
            overrides=overrides,
            space=space,
            objective=args.objective,
            objective_split=args.objective_split,
            study_name=args.study,
            storage=args.storage,
            out=args.out,
            total_trials=args.total_trials,
            pruner=args.pruner,
            n_startup_trials=args.n_startup_trials,
            n_warmup_epochs=args.n_warmup_epochs,
            seed=args.seed,
            timeout=args.timeout,
        )
    except TuneError as exc:
        if os.environ.get("AFF_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if result.best_config is not None else 1
