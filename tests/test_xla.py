"""aff_lightning.xla: accelerator="xla", the compile monitor and XLA metric sync.

Everything that touches torch_xla runs in a subprocess with ``PJRT_DEVICE=CPU`` (torch_xla's
real lazy-tensor path on the CPU), so torch_xla is never imported into the pytest process,
where it would set ``PJRT_DEVICE`` and change what other tests see. Each script prints one JSON
line that the test reads. The multi-replica sync runs here with the collective emulated; the
real ``xm.all_gather`` across several replicas is verified only on a TPU (see the docstring of
``aff_lightning.xla``).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from aff_lightning import xla
from aff_lightning.metrics import build_metrics

pytestmark = [
    pytest.mark.xla,
    # find_spec, not importorskip: importing torch_xla here is what the subprocesses avoid.
    pytest.mark.skipif(not xla.xla_available(), reason="torch_xla is not installed"),
]

REPO = Path(__file__).resolve().parents[1]

# A tiny conv + linear LightningModule and fixed-size fake data (no ragged batch), shared by the
# subprocess scripts. ``dynamic=True`` makes every training step index with a boolean mask
# holding one more True than the step before: a new shape, so a new graph, every step.
_PRELUDE = """
import json, sys, warnings
import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy
from aff_lightning import xla

class Tiny(L.LightningModule):
    def __init__(self, dynamic=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.acc = MulticlassAccuracy(3)
        self.dynamic = dynamic

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        if self.dynamic:
            keep = torch.arange(x.shape[0], device=x.device) <= self.global_step % x.shape[0]
            out, y = out[keep], y[keep]
        loss = nn.functional.cross_entropy(out, y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.acc.update(self(x), y)
        self.log("val/acc", self.acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

def loaders(n_train=64, n_val=32, batch_size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (n_train,), generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=batch_size, drop_last=True)
    val = DataLoader(TensorDataset(x[:n_val], y[:n_val]), batch_size=batch_size, drop_last=True)
    return train, val

def trainer(**kwargs):
    xla.register_xla_accelerator()
    defaults = dict(accelerator="xla", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**defaults, **kwargs})

def emit(obj):
    print("RESULT " + json.dumps(obj), flush=True)
"""


def run_xla(script: str, timeout: float = 240.0, **env: str) -> tuple[dict[str, Any], str]:
    """Run ``_PRELUDE + script`` under PJRT_DEVICE=CPU; its emitted JSON and its stdout."""
    code = _PRELUDE + textwrap.dedent(script)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PJRT_DEVICE": "CPU", **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        pytest.fail(
            f"XLA subprocess failed (rc={proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return json.loads(results[-1].removeprefix("RESULT ")), proc.stdout


# --------------------------------------------------------------------------- accelerator
@pytest.fixture(scope="module")
def xla_facts() -> dict[str, Any]:
    """One subprocess answering the accelerator, precision and single-device sync questions."""
    facts, _ = run_xla(
        """
        import os
        from lightning.pytorch.accelerators import AcceleratorRegistry
        from lightning.pytorch.trainer.connectors.accelerator_connector import (
            _AcceleratorConnector,
        )
        from aff_lightning.metrics import build_metrics

        out = {}
        xla.register_xla_accelerator()
        # registering imports nothing from torch_xla (the package works without it)
        out["torch_xla_imported"] = "torch_xla" in sys.modules
        first_patch = _AcceleratorConnector._choose_strategy
        xla.register_xla_accelerator()
        xla.register_xla_accelerator()
        out["same_patch"] = _AcceleratorConnector._choose_strategy is first_patch
        out["registered"] = AcceleratorRegistry["xla"]["accelerator"].__name__
        out["patch_depth_1"] = not hasattr(first_patch.__wrapped__, "__wrapped__")

        # several devices: XLAStrategy, counted without starting the runtime (xmp.spawn refuses
        # to launch once it is started); the launch itself is verified only on a TPU
        import torch_xla
        os.environ["CPU_NUM_DEVICES"] = "2"
        t = trainer(devices="auto")
        out["two_devices"] = [type(t.strategy).__name__, t.num_devices]
        out["runtime_started"] = torch_xla._XLAC._xla_runtime_is_initialized()
        del os.environ["CPU_NUM_DEVICES"], t

        for devices in ("auto", 1, "1", [0], -1):
            t = trainer(devices=devices)
            out[f"devices={devices!r}"] = [
                type(t.strategy).__name__, type(t.accelerator).__name__,
                str(t.strategy.root_device), t.num_devices,
            ]
        try:
            trainer(devices=3)
        except ValueError as err:
            out["devices=3"] = str(err)
        try:
            L.Trainer(accelerator="tpu", logger=False)
        except Exception as err:  # Lightning's own TPU accelerator, untouched: no TPU VM here
            out["tpu"] = [type(err).__name__, str(err)]
        # ... and on an emulated TPU VM (patched as Lightning's own tests do) "tpu" still gets
        # Lightning's accelerator and XLA strategy
        from lightning.fabric.accelerators.xla import XLAAccelerator as FabricXLA
        saved = FabricXLA.__dict__["is_available"], FabricXLA.__dict__["auto_device_count"]
        FabricXLA.is_available = staticmethod(lambda: True)
        FabricXLA.auto_device_count = staticmethod(lambda: 1)
        t = L.Trainer(accelerator="tpu", devices=1, logger=False)
        out["tpu_emulated"] = [type(t.strategy).__name__, type(t.accelerator).__name__]
        FabricXLA.is_available, FabricXLA.auto_device_count = saved

        import torch_xla.core.xla_model as xm
        from aff_lightning.xla import compile_count

        # static-shape metrics: equal on XLA and CPU, one graph for every batch
        g = torch.Generator().manual_seed(1)
        batches = [
            (torch.randn(16, 5, generator=g), torch.randint(0, 5, (16,), generator=g),
             torch.arange(16) < n_real)
            for n_real in (16, 16, 9)  # the last batch padded: 7 rows masked out
        ]
        dev = torch_xla.device()
        on_cpu = build_metrics(5, (0, 2))
        on_xla = build_metrics(5, (0, 2)).to(dev)
        graphs = []
        for scores, target, mask in batches:
            on_cpu.update(scores, target, mask)
            on_xla.update(scores.to(dev), target.to(dev), mask.to(dev))
            xm.mark_step()
            graphs.append(compile_count())
        out["confmat_cpu"] = on_cpu["acc"].confmat.tolist()
        out["confmat_xla"] = on_xla["acc"].confmat.cpu().tolist()
        out["metrics_cpu"] = {k: v.tolist() for k, v in on_cpu.compute().items()}
        out["metrics_xla"] = {k: v.cpu().tolist() for k, v in on_xla.compute().items()}
        out["metric_update_graphs"] = graphs

        # the sync function on one replica, and the real collective on one device
        state = torch.arange(6, dtype=torch.int32).reshape(2, 3).to(dev)
        synced = xla.xla_dist_sync_fn(state)
        out["sync_one"] = [len(synced), synced[0].cpu().tolist(), synced[0] is state]
        gathered = xla._all_gather(state.unsqueeze(0))
        out["all_gather_one"] = [list(gathered.shape), gathered.cpu().tolist()]
        out["world_size"] = xla._world_size()
        out["configured_one_replica"] = xla.sync_metrics_on_xla(on_xla)
        out["distributed_available"] = xla.xla_distributed_available()

        # bf16-true: accepted, and a step runs with XLA_USE_BF16 set (Lightning's XLAPrecision)
        seen = {}

        class Bf16Probe(Tiny):
            def training_step(self, batch, batch_idx):
                seen["XLA_USE_BF16"] = os.environ.get("XLA_USE_BF16")
                return super().training_step(batch, batch_idx)

        train, val = loaders()
        t = trainer(precision="bf16-true", max_steps=2, limit_val_batches=0)
        out["bf16"] = [type(t.precision_plugin).__name__, t.precision_plugin.precision]
        t.fit(Bf16Probe(), train)
        out["bf16_env_in_step"] = seen.get("XLA_USE_BF16")
        out["bf16_loss"] = float(t.callback_metrics["train/loss"])
        try:
            trainer(precision="bf16-mixed")
        except ValueError as err:
            out["bf16-mixed"] = str(err)
        emit(out)
        """
    )
    return facts


def test_register_is_idempotent(xla_facts: dict[str, Any]):
    assert xla_facts["torch_xla_imported"] is False
    assert xla_facts["registered"] == "PJRTAccelerator"
    assert xla_facts["same_patch"] is True
    assert xla_facts["patch_depth_1"] is True


@pytest.mark.parametrize("devices", ["auto", 1, "1", [0], -1])
def test_accelerator_xla_picks_the_single_device_xla_strategy(xla_facts, devices):
    strategy, accelerator, root, n = xla_facts[f"devices={devices!r}"]
    assert (strategy, accelerator, root, n) == (
        "SingleDeviceXLAStrategy",
        "PJRTAccelerator",
        "xla:0",
        1,
    )


def test_accelerator_xla_on_several_devices_picks_the_xla_strategy(xla_facts):
    assert xla_facts["two_devices"] == ["XLAStrategy", 2]
    assert xla_facts["runtime_started"] is False


def test_accelerator_xla_rejects_a_device_count_it_does_not_have(xla_facts):
    assert "devices must be 1, 1 or -1 (all)" in xla_facts["devices=3"]
    assert "got 3" in xla_facts["devices=3"]


def test_lightning_tpu_accelerator_is_left_alone(xla_facts):
    # off a TPU VM Lightning refuses "tpu" as before, and now lists "xla" as available
    name, message = xla_facts["tpu"]
    assert name == "MisconfigurationException"
    assert "XLAAccelerator` can not run on your system" in message
    assert "'xla'" in message
    assert xla_facts["tpu_emulated"] == ["SingleDeviceXLAStrategy", "XLAAccelerator"]


def test_bf16_true_is_accepted_and_runs(xla_facts):
    assert xla_facts["bf16"] == ["XLAPrecision", "bf16-true"]
    assert xla_facts["bf16_env_in_step"] == "1"
    assert 0 < xla_facts["bf16_loss"] < 10


def test_bf16_mixed_is_refused_by_lightning(xla_facts):
    assert "bf16-mixed" in xla_facts["bf16-mixed"]
    assert "not supported in XLA" in xla_facts["bf16-mixed"]


def test_metrics_are_equal_on_xla_and_cpu(xla_facts):
    # the counts are identical; the float32 metrics agree to rounding (XLA may fuse and
    # reorder the divisions and means: macro_f1 measured 1 ulp apart)
    assert xla_facts["confmat_xla"] == xla_facts["confmat_cpu"]
    assert sum(map(sum, xla_facts["confmat_cpu"])) == 16 + 16 + 9  # padding rows not counted
    cpu, on_xla = xla_facts["metrics_cpu"], xla_facts["metrics_xla"]
    assert set(on_xla) == set(cpu)
    for key in cpu:
        assert_close(torch.tensor(on_xla[key]), torch.tensor(cpu[key]), msg=key)
    # static shapes: the padded last batch reuses the first batch's graph
    first, *rest = xla_facts["metric_update_graphs"]
    assert rest == [first] * len(rest)


def test_dist_sync_fn_on_one_device(xla_facts):
    n, values, same_object = xla_facts["sync_one"]
    assert (n, values, same_object) == (1, [[0, 1, 2], [3, 4, 5]], True)
    # the real collective on a single device: (1, 2, 3) in, (1, 2, 3) out
    assert xla_facts["all_gather_one"] == [[1, 2, 3], [[[0, 1, 2], [3, 4, 5]]]]
    assert xla_facts["world_size"] == 1
    assert xla_facts["configured_one_replica"] == 0
    assert xla_facts["distributed_available"] is False


# --------------------------------------------------------------------------- compile monitor
_LINE = re.compile(r"^XLA: (\d+) graphs compiled; (.*)$", re.MULTILINE)


@pytest.fixture(scope="module")
def monitored_fits() -> dict[str, Any]:
    """Two fits on xla:0 in one subprocess: a static-shape one, one with boolean indexing."""
    result, stdout = run_xla(
        """
        def fit(dynamic, warmup_epochs, **kwargs):
            monitor = xla.CompileMonitor(warmup_epochs=warmup_epochs)
            t = trainer(callbacks=[monitor], **kwargs)
            train, val = loaders()
            print(f"--- fit dynamic={dynamic}", flush=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t.fit(Tiny(dynamic=dynamic), train, val)
            return {
                "strategy": type(t.strategy).__name__, "device": str(t.strategy.root_device),
                "counts": monitor.counts, "epoch_counts": monitor.epoch_counts,
                "total": monitor.graphs_total, "flat_step": monitor.flat_since_step,
                "flat_epoch": monitor.flat_since_epoch, "steps": t.global_step,
                "warned": [str(w.message) for w in caught if "still compiling" in str(w.message)],
            }

        emit({
            "static": fit(False, warmup_epochs=2, max_epochs=4),
            "dynamic": fit(True, warmup_epochs=1, max_epochs=2, limit_train_batches=3),
        })
        """
    )
    static_out, dynamic_out = stdout.split("--- fit dynamic=True")
    result["static"]["lines"] = _LINE.findall(static_out)
    result["dynamic"]["lines"] = _LINE.findall(dynamic_out)
    return result


@pytest.mark.slow
def test_fit_on_xla_compiles_nothing_new_after_the_second_epoch(monitored_fits):
    result = monitored_fits["static"]
    assert (result["strategy"], result["device"]) == ("SingleDeviceXLAStrategy", "xla:0")
    assert result["steps"] == 16  # 4 epochs x 4 full batches
    epochs = result["epoch_counts"]
    # measured on torch_xla 2.9 / PJRT CPU: [5, 6, 6, 6] (the second epoch adds one graph)
    assert len(epochs) == 4 and epochs[0] > 0
    assert epochs[2:] == [epochs[1]] * 2, epochs  # no new graphs after the second epoch
    assert result["counts"][8:] == [epochs[1]] * 8  # nor in any step of epochs 3 and 4
    assert result["total"] == epochs[-1]
    assert result["flat_epoch"] in (0, 1) and result["flat_step"] <= 8
    assert result["warned"] == []
    flat = f"flat since step {result['flat_step']} (epoch {result['flat_epoch']})"
    assert result["lines"] == [(str(result["total"]), flat)]


@pytest.mark.slow
def test_compile_monitor_warns_about_boolean_indexing(monitored_fits):
    result = monitored_fits["dynamic"]
    counts = result["counts"]
    assert len(counts) == 6
    assert all(b > a for a, b in itertools.pairwise(counts)), counts  # a new graph every step
    assert len(result["warned"]) == 1
    message = result["warned"][0]
    assert "1-epoch warm-up" in message
    assert "(step 5, epoch 1)" in message  # the second new graph after warm-up
    assert "boolean indexing" in message
    assert "aten::nonzero" in message  # the counter that points at the cause
    assert result["flat_step"] is None
    assert result["lines"] == [
        (str(counts[-1]), "still compiling at the last step (step 6, epoch 1)")
    ]


def _cpu_trainer(**kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


class _Linear(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.fc(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_compile_monitor_is_a_no_op_off_xla(capsys: pytest.CaptureFixture[str]):
    monitor = xla.CompileMonitor()
    data = DataLoader(TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,))), batch_size=4)
    _cpu_trainer(max_epochs=1, callbacks=[monitor]).fit(_Linear(), data)
    assert monitor.active is False
    assert (monitor.counts, monitor.epoch_counts, monitor.graphs_total) == ([], [], None)
    assert "XLA:" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"warmup_epochs": -1}, ValueError, "warmup_epochs must be >= 0, got -1"),
        ({"warmup_epochs": 1.5}, TypeError, "warmup_epochs must be an int, got 1.5"),
        ({"warmup_epochs": True}, TypeError, "warmup_epochs must be an int, got True"),
    ],
)
def test_compile_monitor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=re.escape(match)):
        xla.CompileMonitor(**kwargs)


# --------------------------------------------------------------------------- devices
@pytest.mark.parametrize(
    ("devices", "count", "expected"),
    [(1, 8, 1), (8, 8, 8), (-1, 8, 8), ("-1", 4, 4), ("8", 8, 8), ([3], 8, [3]), ("2,", 4, [2])],
)
def test_parse_devices(devices, count, expected):
    assert xla._parse_devices_value(devices, count) == expected


@pytest.mark.parametrize("devices", [0, 2, [8], [0, 1], "two", True, 1.0])
def test_parse_devices_rejects_what_the_device_does_not_have(devices):
    with pytest.raises(
        ValueError, match=re.escape(f"for accelerator='xla' on this PJRT device, got {devices!r}")
    ):
        xla._parse_devices_value(devices, 8)


# --------------------------------------------------------------------------- metric sync
def _update(metrics: Any, seed: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    preds, target = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)
    metrics.update(preds, target)
    return preds, target


def test_emulated_two_replica_sync_sums_the_confusion_matrices(monkeypatch: pytest.MonkeyPatch):
    """Replica 0 holds its own batch; the patched gather returns replica 1's state beside it."""
    other = build_metrics(4, (0, 1))
    _update(other, seed=2)
    other_state = other["acc"].confmat.clone()
    monkeypatch.setattr(xla, "_world_size", lambda: 2)
    gathered: list[tuple[int, ...]] = []

    def fake_all_gather(tensor: torch.Tensor) -> torch.Tensor:  # (1, C, C) -> (2, C, C)
        gathered.append(tuple(tensor.shape))
        return torch.cat([tensor, other_state.unsqueeze(0)])

    monkeypatch.setattr(xla, "_all_gather", fake_all_gather)

    mine = build_metrics(4, (0, 1))
    assert xla.sync_metrics_on_xla(mine) == len(mine)  # every member Metric configured
    _update(mine, seed=1)
    together = build_metrics(4, (0, 1))
    _update(together, seed=1)
    _update(together, seed=2)
    synced = mine.compute()
    expected = together.compute()
    assert set(synced) == set(expected)
    for key in expected:
        assert_close(synced[key], expected[key], msg=key)
    assert gathered and set(gathered) == {(1, 4, 4)}
    # after compute, the local state is restored (unsync) so accumulation continues locally
    local = build_metrics(4, (0, 1))
    _update(local, seed=1)
    assert torch.equal(mine["acc"].confmat, local["acc"].confmat)


def test_sync_function_returns_one_tensor_per_replica(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(xla, "_world_size", lambda: 3)
    monkeypatch.setattr(xla, "_all_gather", lambda t: torch.cat([t, t + 1, t + 2]))
    out = xla.xla_dist_sync_fn(torch.tensor(5))  # a scalar state
    assert [t.tolist() for t in out] == [5, 6, 7]


def test_sync_is_a_no_op_without_xla_replicas():
    metrics = build_metrics(4, (0, 1))
    assert xla.sync_metrics_on_xla(metrics) == 0  # this process is no XLA replica
    assert metrics["acc"].dist_sync_fn is None
    assert xla.xla_distributed_available() is False
    state = torch.ones(2, 2)
    assert xla.xla_dist_sync_fn(state)[0] is state


def test_sync_rejects_bad_arguments():
    with pytest.raises(
        ValueError, match=re.escape("group must be None (all XLA replicas), got [0]")
    ):
        xla.xla_dist_sync_fn(torch.ones(2), group=[0])
    with pytest.raises(TypeError, match="tensor must be a torch.Tensor, got list"):
        xla.xla_dist_sync_fn([1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got dict"):
        xla.sync_metrics_on_xla({})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the real CLI
@pytest.mark.slow
def test_cli_fit_on_xla_is_flat_after_epoch_two_and_matches_cpu(tmp_path: Path):
    """The whole path — datamodule, cnn3 + affinity head, metrics, logging — through the CLI."""
    facts, out = run_xla(
        f"""
        sys.path.insert(0, {str(REPO / "tests")!r})
        import fakedata
        from aff_lightning.cli import run_lightning_cli
        from aff_lightning.xla import CompileMonitor

        data = fakedata.write_fake_cifar10({str(tmp_path / "data")!r})

        def fit(accelerator):
            cli = run_lightning_cli([
                "fit", "--config", "configs/baseline.yaml",
                f"--trainer.accelerator={{accelerator}}", "--trainer.max_epochs=4",
                f"--trainer.default_root_dir={tmp_path}/{{accelerator}}",
                "--trainer.enable_progress_bar=false", "--trainer.limit_train_batches=2",
                "--model.backbone=cnn3", f"--data.data_dir={{data}}", "--data.minority_count=4",
                "--data.batch_size=32", "--test_after_fit=false",
            ])
            monitors = [c for c in cli.trainer.callbacks if isinstance(c, CompileMonitor)]
            return {{
                "epoch_counts": monitors[0].epoch_counts if accelerator == "xla" else None,
                "loss": float(cli.trainer.callback_metrics["train/loss"]),
                "history": cli.model.history,
            }}

        from torch_xla.debug import metrics as met

        xla_fit = fit("xla")
        # ops that fell back to the host (aten::*) would transfer data every step
        names = [k for k in met.counter_names() if k.startswith("aten::")]
        xla_fit["fallbacks"] = dict(zip(names, map(met.counter_value, names)))
        emit({{"xla": xla_fit, "cpu": fit("cpu")}})
        """,
        timeout=600,
    )
    counts = facts["xla"]["epoch_counts"]
    assert len(counts) == 4
    assert counts[1] == counts[2] == counts[3], f"graphs compiled after epoch 2: {counts}"
    assert re.search(r"XLA: \d+ graphs compiled; flat since step \d+", out)
    # No op ran on the host instead of the device; values are read back (.item(), i.e.
    # aten::_local_scalar_dense) only at setup and epoch ends, never per step.
    fallbacks = dict(facts["xla"]["fallbacks"])
    reads = fallbacks.pop("aten::_local_scalar_dense", 0)
    assert fallbacks == {}, f"ops ran on the host instead of the XLA device: {fallbacks}"
    # Measured: 22 (Lightning's data-length checks at setup, the metrics once per epoch). One
    # read per training step would add 8, one per eval batch 12.
    assert reads <= 26, f"{reads} host reads in 4 epochs of 2 steps: a read in a step?"
    assert facts["xla"]["loss"] == pytest.approx(facts["cpu"]["loss"], rel=1e-3)
    assert len(facts["xla"]["history"]) == len(facts["cpu"]["history"]) == 4


def test_metrics_under_bf16_true_match_cpu():
    """With XLA_USE_BF16=1 (bf16-true) every float32 on the device is bf16; the metric ratios
    are computed from the integer counts on the host, so they stay exact."""
    facts, _ = run_xla(
        """
        import torch_xla
        from aff_lightning.metrics import build_metrics
        g = torch.Generator().manual_seed(3)
        preds = torch.randint(0, 10, (997,), generator=g)  # indices: bf16 scores would round
        target = torch.randint(0, 10, (997,), generator=g)
        on_cpu, on_xla = build_metrics(10, (0, 2, 4)), build_metrics(10, (0, 2, 4))
        on_xla = on_xla.to(torch_xla.device())
        on_cpu.update(preds, target)
        on_xla.update(preds.to(torch_xla.device()), target.to(torch_xla.device()))
        emit({
            "cpu": {k: v.tolist() for k, v in on_cpu.compute().items()},
            "xla": {k: v.cpu().float().tolist() for k, v in on_xla.compute().items()},
        })
        """,
        XLA_USE_BF16="1",
    )
    for name, value in facts["cpu"].items():
        assert_close(torch.tensor(facts["xla"][name]), torch.tensor(value)), name
