"""Shared pieces of the benchmarks: timing, the machine line, result rows and the table."""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

__all__ = [
    "BackboneName",
    "Row",
    "device_sync",
    "format_markdown",
    "format_table",
    "machine_info",
    "machine_line",
    "resolve_device",
    "time_call",
]

BackboneName = Literal["cnn10", "cnn3", "mobilenet", "resnet50"]

# How the ratio column of a row reads: "speedup" = baseline time / our time (or our rate /
# baseline rate), higher is better for us; "cost" = our time / baseline time, informational;
# "fraction" = a share of something, printed in percent; "count" = a plain number.
RATIO_KINDS = ("speedup", "cost", "fraction", "count")


@dataclass
class Row:
    """One line of the results table.

    Attributes:
        benchmark: what was compared, e.g. "data: images/s vs DataLoader (0 workers)".
        ours: the project's number in ``unit``.
        baseline: the comparison's number in ``unit`` (None when there is none).
        unit: "img/s", "ms/step", "ms", "graphs", ...
        ratio: the number the target is about (see ``ratio_kind``).
        ratio_kind: one of "speedup", "cost", "fraction", "count".
        target: the target as text, e.g. ">= 5x" (None: informational).
        passed: whether ``ratio`` meets the target (None: no target).
        note: how it was measured (sizes, repeats, what the baseline was).
        extra: further measured numbers for the JSON output.
    """

    benchmark: str
    ours: float
    baseline: float | None
    unit: str
    ratio: float | None
    ratio_kind: str
    target: str | None = None
    passed: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ratio_kind not in RATIO_KINDS:
            raise ValueError(f"ratio_kind must be one of {RATIO_KINDS}, got {self.ratio_kind!r}")

    def ratio_text(self) -> str:
        if self.ratio is None or not math.isfinite(self.ratio):
            return "-"
        if self.ratio_kind == "fraction":
            return f"{100.0 * self.ratio:.2f} %"
        if self.ratio_kind == "count":
            return f"{self.ratio:g}"
        suffix = " faster" if self.ratio_kind == "speedup" else " cost"
        return f"{self.ratio:.2f}x{suffix}"

    def result_text(self) -> str:
        if self.passed is None:
            return "info"
        return "PASS" if self.passed else "FAIL"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; ``"cpu"``/``"cuda"`` as given.

    Raises:
        ValueError: an unknown name, or ``"cuda"`` without a GPU.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch.cuda.is_available() is False")
    return torch.device(name)


def device_sync(device: torch.device) -> None:
    """Wait for queued work on ``device`` (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    repeats: int,
    warmup: int = 1,
    inner: int = 1,
) -> list[float]:
    """Seconds per call of ``fn``: ``warmup`` untimed calls, then ``repeats`` timings.

    Each timing runs ``fn`` ``inner`` times between two device syncs and divides by ``inner``,
    so short calls are timed in a loop and asynchronous CUDA work is counted.

    Returns:
        ``repeats`` seconds-per-call values (take the median).
    """
    for _ in range(warmup):
        fn()
    device_sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        device_sync(device)
        times.append((time.perf_counter() - start) / inner)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """The facts the results depend on: CPU, cores, threads, library versions, device."""
    import lightning
    import torchvision

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
        "device": device.type,
    }
    try:  # other jobs on the machine skew timings: record how busy it was
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def machine_line(info: dict[str, Any]) -> str:
    device = info.get("gpu", "no GPU") if info["device"] == "cuda" else "CPU only (no GPU)"
    return (
        f"machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads); "
        f"device {info['device']}: {device}; torch {info['torch']}, torchvision "
        f"{info['torchvision']}, lightning {info['lightning']}, python {info['python']}"
        + (f"; load average {info['load_average_1min']}" if "load_average_1min" in info else "")
    )


_HEADER = ("benchmark", "ours", "baseline", "unit", "ratio", "target", "result")


def _cells(row: Row) -> tuple[str, ...]:
    def num(x: float | None) -> str:
        if x is None or not math.isfinite(x):
            return "-"
        return f"{x:.4g}" if abs(x) < 1e3 else f"{x:,.0f}"

    return (
        row.benchmark,
        num(row.ours),
        num(row.baseline),
        row.unit,
        row.ratio_text(),
        row.target or "-",
        row.result_text(),
    )


def format_table(rows: list[Row]) -> str:
    """A fixed-width text table of ``rows``."""
    cells = [_HEADER, *(_cells(r) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_HEADER))]
    lines = []
    for i, c in enumerate(cells):
        lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: list[Row], *, notes: bool = True) -> str:
    """A Markdown table of ``rows``, then (``notes``) one bullet per row saying how it was run."""
    lines = [
        "| " + " | ".join(_HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * 4 + ["---", "---"]) + "|",
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    if notes:
        lines.append("")
        lines += [f"- **{r.benchmark}**: {r.note}" for r in rows if r.note]
    return "\n".join(lines)
