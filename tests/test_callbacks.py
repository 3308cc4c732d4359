"""The per-class report callback: table, CSV and JSON written at the end of test."""

from __future__ import annotations

import json

import lightning as L
import torch

from aff_lightning import AffinityClassifier, ImbalancedDataModule
from aff_lightning.callbacks import PerClassReport, format_per_class_table


def test_format_marks_minority_classes():
    report = {"count": [3, 7], "precision": [1.0, 0.5], "recall": [0.5, 1.0], "f1": [2 / 3, 2 / 3]}
    text = format_per_class_table(report, minority_classes=(0,))
    lines = text.splitlines()
    assert lines[0].split() == ["class", "count", "precision", "recall", "f1"]
    assert lines[1].split() == ["0*", "3", "1.0000", "0.5000", "0.6667"]
    assert lines[2].split() == ["1", "7", "0.5000", "1.0000", "0.6667"]
    assert lines[-1] == "(* minority class)"


def test_report_files_match_the_confusion_matrix(fake_fmnist_dir, tmp_path, capsys):
    torch.manual_seed(0)
    dm = ImbalancedDataModule(
        dataset="fashion_mnist", data_dir=str(fake_fmnist_dir), minority_count=3, batch_size=32
    )
    model = AffinityClassifier(backbone="cnn3", num_classes=10, in_channels=1, image_size=28)
    trainer = L.Trainer(
        accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        callbacks=[PerClassReport()],
    )  # fmt: skip
    trainer.test(model, datamodule=dm, verbose=False)
    summary = json.loads((tmp_path / "test_metrics.json").read_text())
    counts = dm.class_counts("test")
    assert summary["per_class"]["count"] == counts
    assert summary["minority_classes"] == [0, 2, 4, 6, 8]
    confmat = model.test_confmat.double()
    acc = float(confmat.trace() / confmat.sum())
    assert abs(summary["metrics"]["acc"] - acc) < 1e-6
    rows = (tmp_path / "per_class.csv").read_text().splitlines()
    assert rows[0] == "class,minority,count,precision,recall,f1"
    assert rows[1].startswith("0,1,3,") and rows[2].startswith("1,0,12,")
    assert "Per-class test report" in capsys.readouterr().out
