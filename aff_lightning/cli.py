"""Command line: LightningCLI (fit / validate / test / predict) plus grid, report and tune.

``python cli.py fit --config configs/da_microf1.yaml --data.minority_count=50``

Config files may start with ``extends: other.yaml`` (a path relative to the file): the other
file is applied first and this one overrides it, so the study's conditions state only what they
change. Everything else is plain LightningCLI.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["default_loggers", "expand_config_args", "main", "run_lightning_cli"]

SUBCOMMANDS_EXTRA = ("grid", "report", "tune")
EXTENDS_KEY = "extends"


class CLIError(Exception):
    """A user error reported as one line, without a traceback (set AFF_DEBUG=1 for one)."""


def _load_config(path: Path, seen: tuple[Path, ...] = ()) -> list[str]:
    """The chain of config texts for ``path``: its ``extends`` ancestors first, itself last."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise CLIError(f"config files extend each other in a loop: {chain}")
    if not path.is_file():
        raise CLIError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise CLIError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    parent = data.pop(EXTENDS_KEY, None)
    texts: list[str] = []
    if parent is not None:
        if not isinstance(parent, str):
            raise CLIError(f"'{EXTENDS_KEY}' in {path} must be a file name, got {parent!r}")
        texts = _load_config(path.parent / parent, (*seen, path))
    if data:
        texts.append(yaml.safe_dump(data, sort_keys=False))
    return texts


def expand_config_args(argv: Sequence[str]) -> list[str]:
    """Replace each ``--config FILE`` whose file uses ``extends`` by its chain of configs.

    jsonargparse takes a config either as a path or as YAML text; the chain is passed as text,
    parents first, so later files override earlier ones exactly as repeated ``--config`` do.
    """
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        value: str | None = None
        if arg in ("-c", "--config") and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        path = Path(value)
        if path.is_file() and EXTENDS_KEY in (yaml.safe_load(path.read_text()) or {}):
            for text in _load_config(path):
                out += ["--config", text]
        else:
            out += ["--config", value]
    return out


def _build_cli_class() -> type:
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from aff_lightning import xla  # registers --trainer.accelerator=xla

    class AffinityCLI(LightningCLI):
        """LightningCLI with the datamodule's shape linked into the model and test after fit."""

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            for name in ("num_classes", "in_channels", "image_size"):
                parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
            # Linked as written in the config, so both hold the same value in their hparams.
            parser.link_arguments("data.minority_classes", "model.minority_classes")
            parser.add_argument(
                "--test_after_fit",
                type=bool,
                default=True,
                help="after `fit`, evaluate the last epoch's model on the test set and print "
                "the per-class report",
            )

        def before_instantiate_classes(self) -> None:
            xla.register_xla_accelerator()

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            trainer_cfg = self._get(self.config_init, "trainer", default={})
            if trainer_cfg.get("logger") in (None, True) and "logger" not in kwargs:
                root = trainer_cfg.get("default_root_dir") or os.getcwd()
                kwargs["logger"] = default_loggers(root)
            return super().instantiate_trainer(**kwargs)

        def after_fit(self) -> None:
            cfg = self.config.get(self.subcommand, {})
            fast_dev_run = getattr(self.trainer, "fast_dev_run", False)
            if cfg.get("test_after_fit", True) and not fast_dev_run:
                self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)

    return AffinityCLI


def default_loggers(root: str | Path) -> list[Any]:
    """CSV logs always, TensorBoard too when it is installed; both in one version folder."""
    from lightning.fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    csv = CSVLogger(save_dir=root, name="logs")
    loggers: list[Any] = [csv]
    if bool(_TENSORBOARD_AVAILABLE):
        loggers.append(TensorBoardLogger(save_dir=root, name="logs", version=csv.version))
    return loggers


def run_lightning_cli(args: list[str], extra_callbacks: Sequence[Any] = ()) -> Any:
    """Run LightningCLI on ``args`` (after the ``extends`` expansion).

    ``extra_callbacks`` (Callback objects) join the default callbacks; the command line can add
    only importable callback classes, the grid and the tuner pass objects.
    """
    from aff_lightning.callbacks import default_callbacks
    from aff_lightning.data import ImbalancedDataModule
    from aff_lightning.model import AffinityClassifier

    cli_class = _build_cli_class()
    with warnings.catch_warnings():
        # `args` deliberately replaces sys.argv (after the `extends` expansion).
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return cli_class(
            AffinityClassifier,
            ImbalancedDataModule,
            args=expand_config_args(args),
            seed_everything_default=0,
            trainer_defaults={"callbacks": [*default_callbacks(), *extra_callbacks]},
            save_config_kwargs={"overwrite": True},
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python cli.py`` and the ``aff-lightning`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in SUBCOMMANDS_EXTRA:
            module = importlib.import_module(f"aff_lightning.experiments.{args[0]}")
            return int(module.main(args[1:]))
        run_lightning_cli(args)
        return 0
    except SystemExit as exc:  # argparse errors, --help, --print_config
        if args[:1] in (["-h"], ["--help"]):
            print(
                "\nalso: grid    the study grid (conditions x k x heads x seeds)\n"
                "      report  tables and plots from a grid's runs.csv\n"
                "      tune    Optuna hyperparameter search\n"
                "(python cli.py grid --help, ... for their options)"
            )
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    except Exception as exc:
        if os.environ.get("AFF_DEBUG") or not _is_user_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        print("(set AFF_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 2


def _is_user_error(exc: BaseException) -> bool:
    """Errors about the user's input: ours, or a ValueError/TypeError raised by this package's
    own argument checks. Anything raised deeper (torch, Lightning) keeps its traceback."""
    from aff_lightning.data import DatasetNotFoundError

    if isinstance(exc, (CLIError, DatasetNotFoundError)):
        return True
    if not isinstance(exc, (ValueError, TypeError)) or exc.__traceback__ is None:
        return False
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


_PACKAGE_DIR = Path(__file__).resolve().parent
