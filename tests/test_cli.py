"""The CLI through its real entry point: every config runs, overrides work, errors are clear."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from aff_lightning.cli import CLIError, expand_config_args, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
STUDY_CONDITIONS = {
    "long_training", "mobilenet", "resnet50", "cnn3", "batch128", "no_bn", "joint",
    "augment", "microf1", "da_microf1",
}  # fmt: skip


def _tiny(data_dir: Path, root: Path, dataset: str | None = None) -> list[str]:
    """Overrides that make any config run in seconds on fake data."""
    args = [
        f"--data.data_dir={data_dir}",
        "--data.minority_count=2",
        "--data.batch_size=16",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
    ]
    if dataset:
        args.append(f"--data.dataset={dataset}")
    return args


def test_every_study_condition_has_a_config():
    names = {p.stem for p in CONFIGS}
    assert STUDY_CONDITIONS | {"baseline", "quickstart"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_fits_with_fast_dev_run(config: Path, fake_cifar_dir, tmp_path):
    dataset = yaml.safe_load(config.read_text()).get("data", {}).get("dataset")
    fake = fake_cifar_dir if dataset in (None, "cifar10") else None
    if fake is None:  # quickstart: Fashion-MNIST, found under the same fake root layout
        import fakedata

        fake = fakedata.write_fake_idx(tmp_path / "fm", "fashion_mnist")
    args = ["fit", "--config", str(config), "--trainer.fast_dev_run=true"]
    assert main(args + _tiny(fake, tmp_path)) == 0


@pytest.mark.parametrize("head_args", [["--model.head=softmax"], ["--model.n_centers=5"]])
def test_heads_by_override(head_args: list[str], fake_cifar_dir, tmp_path):
    args = ["fit", "--config", str(ROOT / "configs/da_microf1.yaml"), "--trainer.fast_dev_run=1"]
    assert main(args + head_args + ["--model.backbone=cnn3"] + _tiny(fake_cifar_dir, tmp_path)) == 0


def test_extends_chain_is_applied_in_order(tmp_path):
    args = expand_config_args(["fit", "--config", str(ROOT / "configs/da_microf1.yaml")])
    texts = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    layers = [yaml.safe_load(t) for t in texts]
    assert layers[0]["model"]["backbone"] == "cnn10"  # baseline first
    assert layers[1]["data"]["augment"] is True  # then augment.yaml
    assert layers[2]["model"]["selection_metric"] == "micro_f1"  # then da_microf1 itself
    assert all("extends" not in layer for layer in layers)


def test_extends_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(CLIError, match="extend each other in a loop"):
        expand_config_args(["--config", str(tmp_path / "a.yaml")])
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(CLIError, match="config file not found: .*missing.yaml"):
        expand_config_args(["--config", str(tmp_path / "c.yaml")])


def test_print_config_round_trips(fake_cifar_dir, tmp_path, capsys):
    base = ["--config", str(ROOT / "configs/da_microf1.yaml"), "--model.n_centers=5"]
    base += _tiny(fake_cifar_dir, tmp_path)
    assert main(["fit", *base, "--print_config"]) == 0
    printed = capsys.readouterr().out
    cfg = yaml.safe_load(printed)
    assert cfg["model"]["n_centers"] == 5 and cfg["data"]["augment"] is True
    assert cfg["model"]["selection_metric"] == "micro_f1"
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    assert main(["fit", "--config", str(saved), "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == cfg


def test_fit_writes_csv_logs_and_per_class_report(fake_cifar_dir, tmp_path, capsys):
    args = ["fit", "--config", str(ROOT / "configs/cnn3.yaml"), "--trainer.max_epochs=1"]
    assert main(args + _tiny(fake_cifar_dir, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "Per-class test report" in out and "(* minority class)" in out
    metrics = list(tmp_path.rglob("metrics.csv"))
    assert metrics, "CSV logger wrote nothing"
    header = metrics[0].read_text().splitlines()[0]
    assert "test/macro_f1" in header and "train/loss" in header
    assert list(tmp_path.rglob("per_class.csv")) and list(tmp_path.rglob("test_metrics.json"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.backbone=vgg16", "model.backbone"),
        ("--model.head=sofmax", "model.head"),
        ("--model.no_such_key=1", "no_such_key"),
    ],
)
def test_bad_overrides_fail_cleanly(override: str, message: str, tmp_path):
    cmd = [sys.executable, str(ROOT / "cli.py"), "fit", "--config",
           str(ROOT / "configs/baseline.yaml"), override]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_data_folder_is_one_clear_error(tmp_path):
    cmd = [sys.executable, str(ROOT / "cli.py"), "fit", "--config",
           str(ROOT / "configs/baseline.yaml"), f"--data.data_dir={tmp_path / 'nowhere'}",
           "--trainer.fast_dev_run=true"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "nowhere" in proc.stderr and "cifar-10" in proc.stderr.lower()
    assert "Traceback" not in proc.stderr


def test_unknown_config_key_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: " + str(ROOT / "configs/baseline.yaml") + "\nmodel:\n  sigmaa: 3\n")
    assert main(["fit", "--config", str(bad)]) == 2


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "aff-lightning"
    assert exe.exists()
    proc = subprocess.run([str(exe), "fit", "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--model.n_centers" in proc.stdout


def test_only_our_own_errors_lose_their_traceback():
    from aff_lightning import AffinityHead
    from aff_lightning.cli import _is_user_error

    try:
        AffinityHead(4, 2, sigma=-1.0)
    except ValueError as exc:
        assert _is_user_error(exc)
    try:
        torch.zeros(2) @ torch.zeros(3)
    except RuntimeError as exc:
        assert not _is_user_error(exc)
    try:
        torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(2))
    except (RuntimeError, ValueError, TypeError) as exc:
        assert not _is_user_error(exc)


def test_top_level_help_names_the_extra_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "{fit,validate,test,predict}" in out
    assert "grid" in out and "report" in out and "tune" in out
