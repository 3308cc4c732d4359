"""Tests for aff_lightning/data.py on tiny fake datasets in the real file formats."""

from __future__ import annotations

import gzip
import pickle
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import fakedata
import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from aff_lightning import data as D
from aff_lightning.data import (
    CorruptDatasetError,
    DatasetNotFoundError,
    ImbalancedDataModule,
    TensorLoader,
    crop_flip,
    random_crop_flip,
)

EVEN = (0, 2, 4, 6, 8)
N_TRAIN, N_TEST = 60, 12  # fakedata defaults, per class


def stub_trainer(**overrides: object) -> SimpleNamespace:
    """The few Trainer attributes the data module reads."""
    attrs = dict(
        training=False,
        global_rank=0,
        world_size=1,
        current_epoch=0,
        overfit_batches=0,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )
    attrs.update(overrides)
    return SimpleNamespace(**attrs)


def brute_first(labels: torch.Tensor, minority: tuple[int, ...], keep: int) -> list[int]:
    """Indices kept by the reference protocol, by a plain loop in dataset order."""
    seen: Counter[int] = Counter()
    out = []
    for i, y in enumerate(labels.tolist()):
        if y not in minority or seen[y] < keep:
            out.append(i)
        seen[y] += 1
    return out


def rows(images: torch.Tensor) -> set[bytes]:
    return {bytes(x.flatten().tolist()) for x in images}


# ------------------------------------------------------------------------------ reference split
@pytest.mark.parametrize("k", [1, 5, 12])
def test_reference_counts_cifar(fake_cifar_dir: Path, k: int) -> None:
    dm = ImbalancedDataModule("cifar10", fake_cifar_dir, minority_count=k)
    assert dm.class_counts("train") == [5 * k if c in EVEN else N_TRAIN for c in range(10)]
    assert dm.class_counts("test") == [k if c in EVEN else N_TEST for c in range(10)]
    assert dm.class_counts("val") == [0] * 10


@pytest.mark.parametrize("k", [1, 4, 10])
def test_reference_counts_fashion_mnist(fake_fmnist_dir: Path, k: int) -> None:
    dm = ImbalancedDataModule("fashion_mnist", fake_fmnist_dir, minority_count=k)
    assert dm.class_counts("train") == [6 * k if c in EVEN else N_TRAIN for c in range(10)]
    assert dm.class_counts("test") == [k if c in EVEN else N_TEST for c in range(10)]


def test_reference_counts_mnist_raw_torchvision_layout(fake_mnist_dir: Path) -> None:
    dm = ImbalancedDataModule("mnist", fake_mnist_dir, minority_count=3, minority_classes=[7, 1])
    assert dm.minority_classes == (1, 7)
    assert dm.class_counts("train") == [18 if c in (1, 7) else N_TRAIN for c in range(10)]
    assert dm.class_counts("test") == [3 if c in (1, 7) else N_TEST for c in range(10)]


def test_attributes_known_before_setup(fake_cifar_dir: Path) -> None:
    dm = ImbalancedDataModule("cifar10", fake_cifar_dir, minority_count=5, val_fraction=0.1)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 3, 32)
    assert dm.minority_classes == EVEN and dm.eval_splits == ["val", "test"]
    dm = ImbalancedDataModule("Fashion-MNIST", fake_cifar_dir, minority_count=5, monitor_test=False)
    assert dm.dataset == "fashion_mnist"
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 28)
    assert dm.eval_splits == [] and dm.val_dataloader() == []


@pytest.mark.parametrize(
    "fixture,name,r", [("fake_cifar_dir", "cifar10", 5), ("fake_fmnist_dir", "fashion_mnist", 6)]
)
def test_minority_images_are_first_in_dataset_order(
    request: pytest.FixtureRequest, fixture: str, name: str, r: int
) -> None:
    root = request.getfixturevalue(fixture)
    raw = D.load_dataset(name, root)
    k = 3
    dm = ImbalancedDataModule(name, root, minority_count=k)
    expected_train = brute_first(raw.train_labels, EVEN, k * r)
    expected_test = brute_first(raw.test_labels, EVEN, k)
    assert dm.indices("train").tolist() == expected_train
    assert dm.indices("test").tolist() == expected_test
    images, labels = dm.split_tensors("train")
    assert torch.equal(images, raw.train_images[expected_train])
    assert torch.equal(labels, raw.train_labels[expected_train])
    images, labels = dm.split_tensors("test")
    assert torch.equal(images, raw.test_images[expected_test])
    # The fake label order is shuffled, so "first k" is not "the first k*C rows".
    assert expected_test != list(range(len(expected_test)))


def test_fake_images_are_unique_and_learnable(fake_cifar_dir: Path) -> None:
    raw = D.load_dataset("cifar10", fake_cifar_dir)
    assert len(rows(raw.train_images)) == len(raw.train_images)
    x = raw.train_images.flatten(1).double()
    means = torch.stack([x[raw.train_labels == c].mean(0) for c in range(10)])  # (10, 3072)
    pred = torch.cdist(raw.test_images.flatten(1).double(), means).argmin(1)
    assert (pred == raw.test_labels).double().mean() > 0.9


# ------------------------------------------------------------------------------ validation split
def test_val_split_stratified_disjoint_and_seeded(fake_cifar_dir: Path) -> None:
    kw = dict(dataset="cifar10", data_dir=fake_cifar_dir, minority_count=5)
    full = ImbalancedDataModule(**kw).indices("train")
    dm = ImbalancedDataModule(**kw, val_fraction=0.25, seed=3)
    train, val = dm.indices("train"), dm.indices("val")
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == full.tolist()
    assert torch.equal(train, train.sort().values) and torch.equal(val, val.sort().values)
    # round(25 * 0.25) = 6 per minority class, round(60 * 0.25) = 15 per majority class.
    assert dm.class_counts("val") == [6 if c in EVEN else 15 for c in range(10)]
    assert dm.class_counts("train") == [19 if c in EVEN else 45 for c in range(10)]
    # Identity of the images themselves (every fake image is unique).
    train_rows, val_rows = rows(dm.split_tensors("train")[0]), rows(dm.split_tensors("val")[0])
    assert train_rows.isdisjoint(val_rows) and len(val_rows) == len(val)
    again = ImbalancedDataModule(**kw, val_fraction=0.25, seed=3).indices("val")
    other = ImbalancedDataModule(**kw, val_fraction=0.25, seed=4).indices("val")
    assert torch.equal(val, again) and not torch.equal(val, other)
    assert [len(loader) for loader in dm.val_dataloader()] == [
        -(-sum(dm.class_counts(s)) // dm.eval_batch_size) for s in ("val", "test")
    ]


def test_stratified_holdout_small_classes() -> None:
    labels = torch.tensor([0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    kept, held = D.stratified_holdout(torch.arange(13), labels, 0.01, seed=0)
    assert torch.bincount(held, minlength=13)[:1].sum() == 0  # one-sample class stays whole
    assert torch.bincount(labels[held], minlength=3).tolist() == [0, 1, 1]  # at least one
    assert torch.bincount(labels[kept], minlength=3).tolist() == [1, 1, 9]
    kept, held = D.stratified_holdout(torch.arange(13), labels, 0.9, seed=0)
    assert torch.bincount(labels[kept], minlength=3).tolist() == [1, 1, 1]  # keeps at least one


# ------------------------------------------------------------------------------ other protocols
def test_step_protocol_counts(fake_fmnist_dir: Path) -> None:
    dm = ImbalancedDataModule("fashion_mnist", fake_fmnist_dir, minority_count=2, protocol="step")
    assert dm.class_counts("train") == [12 if c in EVEN else N_TRAIN for c in range(10)]
    assert dm.class_counts("test") == [N_TEST] * 10


def test_longtail_protocol_counts(fake_cifar_dir: Path) -> None:
    dm = ImbalancedDataModule("cifar10", fake_cifar_dir, protocol="longtail", imbalance_ratio=10)
    expected = [int(60 * 10 ** (-c / 9)) for c in range(10)]
    assert expected[0] == 60 and expected[-1] == 6
    assert dm.class_counts("train") == expected
    assert dm.class_counts("test") == [N_TEST] * 10
    raw = D.load_dataset("cifar10", fake_cifar_dir)
    first = [
        i
        for c in range(10)
        for i in torch.nonzero(raw.train_labels == c).flatten()[: expected[c]].tolist()
    ]
    assert dm.indices("train").tolist() == sorted(first)
    assert D.longtail_counts([100, 50, 100], 4.0) == [100, 50, 25]  # capped by availability


# ------------------------------------------------------------------------------ augmentation
def test_random_crop_flip_shape_range_determinism() -> None:
    x = torch.rand(16, 3, 32, 32)
    torch.manual_seed(0)
    a = random_crop_flip(x)
    torch.manual_seed(0)
    b = random_crop_flip(x)
    c = random_crop_flip(x, generator=torch.Generator().manual_seed(1))
    d = random_crop_flip(x, generator=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert torch.equal(a, b) and torch.equal(c, d)
    assert not torch.equal(a, x)
    assert (a == 0).any()  # some zero padding came in
    # Every output is one of the 9x9 crops of its input, possibly flipped: values are a subset.
    assert set(a[0].unique().tolist()) <= set(x[0].unique().tolist()) | {0.0}


@pytest.mark.parametrize("padding", [0, 1, 2])
def test_crop_flip_matches_loop_reference(padding: int) -> None:
    gen = torch.Generator().manual_seed(padding)
    images = torch.randint(1, 255, (5, 2, 4, 6), generator=gen, dtype=torch.uint8)
    top = torch.randint(0, 2 * padding + 1, (5,), generator=gen)
    left = torch.randint(0, 2 * padding + 1, (5,), generator=gen)
    flip = torch.tensor([True, False, True, False, True])
    out = crop_flip(images, top, left, flip, padding)
    x = images.numpy()
    for n in range(5):
        padded = np.pad(x[n], ((0, 0), (padding, padding), (padding, padding)))
        crop = padded[:, top[n] : top[n] + 4, left[n] : left[n] + 6]
        if flip[n]:
            crop = crop[:, :, ::-1]
        np.testing.assert_array_equal(out[n].numpy(), crop)


def test_crop_flip_identity_and_flip() -> None:
    x = torch.rand(3, 1, 5, 5)
    zeros = torch.zeros(3, dtype=torch.long)
    assert torch.equal(crop_flip(x, zeros, zeros, torch.zeros(3, dtype=torch.bool), 0), x)
    assert torch.equal(
        crop_flip(x, zeros + 2, zeros + 2, torch.ones(3, dtype=torch.bool), 2), x.flip(-1)
    )


def test_on_after_batch_transfer(fake_cifar_dir: Path) -> None:
    dm = ImbalancedDataModule(
        "cifar10", fake_cifar_dir, minority_count=5, batch_size=16, augment=True
    )
    images, labels, mask = next(iter(dm.train_dataloader()))
    x, y, m = dm.on_after_batch_transfer((images, labels, mask), 0)
    assert x.dtype == torch.float32 and torch.equal(x, images.float() / 255)  # no trainer
    assert y is labels and m is mask
    dm.trainer = stub_trainer(training=True)
    torch.manual_seed(0)
    aug, y, m = dm.on_after_batch_transfer((images, labels, mask), 0)
    assert aug.shape == x.shape and not torch.equal(aug, x) and y is labels and m is mask
    dm.trainer = stub_trainer(training=False)
    assert torch.equal(dm.on_after_batch_transfer((images, labels, mask), 0)[0], x)
    dm.normalize = True
    normed = dm.on_after_batch_transfer((images, labels, mask), 0)[0]
    mean = torch.tensor(D.DATASETS["cifar10"].mean).view(1, 3, 1, 1)
    std = torch.tensor(D.DATASETS["cifar10"].std).view(1, 3, 1, 1)
    torch.testing.assert_close(normed, (x - mean) / std)


# ------------------------------------------------------------------------------ loaders
def test_every_test_image_once_in_padded_batches(fake_cifar_dir: Path) -> None:
    dm = ImbalancedDataModule("cifar10", fake_cifar_dir, minority_count=5, eval_batch_size=16)
    images, labels = dm.split_tensors("test")
    assert len(images) % 16 != 0  # 85 images: the last batch is padded
    loader = dm.test_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    assert all(b[0].shape == (16, 3, 32, 32) and b[0].dtype == torch.uint8 for b in batches)
    assert all(b[1].dtype == torch.int64 and b[2].dtype == torch.bool for b in batches)
    x, y, m = (torch.cat(t) for t in zip(*batches, strict=True))
    assert int(m.sum()) == len(images)
    assert torch.equal(x[m], images) and torch.equal(y[m], labels)  # in order, no duplicates
    assert not x[~m].any() and not y[~m].any()  # padding rows: zero image, label 0


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_loaders(world: int) -> None:
    n = 50
    images, labels = torch.arange(n).view(n, 1).float(), torch.arange(n)
    evals = [TensorLoader(images, labels, 4, rank=r, world_size=world) for r in range(world)]
    assert len({len(loader) for loader in evals}) == 1
    seen = [int(v) for loader in evals for _, y, m in loader for v in y[m]]
    assert sorted(seen) == list(range(n))
    trains = [
        TensorLoader(
            images, labels, 4, shuffle=True, drop_last=True, seed=1, rank=r, world_size=world
        )
        for r in range(world)
    ]
    per_rank = [torch.cat([y for _, y, _ in loader]).tolist() for loader in trains]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == (n // world) // 4 * 4
    everything = [i for p in per_rank for i in p]
    assert len(set(everything)) == len(everything)  # disjoint


def test_train_loader_full_shuffled_batches() -> None:
    n, b = 50, 8
    images, labels = torch.arange(n).view(n, 1), torch.arange(n)
    loader = TensorLoader(images, labels, b, shuffle=True, drop_last=True, seed=5, name="train")
    assert len(loader) == n // b
    epoch0 = list(loader)
    epoch1 = list(loader)
    assert all(x.shape == (b, 1) and m.all() for x, _, m in epoch0)
    ids0 = torch.cat([y for _, y, _ in epoch0])
    ids1 = torch.cat([y for _, y, _ in epoch1])
    assert len(set(ids0.tolist())) == len(ids0) == len(loader) * b
    assert not torch.equal(ids0, ids1)  # a new permutation per epoch
    loader.set_epoch(0)
    assert torch.equal(torch.cat([y for _, y, _ in loader]), ids0)  # seeded by (seed, epoch)
    fixed = TensorLoader(
        images, labels, b, shuffle=True, drop_last=True, seed=5, epoch_fn=lambda: 1
    )
    assert torch.equal(torch.cat([y for _, y, _ in fixed]), ids1)


def test_device_residency(fake_cifar_dir: Path) -> None:
    dm = ImbalancedDataModule("cifar10", fake_cifar_dir, minority_count=5, batch_size=16)
    assert dm.train_dataloader().images.device.type == "cpu"  # plain use: host
    # The meta device stands in for CUDA: the split moves there once and stays.
    dm.trainer = stub_trainer(strategy=SimpleNamespace(root_device=torch.device("meta")))
    first, second = dm.train_dataloader(), dm.train_dataloader()
    assert first.images.device.type == "meta" and first.images is second.images
    assert next(iter(dm.test_dataloader()))[0].device.type == "meta"
    dm.trainer = stub_trainer(strategy=SimpleNamespace(root_device=torch.device("xla")))
    assert dm.train_dataloader().images.device.type == "cpu"  # XLA: Lightning transfers
    off = ImbalancedDataModule(
        "cifar10", fake_cifar_dir, minority_count=5, batch_size=16, device_resident=False
    )
    off.trainer = stub_trainer(strategy=SimpleNamespace(root_device=torch.device("meta")))
    assert off.train_dataloader().images.device.type == "cpu"


def test_datamodule_shards_by_trainer_rank(fake_cifar_dir: Path) -> None:
    seen = []
    for rank in range(2):
        dm = ImbalancedDataModule(
            "cifar10", fake_cifar_dir, minority_count=5, batch_size=8, eval_batch_size=16
        )
        dm.trainer = stub_trainer(global_rank=rank, world_size=2)
        assert len(dm.train_dataloader()) == (425 // 2) // 8
        seen += [int(v) for _, y, m in dm.test_dataloader() for v in y[m]]
    assert Counter(seen) == Counter(dm.split_tensors("test")[1].tolist())


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
        self.counted: Counter[int] = Counter()

    def training_step(self, batch: tuple[torch.Tensor, ...], idx: int) -> torch.Tensor:
        x, y, _ = batch
        assert x.dtype == torch.float32
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(
        self, batch: tuple[torch.Tensor, ...], idx: int, dataloader_idx: int = 0
    ) -> None:
        self.counted[dataloader_idx] += int(batch[2].sum())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_fit_smoke(fake_cifar_dir: Path) -> None:
    dm = ImbalancedDataModule(
        "cifar10",
        fake_cifar_dir,
        minority_count=5,
        batch_size=64,
        eval_batch_size=40,
        val_fraction=0.2,
        augment=True,
        normalize=True,
    )
    model = _Tiny()
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(model, dm)
    assert model.counted == {0: sum(dm.class_counts("val")), 1: sum(dm.class_counts("test"))}


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(minority_count=0), ValueError, r"minority_count must be an int >= 1, got 0"),
        (dict(minority_count=-3), ValueError, r"minority_count must be an int >= 1, got -3"),
        (dict(minority_count=2.5), ValueError, r"minority_count must be an int >= 1, got 2.5"),
        (dict(minority_count=None), ValueError, r"minority_count .* required .*'reference'"),
        (dict(dataset="svhn"), ValueError, r"dataset must be one of .* got 'svhn'"),
        (dict(minority_classes=(0, 10)), ValueError, r"minority_classes .*\[0, 10\), got 10"),
        (dict(minority_classes=(-1,)), ValueError, r"minority_classes .* got -1"),
        (dict(minority_classes=(2, 4, 2)), ValueError, r"minority_classes has duplicates"),
        (dict(minority_classes=3), TypeError, r"minority_classes must be a sequence.* got 3"),
        (dict(val_fraction=1.0), ValueError, r"val_fraction must be in \[0, 1\), got 1.0"),
        (dict(val_fraction=-0.1), ValueError, r"val_fraction must be in \[0, 1\), got -0.1"),
        (dict(batch_size=0), ValueError, r"batch_size must be an int >= 1, got 0"),
        (dict(eval_batch_size=-1), ValueError, r"eval_batch_size must be an int >= 1, got -1"),
        (dict(protocol="balanced"), ValueError, r"protocol must be one of .* got 'balanced'"),
        (dict(protocol="longtail"), ValueError, r"imbalance_ratio must be set .* got None"),
        (
            dict(protocol="longtail", imbalance_ratio=0.5),
            ValueError,
            r"imbalance_ratio must be >= 1, got 0.5",
        ),
        (dict(seed=-1), ValueError, r"seed must be an int >= 0 or None, got -1"),
    ],
)
def test_bad_arguments(kwargs: dict, exc: type[Exception], match: str) -> None:
    args = dict(dataset="cifar10", data_dir="unused", minority_count=5) | kwargs
    with pytest.raises(exc, match=match):
        ImbalancedDataModule(**args)


def test_minority_count_too_large_for_train(fake_cifar_dir: Path) -> None:
    dm = ImbalancedDataModule("cifar10", fake_cifar_dir, minority_count=13)
    with pytest.raises(
        ValueError,
        match=r"minority_count=13 needs .* 65 train images of class "
        r"0.* only 60; use minority_count <= 12",
    ):
        dm.setup("fit")


def test_minority_count_too_large_for_test(tmp_path: Path) -> None:
    root = fakedata.write_fake_idx(tmp_path, "mnist", n_train_per_class=90, n_test_per_class=12)
    dm = ImbalancedDataModule("mnist", root, minority_count=13)
    with pytest.raises(
        ValueError,
        match=r"minority_count=13 needs 13 test images of class 0.*"
        r"only 12",
    ):
        dm.setup()
    step = ImbalancedDataModule("mnist", root, minority_count=13, protocol="step")
    assert step.class_counts("train")[0] == 78  # step keeps the full test set: no limit there


def test_unknown_split_and_too_large_batch(fake_cifar_dir: Path) -> None:
    dm = ImbalancedDataModule("cifar10", fake_cifar_dir, minority_count=5, batch_size=1000)
    with pytest.raises(ValueError, match=r"split must be one of .* got 'valid'"):
        dm.class_counts("valid")
    with pytest.raises(
        ValueError,
        match=r"batch_size=1000 is larger than the 425 train images"
        r".*lower batch_size",
    ):
        dm.train_dataloader()


# ------------------------------------------------------------------------------ missing / corrupt
def test_missing_cifar_names_path_and_remedy(tmp_path: Path) -> None:
    dm = ImbalancedDataModule("cifar10", tmp_path, minority_count=5)
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup()
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert "download=True" in msg and "cifar-10-python.tar.gz" in msg


def test_missing_idx_names_paths_and_remedy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-copy")
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")  # a partial set is reported
    with pytest.raises(DatasetNotFoundError) as info:
        ImbalancedDataModule("fashion_mnist", tmp_path, minority_count=5).setup()
    msg = str(info.value)
    for folder in (tmp_path, tmp_path / "FashionMNIST" / "raw", tmp_path / "no-system-copy"):
        assert str(folder) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "download=True" in msg
    assert "lacks train-labels-idx1-ubyte" in msg
    with pytest.raises(DatasetNotFoundError, match=r"MNIST not found: .*MNIST/raw"):
        ImbalancedDataModule("mnist", tmp_path / "x", minority_count=5).class_counts("train")


def _rewrite_cifar_batch(folder: Path, name: str, changes: dict[bytes, object]) -> None:
    with open(folder / name, "rb") as fh:
        batch = pickle.load(fh, encoding="bytes")
    batch.update(changes)
    with open(folder / name, "wb") as fh:
        pickle.dump(batch, fh, protocol=2)


def test_corrupt_cifar(fake_cifar_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(fake_cifar_dir, tmp_path, dirs_exist_ok=True)
    folder = tmp_path / "cifar-10-batches-py"
    _rewrite_cifar_batch(folder, "data_batch_3", {b"data": np.zeros((120, 3000), np.uint8)})
    with pytest.raises(CorruptDatasetError, match=r"data_batch_3: b'data' must be a \(N, 3072\)"):
        D.load_dataset("cifar10", tmp_path)
    shutil.copy(fake_cifar_dir / "cifar-10-batches-py" / "data_batch_3", folder)
    _rewrite_cifar_batch(folder, "test_batch", {b"labels": [10] * 120})
    with pytest.raises(CorruptDatasetError, match=r"test set .* labels must be in \[0, 10\)"):
        ImbalancedDataModule("cifar10", tmp_path, minority_count=5).setup()
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"cannot unpickle CIFAR-10 batch .*test_batch"):
        D.load_dataset("cifar10", tmp_path)


def test_corrupt_idx(tmp_path: Path) -> None:
    root = fakedata.write_fake_idx(
        tmp_path, "fashion_mnist", n_train_per_class=3, n_test_per_class=2, gz=False
    )
    labels = root / "t10k-labels-idx1-ubyte"
    labels.write_bytes(fakedata.idx_bytes(np.full(20, 12, np.uint8)))
    with pytest.raises(CorruptDatasetError, match=r"labels must be in \[0, 10\), got min 12"):
        D.load_dataset("fashion_mnist", root)
    labels.write_bytes(fakedata.idx_bytes(np.zeros(20, np.uint8)))
    images = root / "train-images-idx3-ubyte"
    images.write_bytes(fakedata.idx_bytes(np.zeros((30, 27, 27), np.uint8)))
    with pytest.raises(CorruptDatasetError, match=r"images must have shape \(N, 28, 28\)"):
        D.load_dataset("fashion_mnist", root)
    images.write_bytes(fakedata.idx_bytes(np.zeros((30, 28, 28), np.uint8))[:-5])
    with pytest.raises(CorruptDatasetError, match=r"header promises shape \(30, 28, 28\)"):
        D.load_dataset("fashion_mnist", root)
    images.write_bytes(b"\x00\x00\x0d\x03")  # float IDX: not what we read
    with pytest.raises(CorruptDatasetError, match=r"not an unsigned-byte IDX file"):
        D.read_idx(images)
    gz = root / "broken.gz"
    gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05")[:-4])
    with pytest.raises(CorruptDatasetError, match=r"cannot read IDX file .*broken.gz"):
        D.read_idx(gz)


def test_fakedata_main_writes_all_three(tmp_path: Path) -> None:
    fakedata.main([str(tmp_path), "--train-per-class", "6", "--test-per-class", "2"])
    for name in ("cifar10", "mnist", "fashion_mnist"):
        raw = D.load_dataset(name, tmp_path)
        assert raw.train_labels.bincount().tolist() == [6] * 10
        assert raw.test_labels.bincount().tolist() == [2] * 10


# ------------------------------------------------------------------------------ real data
@pytest.mark.skipif(
    not (D.FASHION_MNIST_SYSTEM_DIR / "train-labels-idx1-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed "
    "(apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_reference_counts(tmp_path: Path) -> None:
    dm = ImbalancedDataModule("fashion_mnist", tmp_path, minority_count=10)
    assert dm.class_counts("train") == [60 if c in EVEN else 6000 for c in range(10)]
    assert dm.class_counts("test") == [10 if c in EVEN else 1000 for c in range(10)]
    images, _ = dm.split_tensors("train")
    assert images.shape == (30300, 1, 28, 28) and images.dtype == torch.uint8


# ----------------------------------------------------------------------------- review fixes
def test_seed_follows_seed_everything_unless_given(fake_cifar_dir, monkeypatch):
    def val_indices(**kwargs):
        dm = ImbalancedDataModule(
            dataset="cifar10", data_dir=str(fake_cifar_dir), minority_count=4,
            val_fraction=0.3, batch_size=8, **kwargs,
        )  # fmt: skip
        dm.setup("fit")
        return dm.indices("val").tolist(), dm.data_seed

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    default, seed0 = val_indices()
    assert seed0 == 0
    L.seed_everything(3)
    replicate, seed3 = val_indices()
    assert seed3 == 3 and replicate != default
    assert val_indices(seed=0) == (default, 0)  # an explicit seed wins


def test_no_flip_for_mnist_digits(fake_mnist_dir, fake_cifar_dir):
    kwargs = {"minority_count": 2, "augment": True}
    assert not ImbalancedDataModule("mnist", str(fake_mnist_dir), **kwargs).flip
    assert ImbalancedDataModule("cifar10", str(fake_cifar_dir), **kwargs).flip
    assert not ImbalancedDataModule("cifar10", str(fake_cifar_dir), flip=False, **kwargs).flip
    images = torch.rand(64, 1, 8, 8)
    torch.manual_seed(0)
    with_flip = random_crop_flip(images, padding=0)
    torch.manual_seed(0)
    no_flip = random_crop_flip(images, padding=0, flip=False)
    assert torch.equal(no_flip, images)  # padding 0: only the flip could change anything
    assert not torch.equal(with_flip, images)


def test_predict_dataloader_is_the_padded_test_split(fake_cifar_dir):
    dm = ImbalancedDataModule("cifar10", str(fake_cifar_dir), minority_count=3, batch_size=16)
    dm.setup("predict")
    masks = [mask for _, _, mask in dm.predict_dataloader()]
    assert int(sum(m.sum() for m in masks)) == sum(dm.class_counts("test"))
