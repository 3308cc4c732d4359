"""The Gaussian-affinity classification head, usable in any PyTorch code (no Lightning import)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from aff_lightning import functional as AF

__all__ = ["AffinityHead"]

# Keras' he_normal draws from a normal truncated at 2 std and rescales by this factor so that
# the truncated draw has the requested std.
_TRUNC_NORMAL_STD = 0.87962566103423978


class AffinityHead(nn.Module):
    """Gaussian-affinity head with M learnable centers per class and the max-margin loss.

    ``forward`` maps features (N, D) to affinities (N, C) in (0, 1]; their argmax is the
    prediction. ``loss`` is the batch-mean max-margin term plus ``reg_weight`` times the
    diversity regulariser of the centers.

    Args:
        in_features: feature width D.
        num_classes: C >= 2.
        n_centers: centers per class M >= 1.
        sigma: Gaussian kernel width, > 0 (reference: 90 for CIFAR-10).
        margin: lambda in (0, 1] (reference: 0.43).
        reg_weight: weight of the diversity regulariser, >= 0 (reference: 1.0).
        validate_args: check target values and that features are finite (one host sync per
            call); turn off in hot paths on XLA or CUDA. Shape and dtype checks always run.

    Example:
        >>> head = AffinityHead(in_features=256, num_classes=10, n_centers=5)
        >>> aff = head(torch.randn(8, 256))
        >>> loss = head.loss(aff, torch.randint(0, 10, (8,)))
    """

    centers: nn.Parameter

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        n_centers: int = 1,
        sigma: float = 90.0,
        margin: float = 0.43,
        reg_weight: float = 1.0,
        validate_args: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be an int >= 1, got {in_features!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if isinstance(n_centers, bool) or not isinstance(n_centers, int) or n_centers < 1:
            raise ValueError(f"n_centers must be an int >= 1, got {n_centers!r}")
        if not sigma > 0 or not math.isfinite(sigma):
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if not 0.0 < margin <= 1.0:
            raise ValueError(f"margin must be in (0, 1], got {margin}")
        if not reg_weight >= 0 or not math.isfinite(reg_weight):
            raise ValueError(f"reg_weight must be >= 0, got {reg_weight}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.n_centers = n_centers
        self.sigma = float(sigma)
        self.margin = float(margin)
        self.reg_weight = float(reg_weight)
        self.validate_args = validate_args
        self.centers = nn.Parameter(torch.empty(num_classes, n_centers, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras ``he_normal`` on the (C, M, D) tensor: std sqrt(2 / (C*M)), truncated at 2 std."""
        std = math.sqrt(2.0 / (self.num_classes * self.n_centers)) / _TRUNC_NORMAL_STD
        nn.init.trunc_normal_(self.centers, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)

    def forward(self, features: Tensor) -> Tensor:
        """Affinities of each sample to each class.

        Args:
            features: (N, D).

        Returns:
            (N, C) affinities in (0, 1].
        """
        if not isinstance(features, Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if features.dim() != 2 or features.shape[1] != self.in_features:
            raise ValueError(
                f"features must have shape (N, {self.in_features}), got {tuple(features.shape)}"
            )
        if not features.dtype.is_floating_point:
            raise TypeError(f"features must be a floating-point tensor, got dtype {features.dtype}")
        if self.validate_args and not bool(torch.isfinite(features).all()):
            raise ValueError("features contain NaN or infinite values")
        return AF.gaussian_affinity(features, self.centers.to(features.dtype), self.sigma)

    def regularizer(self) -> Tensor:
        """Diversity regulariser R(W) of this head's centers (scalar)."""
        return AF.diversity_regularizer(self.centers)

    def loss(self, affinity: Tensor, target: Tensor) -> Tensor:
        """Mean max-margin term plus ``reg_weight`` times the diversity regulariser.

        Args:
            affinity: (N, C) from :meth:`forward`.
            target: (N,) integer class indices in [0, C).

        Returns:
            Scalar loss.
        """
        if affinity.dim() != 2 or affinity.shape[1] != self.num_classes:
            raise ValueError(
                f"affinity must have shape (N, {self.num_classes}), got {tuple(affinity.shape)}"
            )
        if self.validate_args:
            AF.check_targets(target, affinity.shape[0], self.num_classes)
        elif target.dtype.is_floating_point or target.shape != affinity.shape[:1]:
            raise ValueError(
                f"target must be an integer tensor of shape ({affinity.shape[0]},), "
                f"got dtype {target.dtype} and shape {tuple(target.shape)}"
            )
        loss = AF.max_margin_loss(affinity, target, self.margin)
        if self.reg_weight:
            loss = loss + self.reg_weight * self.regularizer().to(loss.dtype)
        return loss

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"n_centers={self.n_centers}, sigma={self.sigma}, margin={self.margin}, "
            f"reg_weight={self.reg_weight}"
        )
