"""Benchmark 4: XLA graphs compiled per epoch and the steady-state step time.

The measurement runs in a child process (``python -m benchmarks.xla_graphs --json OUT ...``)
with ``PJRT_DEVICE`` set (CPU here; TPU where the host has one, or whatever the caller's
environment says), since torch_xla's runtime is process-wide. The child trains a small
:class:`~aff_lightning.model.AffinityClassifier` (affinity head) on random CIFAR-10-shaped data
through the real :class:`~aff_lightning.data.ImbalancedDataModule` (augmentation on, the test
split evaluated every epoch in padded batches) with ``Trainer(accelerator="xla")`` from
:func:`aff_lightning.xla.register_xla_accelerator` and the
:class:`~aff_lightning.xla.CompileMonitor` callback, which reads
:func:`aff_lightning.xla.compile_count` after every step and epoch. It then trains the same
model eagerly on the CPU as the step-time reference.

Step time: each training epoch is timed from its start to the end of its last batch, with the
device drained (``torch_xla.sync()`` + ``xm.wait_device_ops()``) at both ends, divided by its
steps; the steady state is the median over the epochs after the first two (compilation).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Row

__all__ = ["bench_xla", "main", "pjrt_device"]

WARMUP_EPOCHS = 2


class SkippedError(RuntimeError):
    """The benchmark cannot run here (the message says why)."""


def pjrt_device() -> str:
    """``PJRT_DEVICE`` if set, else "TPU" when the host exposes TPU chips, else "CPU"."""
    if os.environ.get("PJRT_DEVICE"):
        return os.environ["PJRT_DEVICE"]
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return "TPU"
    return "CPU"


# ------------------------------------------------------------------------------ child process
def _drain() -> None:
    """Wait for the graphs already launched (the step's ``mark_step`` launched its graph).

    No ``torch_xla.sync()``: that would cut the pending epoch-end bookkeeping into a graph of
    its own and add compilations the training run itself does not have.
    """
    import torch_xla.core.xla_model as xm

    xm.wait_device_ops()


def _run_fit(accelerator: str, args: argparse.Namespace, data_dir: str) -> dict[str, Any]:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    from aff_lightning.data import ImbalancedDataModule
    from aff_lightning.model import AffinityClassifier
    from aff_lightning.xla import CompileMonitor

    xla = accelerator == "xla"

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.steps: list[int] = []
            self._start = 0.0

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if xla:
                _drain()
            self._start = time.perf_counter()

        def on_train_batch_end(
            self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
        ) -> None:
            if i + 1 == trainer.num_training_batches:
                if xla:
                    _drain()
                self.seconds.append(time.perf_counter() - self._start)
                self.steps.append(i + 1)

    torch.manual_seed(0)
    dm = ImbalancedDataModule(
        "cifar10",
        data_dir,
        minority_count=1,
        minority_classes=(),
        batch_size=args.batch,
        eval_batch_size=args.eval_batch,
        augment=True,
        monitor_test=True,
    )
    model = AffinityClassifier(
        backbone=args.backbone, head="affinity", minority_classes=(), milestones=(10_000,)
    )
    monitor = CompileMonitor(warmup_epochs=WARMUP_EPOCHS, warn=False)
    timer = EpochTimer()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[monitor, timer],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    out: dict[str, Any] = {
        "fit_seconds": time.perf_counter() - start,
        "epoch_seconds": timer.seconds,
        "epoch_steps": timer.steps,
    }
    if xla:
        counts = monitor.epoch_counts
        out["epoch_graph_counts"] = counts
        out["graphs_per_epoch"] = [b - a for a, b in zip([0, *counts[:-1]], counts, strict=True)]
        out["step_graph_counts"] = monitor.counts
        out["graphs_total"] = monitor.graphs_total
        out["flat_since_step"] = monitor.flat_since_step
    return out


def _steady_ms(run: dict[str, Any]) -> float:
    per_step = [s / n for s, n in zip(run["epoch_seconds"], run["epoch_steps"], strict=True)]
    steady = per_step[WARMUP_EPOCHS:] or per_step[-1:]
    return 1e3 * statistics.median(steady)


def main(argv: list[str] | None = None) -> int:
    """Child entry point: fit on XLA, then eagerly on the CPU; write the numbers as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="output file")
    parser.add_argument("--backbone", default="cnn3")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eval-batch", type=int, default=100)
    parser.add_argument("--n-train", type=int, default=640)
    parser.add_argument("--n-test", type=int, default=250)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    import logging

    import torch_xla.runtime as xr

    from aff_lightning.xla import register_xla_accelerator
    from benchmarks.fakecifar import write_random_cifar10

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    register_xla_accelerator()
    with tempfile.TemporaryDirectory(prefix="aff_bench_xla_") as tmp:
        write_random_cifar10(tmp, n_train=args.n_train, n_test=args.n_test)
        xla_run = _run_fit("xla", args, tmp)
        eager_run = _run_fit("cpu", args, tmp)
    result = {
        "pjrt_device": xr.device_type(),
        "config": vars(args),
        "xla": xla_run,
        "eager_cpu": eager_run,
        "xla_steady_ms": _steady_ms(xla_run),
        "eager_steady_ms": _steady_ms(eager_run),
    }
    Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


# ------------------------------------------------------------------------------ parent side
def run_child(
    quick: bool, timeout: float, device: str | None = None, threads: int | None = None
) -> dict[str, Any]:
    """Run :func:`main` in a subprocess with ``PJRT_DEVICE`` and return its JSON."""
    if importlib.util.find_spec("torch_xla") is None:
        raise SkippedError("torch_xla is not installed")
    quick_config = ["--batch", "32", "--n-train", "160", "--n-test", "50", "--eval-batch", "32"]
    config = [*quick_config, "--epochs", "3"] if quick else []
    if threads:
        config += ["--threads", str(threads)]
    env = {**os.environ, "PJRT_DEVICE": device or pjrt_device()}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="aff_bench_xla_out_") as tmp:
        out = Path(tmp) / "xla.json"
        cmd = [sys.executable, "-m", "benchmarks.xla_graphs", "--json", str(out), *config]
        try:
            proc = subprocess.run(
                cmd, env=env, cwd=root, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as err:
            raise SkippedError(f"the XLA child did not finish in {timeout:g} s") from err
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout)[-2000:]
            raise SkippedError(f"the XLA child failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


def bench_xla(
    *, quick: bool = False, timeout: float | None = None, threads: int | None = None
) -> list[Row]:
    """Rows: graphs compiled after the warm-up epochs (target 0); steady step vs eager CPU.

    Raises:
        SkippedError: torch_xla missing, or the child failed or timed out.
    """
    res = run_child(quick, timeout or (600.0 if quick else 1200.0), threads=threads)
    cfg, xla = res["config"], res["xla"]
    dev = res["pjrt_device"]
    per_epoch = xla["graphs_per_epoch"]
    late = sum(per_epoch[WARMUP_EPOCHS:])
    size = (
        f"{cfg['backbone']}, affinity head m=1, batch {cfg['batch']}, {cfg['n_train']} random "
        f"train images ({xla['epoch_steps'][0]} steps/epoch) with augmentation, "
        f"{cfg['n_test']} test images evaluated every epoch in padded batches of "
        f"{cfg['eval_batch']}, {cfg['epochs']} epochs"
    )
    steady = f"median over epochs {WARMUP_EPOCHS}..{cfg['epochs'] - 1}"
    return [
        Row(
            benchmark=f"xla ({dev}): new graphs after {WARMUP_EPOCHS} warm-up epochs",
            ours=float(late),
            baseline=float(xla["graphs_total"]),
            unit="graphs",
            ratio=float(late),
            ratio_kind="count",
            target="== 0",
            passed=late == 0,
            note=(
                f"{size}; graphs compiled per epoch (train + eval) {per_epoch}, baseline column "
                f"= all graphs of the fit; CompileMonitor / aff_lightning.xla.compile_count()"
            ),
            extra={"graphs_per_epoch": per_epoch, "graphs_total": xla["graphs_total"]},
        ),
        Row(
            benchmark=f"xla ({dev}): steady-state step vs eager CPU",
            ours=res["xla_steady_ms"],
            baseline=res["eager_steady_ms"],
            unit="ms/step",
            ratio=res["eager_steady_ms"] / res["xla_steady_ms"],
            ratio_kind="speedup",
            note=(
                f"{size}; Trainer(accelerator='xla') vs Trainer(accelerator='cpu') in the same "
                f"child process, training-epoch time / steps, device drained at both ends, "
                f"{steady}; XLA fit {xla['fit_seconds']:.0f} s including compilation"
            ),
            extra={"xla": xla, "eager_cpu": res["eager_cpu"]},
        ),
    ]


if __name__ == "__main__":
    sys.exit(main())
