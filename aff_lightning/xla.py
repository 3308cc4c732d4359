"""XLA helpers: ``accelerator="xla"`` on any PJRT device, a compile monitor, metric sync.

Three pieces, all importable without ``torch_xla`` installed (it is imported lazily):

- :func:`register_xla_accelerator` makes ``Trainer(accelerator="xla")`` (and the CLI's
  ``--trainer.accelerator=xla``) run on whatever PJRT device is configured: a TPU on a TPU VM,
  the CPU under ``PJRT_DEVICE=CPU``. Lightning's own ``"tpu"`` counts chips through the TPU VM's
  metadata and PCI bus, so it is refused anywhere else; it is left untouched and keeps working
  on TPU VMs.
- :class:`CompileMonitor` records how many XLA graphs have been compiled after every training
  step and warns, with the likely causes, when new graphs keep appearing after warm-up.
- :func:`xla_dist_sync_fn` / :func:`sync_metrics_on_xla`: Lightning's XLA strategies do not
  initialise ``torch.distributed``, so torchmetrics would silently compute each TPU core's
  metrics from that core's share of the data. These gather metric states with
  ``xm.all_gather`` instead.

What is verified where (``tests/test_xla.py``, torch_xla 2.9, Lightning 2.6):

- On one PJRT CPU device (the real lazy-tensor path): the accelerator registration and strategy
  choice, ``bf16-true`` precision, a full fit with the compile monitor, the warning on dynamic
  shapes, ``xm.all_gather`` on one device, and metrics equal on XLA and CPU.
- With the collective emulated (two replicas' states returned by a patched gather): that
  synced metrics equal the metrics of all replicas' data together.
- With ``CPU_NUM_DEVICES=2``: that ``accelerator="xla"`` then picks Lightning's ``XLAStrategy``
  for two devices without starting the XLA runtime (``xmp.spawn`` refuses to launch once it is
  started).
- Only on a TPU with several cores: the launch of several replicas, and the real
  ``xm.all_gather`` inside ``Metric.compute`` under ``XLAStrategy``. Two PJRT CPU devices in one
  process hang in the all-reduce rendezvous and abort (torch_xla 2.9, checked with
  ``torch_xla.launch`` and a bare ``xm.all_gather``), so nothing collective across replicas
  runs on a machine without a TPU.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.accelerators import AcceleratorRegistry, XLAAccelerator
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

__all__ = [
    "CompileMonitor",
    "PJRTAccelerator",
    "compile_count",
    "register_xla_accelerator",
    "sync_metrics_on_xla",
    "xla_available",
    "xla_dist_sync_fn",
    "xla_distributed_available",
]

ACCELERATOR_NAME = "xla"
_PATCH_MARK = "_aff_lightning_xla_patch"

# Counters torch_xla bumps on the usual causes of recompilation: ``aten::*`` counters are ops
# that fell back to the CPU (``aten::nonzero`` from boolean indexing, ``aten::_local_scalar_dense``
# from ``.item()``); ``xla::nonzero`` and ``xla::masked_select`` produce data-dependent shapes.
_DYNAMIC_SHAPE_COUNTERS = ("xla::nonzero", "xla::masked_select", "xla::unique2")

_CAUSES = (
    "dynamic shapes: boolean indexing (x[mask]), nonzero, masked_select or unique in a step "
    "(torchmetrics' ignore_index does boolean indexing)",
    "a ragged last batch (drop it, or pad it and mask the padding)",
    "a batch size or input size that changes between steps",
    ".item(), .cpu(), print or Python control flow on tensor values inside a step",
    "Python ints that change a shape every step (x[:n], arange(n), a loop over range(n))",
)


def xla_available() -> bool:
    """Whether ``torch_xla`` is installed (checked without importing it)."""
    return importlib.util.find_spec("torch_xla") is not None


# --------------------------------------------------------------------------- accelerator
def _pjrt_device_count() -> int:
    """Devices of the configured PJRT device type on this host, without starting the runtime.

    Starting the runtime in the launching process would make ``xmp.spawn`` refuse to run, so
    the count comes from the same sources torch_xla's launcher uses: the TPU's PCI bus and
    metadata (Lightning's own TPU count), ``<TYPE>_NUM_DEVICES`` (``CPU_NUM_DEVICES``, default
    1 for the CPU client), and only for other device types the runtime itself.
    """
    if not xla_available():
        return 0
    import torch_xla.runtime as xr  # importing torch_xla sets PJRT_DEVICE when unset

    device_type = xr.device_type()
    if device_type is None:
        return 0
    if device_type == "TPU":
        try:
            count = int(XLAAccelerator.auto_device_count())
        except (ValueError, AssertionError, OSError, RuntimeError):
            count = 0
        if count > 0:
            return count
    env = os.environ.get(f"{device_type}_NUM_DEVICES")
    if env:
        return int(env)
    if device_type == "CPU":
        return 1
    return int(xr.global_runtime_device_count())


def _parse_devices_value(devices: int | str | list[int], count: int) -> int | list[int]:
    """``devices`` for ``accelerator="xla"``: 1, all (``count`` or -1) or one index ``[i]``."""
    value: Any = devices
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = [int(x) for x in text.split(",") if x.strip()]
            except ValueError:
                value = None
    if isinstance(value, int) and not isinstance(value, bool):
        if value == -1:
            return count
        if value in (1, count):
            return value
    elif isinstance(value, (list, tuple)) and len(value) == 1:
        index = value[0]
        if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < count:
            return [index]
    raise ValueError(
        f"devices must be 1, {count} or -1 (all), or [i] with 0 <= i < {count} for "
        f"accelerator='xla' on this PJRT device, got {devices!r}"
    )


class PJRTAccelerator(XLAAccelerator):
    """Lightning's XLA accelerator, counting devices through PJRT instead of TPU metadata.

    Registered as ``"xla"`` by :func:`register_xla_accelerator`. It runs on the device type
    torch_xla is configured for (``PJRT_DEVICE``: TPU, CPU, ...), with ``devices`` 1, all
    (the count or -1) or one index ``[i]``. Strategies and precision are Lightning's XLA ones
    (``SingleDeviceXLAStrategy``, ``XLAStrategy``, ``XLAPrecision``: ``"32-true"``,
    ``"16-true"``, ``"bf16-true"``; the mixed precisions raise).

    ``"bf16-true"`` is Lightning's ``XLA_USE_BF16=1``: torch_xla (deprecated after 2.6, still
    honoured by 2.9) then stores *every* float32 tensor on the device as bfloat16, metric
    arithmetic included (integer states stay exact until converted to float).
    """

    @staticmethod
    def name() -> str:
        return ACCELERATOR_NAME

    # Not lru_cached like the base class's: the count follows PJRT_DEVICE / <TYPE>_NUM_DEVICES.
    @staticmethod
    def is_available() -> bool:  # type: ignore[override]
        try:
            return _pjrt_device_count() > 0
        except (ImportError, ValueError, AssertionError, OSError, RuntimeError):
            return False

    @staticmethod
    def auto_device_count() -> int:  # type: ignore[override]
        return _pjrt_device_count()

    @staticmethod
    def parse_devices(devices: int | str | list[int]) -> int | list[int]:
        return _parse_devices_value(devices, _pjrt_device_count())

    @staticmethod
    def get_parallel_devices(devices: int | str | list[int]) -> list[torch.device]:
        parsed = _parse_devices_value(devices, _pjrt_device_count())
        if isinstance(parsed, int):
            return [torch.device("xla", i) for i in range(parsed)]
        return [torch.device("xla", parsed[0])]


def _patch_strategy_choice() -> None:
    """Let an XLA accelerator chosen by a registered name get an XLA strategy.

    Lightning's ``_AcceleratorConnector._choose_strategy`` picks ``SingleDeviceXLAStrategy`` /
    ``XLAStrategy`` only for the string ``"tpu"`` or an ``XLAAccelerator`` *instance*; for any
    other registered name it picks ``SingleDeviceStrategy`` and then refuses the pair. By then
    the connector has built the accelerator from the name, so hand it the instance: exactly
    what ``Trainer(accelerator=PJRTAccelerator())`` does. Flags other than registered XLA
    names (``"tpu"`` included) are left as they are.
    """
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    original: Callable[[Any], Any] = _AcceleratorConnector._choose_strategy
    if getattr(original, _PATCH_MARK, False):
        return

    def _choose_strategy(self: Any) -> Any:
        flag = self._accelerator_flag
        accelerator = getattr(self, "accelerator", None)
        if isinstance(flag, str) and flag != "tpu" and isinstance(accelerator, XLAAccelerator):
            self._accelerator_flag = accelerator
        return original(self)

    setattr(_choose_strategy, _PATCH_MARK, True)
    _choose_strategy.__wrapped__ = original  # type: ignore[attr-defined]
    _choose_strategy.__doc__ = original.__doc__
    _AcceleratorConnector._choose_strategy = _choose_strategy  # type: ignore[method-assign]


def register_xla_accelerator() -> None:
    """Make ``Trainer(accelerator="xla")`` run on the configured PJRT device. Idempotent.

    Registers :class:`PJRTAccelerator` under ``"xla"`` in Lightning's ``AcceleratorRegistry``
    (unless that name is taken already) and lets Lightning pick its XLA strategies for it (see
    :func:`_patch_strategy_choice`). Does not import ``torch_xla``; ``accelerator="tpu"`` is
    unchanged.
    """
    if ACCELERATOR_NAME not in AcceleratorRegistry:
        AcceleratorRegistry.register(
            ACCELERATOR_NAME,
            PJRTAccelerator,
            description="XLA on the configured PJRT device (aff_lightning.xla.PJRTAccelerator)",
        )
    _patch_strategy_choice()


# --------------------------------------------------------------------------- compile monitor
def mark_step(device: torch.device) -> None:
    """Cut the lazy XLA graph here (``torch_xla.sync()``); a no-op off XLA.

    Called by the model at epoch boundaries so that epoch-end work (metric resets, logging)
    runs as its own small graph instead of being folded into the next training step, which
    would give that step a new graph every epoch.
    """
    if device.type == "xla":
        import torch_xla

        torch_xla.sync()


def compile_count() -> int:
    """Graphs torch_xla has compiled in this process (0 before the first).

    Reads a host-side counter (``metric_data("CompileTime")``): no device sync, no execution
    of pending lazy tensors.
    """
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return 0 if data is None else int(data[0])


def _fallback_counters() -> dict[str, int]:
    """torch_xla counters that point at dynamic shapes or host syncs (host-side reads)."""
    import torch_xla.debug.metrics as met

    names = [
        n for n in met.counter_names() if n.startswith("aten::") or n in _DYNAMIC_SHAPE_COUNTERS
    ]
    return {n: int(met.counter_value(n) or 0) for n in names}


class CompileMonitor(Callback):
    """Counts XLA graph compilations during ``fit``; warns when they continue after warm-up.

    Inactive (a no-op) unless the trainer's root device is an XLA device. After every training
    batch it appends the graphs compiled since the fit started to :attr:`counts`, and at every
    training epoch end (after that epoch's validation) to :attr:`epoch_counts`. Reading the
    count is a host-side counter: no device sync.

    A healthy static-shape run compiles its graphs in the first epoch or two and then reuses
    them. When new graphs appear after ``warmup_epochs`` epochs at two or more observations (one
    extra graph, e.g. from a learning-rate milestone, is tolerated), it warns once on rank zero,
    naming the step, the likely causes and the torch_xla counters that grew. At fit end it
    prints one line: ``XLA: N graphs compiled; flat since step S (epoch E)`` or ``...; still
    compiling at the last step (step S, epoch E)``. Steps are optimizer steps
    (``trainer.global_step``), epochs count from 0 as in Lightning's progress bar.

    Args:
        warmup_epochs: epochs (>= 0) during which new graphs are expected.
        warn: warn about compilations after warm-up.

    Attributes:
        counts: cumulative graphs after each training batch.
        epoch_counts: cumulative graphs at each training epoch end.
        graphs_total: graphs compiled during the fit (set at fit end).
        flat_since_step: the step after which no graph was compiled (set at fit end; None when
            the last step, or the validation after it, still compiled).
        flat_since_epoch: the epoch of that step.
    """

    def __init__(self, warmup_epochs: int = 2, warn: bool = True) -> None:
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int):
            raise TypeError(f"warmup_epochs must be an int, got {warmup_epochs!r}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.warmup_epochs = warmup_epochs
        self.warn = bool(warn)
        self.active = False
        self._reset()

    def _reset(self) -> None:
        self.counts: list[int] = []
        self.epoch_counts: list[int] = []
        self.graphs_total: int | None = None
        self.flat_since_step: int | None = None
        self.flat_since_epoch: int | None = None
        self._baseline = 0
        self._last = 0
        self._last_rise: tuple[int, int] = (0, 0)
        self._late_rises = 0
        self._warned = False
        self._counters_at_start: dict[str, int] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self.active = trainer.strategy.root_device.type == "xla"
        if not self.active:
            return
        self._baseline = compile_count()
        self._counters_at_start = _fallback_counters()

    def _observe(self, trainer: L.Trainer, where: str) -> int:
        count = compile_count() - self._baseline
        step, epoch = trainer.global_step, trainer.current_epoch
        if count > self._last:
            self._last_rise = (step, epoch)
            if epoch >= self.warmup_epochs:
                self._late_rises += 1
                if self.warn and not self._warned and self._late_rises >= 2:
                    self._warned = True
                    if trainer.is_global_zero:
                        self._warn(count, step, epoch, where)
        self._last = count
        return count

    def _warn(self, count: int, step: int, epoch: int, where: str) -> None:
        now = _fallback_counters()
        grown = {
            n: v - self._counters_at_start.get(n, 0)
            for n, v in now.items()
            if v > self._counters_at_start.get(n, 0)
        }
        counters = ", ".join(f"{n} +{d}" for n, d in sorted(grown.items())) or "none"
        causes = "; ".join(_CAUSES)
        message = (
            f"XLA is still compiling new graphs after the {self.warmup_epochs}-epoch warm-up: "
            f"{count} graphs so far, the latest at the {where} (step {step}, epoch {epoch}). "
            f"Each new graph costs a compilation; usual causes: {causes}. "
            f"torch_xla counters that grew during the fit (CPU fallbacks, dynamic shapes): "
            f"{counters}."
        )
        warnings.warn(message, UserWarning, stacklevel=3)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.active:
            self.counts.append(self._observe(trainer, "training step"))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active:
            self.epoch_counts.append(self._observe(trainer, "end of the epoch"))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        self.graphs_total = self._last
        step, epoch = self._last_rise
        # Flat means at least one optimizer step ran after the last new graph.
        if self._last > 0 and step >= trainer.global_step:
            self.flat_since_step = self.flat_since_epoch = None
            tail = f"still compiling at the last step (step {step}, epoch {epoch})"
        else:
            self.flat_since_step, self.flat_since_epoch = step, epoch
            tail = f"flat since step {step} (epoch {epoch})"
        if trainer.is_global_zero:
            print(f"XLA: {self.graphs_total} graphs compiled; {tail}", flush=True)


# --------------------------------------------------------------------------- metric sync
def _world_size() -> int:
    """XLA replicas in this run: 1 unless torch_xla is in use with several replicas.

    Never imports torch_xla or starts its runtime: a process that has not used XLA is not an
    XLA replica.
    """
    if "torch_xla" not in sys.modules:
        return 1
    import torch_xla
    import torch_xla.runtime as xr

    if not torch_xla._XLAC._xla_runtime_is_initialized():
        return 1
    return int(xr.world_size())


def _all_gather(tensor: Tensor) -> Tensor:
    """``xm.all_gather`` along dim 0 across all replicas: (1, *S) -> (W, *S).

    A tensor off the XLA device is gathered on it; the result is on ``tensor``'s device.
    """
    import torch_xla
    import torch_xla.core.xla_model as xm

    device = tensor.device
    local = tensor if device.type == "xla" else tensor.to(torch_xla.device())
    return xm.all_gather(local.contiguous(), dim=0).to(device)


def xla_distributed_available() -> bool:
    """torchmetrics' ``distributed_available_fn`` on XLA: more than one replica."""
    return _world_size() > 1


def xla_dist_sync_fn(tensor: Tensor, group: Any | None = None) -> list[Tensor]:
    """Gather one metric state from every XLA replica (a torchmetrics ``dist_sync_fn``).

    Args:
        tensor: the state on this replica, any shape ``S``; every replica must hold the same
            shape (true of fixed-size states such as a confusion matrix, not of ``cat`` list
            states whose lengths differ). A state off the XLA device is gathered on it and
            returned to its own device.
        group: must be None (all replicas); XLA replica groups are not supported.

    Returns:
        A list of W tensors of shape ``S``, element i from replica i, as torchmetrics'
        ``gather_all_tensors`` returns; ``[tensor]`` on a single replica.
    """
    if group is not None:
        raise ValueError(f"group must be None (all XLA replicas), got {group!r}")
    if not isinstance(tensor, Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if _world_size() <= 1:
        return [tensor]
    gathered = _all_gather(tensor.unsqueeze(0))  # (*S) -> (1, *S) -> (W, *S)
    return list(gathered.unbind(0))


def sync_metrics_on_xla(module: nn.Module, world_size: int | None = None) -> int:
    """Make every torchmetrics ``Metric`` in ``module`` sync across XLA replicas.

    Sets ``dist_sync_fn=xla_dist_sync_fn`` and ``distributed_available_fn=
    xla_distributed_available`` on each ``Metric`` registered as a submodule (metrics inside
    a ``MetricCollection`` included). A no-op off XLA or on one replica, so CPU/GPU runs keep
    torch.distributed syncing. Call it in the LightningModule's ``setup`` (in the replica
    process, before any ``compute``).

    Args:
        module: the module holding the metrics.
        world_size: number of XLA replicas; None reads it from torch_xla's runtime (1 when
            torch_xla is not in use).

    Returns:
        The number of metrics configured (0 when nothing was changed).
    """
    from torchmetrics import Metric

    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    replicas = _world_size() if world_size is None else world_size
    if replicas <= 1:
        return 0
    configured = 0
    for sub in module.modules():
        if isinstance(sub, Metric):
            sub.dist_sync_fn = xla_dist_sync_fn
            sub.distributed_available_fn = xla_distributed_available
            configured += 1
    return configured
