"""``make demo``: the offline quickstart, softmax vs affinity on imbalanced Fashion-MNIST.

Finds Fashion-MNIST (``data/``, Debian's ``dataset-fashion-mnist`` package, installing it with
apt-get when run as root, or torchvision's download when online), trains the quickstart config
once per head through the real CLI, and prints the per-class tables side by side with the
headline metrics and the pictures written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from aff_lightning.cli import main as cli_main

__all__ = ["ensure_fashion_mnist", "main", "side_by_side"]

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
HEADS = {"softmax": ["--model.head=softmax"], "affinity": ["--model.head=affinity"]}


def ensure_fashion_mnist(data_dir: Path) -> None:
    """Make Fashion-MNIST findable: Debian's package first (offline), torchvision second."""
    from aff_lightning.data import DatasetNotFoundError, ImbalancedDataModule

    dm = ImbalancedDataModule(dataset="fashion_mnist", data_dir=str(data_dir), minority_count=10)
    try:
        dm.setup("fit")
        return
    except DatasetNotFoundError:
        pass
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("Fashion-MNIST not found; installing Debian's dataset-fashion-mnist package ...")
        cmd = ["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"]
        if subprocess.run(cmd, check=False, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True)
            subprocess.run(cmd, check=False, capture_output=True)
        if DEBIAN_DIR.is_dir():
            return
    print("Fashion-MNIST not found offline; trying torchvision's download ...")
    from torchvision.datasets import FashionMNIST

    FashionMNIST(str(data_dir), train=True, download=True)
    FashionMNIST(str(data_dir), train=False, download=True)


def side_by_side(results: dict[str, dict]) -> str:
    """Per-class F1 (and recall) of each head next to each other, then the headline metrics."""
    heads = list(results)
    first = results[heads[0]]
    minority = set(first["minority_classes"])
    counts = first["per_class"]["count"]
    header = f"{'class':>7} {'count':>6} " + " ".join(
        f"{h + ' ' + m:>16}" for h in heads for m in ("recall", "F1")
    )
    lines = [header]
    for c, n in enumerate(counts):
        mark = "*" if c in minority else " "
        cells = " ".join(
            f"{results[h]['per_class'][m][c]:>16.4f}" for h in heads for m in ("recall", "f1")
        )
        lines.append(f"{c:>6}{mark} {int(n):>6d} {cells}")
    lines.append("(* minority class)")
    lines.append("")
    keys = ("acc", "micro_f1", "macro_f1", "balanced_acc", "minority_acc", "majority_acc")
    lines.append(f"{'metric':>14} " + " ".join(f"{h:>10}" for h in heads))
    for k in keys:
        lines.append(f"{k:>14} " + " ".join(f"{results[h]['metrics'][k]:>10.4f}" for h in heads))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--out", default="demo_out", help="folder for logs, checkpoints, plots")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--max-epochs", type=int, default=None)
    args, overrides = parser.parse_known_args(argv)
    ensure_fashion_mnist(Path(args.data_dir))
    results: dict[str, dict] = {}
    for head, head_args in HEADS.items():
        root = Path(args.out) / head
        cli_args = [
            "fit",
            "--config",
            args.config,
            f"--data.data_dir={args.data_dir}",
            f"--trainer.default_root_dir={root}",
            *head_args,
            *overrides,
        ]
        if args.max_epochs is not None:
            cli_args.append(f"--trainer.max_epochs={args.max_epochs}")
        print(f"\n=== {head}: python cli.py {' '.join(cli_args)}")
        code = cli_main(cli_args)
        if code:
            return code
        found = sorted(root.rglob("test_metrics.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            print(f"error: no test_metrics.json under {root}", file=sys.stderr)
            return 1
        results[head] = json.loads(found[-1].read_text())
    print("\n=== Test set, softmax vs affinity (imbalanced Fashion-MNIST 1000:10)")
    print(side_by_side(results))
    pictures = sorted(Path(args.out).rglob("*.png"))
    if pictures:
        print("\nPictures written:")
        for p in pictures:
            print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
