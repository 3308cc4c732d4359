"""The naive formulation of the Gaussian-affinity loss, the baseline of the head benchmark.

Public PyTorch ports of Hayat et al. compute the feature-to-center distances by broadcasting a
difference tensor ``f[:, None, None, :] - W[None]`` of shape (N, C, M, D) and the regulariser's
center-to-center distances from a (K, K, D) difference tensor. This module writes that
formulation once, from the paper's formulas (no code copied), with the same loss as
:meth:`aff_lightning.heads.AffinityHead.loss`, so the benchmark compares equal maths
(``tests/test_benchmarks.py`` checks the losses and gradients agree).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["naive_affinity", "naive_loss", "naive_regularizer"]


def naive_affinity(features: Tensor, centers: Tensor, sigma: float) -> Tensor:
    """``max_t exp(-||f_i - W_jt||^2 / sigma)`` via an (N, C, M, D) difference tensor.

    Args:
        features: (N, D).
        centers: (C, M, D).
        sigma: kernel width, > 0.

    Returns:
        (N, C) affinities.
    """
    diff = features[:, None, None, :] - centers[None]  # (N, 1, 1, D) - (1, C, M, D) -> (N, C, M, D)
    dist = diff.pow(2).sum(dim=-1)  # (N, C, M, D) -> (N, C, M)
    return torch.exp(-dist / sigma).amax(dim=2)  # (N, C, M) -> (N, C)


def naive_regularizer(centers: Tensor) -> Tensor:
    """Population variance of the pairwise squared center distances via a (K, K, D) tensor."""
    flat = centers.reshape(-1, centers.shape[-1])  # (C, M, D) -> (K, D)
    k = flat.shape[0]
    dist = (flat[:, None, :] - flat[None, :, :]).pow(2).sum(dim=-1)  # (K, K, D) -> (K, K)
    upper = torch.ones(k, k, dtype=dist.dtype, device=dist.device).triu(diagonal=1)
    n_pairs = k * (k - 1) / 2
    mean = (dist * upper).sum() / n_pairs
    return ((dist - mean) * upper).pow(2).sum() / n_pairs


def naive_loss(
    affinity: Tensor, target: Tensor, centers: Tensor, margin: float, reg_weight: float
) -> Tensor:
    """Mean of ``sum_{j != y} relu(margin + a_ij - a_iy)`` plus ``reg_weight * R(W)``.

    Args:
        affinity: (N, C).
        target: (N,) int64 labels.
        centers: (C, M, D), for the regulariser.
        margin: lambda in (0, 1].
        reg_weight: weight of the regulariser.

    Returns:
        Scalar loss.
    """
    true_aff = affinity.gather(1, target[:, None])  # (N, 1)
    hinge = torch.relu(margin + affinity - true_aff)  # (N, C)
    hinge = hinge.scatter(1, target[:, None], 0.0)  # drop the j == y term
    return hinge.sum(dim=1).mean() + reg_weight * naive_regularizer(centers)
