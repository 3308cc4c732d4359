"""Figures that show imbalance: a 2-D feature embedding with the class centers, and a confusion
matrix normalised per true class; plus the :class:`EmbeddingPlot` callback that writes them.

The figures are built with :class:`matplotlib.figure.Figure` on an Agg canvas, never through
``pyplot``: no global figure state, no GUI backend, so plotting works headless and in threads.

The embedding shows the features the head sees (``model.features``: after the backbone, the
optional ``embedding_dim`` bottleneck and the optional BatchNorm), which is the space the
affinity head's centers live in, so points and centers are drawn in the same coordinates. A model
built with ``embedding_dim=2`` (the reference's MNIST figure) is plotted as is; wider features are
projected on their first two principal components, the centers with the same mean and basis.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from torch import Tensor, nn

__all__ = [
    "EmbeddingPlot",
    "collect_features",
    "confusion_figure",
    "embedding_figure",
    "figure_to_array",
    "normalize_confusion",
    "project_2d",
    "save_figure",
]

Batch = tuple[Tensor, Tensor, Tensor]  # images (B, C, H, W), labels (B,), mask (B,) bool
PLOTS_SUBDIR = "plots"
SPLITS = ("test", "val")
_MINORITY_MARKER = "^"
_MAJORITY_MARKER = "o"
_DPI = 120


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def _as_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def project_2d(
    features: Tensor, centers: Tensor | None = None
) -> tuple[Tensor, Tensor | None, str]:
    """Map features (and centers) to 2-D for plotting.

    D == 2: unchanged ("identity"). D == 1: a zero second coordinate ("pad"). D > 2: the first
    two principal components of ``features`` ("pca"): features are centered on their mean and
    projected on the top two right singular vectors (each oriented so that its largest-magnitude
    entry is positive, so the picture does not flip between calls); centers go through the same
    mean and basis. With fewer than 2 usable components the missing axis is zero.

    Args:
        features: (N, D) float, N >= 1.
        centers: optional (K, D) in the same space as ``features``.

    Returns:
        ``(points (N, 2), centers2d (K, 2) or None, method)``, float32 on the CPU.
    """
    feats = _as_tensor(features, "features")
    if feats.dim() != 2 or feats.shape[0] < 1 or feats.shape[1] < 1:
        raise ValueError(
            f"features must have shape (N, D) with N, D >= 1, got {tuple(feats.shape)}"
        )
    feats = feats.to(device="cpu", dtype=torch.float64)
    d = feats.shape[1]
    ctr: Tensor | None = None
    if centers is not None:
        ctr = _as_tensor(centers, "centers")
        if ctr.dim() != 2 or ctr.shape[1] != d:
            raise ValueError(
                f"centers must have shape (K, {d}) to match features (N, {d}), got "
                f"{tuple(ctr.shape)}"
            )
        ctr = ctr.to(device="cpu", dtype=torch.float64)

    if d == 2:
        method = "identity"
        points, ctr2 = feats, ctr
    elif d == 1:
        method = "pad"
        points = torch.cat([feats, torch.zeros_like(feats)], dim=1)  # (N, 1) -> (N, 2)
        ctr2 = None if ctr is None else torch.cat([ctr, torch.zeros_like(ctr)], dim=1)
    else:
        method = "pca"
        mean = feats.mean(dim=0, keepdim=True)  # (1, D)
        _, _, vh = torch.linalg.svd(feats - mean, full_matrices=False)  # vh: (min(N, D), D)
        basis = vh[:2]  # (k, D), k <= 2
        sign = torch.sign(basis.gather(1, basis.abs().argmax(dim=1, keepdim=True)))  # (k, 1)
        basis = basis * torch.where(sign == 0, torch.ones_like(sign), sign)
        if basis.shape[0] < 2:  # a single sample: one (degenerate) direction, pad the other
            basis = torch.cat([basis, torch.zeros(2 - basis.shape[0], d, dtype=basis.dtype)])
        points = (feats - mean) @ basis.T  # (N, D) @ (D, 2) -> (N, 2)
        ctr2 = None if ctr is None else (ctr - mean) @ basis.T  # (K, 2)
    return points.float(), (None if ctr2 is None else ctr2.float()), method


def class_colors(num_classes: int) -> list[tuple[float, float, float, float]]:
    """One distinct RGBA colour per class (tab10, tab20, then an evenly spaced hue wheel)."""
    if num_classes <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(num_classes)]
    if num_classes <= 20:
        cmap = colormaps["tab20"]
        return [cmap(i) for i in range(num_classes)]
    cmap = colormaps["hsv"]
    return [cmap(i / num_classes) for i in range(num_classes)]


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas; no pyplot involved
    return fig


def _check_minority(minority_classes: Iterable[int]) -> tuple[int, ...]:
    if isinstance(minority_classes, (str, bytes)):
        raise TypeError(f"minority_classes must be a sequence of ints, got {minority_classes!r}")
    out: list[int] = []
    for c in minority_classes:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral):
            raise TypeError(f"minority_classes must contain ints, got {c!r}")
        out.append(int(c))
    return tuple(out)


def _class_name(c: int, class_names: Sequence[str] | None) -> str:
    return class_names[c] if class_names is not None and c < len(class_names) else str(c)


def embedding_figure(
    points: Tensor,
    labels: Tensor,
    centers2d: Tensor | None = None,
    center_labels: Tensor | None = None,
    minority_classes: Sequence[int] = (),
    title: str = "",
    class_names: Sequence[str] | None = None,
    axis_labels: tuple[str, str] = ("dim 1", "dim 2"),
) -> Figure:
    """Scatter plot of 2-D points coloured by class, with the class centers as stars.

    ``ax.collections`` holds one scatter per class present in ``labels``, in increasing class
    order (its legend label is the class name, plus " (minority)" for minority classes, which
    are drawn as black-edged triangles on top of the majority dots), then, when centers are
    given, one collection of star markers with a black edge in their class colours.

    Args:
        points: (N, 2) float.
        labels: (N,) int class of each point.
        centers2d: optional (K, 2) center positions.
        center_labels: (K,) int class of each center; required with ``centers2d``.
        minority_classes: classes to mark as minority.
        title: figure title.
        class_names: optional names indexed by class.
        axis_labels: x and y axis labels.

    Returns:
        A :class:`~matplotlib.figure.Figure` on an Agg canvas.
    """
    pts = _as_tensor(points, "points").to("cpu", torch.float64)
    lab = _as_tensor(labels, "labels").to("cpu")
    if pts.dim() != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2), got {tuple(pts.shape)}")
    if lab.shape != (pts.shape[0],) or lab.dtype.is_floating_point or lab.dtype == torch.bool:
        raise ValueError(
            f"labels must be (N,) = ({pts.shape[0]},) ints, got {tuple(lab.shape)} {lab.dtype}"
        )
    if lab.numel() and int(lab.min()) < 0:
        raise ValueError(f"labels must be >= 0, got {int(lab.min())}")
    ctr: Tensor | None = None
    ctr_lab: Tensor | None = None
    if centers2d is not None:
        ctr = _as_tensor(centers2d, "centers2d").to("cpu", torch.float64)
        if ctr.dim() != 2 or ctr.shape[1] != 2:
            raise ValueError(f"centers2d must have shape (K, 2), got {tuple(ctr.shape)}")
        if center_labels is None:
            raise ValueError("center_labels must be given with centers2d, got None")
        ctr_lab = _as_tensor(center_labels, "center_labels").to("cpu")
        if ctr_lab.shape != (ctr.shape[0],):
            raise ValueError(
                f"center_labels must have shape (K,) = ({ctr.shape[0]},), got "
                f"{tuple(ctr_lab.shape)}"
            )
        if ctr_lab.numel() and int(ctr_lab.min()) < 0:
            raise ValueError(f"center_labels must be >= 0, got {int(ctr_lab.min())}")
    minority = set(_check_minority(minority_classes))

    n_classes = 1 + max(
        int(lab.max()) if lab.numel() else -1,
        int(ctr_lab.max()) if ctr_lab is not None and ctr_lab.numel() else -1,
        max(minority, default=-1),
    )
    colors = class_colors(max(n_classes, 1))
    fig = _new_figure((7.0, 6.0))
    ax = fig.add_subplot()
    n = pts.shape[0]
    size = float(min(24.0, max(3.0, 6000.0 / max(n, 1))))  # smaller dots for many points
    xy = pts.numpy()
    lab_np = lab.numpy()
    for c in sorted(set(lab_np.tolist())):
        sel = xy[lab_np == c]
        name = _class_name(c, class_names)
        if c in minority:
            ax.scatter(
                sel[:, 0],
                sel[:, 1],
                s=max(size * 2.2, 14.0),
                marker=_MINORITY_MARKER,
                color=colors[c],
                edgecolors="black",
                linewidths=0.5,
                alpha=0.9,
                zorder=3,
                label=f"{name} (minority)",
            )
        else:
            ax.scatter(
                sel[:, 0],
                sel[:, 1],
                s=size,
                marker=_MAJORITY_MARKER,
                color=colors[c],
                edgecolors="none",
                alpha=0.45,
                zorder=2,
                label=name,
            )
    if ctr is not None and ctr_lab is not None and ctr.shape[0]:
        ax.scatter(
            ctr[:, 0].numpy(),
            ctr[:, 1].numpy(),
            s=260,
            marker="*",
            c=[colors[int(c)] for c in ctr_lab.tolist()],
            edgecolors="black",
            linewidths=1.2,
            zorder=4,
            label="centers",
        )
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.grid(True, alpha=0.25)
    if title:
        ax.set_title(title)
    if ax.collections:
        legend = ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize="small",
            frameon=False,
        )
        # Legend markers: one readable size and opaque, whatever the plotted size and alpha;
        # the centers' entry is a neutral star (its collection has one colour per class).
        for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=False):
            if not isinstance(handle, PathCollection):
                continue
            handle.set_alpha(1.0)
            if text.get_text() == "centers":
                handle.set_sizes([140.0])
                handle.set_facecolor("white")
            else:
                handle.set_sizes([40.0])
    return fig


def normalize_confusion(confmat: Tensor) -> Tensor:
    """Row-normalise a confusion matrix: each true class' row sums to 1 (0 for empty rows).

    Args:
        confmat: (C, C) counts, rows = true class, columns = predicted class.

    Returns:
        (C, C) float64 on the CPU.
    """
    cm = _as_tensor(confmat, "confmat")
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] < 1:
        raise ValueError(f"confmat must have shape (C, C) with C >= 1, got {tuple(cm.shape)}")
    cm = cm.to("cpu", torch.float64)
    support = cm.sum(dim=1, keepdim=True)  # (C, 1)
    return torch.where(support > 0, cm / support.clamp_min(1e-300), torch.zeros_like(cm))


def confusion_figure(
    confmat: Tensor,
    minority_classes: Sequence[int] = (),
    title: str = "",
    class_names: Sequence[str] | None = None,
) -> Figure:
    """Heat map of a confusion matrix normalised per true class (rows), in percent.

    Each cell shows the percentage of the true class predicted as the column class (cells of 0
    are left blank); the y tick labels give the class support ``n=`` so the imbalance is visible;
    minority classes are starred and drawn in red on both axes. ``ax.images[0]`` holds the
    normalised (C, C) matrix.

    Args:
        confmat: (C, C) counts, rows = true class, columns = predicted class.
        minority_classes: classes to mark as minority.
        title: figure title.
        class_names: optional names indexed by class.

    Returns:
        A :class:`~matplotlib.figure.Figure` on an Agg canvas.
    """
    norm = normalize_confusion(confmat)
    counts = _as_tensor(confmat, "confmat").to("cpu", torch.float64)
    minority = set(_check_minority(minority_classes))
    c = norm.shape[0]
    side = float(min(14.0, max(4.5, 0.55 * c + 2.5)))
    fig = _new_figure((side + 1.2, side))
    ax = fig.add_subplot()
    image = ax.imshow(norm.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of true class")
    if c <= 30:
        fontsize = 9 if c <= 12 else 6
        for i in range(c):
            for j in range(c):
                value = float(norm[i, j])
                if counts[i, j] == 0:
                    continue
                text = f"{100 * value:.0f}" if value >= 0.01 else "<1"
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color="white" if value > 0.55 else "black",
                )
    support = counts.sum(dim=1).tolist()
    xt = [_class_name(i, class_names) + ("*" if i in minority else "") for i in range(c)]
    yt = [f"{xt[i]} (n={int(support[i])})" for i in range(c)]
    ax.set_xticks(range(c), labels=xt, rotation=45 if class_names else 0, ha="center")
    ax.set_yticks(range(c), labels=yt)
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
        for i, tick in enumerate(ticks):
            if i in minority:
                tick.set_color("tab:red")
                tick.set_fontweight("bold")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (support)")
    full_title = title or "Confusion matrix, % of each true class"
    if minority:
        full_title += "\n(* minority class)"
    ax.set_title(full_title)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (parent folders created) and return the path."""
    if not isinstance(fig, Figure):
        raise TypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=_DPI)
    return out


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render ``fig`` with Agg to an (H, W, 3) uint8 RGB array (what TensorBoard logs)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# --------------------------------------------------------------------------------------------
# Feature collection
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside, each one's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _no_augment(datamodule: Any) -> Iterator[None]:
    """Turn a datamodule's training augmentation off inside (the hooks augment when training)."""
    had = hasattr(datamodule, "augment")
    old = getattr(datamodule, "augment", None)
    if had:
        datamodule.augment = False
    try:
        yield
    finally:
        if had:
            datamodule.augment = old


def collect_features(
    model: nn.Module,
    dataloader: Iterable[Batch],
    device: torch.device | str | None = None,
    max_points: int | None = 5000,
    datamodule: Any = None,
) -> tuple[Tensor, Tensor]:
    """The features ``model.features`` gives for a loader's real samples, in loader order.

    Runs in eval mode (each submodule's mode restored after) under ``torch.no_grad``. Every
    batch is moved to ``device``, then passed through ``datamodule.on_after_batch_transfer`` with
    its training augmentation off (uint8 -> float, optional normalisation), exactly as the
    trainer prepares evaluation batches. Padded rows (mask False) are dropped on the host after
    the features come back to the CPU, so the device sees the loader's static shapes.

    Args:
        model: a module with ``features(images) -> (B, D)``, e.g. ``AffinityClassifier``.
        dataloader: yields ``(images, labels, mask)``.
        device: where to run; defaults to the model's device.
        max_points: stop after this many real samples (the first ones); None for all.
        datamodule: the batch transform; defaults to the one attached to the model's trainer.
            Without one, batches must already hold float images.

    Returns:
        ``(features (N, D) float32, labels (N,) int64)`` on the CPU.
    """
    features_fn = getattr(model, "features", None)
    if not callable(features_fn):
        raise TypeError(f"model must have a features(images) method, got {type(model).__name__}")
    if max_points is not None and (
        isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 1
    ):
        raise ValueError(f"max_points must be an int >= 1 or None, got {max_points!r}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if datamodule is None:
        trainer = getattr(model, "_trainer", None)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    transform: Callable[[Batch, int], Batch] | None = getattr(
        datamodule, "on_after_batch_transfer", None
    )
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    total = 0
    with _eval_mode(model), _no_augment(datamodule), torch.no_grad():
        for batch in dataloader:
            images, target, mask = (t.to(device) for t in batch)
            if transform is not None:
                images, target, mask = transform((images, target, mask), 0)
            if images.dtype == torch.uint8:
                raise TypeError(
                    "the loader yields uint8 images and no datamodule converts them; pass "
                    "datamodule= (its on_after_batch_transfer turns them into floats)"
                )
            out = features_fn(images).float().cpu()  # (B, D), host from here on
            keep = mask.cpu().bool()
            feats.append(out[keep])
            labels.append(target.cpu()[keep])
            total += int(keep.sum())
            if max_points is not None and total >= max_points:
                break
    if not feats:
        raise ValueError("dataloader yielded no batches")
    features = torch.cat(feats)  # (N, D)
    target_all = torch.cat(labels).long()
    if max_points is not None:
        features, target_all = features[:max_points], target_all[:max_points]
    return features, target_all


# --------------------------------------------------------------------------------------------
# Callback
# --------------------------------------------------------------------------------------------


def model_centers(model: nn.Module) -> tuple[Tensor, Tensor] | None:
    """The affinity head's centers as ``((C*M, D), class of each (C*M,))`` on the CPU, or None.

    Softmax models (no ``head.centers``) give None.
    """
    head = getattr(model, "head", None)
    centers = getattr(head, "centers", None)
    if not isinstance(centers, Tensor):
        return None
    c, m, d = centers.shape
    flat = centers.detach().float().cpu().reshape(c * m, d)  # (C, M, D) -> (C*M, D)
    return flat, torch.arange(c).repeat_interleave(m)  # (C*M,)


class EmbeddingPlot(Callback):
    """Writes the 2-D feature embedding with the class centers, and the test confusion matrix.

    * every ``every_n_epochs`` training epochs (at the end of epochs where
      ``(epoch + 1) % every_n_epochs == 0``, after that epoch's validation):
      ``embedding_epoch{E:03d}.png`` with E the number of epochs done;
    * at the end of fit: ``embedding_final.png``;
    * at the end of test (``on_test_end=True``): ``confusion_test.png``, the test confusion
      matrix normalised per true class, and ``embedding_test.png`` when this trainer did not fit
      (e.g. ``cli.py test --ckpt_path=...``).

    The embedding shows the first ``max_points`` samples of ``split`` (the whole split in
    dataset order, on one process) through ``model.features``: the raw coordinates when the
    model has a 2-unit bottleneck (``embedding_dim=2``), else the first two principal
    components; the affinity head's centers as stars; minority classes as black-edged triangles.
    Files go to ``<trainer.log_dir>/plots/`` (``default_root_dir`` without a logger) and are
    logged as images to every TensorBoardLogger (tags ``plots/embedding``, one step per plot,
    and ``plots/confusion_test``). Only global rank 0 plots, and nothing is plotted under
    ``fast_dev_run`` (like checkpointing, so smoke runs write no files).

    Args:
        every_n_epochs: plot period in epochs; 0 plots only at the end of fit.
        max_points: the most samples plotted.
        split: "test" or "val", the datamodule split whose features are plotted.
        on_test_end: write the confusion matrix (and the embedding, if not fitted) after test.

    Attributes:
        written: the paths written, in order.
        last_embedding: ``(points (N, 2), labels (N,))`` of the last embedding drawn.
    """

    def __init__(
        self,
        every_n_epochs: int = 10,
        max_points: int = 5000,
        split: str = "test",
        on_test_end: bool = True,
    ) -> None:
        if (
            isinstance(every_n_epochs, bool)
            or not isinstance(every_n_epochs, int)
            or (every_n_epochs < 0)
        ):
            raise ValueError(f"every_n_epochs must be an int >= 0, got {every_n_epochs!r}")
        if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 1:
            raise ValueError(f"max_points must be an int >= 1, got {max_points!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.every_n_epochs = every_n_epochs
        self.max_points = max_points
        self.split = split
        # Not ``self.on_test_end``: that name is the hook method below.
        self.plot_on_test_end = bool(on_test_end)
        self.written: list[Path] = []
        self.last_embedding: tuple[Tensor, Tensor] | None = None
        self._fitted = False

    # ---------------------------------------------------------------- hooks
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs == 0 or trainer.sanity_checking:
            return
        done = trainer.current_epoch + 1
        if done % self.every_n_epochs == 0:
            name = f"embedding_epoch{done:03d}"
            self._plot_embedding(trainer, pl_module, name, f"after {done} epochs", tag="embedding")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fitted = True
        when = f"after {trainer.current_epoch} epochs"
        self._plot_embedding(trainer, pl_module, "embedding_final", when, tag="embedding")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.plot_on_test_end or not self._active(trainer):
            return
        confmat = getattr(pl_module, "test_confmat", None)
        confusion_matrix = getattr(pl_module, "confusion_matrix", None)
        if confmat is None and callable(confusion_matrix):
            confmat = confusion_matrix("test")
        if confmat is not None:
            fig = confusion_figure(
                confmat.detach().cpu(),
                minority_classes=tuple(getattr(pl_module, "minority_classes", ())),
                title=f"Test confusion matrix ({self._describe(pl_module)}), % of true class",
            )
            self._emit(trainer, fig, "confusion_test")
        if not self._fitted:
            self._plot_embedding(trainer, pl_module, "embedding_test", "test")
        rank_zero_info(
            "EmbeddingPlot wrote " + ", ".join(str(p) for p in self.written)
            if self.written
            else "EmbeddingPlot wrote nothing"
        )

    # ---------------------------------------------------------------- work
    @staticmethod
    def _active(trainer: L.Trainer) -> bool:
        """Plot on global rank 0 only, and not in ``fast_dev_run`` smoke runs."""
        return bool(trainer.is_global_zero and not getattr(trainer, "fast_dev_run", False))

    def _plot_embedding(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        name: str,
        when: str,
        tag: str | None = None,
    ) -> None:
        if not self._active(trainer):
            return
        loader, dm = self._loader(trainer)
        if loader is None:
            rank_zero_warn(f"EmbeddingPlot: no {self.split} data to plot; skipped {name}.png")
            return
        feats, labels = collect_features(
            pl_module, loader, pl_module.device, self.max_points, datamodule=dm
        )
        if feats.shape[0] == 0:
            rank_zero_warn(f"EmbeddingPlot: the {self.split} split is empty; skipped {name}.png")
            return
        centers = model_centers(pl_module)
        points, centers2d, method = project_2d(feats, None if centers is None else centers[0])
        axis = {
            "identity": ("feature 1", "feature 2"),
            "pad": ("feature 1", "(zero)"),
            "pca": ("principal component 1", "principal component 2"),
        }[method]
        space = {
            "identity": "2-D features",
            "pad": "1-D features",
            "pca": f"PCA of {feats.shape[1]}-D features",
        }[method]
        fig = embedding_figure(
            points,
            labels,
            centers2d,
            None if centers is None else centers[1],
            minority_classes=tuple(getattr(pl_module, "minority_classes", ())),
            title=f"{self._describe(pl_module)}: {self.split} {space}, {when}",
            axis_labels=axis,
        )
        self.last_embedding = (points, labels)
        self._emit(trainer, fig, name, tag)

    def _loader(self, trainer: L.Trainer) -> tuple[Iterable[Batch] | None, Any]:
        """The whole split in dataset order on one process, and the datamodule (or None)."""
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and callable(getattr(dm, "split_tensors", None)):
            from aff_lightning.data import TensorLoader  # the un-sharded view, even under DDP

            images, labels = dm.split_tensors(self.split)
            if labels.numel() == 0:
                return None, dm
            batch = int(getattr(dm, "eval_batch_size", 256))
            return TensorLoader(images, labels, batch, name=self.split), dm
        if dm is not None:
            get = dm.test_dataloader if self.split == "test" else dm.val_dataloader
            loader = get()
            if isinstance(loader, (list, tuple)):  # val_dataloader may return one per split
                splits = list(getattr(dm, "eval_splits", ["val"]))
                if self.split not in splits or not loader:
                    return None, dm
                loader = loader[splits.index(self.split)]
            return loader, dm
        loaders = trainer.test_dataloaders if self.split == "test" else trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        return loaders, None

    def _describe(self, pl_module: L.LightningModule) -> str:
        hp = dict(getattr(pl_module, "hparams", {}))
        head = hp.get("head", type(pl_module).__name__)
        if head in ("affinity", "joint") and "n_centers" in hp:
            return f"{head} m={hp['n_centers']}"
        return str(head)

    def _out_dir(self, trainer: L.Trainer) -> Path:
        """``<log dir of the first logger>/plots``, else ``<default_root_dir>/plots``.

        The same folder as ``trainer.log_dir``, read without it: ``trainer.log_dir`` broadcasts
        from rank 0, a collective that would hang when only rank 0 gets here.
        """
        root: str | None = None
        if trainer.loggers:
            logger = trainer.loggers[0]
            root = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        return Path(root or trainer.default_root_dir) / PLOTS_SUBDIR

    def _emit(self, trainer: L.Trainer, fig: Figure, name: str, tag: str | None = None) -> None:
        """Save ``<plots>/<name>.png``; log it to TensorBoard under ``plots/<tag or name>``."""
        path = save_figure(fig, self._out_dir(trainer) / f"{name}.png")
        self.written.append(path)
        tb = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if tb:
            image = figure_to_array(fig)
            for logger in tb:
                logger.experiment.add_image(
                    f"{PLOTS_SUBDIR}/{tag or name}", image, trainer.global_step, dataformats="HWC"
                )
        fig.clear()
