"""AffinityClassifier: every backbone x head trains, learns, round-trips, and rejects bad input."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.testing import assert_close
from torch.utils.data import DataLoader, Dataset

from aff_lightning import AffinityClassifier, ImbalancedDataModule
from aff_lightning.backbones import BACKBONES
from aff_lightning.model import HEADS


class ToyImages(Dataset):
    """Learnable toy images: each class lights up its own horizontal band; batches carry a mask."""

    def __init__(self, n: int, num_classes: int = 4, channels: int = 1, size: int = 16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (n,), generator=g)
        self.images = 0.1 * torch.rand(n, channels, size, size, generator=g)
        band = size // num_classes
        for i, y in enumerate(self.labels.tolist()):
            self.images[i, :, y * band : (y + 1) * band] += 0.8

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i], torch.tensor(True)


def _toy(**kwargs) -> AffinityClassifier:
    """A cnn3 model for 1x16x16 toy images of 4 classes (class 0 the minority)."""
    args = dict(backbone="cnn3", num_classes=4, in_channels=1, image_size=16, minority_classes=(0,))
    return AffinityClassifier(**{**args, **kwargs})


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_and_head_trains_two_steps(backbone: str, head: str):
    torch.manual_seed(0)
    size = 32 if backbone in ("mobilenet", "resnet50") else 16
    model = AffinityClassifier(
        backbone=backbone,
        head=head,
        num_classes=4,
        in_channels=3,
        image_size=size,
        minority_classes=(0, 2),
        n_centers=2,
    )
    data = DataLoader(ToyImages(8, channels=3, size=size), batch_size=4)
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    trainer = _trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=data)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    changed = [
        k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])
    ]
    assert any("backbone" in k for k in changed)
    if head != "softmax":
        assert "head.centers" in changed
    out = model.eval()(torch.rand(3, 3, size, size))
    assert out.shape == (3, 4)


@pytest.mark.parametrize("head", HEADS)
def test_loss_decreases_on_a_learnable_problem(head: str):
    torch.manual_seed(0)
    model = _toy(head=head, lr=3e-3, sigma=10.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ds = ToyImages(64)
    images, labels = ds.images, ds.labels
    losses = []
    for _ in range(15):
        opt.zero_grad()
        aff, logits = model.scores(model.features(images))
        loss = model._loss(aff, logits, labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_forward_returns_affinities_or_logits():
    torch.manual_seed(0)
    x = torch.rand(5, 1, 16, 16)
    aff = _toy(head="affinity", num_classes=3, minority_classes=()).eval()
    out = aff(x)
    assert ((out > 0) & (out <= 1)).all()
    assert_close(out, aff.head(aff.features(x)))
    joint = _toy(head="joint", num_classes=3, minority_classes=()).eval()
    assert_close(joint(x), joint.head(joint.features(x)))
    soft = _toy(head="softmax", num_classes=3, minority_classes=()).eval()
    assert_close(soft(x), soft.linear(soft.features(x)))
    assert isinstance(soft.feature_norm, torch.nn.Identity)  # no BN before the softmax head
    assert isinstance(aff.feature_norm, torch.nn.BatchNorm1d)


def test_embedding_dim_bottleneck():
    model = _toy(num_classes=3, minority_classes=(), embedding_dim=2)
    assert model.features(torch.rand(4, 1, 16, 16)).shape == (4, 2)
    assert model.head.centers.shape == (3, 1, 2)


def test_history_best_epoch_and_checkpoint_round_trip(tmp_path, fake_fmnist_dir):
    torch.manual_seed(0)
    dm = ImbalancedDataModule(
        dataset="fashion_mnist",
        data_dir=str(fake_fmnist_dir),
        minority_count=2,
        batch_size=32,
        val_fraction=0.2,
    )
    model = AffinityClassifier(
        backbone="cnn3", num_classes=10, in_channels=1, image_size=28, sigma=20.0
    )
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        logger=False,
        num_sanity_val_steps=1,
    )
    trainer.fit(model, datamodule=dm)
    assert [r["epoch"] for r in model.history] == [0.0, 1.0]  # sanity check not recorded
    assert {"val/macro_f1", "test/macro_f1", "val/acc", "test/acc"} <= set(model.history[0])
    best = model.best_epoch("val")
    assert best["val/macro_f1"] == max(r["val/macro_f1"] for r in model.history)
    assert trainer.callback_metrics["val/macro_f1_best"] == pytest.approx(best["val/macro_f1"])
    with pytest.raises(ValueError, match="no epoch recorded 'train/acc'"):
        model.best_epoch("train", "acc")
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = AffinityClassifier.load_from_checkpoint(ckpt)
    assert loaded.history == model.history
    x = torch.rand(6, 1, 28, 28)
    assert_close(loaded.eval()(x), model.eval()(x))


def test_metrics_from_a_trainer_test_run(fake_fmnist_dir):
    torch.manual_seed(0)
    dm = ImbalancedDataModule(
        dataset="fashion_mnist",
        data_dir=str(fake_fmnist_dir),
        minority_count=2,
        batch_size=32,
        eval_batch_size=7,
    )
    model = AffinityClassifier(backbone="cnn3", num_classes=10, in_channels=1, image_size=28)
    _trainer().test(model, datamodule=dm)
    confmat = model.test_confmat
    assert int(confmat.sum()) == sum(dm.class_counts("test"))  # padding never counted
    assert confmat.sum(dim=1).tolist() == dm.class_counts("test")


@pytest.mark.slow
def test_affinity_head_learns_an_imbalanced_problem(fake_fmnist_dir):
    """A real, seeded learning test: the fake images are learnable, minority classes included."""
    L.seed_everything(0)
    dm = ImbalancedDataModule(
        dataset="fashion_mnist",
        data_dir=str(fake_fmnist_dir),
        minority_count=4,
        batch_size=32,
        monitor_test=True,
    )
    model = AffinityClassifier(
        backbone="cnn3",
        head="affinity",
        num_classes=10,
        in_channels=1,
        image_size=28,
        sigma=90.0,
        lr=1e-2,
        milestones=(100,),
    )
    trainer = _trainer(max_epochs=8)
    trainer.fit(model, datamodule=dm)
    last = model.history[-1]
    assert last["test/acc"] >= 0.9, model.history
    assert last["test/minority_acc"] >= 0.7, model.history


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"backbone": "vgg"}, ValueError, "backbone must be one of .*got 'vgg'"),
        ({"head": "svm"}, ValueError, "head must be one of .*got 'svm'"),
        ({"n_centers": 0}, ValueError, "n_centers must be >= 1 for the affinity head, got 0"),
        ({"lr": 0.0}, ValueError, "lr must be > 0, got 0.0"),
        ({"lr_decay": 1.5}, ValueError, r"lr_decay must be in \(0, 1\], got 1.5"),
        ({"milestones": (80, 50)}, ValueError, r"milestones must be strictly increasing"),
        ({"selection_metric": "auc"}, ValueError, "selection_metric must be one of"),
        ({"embedding_dim": 0}, ValueError, "embedding_dim must be >= 1 or None, got 0"),
    ],
)
def test_constructor_errors(kwargs: dict, error: type, match: str):
    with pytest.raises(error, match=match):
        AffinityClassifier(**{"backbone": "cnn3", **kwargs})


def test_softmax_ignores_n_centers():
    assert AffinityClassifier(backbone="cnn3", head="softmax", n_centers=0).head is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"num_classes": 5, "minority_classes": (0,)},
            "datamodule has num_classes=10 but the model was built with num_classes=5",
        ),
        (
            {"in_channels": 3},
            "datamodule has in_channels=1 but the model was built with in_channels=3",
        ),
    ],
)
def test_datamodule_mismatch_is_an_error(fake_fmnist_dir, kwargs: dict, match: str):
    dm = ImbalancedDataModule(
        dataset="fashion_mnist", data_dir=str(fake_fmnist_dir), minority_count=2, batch_size=32
    )
    model = AffinityClassifier(**{"backbone": "cnn3", "image_size": 28, "in_channels": 1, **kwargs})
    with pytest.raises(ValueError, match=match):
        _trainer(max_epochs=1).fit(model, datamodule=dm)


# ------------------------------------------------------------------------------ speed options
# channels_last, torch.compile and bf16-mixed must not change what the model computes, and the
# device-resident data path must feed a training step without reading values back to the host.


def _speed_twins(**kwargs) -> tuple[AffinityClassifier, AffinityClassifier]:
    """(model with the speed options in kwargs, default model), with identical weights."""
    torch.manual_seed(0)
    fast = AffinityClassifier(**kwargs)
    plain = AffinityClassifier(
        **{k: v for k, v in kwargs.items() if k not in ("channels_last", "compile")}
    )
    plain.load_state_dict(fast.state_dict())
    return fast, plain


def _assert_same_step(fast: AffinityClassifier, plain: AffinityClassifier, x, y) -> None:
    """Same eval outputs, and the same training loss and gradients, for both models."""
    assert_close(fast.eval()(x), plain.eval()(x), rtol=1e-4, atol=1e-5)
    losses, grads = [], []
    for model in (fast, plain):
        model.train().zero_grad()
        aff, logits = model.scores(model.features(x))
        loss = model._loss(aff, logits, y)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
    assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("backbone", ["cnn3", "cnn10"])
def test_channels_last_gives_the_same_outputs_loss_and_gradients(backbone: str):
    fast, plain = _speed_twins(
        backbone=backbone,
        num_classes=4,
        in_channels=3,
        image_size=16,
        minority_classes=(0,),
        n_centers=2,
        channels_last=True,
    )
    conv = next(m for m in fast.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 3, 0, 1])
    _assert_same_step(fast, plain, x, y)


def test_compile_gives_the_same_outputs_loss_and_gradients(monkeypatch: pytest.MonkeyPatch):
    """``compile=True`` through the Trainer's configure_model hook; aot_eager stands in for
    inductor (same dynamo capture and AOT autograd, no C++ build), see the slow test below."""
    real_compile = torch.compile
    compiled = []

    def aot_eager_compile(model, *args, **kwargs):
        compiled.append(model)
        return real_compile(model, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", aot_eager_compile)
    fast, plain = _speed_twins(
        backbone="cnn3",
        num_classes=4,
        in_channels=1,
        image_size=16,
        minority_classes=(0,),
        compile=True,
    )
    fast.configure_model()  # what Trainer.fit/test/predict and load_from_checkpoint call
    assert compiled, "compile=True did not call torch.compile"
    data = ToyImages(6)
    _assert_same_step(fast, plain, data.images, data.labels)
    trainer = _trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(fast, DataLoader(ToyImages(8), batch_size=4))
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_compile_keeps_the_state_dict_keys(monkeypatch: pytest.MonkeyPatch):
    real_compile = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda m, *a, **k: real_compile(m, *a, **{**k, "backend": "eager"})
    )
    fast, plain = _speed_twins(backbone="cnn3", in_channels=1, compile=True)
    fast.configure_model()
    assert list(fast.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(fast.state_dict())  # strict, as load_from_checkpoint


@pytest.mark.slow
def test_compile_with_inductor_gives_the_same_outputs():
    """The real default backend (inductor; builds C++ kernels with gcc: ~1 min on 2 cores)."""
    fast, plain = _speed_twins(
        backbone="cnn3",
        num_classes=4,
        in_channels=1,
        image_size=16,
        minority_classes=(0,),
        compile=True,
    )
    fast.configure_model()
    x = ToyImages(4).images
    with torch.no_grad():
        assert_close(fast.eval()(x), plain.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head", HEADS)
def test_bf16_mixed_on_cpu_trains_and_counts_exactly(head: str):
    """CPU autocast bf16 (``precision="bf16-mixed"``): finite loss, metrics as integer counts."""
    torch.manual_seed(0)
    model = _toy(head=head, n_centers=2)
    trainer = _trainer(precision="bf16-mixed", max_steps=2, num_sanity_val_steps=0)
    val = DataLoader(ToyImages(12, seed=1), batch_size=8)  # a ragged last batch of 4
    trainer.fit(model, DataLoader(ToyImages(16), batch_size=8), val)
    assert trainer.precision == "bf16-mixed"
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert 0.0 <= model.history[-1]["val/acc"] <= 1.0
    trainer.test(model, val)
    confmat = model.test_confmat
    assert not confmat.dtype.is_floating_point  # counts, not bf16-rounded sums
    assert int(confmat.sum()) == 12
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model.eval()(ToyImages(3).images)
    assert scores.shape == (3, 4) and torch.isfinite(scores.float()).all()


def test_device_resident_training_step_reads_nothing_back(fake_cifar_dir):
    """On the meta device no value can be read to the host (``.item()``, ``bool(t)``, ``.cpu()``
    all fail), so running the whole training path there shows it needs no host sync: batch
    slicing on the device, uint8 -> float, batched crop + flip, normalisation, the model step,
    the loss, the metric update and backward."""
    from types import SimpleNamespace

    meta = torch.device("meta")
    dm = ImbalancedDataModule(
        "cifar10", fake_cifar_dir, minority_count=5, batch_size=16, augment=True, normalize=True
    )
    dm.trainer = SimpleNamespace(
        training=True,
        global_rank=0,
        world_size=1,
        current_epoch=0,
        overfit_batches=0,
        strategy=SimpleNamespace(root_device=meta),
    )
    loader = dm.train_dataloader()
    assert loader.images.device == meta and loader.images.dtype == torch.uint8  # moved once
    images, labels, mask = dm.on_after_batch_transfer(next(iter(loader)), 0)
    assert images.device == meta and images.dtype == torch.float32
    assert images.shape == (16, 3, 32, 32) and labels.device == mask.device == meta
    for head in HEADS:
        model = AffinityClassifier(backbone="cnn3", head=head, n_centers=2).to(meta)
        aff, logits = model.scores(model.features(images))
        loss = model._loss(aff, logits, labels)
        model.train_metrics.update((aff if aff is not None else logits).detach(), labels, mask)
        loss.backward()
        assert loss.device == meta and loss.shape == ()


# ------------------------------------------------------------------------------ precision, predict
@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_true_precisions_train_on_cpu(precision: str, fake_fmnist_dir):
    """The datamodule makes float32 images after Lightning's input conversion; the model casts
    them to its own dtype."""
    torch.manual_seed(0)
    dm = ImbalancedDataModule(
        dataset="fashion_mnist", data_dir=str(fake_fmnist_dir), minority_count=2, batch_size=32
    )
    model = AffinityClassifier(backbone="cnn3", num_classes=10, in_channels=1, image_size=28)
    trainer = _trainer(max_steps=2, limit_val_batches=1, precision=precision)
    trainer.fit(model, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert model.dtype == {"bf16-true": torch.bfloat16, "64-true": torch.float64}[precision]


def test_predict_returns_labels_and_mask(fake_fmnist_dir):
    dm = ImbalancedDataModule(
        dataset="fashion_mnist", data_dir=str(fake_fmnist_dir), minority_count=2, batch_size=32
    )
    model = AffinityClassifier(backbone="cnn3", num_classes=10, in_channels=1, image_size=28)
    out = _trainer().predict(model, datamodule=dm)
    mask = torch.cat([o["mask"] for o in out])
    labels = torch.cat([o["labels"] for o in out])[mask]
    assert labels.tolist() == dm.split_tensors("test")[1].tolist()
    assert torch.cat([o["preds"] for o in out]).shape == mask.shape


def test_two_plain_val_loaders_need_the_datamodule():
    model = AffinityClassifier(
        backbone="cnn3", num_classes=4, in_channels=1, image_size=16, minority_classes=(0,)
    )
    loader = DataLoader(ToyImages(8), batch_size=4)
    with pytest.raises(ValueError, match="validation got dataloader 1, but only 1 evaluation"):
        _trainer(max_epochs=1).validate(model, dataloaders=[loader, loader])
