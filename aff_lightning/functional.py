"""Pure functions of the Gaussian-affinity max-margin loss (Hayat et al., arXiv 1901.07711).

The :class:`aff_lightning.heads.AffinityHead` module only holds the centers and calls these.
Everything here uses static shapes only (no boolean indexing, ``nonzero`` or ``.item()``), so it
traces into a fixed XLA graph, and never builds an ``(N, C, M, D)`` tensor.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = [
    "check_targets",
    "diversity_regularizer",
    "gaussian_affinity",
    "max_margin_loss",
    "squared_distances",
]


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager[object]:
    """Autocast off: it would run the cancelling matmul in half precision."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class _PairwiseSquaredDistance(torch.autograd.Function):
    """``||f_i - w_k||^2`` as one ``addmm``, with a hand-written backward.

    Autograd through ``(f * f).sum() ... addmm`` spends most of its time in elementwise passes
    over the (N, D) features; the closed form needs one: with G = 2 * grad (N, K),
    ``d/df = f * G.sum(1) - G @ w`` and ``d/dw = w * G.sum(0) - G^T @ f``. The gradient is that
    of the true squared distance; the clamp at 0 (rounding only) passes it through.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, f: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(f, w)
        f_sq = (f * f).sum(dim=1, keepdim=True)  # (N, 1)
        w_sq = (w * w).sum(dim=1)  # (K,)
        # ||f||^2 + ||w||^2 - 2 f.w in one fused matmul-add, clamped against rounding. The -2
        # goes on the small (K, D) operand: torch_xla lowers addmm only with alpha = beta = 1
        # and runs any other on the host.
        return torch.addmm(f_sq + w_sq, f, (-2.0 * w).t()).clamp_min(0.0)  # (N, K)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, Tensor]:
        f, w = ctx.saved_tensors  # type: ignore[attr-defined]
        with _no_autocast(grad.device.type):
            g2 = 2.0 * grad  # (N, K)
            grad_f = torch.addmm(f * g2.sum(dim=1, keepdim=True), -g2, w)  # (N, D)
            grad_w = torch.addmm(w * g2.sum(dim=0).unsqueeze(1), -g2.t(), f)  # (K, D)
        return grad_f, grad_w


def squared_distances(features: Tensor, centers: Tensor) -> Tensor:
    """Squared Euclidean distances between every feature and every center, with one matmul.

    ``||f - w||^2 = ||f||^2 - 2 f.w + ||w||^2``, clamped at 0 against rounding; computed in the
    inputs' dtype even under autocast (half precision would cancel every digit).

    Args:
        features: (N, D).
        centers: (C, M, D) or (K, D).

    Returns:
        (N, C, M) for (C, M, D) centers, (N, K) for (K, D) centers.
    """
    flat = centers.reshape(-1, centers.shape[-1])  # (C, M, D) -> (K, D)
    with _no_autocast(features.device.type):
        dist = _PairwiseSquaredDistance.apply(features, flat)  # (N, K)
    return dist.reshape(features.shape[0], *centers.shape[:-1])  # (N, K) -> (N, C, M)


def gaussian_affinity(features: Tensor, centers: Tensor, sigma: float) -> Tensor:
    """Affinity of each sample to each class: the best of the class's Gaussian kernels.

    ``a_ij = max_t exp(-||f_i - W_jt||^2 / sigma)``, in (0, 1].

    Args:
        features: (N, D).
        centers: (C, M, D), M centers per class.
        sigma: kernel width, > 0.

    Returns:
        (N, C) affinities; their argmax is the predicted class.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if centers.dim() != 3:
        raise ValueError(f"centers must have shape (C, M, D), got {tuple(centers.shape)}")
    # Half-precision distances of features with norms in the tens lose every digit to
    # cancellation in ||f||^2 - 2 f.w + ||w||^2; compute them in float32 and cast back.
    work = torch.float32 if features.dtype in (torch.float16, torch.bfloat16) else features.dtype
    dist = squared_distances(features.to(work), centers.to(work))  # (N, C, M)
    # exp is monotone decreasing in the distance: max over centers == exp(-min distance / sigma).
    nearest = dist[:, :, 0] if dist.shape[2] == 1 else dist.amin(dim=2)  # (N, C, M) -> (N, C)
    return torch.exp(nearest / -sigma).to(features.dtype)


def check_targets(target: Tensor, num_samples: int, num_classes: int) -> None:
    """Raise if ``target`` is not an integer (N,) tensor of labels in [0, C).

    This reads values back to the host, so call it only where a sync is acceptable.
    """
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            f"target must be an integer tensor of class indices, got dtype {target.dtype}"
        )
    if target.dim() != 1 or target.shape[0] != num_samples:
        raise ValueError(f"target must have shape ({num_samples},), got {tuple(target.shape)}")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"target values must be in [0, {num_classes}), got min {int(target.min())} "
            f"and max {int(target.max())}"
        )


def max_margin_loss(affinity: Tensor, target: Tensor, margin: float) -> Tensor:
    """Batch mean of ``sum_{j != y_i} relu(margin + a_ij - a_iy_i)``.

    Args:
        affinity: (N, C) affinities from :func:`gaussian_affinity`.
        target: (N,) integer class indices.
        margin: lambda in (0, 1].

    Returns:
        Scalar loss.
    """
    if not 0.0 < margin <= 1.0:
        raise ValueError(f"margin must be in (0, 1], got {margin}")
    true_aff = affinity.gather(1, target.long().unsqueeze(1))  # (N, 1)
    hinge = torch.relu(margin + affinity - true_aff)  # (N, C)
    # The j == y_i term is exactly relu(margin + a - a) = margin (and its gradient is 0), so
    # subtracting it equals the sum over j != y_i, without a mask.
    return hinge.sum(dim=1).mean() - margin


def diversity_regularizer(centers: Tensor) -> Tensor:
    """Population variance of the squared distances between all pairs of centers.

    With all K = C*M centers and ``d_jk = ||w_j - w_k||^2`` over the K(K-1)/2 pairs j < k,
    ``R = mean((d_jk - mean(d))^2)``. Zero when all centers are equidistant.

    Args:
        centers: (C, M, D) or (K, D), K >= 2.

    Returns:
        Scalar R(W).
    """
    flat = centers.reshape(-1, centers.shape[-1])  # (C, M, D) -> (K, D)
    k = flat.shape[0]
    if k < 2:
        raise ValueError(f"diversity_regularizer needs at least 2 centers, got {k}")
    work = torch.float32 if flat.dtype in (torch.float16, torch.bfloat16) else flat.dtype
    dist = squared_distances(flat.to(work), flat.to(work))  # (K, K)
    # The K(K-1)/2 pairs j < k as a constant mask (static shapes; torch_xla lowers arange
    # and comparisons, where triu_indices would run on the host).
    idx = torch.arange(k, device=dist.device)
    upper = (idx.unsqueeze(1) < idx.unsqueeze(0)).to(dist.dtype)  # (K, K)
    n_pairs = k * (k - 1) / 2
    mean = (dist * upper).sum() / n_pairs
    return ((dist - mean) * upper).pow(2).sum() / n_pairs  # population variance
