"""benchmarks/: the script runs, reports finite ratios, and compares equal maths."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

# benchmarks/ is a top-level folder next to tests/, not an installed package.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from aff_lightning import AffinityHead, ImbalancedDataModule  # noqa: E402
from aff_lightning import functional as AF  # noqa: E402
from aff_lightning.backbones import build_backbone  # noqa: E402
from benchmarks import run  # noqa: E402
from benchmarks.common import Row, format_markdown, format_table  # noqa: E402
from benchmarks.data_path import worker_counts  # noqa: E402
from benchmarks.fakecifar import write_random_cifar10  # noqa: E402
from benchmarks.head import head_step_fns  # noqa: E402
from benchmarks.naive import naive_affinity, naive_loss, naive_regularizer  # noqa: E402
from benchmarks.training import peak_bf16_tflops, training_flops_per_image  # noqa: E402
from benchmarks.xla_graphs import pjrt_device  # noqa: E402

CPU = torch.device("cpu")


def _rows(path: Path) -> dict[str, dict]:
    report = json.loads(path.read_text())
    return {r["benchmark"]: r for r in report["rows"]}


# ------------------------------------------------------------------------------ the script
def test_quick_head_and_data_write_finite_positive_ratios(tmp_path: Path) -> None:
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    argv = ["--quick", "--device", "cpu", "--only", "head,data", "--repeats", "1"]
    argv += ["--json", str(out)]
    status = run.main([*argv, "--markdown", str(md)])
    assert status == 0
    report = json.loads(out.read_text())
    assert report["machine"]["device"] == "cpu" and report["machine"]["cores"] >= 1
    assert report["benchmarks"] == ["head", "data"]
    rows = _rows(out)
    assert len(rows) == 8
    for name, row in rows.items():
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, name
        assert row["ours"] > 0 and row["baseline"] > 0, name
        assert row["note"], name
    for m in (1, 5):
        naive = rows[f"head+loss m={m}: one matmul vs naive (N,C,M,D)"]
        assert naive["ratio"] == pytest.approx(naive["baseline"] / naive["ours"])
        assert naive["target"] == ">= 5x" and isinstance(naive["passed"], bool)
        share = rows[f"head+loss m={m} share of a cnn10 step (batch 640)"]
        assert share["ratio"] == pytest.approx(share["ours"] / share["baseline"])
        assert share["extra"]["step_batch"] == 4  # measured small on the CPU, then scaled
    data = rows["data: images/s vs DataLoader (0 workers)"]
    assert any(n.startswith("data: images/s vs DataLoader (best of workers") for n in rows)
    assert data["unit"] == "img/s" and data["extra"]["workers"] == 0
    assert data["ratio"] == pytest.approx(data["ours"] / data["baseline"])
    text = md.read_text()
    assert text.startswith("# Benchmark results") and "| head+loss m=5" in text
    assert "Command: `python -m benchmarks.run --quick --device cpu --only head,data" in text
    assert "no GPU" in text  # the GPU section is said to be missing, not silently absent


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--only", "data,gpu"], "--only takes a comma-separated subset"),
        (["--repeats", "0"], "must be an int >= 1, got '0'"),
        (["--device", "tpu"], "invalid choice: 'tpu'"),
    ],
)
def test_bad_arguments(argv: list[str], match: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        run.main(argv)
    assert match in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_an_error(capsys: pytest.CaptureFixture) -> None:
    assert run.main(["--device", "cuda", "--only", "head"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_table_formats() -> None:
    rows = [
        Row("a", 1234.5, 100.0, "img/s", 12.345, "speedup", ">= 5x", True, note="how"),
        Row("b", 2.0, 1.0, "ms", 0.0123, "fraction", "< 3 %", False),
        Row("c", 2.0, None, "graphs", 0.0, "count"),
    ]
    text = format_table(rows)
    assert "12.35x faster" in text and "1.23 %" in text and "PASS" in text and "FAIL" in text
    assert "1,234" in text or "1,235" in text
    assert "info" in text.splitlines()[-1]
    md = format_markdown(rows)
    assert md.count("\n|") == 4 and "- **a**: how" in md
    with pytest.raises(ValueError, match="ratio_kind must be one of"):
        Row("d", 1.0, 1.0, "ms", 1.0, "percent")


# ------------------------------------------------------------------------------ equal maths
@pytest.mark.parametrize(("n_centers", "dim", "sigma"), [(1, 16, 90.0), (5, 8, 5.0), (3, 32, 20.0)])
def test_naive_and_one_matmul_heads_agree(n_centers: int, dim: int, sigma: float) -> None:
    """The benchmark's baseline computes the same loss and gradients as AffinityHead."""
    torch.manual_seed(n_centers)
    head = AffinityHead(dim, 6, n_centers, sigma=sigma, margin=0.43).double()
    feats = torch.randn(12, dim, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 6, (12,))
    ours = head.loss(head(feats), target)
    g_ours = torch.autograd.grad(ours, (feats, head.centers))
    aff = naive_affinity(feats, head.centers, sigma)
    assert_close(aff, head(feats))
    assert_close(naive_regularizer(head.centers), AF.diversity_regularizer(head.centers))
    naive = naive_loss(aff, target, head.centers, 0.43, head.reg_weight)
    g_naive = torch.autograd.grad(naive, (feats, head.centers))
    assert_close(naive, ours)
    for a, b in zip(g_naive, g_ours, strict=True):
        assert_close(a, b)


def test_benchmark_closures_compute_the_same_loss() -> None:
    for m in (1, 5):
        fns = head_step_fns(64, 32, 10, m, CPU)
        assert_close(fns["naive"](), fns["ours"](), rtol=1e-4, atol=1e-4)
        assert torch.isfinite(fns["linear"]())


# ------------------------------------------------------------------------------ helpers
def test_random_cifar10_loads_through_the_datamodule(tmp_path: Path) -> None:
    write_random_cifar10(tmp_path, n_train=130, n_test=20)
    dm = ImbalancedDataModule("cifar10", tmp_path, minority_count=1, minority_classes=())
    assert dm.class_counts("train") == [13] * 10
    assert dm.class_counts("test") == [2] * 10
    with pytest.raises(ValueError, match="n_train must be a multiple of 10 and >= 10, got 15"):
        write_random_cifar10(tmp_path, n_train=15, n_test=10)


def test_training_flops_of_cnn10_match_the_issue() -> None:
    flops = training_flops_per_image(build_backbone("cnn10", 3, 32), (3, 32, 32))
    assert flops == pytest.approx(1.6e9, rel=0.02)  # "about 1.6 GFLOP per training image"
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_bf16_tflops("Some GPU") is None


def test_worker_counts_and_pjrt_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert worker_counts(2) == [0, 1, 2] and worker_counts(16) == [0, 1, 2, 4, 8, 16]
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    assert pjrt_device() == "TPU"


# ------------------------------------------------------------------------------ slower paths
@pytest.mark.slow
def test_quick_lightning_overhead_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert run.main(["--quick", "--device", "cpu", "--only", "lightning", "--json", str(out)]) == 0
    (row,) = _rows(out).values()
    assert row["unit"] == "ms/step" and row["ours"] > 0 and row["baseline"] > 0
    assert math.isfinite(row["ratio"]) and row["ratio"] < 1  # (L - plain) / L
    assert row["extra"]["overhead_ms"] == pytest.approx(row["ours"] - row["baseline"])


@pytest.mark.slow
def test_training_benchmark_runs_on_the_cpu() -> None:
    from benchmarks.training import bench_training

    rows = bench_training(CPU, backbone="cnn3", n_train=320, n_test=40, batch=64, epochs=2)
    assert [r.unit for r in rows] == ["img/s", "s"]
    assert all(math.isfinite(r.ratio) and r.ratio > 0 for r in rows)


@pytest.mark.slow
@pytest.mark.xla
@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="needs torch_xla")
def test_quick_xla_rows(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert run.main(["--quick", "--only", "xla", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "xla" not in report["skipped"], report["skipped"]
    graphs, step = report["rows"]
    assert graphs["unit"] == "graphs" and len(graphs["extra"]["graphs_per_epoch"]) == 3
    assert graphs["baseline"] == sum(graphs["extra"]["graphs_per_epoch"]) > 0
    assert step["unit"] == "ms/step" and step["ours"] > 0 and step["baseline"] > 0
