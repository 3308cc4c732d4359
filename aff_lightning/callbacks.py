"""Callbacks the CLI adds by default: the per-class report at the end of test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from aff_lightning.metrics import per_class_report

__all__ = ["PerClassReport", "default_callbacks", "format_per_class_table"]


def format_per_class_table(
    report: dict[str, list[float]], minority_classes: tuple[int, ...] = ()
) -> str:
    """A fixed-width table: class, count, precision, recall, F1; minority classes marked ``*``."""
    lines = [f"{'class':>7} {'count':>7} {'precision':>9} {'recall':>7} {'f1':>7}"]
    for c, (n, p, r, f) in enumerate(
        zip(report["count"], report["precision"], report["recall"], report["f1"], strict=True)
    ):
        mark = "*" if c in minority_classes else " "
        lines.append(f"{c:>6}{mark} {int(n):>7d} {p:>9.4f} {r:>7.4f} {f:>7.4f}")
    lines.append("(* minority class)" if minority_classes else "")
    return "\n".join(lines).rstrip()


class PerClassReport(Callback):
    """At the end of test: print the per-class table and headline metrics, and save them.

    Writes ``per_class.csv`` and ``test_metrics.json`` into the trainer's log folder (or
    ``default_root_dir``), so runs can be compared afterwards (``make demo`` does).
    """

    def __init__(self, print_table: bool = True) -> None:
        self.print_table = print_table

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # trainer.log_dir broadcasts from rank 0: every rank must read it.
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        confmat = getattr(pl_module, "test_confmat", None)
        if not trainer.is_global_zero or confmat is None:
            return
        report = {k: v.tolist() for k, v in per_class_report(confmat.cpu()).items()}
        minority = tuple(getattr(pl_module, "minority_classes", ()))
        headline = {
            k.removeprefix("test/"): float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("test/")
            and "_best" not in k
            and v.dim() == 0
            and not k.startswith("test/per_class")
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = ["class,minority,count,precision,recall,f1"]
        for c in range(len(report["count"])):
            rows.append(
                f"{c},{int(c in minority)},{int(report['count'][c])},{report['precision'][c]:.6f},"
                f"{report['recall'][c]:.6f},{report['f1'][c]:.6f}"
            )
        (out_dir / "per_class.csv").write_text("\n".join(rows) + "\n")
        hp: dict[str, Any] = dict(getattr(pl_module, "hparams", {}))
        summary = {
            "head": hp.get("head"),
            "backbone": hp.get("backbone"),
            "n_centers": hp.get("n_centers"),
            "epochs": trainer.current_epoch,
            "metrics": headline,
            "per_class": report,
            "minority_classes": list(minority),
        }
        (out_dir / "test_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.print_table:
            print(f"\nPer-class test report ({out_dir}):")
            print(format_per_class_table(report, minority))
            keys = ("acc", "micro_f1", "macro_f1", "balanced_acc", "minority_acc", "majority_acc")
            print("  ".join(f"{k}={headline[k]:.4f}" for k in keys if k in headline))


def default_callbacks() -> list[Callback]:
    """Callbacks every CLI run gets: the XLA compile monitor (inactive off XLA), the report."""
    from aff_lightning.xla import CompileMonitor

    return [CompileMonitor(), PerClassReport()]
