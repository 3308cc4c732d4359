"""`make demo` logic: softmax vs affinity through the real CLI, side-by-side table at the end."""

from __future__ import annotations

from aff_lightning.demo import main, side_by_side


def test_demo_runs_both_heads_and_prints_the_comparison(fake_fmnist_dir, tmp_path, capsys):
    code = main(
        [
            "--data-dir", str(fake_fmnist_dir), "--out", str(tmp_path), "--max-epochs", "1",
            "--data.minority_count=2", "--data.batch_size=32",
            "--trainer.enable_progress_bar=false",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "softmax vs affinity" in out
    table = out.split("softmax vs affinity")[1]
    assert "softmax recall" in table and "affinity F1" in table
    assert table.count("*") >= 5  # minority classes marked
    for metric in ("acc", "macro_f1", "minority_acc"):
        assert metric in table


def test_side_by_side_layout():
    one = {
        "minority_classes": [0],
        "per_class": {"count": [2, 5], "recall": [0.5, 1.0], "f1": [0.25, 0.75]},
        "metrics": dict.fromkeys(
            ("acc", "micro_f1", "macro_f1", "balanced_acc", "minority_acc", "majority_acc"), 0.5
        ),
    }
    text = side_by_side({"softmax": one, "affinity": one})
    lines = text.splitlines()
    assert lines[1].split()[:2] == ["0*", "2"]
    assert "0.2500" in lines[1] and "0.7500" in lines[2]
