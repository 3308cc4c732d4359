"""Run the speed benchmarks side by side on this machine and print one table.

Usage::

    python -m benchmarks.run                      # everything that fits the device (make bench)
    python -m benchmarks.run --quick              # CI-sized
    python -m benchmarks.run --only head,data --json out.json --markdown out.md

Benchmarks (``--only``, comma-separated):

- ``data``: images/s of the device-resident data path vs a per-image torchvision DataLoader
  (:mod:`benchmarks.data_path`), target >= 5x;
- ``lightning``: time per training step of the LightningModule vs a plain PyTorch loop
  (:mod:`benchmarks.lightning_overhead`), target overhead <= 5 %;
- ``head``: affinity head + loss vs the naive (N, C, M, D) formulation and vs a linear head,
  and its share of a cnn10 step (:mod:`benchmarks.head`), targets >= 5x and < 3 %;
- ``xla``: graphs compiled per epoch and steady-state step time on XLA (PJRT CPU, or TPU when
  present) in a subprocess (:mod:`benchmarks.xla_graphs`), target: no new graphs after warm-up;
- ``train`` (default only on CUDA): end-to-end cnn10 images/s and seconds per 100-epoch run next
  to the compute limit (:mod:`benchmarks.training`).

Every number is a median over repeats, measured in this one run; the machine line says where.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    Row,
    format_markdown,
    format_table,
    machine_info,
    machine_line,
    resolve_device,
)

__all__ = ["BENCHMARKS", "main", "run_benchmarks"]

BENCHMARKS = ("data", "lightning", "head", "xla", "train")
DEFAULT_REPEATS = 5
QUICK_REPEATS = 2


def _parse_only(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"--only takes a comma-separated subset of {','.join(BENCHMARKS)}, got {text!r}"
        )
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="aff_lightning speed benchmarks, measured side by side on this machine.",
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        default=None,
        help=f"timed repeats per measurement (default {DEFAULT_REPEATS}, --quick {QUICK_REPEATS})",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch intra-op threads (default: torch's choice); on a shared or oversubscribed "
        "CPU one thread avoids waiting for descheduled OpenMP threads",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI")
    parser.add_argument(
        "--only",
        type=_parse_only,
        default=None,
        help=f"comma-separated subset of {','.join(BENCHMARKS)} "
        "(default: all but train; train too on CUDA)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--markdown", type=Path, default=None, help="write a Markdown report")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense bf16 peak of the GPU for the train benchmark's compute limit",
    )
    parser.add_argument(
        "--train-compile", action="store_true", help="torch.compile the backbone in train"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 when a target is missed"
    )
    return parser


def run_benchmarks(
    names: list[str], device: torch.device, repeats: int, quick: bool, args: argparse.Namespace
) -> tuple[list[Row], dict[str, str], dict[str, float]]:
    """Run the named benchmarks; returns (rows, skipped name -> reason, name -> seconds)."""
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        if name == "data":
            from benchmarks.data_path import bench_data

            rows += bench_data(device, repeats=repeats, quick=quick)
        elif name == "lightning":
            from benchmarks.lightning_overhead import bench_lightning

            rows += bench_lightning(device, repeats=repeats, quick=quick)
        elif name == "head":
            from benchmarks.head import bench_head

            rows += bench_head(device, repeats=repeats, quick=quick)
        elif name == "xla":
            from benchmarks.xla_graphs import SkippedError, bench_xla

            try:
                rows += bench_xla(quick=quick, threads=args.threads)
            except SkippedError as err:
                skipped[name] = str(err)
        elif name == "train":
            from benchmarks.training import bench_training

            rows += bench_training(
                device, quick=quick, compile=args.train_compile, peak_tflops=args.peak_tflops
            )
        seconds[name] = time.perf_counter() - start
        print(f"[bench] {name} done in {seconds[name]:.0f} s", file=sys.stderr, flush=True)
    return rows, skipped, seconds


def _markdown(report: dict[str, Any], rows: list[Row]) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}  ",
        f"{machine_line(report['machine'])}  ",
        f"Settings: repeats={report['repeats']}, quick={report['quick']}, "
        f"torch threads={report['threads']}, "
        f"benchmarks={','.join(report['benchmarks'])}; total {report['total_seconds']:.0f} s; "
        f"load average at the end {report['machine'].get('load_average_1min_end', '-')}",
        "",
        format_markdown(rows),
    ]
    if report["skipped"]:
        lines += ["", "Skipped:"]
        lines += [f"- {name}: {why}" for name, why in report["skipped"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the benchmarks, print the table; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.only or [n for n in BENCHMARKS if n != "train" or device.type == "cuda"]
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)

    machine = machine_info(device)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # Lightning's hints about DataLoader workers and logging intervals do not apply here.
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*log_every_n_steps.*")
        warnings.filterwarnings("ignore", message=r".*but have no `val_dataloader`.*")
        rows, skipped, seconds = run_benchmarks(names, device, repeats, args.quick, args)
    total = time.perf_counter() - start
    if hasattr(os, "getloadavg"):  # how busy the machine was by the end (other jobs skew times)
        machine["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    if device.type != "cuda" and "train" not in names:
        skipped.setdefault("train", "no GPU on this machine: the GPU section was not measured")

    command = "python -m benchmarks.run" + (
        " " + shlex.join(argv if argv is not None else sys.argv[1:])
        if (argv if argv is not None else sys.argv[1:])
        else ""
    )
    report: dict[str, Any] = {
        "command": command,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "repeats": repeats,
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "benchmarks": names,
        "seconds": seconds,
        "total_seconds": total,
        "rows": [r.to_dict() for r in rows],
        "skipped": skipped,
    }
    print(machine_line(machine))
    print(format_table(rows))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(f"total {total:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(_markdown(report, rows))
    missed = [r.benchmark for r in rows if r.passed is False]
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
