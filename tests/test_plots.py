"""Tests for aff_lightning.plots: projections, figures read back from their Axes, the callback."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from torch import Tensor, nn
from torch.testing import assert_close

from aff_lightning.data import ImbalancedDataModule, TensorLoader
from aff_lightning.model import AffinityClassifier
from aff_lightning.plots import (
    EmbeddingPlot,
    collect_features,
    confusion_figure,
    embedding_figure,
    figure_to_array,
    normalize_confusion,
    project_2d,
    save_figure,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_PNG_BYTES = 5_000  # a blank 120-dpi figure with axes is already well above this


def _check_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > MIN_PNG_BYTES, f"{path} has only {len(data)} bytes"


def _blobs(n_per_class: int, num_classes: int, dim: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = 4 * torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    feats = means[labels] + torch.randn(labels.numel(), dim, generator=g)
    return feats, labels


# --------------------------------------------------------------------------------- project_2d
def test_project_2d_identity_for_2d() -> None:
    feats, _ = _blobs(5, 3, 2)
    centers = torch.randn(6, 2)
    points, centers2d, method = project_2d(feats, centers)
    assert method == "identity"
    assert_close(points, feats)
    assert centers2d is not None
    assert_close(centers2d, centers)


def test_project_2d_pca_shape_orthonormal_basis_and_mean_at_origin() -> None:
    feats, _ = _blobs(20, 4, 16, seed=1)
    feats = feats.double()
    mean = feats.mean(dim=0)
    # Projecting mean + e_k gives row k of the (D, 2) basis: its columns must be orthonormal.
    centers = torch.cat([mean[None], mean[None] + torch.eye(16, dtype=torch.float64)])
    points, centers2d, method = project_2d(feats, centers)
    assert method == "pca"
    assert points.shape == (80, 2) and points.dtype == torch.float32
    assert centers2d is not None and centers2d.shape == (17, 2)
    assert_close(centers2d[0], torch.zeros(2), atol=1e-5, rtol=0)  # the mean -> origin
    basis = centers2d[1:].double()  # (D, 2)
    assert_close(basis.T @ basis, torch.eye(2, dtype=torch.float64), atol=1e-5, rtol=0)
    assert_close(points.double(), (feats - mean) @ basis, atol=1e-4, rtol=1e-4)
    # principal components: uncorrelated scores, the first with the larger variance, and the
    # same axes as scikit-learn's PCA up to sign
    cov = torch.cov(points.double().T)
    assert abs(float(cov[0, 1])) < 1e-3 * float(cov[0, 0])
    assert float(cov[0, 0]) >= float(cov[1, 1])
    from sklearn.decomposition import PCA

    ref = PCA(n_components=2).fit(feats.numpy()).components_  # (2, D)
    np.testing.assert_allclose(np.abs(ref @ basis.numpy()), np.eye(2), atol=1e-4)


def test_project_2d_pads_1d_and_handles_one_sample() -> None:
    feats = torch.tensor([[1.0], [2.0], [-3.0]])
    points, centers2d, method = project_2d(feats, torch.tensor([[0.5]]))
    assert method == "pad"
    assert_close(points, torch.tensor([[1.0, 0.0], [2.0, 0.0], [-3.0, 0.0]]))
    assert_close(centers2d, torch.tensor([[0.5, 0.0]]))
    points, centers2d, method = project_2d(torch.randn(1, 5))
    assert method == "pca" and points.shape == (1, 2) and centers2d is None
    assert torch.isfinite(points).all()


def test_project_2d_is_deterministic_in_sign() -> None:
    feats, _ = _blobs(10, 3, 8, seed=2)
    a, _, _ = project_2d(feats)
    b, _, _ = project_2d(feats.clone())
    assert_close(a, b)


@pytest.mark.parametrize(
    ("features", "centers", "error", "match"),
    [
        (torch.zeros(4), None, ValueError, r"features must have shape \(N, D\).*\(4,\)"),
        (torch.zeros(0, 3), None, ValueError, r"N, D >= 1, got \(0, 3\)"),
        (torch.zeros(4, 3), torch.zeros(2, 5), ValueError, r"centers must have shape \(K, 3\)"),
        ([[1.0, 2.0]], None, TypeError, "features must be a torch.Tensor or numpy array, got list"),
    ],
)
def test_project_2d_rejects_bad_input(features, centers, error, match) -> None:
    with pytest.raises(error, match=match):
        project_2d(features, centers)


# --------------------------------------------------------------------------------- figures
def test_embedding_figure_plots_the_points_by_class_and_writes_a_png(tmp_path: Path) -> None:
    feats, labels = _blobs(15, 4, 2)
    labels[labels == 2] = 3  # class 2 absent: no collection for it
    centers = torch.randn(8, 2)
    center_labels = torch.arange(4).repeat_interleave(2)
    fig = embedding_figure(
        feats, labels, centers, center_labels, minority_classes=(1, 3), title="blobs"
    )
    assert isinstance(fig.canvas, FigureCanvasAgg)
    ax = fig.axes[0]
    present = [0, 1, 3]
    assert len(ax.collections) == len(present) + 1  # one per class present, then the centers
    for coll, c in zip(ax.collections, present, strict=False):
        assert_close(torch.from_numpy(np.asarray(coll.get_offsets())).float(), feats[labels == c])
        assert coll.get_label() == (f"{c} (minority)" if c in (1, 3) else f"{c}")
    markers_are_distinct = ax.collections[0].get_paths()[0] != ax.collections[1].get_paths()[0]
    assert markers_are_distinct
    stars = ax.collections[-1]
    assert stars.get_label() == "centers"
    assert_close(torch.from_numpy(np.asarray(stars.get_offsets())).float(), centers)
    assert np.allclose(stars.get_edgecolor()[0], to_rgba("black"))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["0", "1 (minority)", "3 (minority)", "centers"]
    assert ax.get_title() == "blobs"
    _check_png(save_figure(fig, tmp_path / "sub" / "emb.png"))


def test_embedding_figure_without_centers_matches_projected_features() -> None:
    feats, labels = _blobs(10, 3, 12, seed=3)
    points, centers2d, _ = project_2d(feats)
    fig = embedding_figure(points, labels, centers2d)
    ax = fig.axes[0]
    assert len(ax.collections) == 3
    got = torch.cat([torch.from_numpy(np.asarray(c.get_offsets())) for c in ax.collections])
    want = torch.cat([points[labels == c] for c in range(3)])
    assert got.shape == (30, 2)
    assert_close(got.float(), want)
    image = figure_to_array(fig)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.std() > 0  # something was drawn


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"points": torch.zeros(3, 3)}, ValueError, r"points must have shape \(N, 2\)"),
        ({"labels": torch.zeros(2, dtype=torch.long)}, ValueError, r"labels must be \(N,\)"),
        ({"labels": torch.zeros(3)}, ValueError, r"labels must be \(N,\) = \(3,\) ints"),
        ({"labels": torch.tensor([0, -1, 0])}, ValueError, "labels must be >= 0, got -1"),
        ({"centers2d": torch.zeros(2, 2)}, ValueError, "center_labels must be given"),
        (
            {"centers2d": torch.zeros(2, 2), "center_labels": torch.zeros(3, dtype=torch.long)},
            ValueError,
            r"center_labels must have shape \(K,\) = \(2,\)",
        ),
        ({"minority_classes": "02"}, TypeError, "minority_classes must be a sequence of ints"),
        ({"minority_classes": (1.5,)}, TypeError, "minority_classes must contain ints"),
    ],
)
def test_embedding_figure_rejects_bad_input(kwargs, error, match) -> None:
    args = {"points": torch.zeros(3, 2), "labels": torch.zeros(3, dtype=torch.long), **kwargs}
    with pytest.raises(error, match=match):
        embedding_figure(**args)


def test_confusion_figure_is_row_normalised_and_marks_minority(tmp_path: Path) -> None:
    confmat = torch.tensor([[50, 3, 0], [10, 2, 1], [0, 0, 0]], dtype=torch.int32)
    fig = confusion_figure(confmat, minority_classes=(1,), title="cm")
    ax = fig.axes[0]
    shown = torch.from_numpy(np.asarray(ax.images[0].get_array()))
    assert_close(shown[:2].sum(dim=1), torch.ones(2, dtype=torch.float64))
    assert_close(shown[2], torch.zeros(3, dtype=torch.float64))  # no support: all zero
    assert_close(shown[1], torch.tensor([10, 2, 1], dtype=torch.float64) / 13)
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == sorted(["94", "6", "77", "15", "8"])  # percentages, zero cells blank
    yticks = [t.get_text() for t in ax.get_yticklabels()]
    assert yticks == ["0 (n=53)", "1* (n=13)", "2 (n=0)"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1*", "2"]
    assert ax.get_yticklabels()[1].get_color() != ax.get_yticklabels()[0].get_color()
    _check_png(save_figure(fig, tmp_path / "cm.png"))


def test_normalize_confusion_rows_sum_to_one_with_support() -> None:
    confmat = torch.randint(0, 20, (6, 6))
    confmat[4] = 0
    norm = normalize_confusion(confmat)
    support = confmat.sum(dim=1) > 0
    assert_close(norm.sum(dim=1)[support], torch.ones(5, dtype=torch.float64))
    assert float(norm[4].abs().sum()) == 0.0


@pytest.mark.parametrize("bad", [torch.zeros(2, 3), torch.zeros(4), torch.zeros(0, 0)])
def test_confusion_figure_rejects_non_square(bad: Tensor) -> None:
    with pytest.raises(ValueError, match=r"confmat must have shape \(C, C\)"):
        confusion_figure(bad)


def test_save_figure_rejects_non_figures(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="fig must be a matplotlib Figure, got str"):
        save_figure("fig", tmp_path / "x.png")  # type: ignore[arg-type]


def test_plotting_needs_no_pyplot_or_display(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Headless: no DISPLAY, and pyplot (which could pick a GUI backend) is never used."""
    import matplotlib.pyplot as plt  # imported anyway by torchmetrics; must stay unused

    def forbidden(*args, **kwargs):
        raise AssertionError("pyplot was used")

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    for name in ("figure", "gcf", "subplots", "switch_backend", "savefig"):
        monkeypatch.setattr(plt, name, forbidden)
    before = plt.get_fignums()
    fig = embedding_figure(torch.randn(20, 2), torch.arange(20) % 3, minority_classes=(1,))
    _check_png(save_figure(fig, tmp_path / "a.png"))
    assert figure_to_array(fig).shape[2] == 3
    _check_png(save_figure(confusion_figure(torch.eye(3)), tmp_path / "b.png"))
    assert plt.get_fignums() == before  # no figure registered with pyplot


# --------------------------------------------------------------------------------- collect
class _Doubler(nn.Module):
    """features = 2 * flattened image; a BatchNorm whose mode the test watches."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.seen_training: list[bool] = []

    def features(self, images: Tensor) -> Tensor:
        self.seen_training.append(self.bn.training)
        return 2 * images.flatten(1)


class _ToFloat:
    """A stand-in datamodule: uint8 -> float, and an augment flag that must be off."""

    augment = True

    def on_after_batch_transfer(self, batch, dataloader_idx):
        assert not self.augment, "augmentation was on while collecting features"
        images, labels, mask = batch
        return images.float(), labels, mask


def test_collect_features_drops_padding_keeps_order_and_restores_mode() -> None:
    images = torch.arange(7 * 4, dtype=torch.uint8).view(7, 1, 2, 2)
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    loader = TensorLoader(images, labels, batch_size=3)  # 3 batches, the last one padded
    model = _Doubler().train()
    dm = _ToFloat()
    feats, got = collect_features(model, loader, "cpu", datamodule=dm)
    assert feats.shape == (7, 4) and feats.dtype == torch.float32
    assert_close(feats, 2 * images.flatten(1).float())
    assert torch.equal(got, labels)
    assert model.seen_training == [False] * 3 and model.training and model.bn.training
    assert dm.augment is True  # restored
    feats, got = collect_features(model, loader, "cpu", max_points=4, datamodule=dm)
    assert feats.shape == (4, 4) and torch.equal(got, labels[:4])


def test_collect_features_errors() -> None:
    loader = TensorLoader(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(2).long(), 2)
    with pytest.raises(TypeError, match="no datamodule converts them; pass datamodule="):
        collect_features(_Doubler(), loader, "cpu")
    with pytest.raises(TypeError, match=r"model must have a features\(images\) method"):
        collect_features(nn.Linear(2, 2), loader, "cpu")
    with pytest.raises(ValueError, match="max_points must be an int >= 1 or None, got 0"):
        collect_features(_Doubler(), loader, "cpu", max_points=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_epochs": -1}, "every_n_epochs must be an int >= 0, got -1"),
        ({"max_points": 0}, "max_points must be an int >= 1, got 0"),
        ({"split": "train"}, r"split must be one of \['test', 'val'\], got 'train'"),
    ],
)
def test_embedding_plot_rejects_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        EmbeddingPlot(**kwargs)


# --------------------------------------------------------------------------------- end to end
def _datamodule(data_dir: Path) -> ImbalancedDataModule:
    return ImbalancedDataModule(
        dataset="fashion_mnist",
        data_dir=str(data_dir),
        minority_count=2,
        batch_size=32,
        eval_batch_size=64,
        val_fraction=0.0,
        monitor_test=True,
    )


def _trainer(root: Path, callbacks, logger, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        default_root_dir=root,
        **kwargs,
    )


def test_embedding_plot_end_to_end_2d(fake_fmnist_dir: Path, tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    dm = _datamodule(fake_fmnist_dir)
    model = AffinityClassifier(
        backbone="cnn3",
        head="affinity",
        in_channels=1,
        image_size=28,
        embedding_dim=2,
        minority_classes=dm.minority_classes,
        lr=1e-3,
    )
    plot = EmbeddingPlot(every_n_epochs=1)
    trainer = _trainer(tmp_path, [plot], CSVLogger(tmp_path), max_epochs=2, limit_train_batches=4)
    trainer.fit(model, dm)
    trainer.test(model, dm, verbose=False)

    plots = Path(trainer.log_dir) / "plots"
    names = ["embedding_epoch001", "embedding_epoch002", "embedding_final", "confusion_test"]
    assert plot.written == [plots / f"{n}.png" for n in names]
    for path in plot.written:
        _check_png(path)

    test_labels = dm.split_tensors("test")[1]
    feats, labels = collect_features(model, dm.test_dataloader(), "cpu", datamodule=dm)
    assert feats.shape == (test_labels.numel(), 2)
    assert torch.equal(labels, test_labels)
    # the final picture shows exactly these features (2-D: no projection) and labels
    assert plot.last_embedding is not None
    points, plotted_labels = plot.last_embedding
    assert_close(points, feats)
    assert torch.equal(plotted_labels, test_labels)


def test_embedding_plot_softmax_pca_tensorboard_and_test_only(
    fake_fmnist_dir: Path, tmp_path: Path
) -> None:
    """No centers (softmax), 256-D features through PCA, TensorBoard images, test without fit."""
    L.seed_everything(0, verbose=False)
    dm = _datamodule(fake_fmnist_dir)
    model = AffinityClassifier(
        backbone="cnn3",
        head="softmax",
        in_channels=1,
        image_size=28,
        lr=1e-3,
        minority_classes=dm.minority_classes,
    )
    tb = TensorBoardLogger(tmp_path, name="tb")
    plot = EmbeddingPlot(every_n_epochs=0, max_points=30)
    trainer = _trainer(
        tmp_path,
        [plot],
        [CSVLogger(tmp_path, name="csv"), tb],
        max_epochs=1,
        limit_train_batches=2,
    )
    trainer.fit(model, dm)
    assert [p.name for p in plot.written] == ["embedding_final.png"]
    _check_png(plot.written[0])
    points, labels = plot.last_embedding
    assert points.shape == (30, 2) and torch.equal(labels, dm.split_tensors("test")[1][:30])
    assert list(Path(tb.log_dir).glob("events.out.tfevents.*"))

    fresh = EmbeddingPlot(every_n_epochs=0)
    tester = _trainer(tmp_path / "t", [fresh], CSVLogger(tmp_path / "t"))
    tester.test(model, dm, verbose=False)
    assert [p.name for p in fresh.written] == ["confusion_test.png", "embedding_test.png"]
    for path in fresh.written:
        _check_png(path)


def test_embedding_plot_writes_nothing_under_fast_dev_run(
    fake_fmnist_dir: Path, tmp_path: Path
) -> None:
    dm = _datamodule(fake_fmnist_dir)
    model = AffinityClassifier(
        backbone="cnn3", head="affinity", in_channels=1, image_size=28, embedding_dim=2
    )
    plot = EmbeddingPlot(every_n_epochs=1)
    trainer = _trainer(tmp_path, [plot], None, fast_dev_run=True)
    trainer.fit(model, dm)
    trainer.test(model, dm, verbose=False)
    assert plot.written == []
    assert not list(tmp_path.rglob("*.png"))
