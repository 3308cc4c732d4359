"""The LightningModule: a backbone, a softmax / affinity / joint head, and imbalance metrics."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection

from aff_lightning.backbones import BACKBONES, build_backbone
from aff_lightning.heads import AffinityHead
from aff_lightning.metrics import build_metrics
from aff_lightning.xla import mark_step, sync_metrics_on_xla

__all__ = ["HEADS", "SELECTION_METRICS", "AffinityClassifier"]

HEADS = ("softmax", "affinity", "joint")
# Metrics a run can be selected on (best epoch) and that the grid/tuner can read.
SELECTION_METRICS = ("acc", "micro_f1", "macro_f1", "balanced_acc", "minority_acc")
Batch = tuple[Tensor, Tensor, Tensor]  # images (N, C, H, W) float, labels (N,), mask (N,) bool


class AffinityClassifier(L.LightningModule):
    """Image classifier with interchangeable backbones and a softmax, affinity or joint head.

    ``model(images)`` returns (N, C) scores whose argmax is the prediction: the affinities for
    the affinity and joint heads, the logits for softmax. Metrics (accuracy, micro/macro-F1,
    balanced accuracy, per-class F1, minority and majority accuracy) are computed per epoch for
    each evaluation split the datamodule offers ("val" and/or "test"); ``history`` keeps them
    per epoch so a run can be read at its last epoch or its best one.

    Args:
        backbone: "cnn10" (reference 10-layer CNN), "cnn3", "mobilenet" (V2) or "resnet50".
        head: "softmax" (linear + cross-entropy), "affinity" (AffinityHead) or "joint"
            (both on the same features; loss = cross-entropy + affinity loss; predictions from
            the affinity head).
        num_classes: C; linked from the datamodule by the CLI.
        in_channels: image channels; linked from the datamodule by the CLI.
        image_size: image side in pixels; linked from the datamodule by the CLI.
        minority_classes: the classes counted as minority in the group accuracies.
        n_centers: centers per class M of the affinity head.
        sigma: Gaussian kernel width of the affinity head.
        margin: max-margin lambda of the affinity head.
        reg_weight: weight of the diversity regulariser.
        bn_before_head: BatchNorm1d on the features before the affinity head (affinity and
            joint heads only; the softmax head never has one, as in the reference).
        embedding_dim: optional linear bottleneck after the backbone (2 gives the reference's
            2-D MNIST embedding figure).
        lr: Adam learning rate (reference: 5e-3 at batch 640, 1e-3 at batch 128).
        milestones: epochs at which the learning rate is multiplied by ``lr_decay``.
        lr_decay: the multiplier (reference: 0.2, i.e. divided by 5).
        weight_decay: Adam weight decay.
        selection_metric: the metric whose best epoch ``best_epoch`` reports.
        channels_last: run the backbone in channels-last memory format.
        compile: ``torch.compile`` the backbone.
    """

    def __init__(
        self,
        backbone: Literal["cnn10", "cnn3", "mobilenet", "resnet50"] = "cnn10",
        head: Literal["softmax", "affinity", "joint"] = "affinity",
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        minority_classes: Sequence[int] = (0, 2, 4, 6, 8),
        n_centers: int = 1,
        sigma: float = 90.0,
        margin: float = 0.43,
        reg_weight: float = 1.0,
        bn_before_head: bool = True,
        embedding_dim: int | None = None,
        lr: float = 5e-3,
        milestones: Sequence[int] = (50, 80),
        lr_decay: float = 0.2,
        weight_decay: float = 0.0,
        selection_metric: Literal[
            "acc", "micro_f1", "macro_f1", "balanced_acc", "minority_acc"
        ] = "macro_f1",
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if head != "softmax" and (isinstance(n_centers, bool) or n_centers < 1):
            raise ValueError(f"n_centers must be >= 1 for the {head} head, got {n_centers}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 < lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay}")
        milestones = [int(m) for m in milestones]
        if any(b <= a for a, b in itertools.pairwise(milestones)):
            raise ValueError(f"milestones must be strictly increasing, got {milestones}")
        if embedding_dim is not None and embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1 or None, got {embedding_dim}")
        if selection_metric not in SELECTION_METRICS:
            raise ValueError(
                f"selection_metric must be one of {SELECTION_METRICS}, got {selection_metric!r}"
            )
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.minority_classes = tuple(sorted(int(c) for c in minority_classes))

        self.backbone = build_backbone(backbone, in_channels=in_channels, image_size=image_size)
        width = self.backbone.out_features
        self.bottleneck: nn.Module = nn.Identity()
        if embedding_dim is not None:
            self.bottleneck = nn.Linear(width, embedding_dim)
            width = embedding_dim
        self.feature_dim = width
        use_bn = head != "softmax" and bn_before_head
        self.feature_norm: nn.Module = nn.BatchNorm1d(width) if use_bn else nn.Identity()
        self.linear: nn.Linear | None = None
        self.head: AffinityHead | None = None
        if head in ("softmax", "joint"):
            self.linear = nn.Linear(width, num_classes)
        if head in ("affinity", "joint"):
            # The datamodule validates labels once at load; no per-step host sync here.
            self.head = AffinityHead(
                width, num_classes, n_centers, sigma, margin, reg_weight, validate_args=False
            )
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._compiled = False

        metrics = build_metrics(num_classes, self.minority_classes)
        # One collection cloned per stage; attributes, as "train" is a Module method.
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.history: list[dict[str, float]] = []  # "epoch" is an int, the metrics floats

    # ----------------------------------------------------------------- forward
    def configure_model(self) -> None:
        # In place (nn.Module.compile): the state_dict keys stay those of an uncompiled model,
        # so checkpoints load either way.
        if self.hparams["compile"] and not self._compiled:
            self.backbone.compile()
            self._compiled = True

    def features(self, images: Tensor) -> Tensor:
        """Features the head sees.

        Args:
            images: (N, C_in, H, W) float.

        Returns:
            (N, D) after the backbone, the optional bottleneck and the optional BatchNorm.
        """
        if images.dtype != self.dtype and images.is_floating_point():
            # "bf16-true"/"64-true" convert the model; the datamodule makes float32 images
            # after Lightning's input conversion has run on the uint8 batch.
            images = images.to(self.dtype)
        if self.hparams["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.feature_norm(self.bottleneck(self.backbone(images)))

    def scores(self, feats: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """(affinities, logits) of the heads present, each (N, C) or None."""
        aff = self.head(feats) if self.head is not None else None
        logits = self.linear(feats) if self.linear is not None else None
        return aff, logits

    def forward(self, images: Tensor) -> Tensor:
        """(N, C_in, H, W) images -> (N, C) scores: affinities, or logits for softmax."""
        aff, logits = self.scores(self.features(images))
        out = aff if aff is not None else logits
        assert out is not None  # one head always exists (checked in __init__)
        return out

    def _loss(self, aff: Tensor | None, logits: Tensor | None, labels: Tensor) -> Tensor:
        loss = torch.zeros((), device=labels.device)
        if logits is not None:
            loss = loss + F.cross_entropy(logits, labels)
        if aff is not None and self.head is not None:
            loss = loss + self.head.loss(aff, labels)
        return loss

    # ----------------------------------------------------------------- steps
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, labels, mask = batch
        aff, logits = self.scores(self.features(images))
        loss = self._loss(aff, logits, labels)
        scores = aff if aff is not None else logits
        self.train_metrics.update(scores.detach(), labels, mask)  # type: ignore[union-attr]
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _eval_splits(self) -> list[str]:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return list(getattr(dm, "eval_splits", None) or ["val"])

    def _split_of(self, dataloader_idx: int) -> str:
        splits = self._eval_splits()
        if dataloader_idx >= len(splits):
            raise ValueError(
                f"validation got dataloader {dataloader_idx}, but only {len(splits)} evaluation "
                f"split(s) are known ({splits}); with several validation loaders use "
                "ImbalancedDataModule, whose eval_splits names them"
            )
        return splits[dataloader_idx]

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels, mask = batch
        split = self._split_of(dataloader_idx)
        self.split_metrics(split).update(self(images), labels, mask)

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels, mask = batch
        self.test_metrics.update(self(images), labels, mask)

    def predict_step(
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """Scores and predictions; with the datamodule's ``(images, labels, mask)`` batches also
        the labels and the mask (False on the padding rows of the last batch: drop those)."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        scores = self(images)
        out = {"scores": scores, "preds": scores.argmax(dim=1)}
        if isinstance(batch, (tuple, list)) and len(batch) == 3:
            out["labels"], out["mask"] = batch[1], batch[2]
        return out

    # ----------------------------------------------------------------- epoch ends
    def _log_split(self, split: str) -> dict[str, float]:
        """Compute, log and reset the metrics of one split; returns the scalar values.

        The values are read back to the host once per split and epoch and logged from there,
        so Lightning's logging adds no device work (no extra XLA graphs).
        """
        collection = self.split_metrics(split)
        values = collection.compute()
        collection.reset()
        names = list(values)
        flat = torch.cat([values[n].detach().reshape(-1).float().cpu() for n in names]).tolist()
        scalars: dict[str, float] = {}
        for name in names:
            size = values[name].numel()
            chunk, flat = flat[:size], flat[size:]
            if values[name].dim() == 0:
                scalars[name] = chunk[0]
                self._log_host(name, chunk[0], prog_bar=name.endswith(("/macro_f1", "/acc")))
            else:  # per-class F1 vector
                for c, v in enumerate(chunk):
                    self._log_host(f"{name}_{c}", v)
        return scalars

    def _log_host(self, name: str, value: float, prog_bar: bool = False) -> None:
        """Log a host value as a CPU tensor: Lightning would upload a float to the device, and on
        XLA the values 0 and 1 become graph constants, so each epoch could compile a new graph."""
        self.log(name, torch.tensor(value, dtype=torch.float32), prog_bar=prog_bar)

    def on_train_epoch_start(self) -> None:
        mark_step(self.device)  # keep last epoch's end-of-epoch work out of the first step

    def on_train_epoch_end(self) -> None:
        self._log_split("train")
        mark_step(self.device)

    def on_validation_epoch_end(self) -> None:
        record: dict[str, float] = {}
        for split in self._eval_splits():
            record.update(self._log_split(split))
        if self.trainer.sanity_checking:
            return
        record["epoch"] = int(self.current_epoch)
        self.history.append(record)
        for key in list(record):
            if key == "epoch":
                continue
            best = max(r[key] for r in self.history if key in r)
            self._log_host(f"{key}_best", best)

    def on_test_epoch_end(self) -> None:
        confmat = self.confusion_matrix("test")
        if self.trainer.world_size > 1:  # each process holds its shard of the test set
            gathered = self.all_gather(confmat)
            assert isinstance(gathered, Tensor)  # a tensor in, a (world, C, C) tensor out
            confmat = gathered.sum(dim=0)
        self.test_confmat = confmat
        self._log_split("test")

    def confusion_matrix(self, split: str) -> Tensor:
        """The accumulated (C, C) confusion matrix of a split (rows true, columns predicted)."""
        confmat = self.split_metrics(split)["acc"].confmat
        assert isinstance(confmat, Tensor)  # the metric state, never a module
        return confmat.detach().clone()

    def split_metrics(self, split: str) -> MetricCollection:
        """The metric collection of "train", "val" or "test"."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        return getattr(self, f"{split}_metrics")

    def best_epoch(self, split: str = "val", metric: str | None = None) -> dict[str, float]:
        """The history record of the epoch with the best ``metric`` on ``split``.

        Ties go to the earliest epoch. Raises if that split was never evaluated.
        """
        key = f"{split}/{metric or self.hparams['selection_metric']}"
        rows = [r for r in self.history if key in r]
        if not rows:
            raise ValueError(f"no epoch recorded {key!r}; splits evaluated: {self._eval_splits()}")
        return max(rows, key=lambda r: (r[key], -r["epoch"]))

    # ----------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        sync_metrics_on_xla(self)  # torchmetrics sync across TPU cores; no-op elsewhere
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        checks: tuple[tuple[str, Any], ...] = (
            ("num_classes", self.num_classes),
            ("in_channels", self.hparams["in_channels"]),
            ("minority_classes", self.minority_classes),
        )
        for name, mine in checks:
            theirs = getattr(dm, name, mine)
            if name == "minority_classes":
                theirs = tuple(sorted(theirs))
            if theirs != mine:
                raise ValueError(
                    f"the datamodule has {name}={theirs} but the model was built with "
                    f"{name}={mine}; build the model with {name}={theirs}"
                )

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(
            self.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
        )
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=list(self.hparams["milestones"]), gamma=self.hparams["lr_decay"]
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["aff_history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("aff_history", []))
