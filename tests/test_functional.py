"""Reference-value tests of the pure loss functions against float64 NumPy loop ports."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from aff_lightning import functional as AF


def ref_affinity(f: np.ndarray, w: np.ndarray, sigma: float) -> np.ndarray:
    n, (c, m, _) = f.shape[0], w.shape
    out = np.zeros((n, c))
    for i in range(n):
        for j in range(c):
            out[i, j] = max(np.exp(-np.sum((f[i] - w[j, t]) ** 2) / sigma) for t in range(m))
    return out


def ref_max_margin(a: np.ndarray, y: np.ndarray, margin: float) -> float:
    total = 0.0
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            if j != y[i]:
                total += max(0.0, margin + a[i, j] - a[i, y[i]])
    return total / a.shape[0]


def ref_regularizer(w: np.ndarray) -> float:
    flat = w.reshape(-1, w.shape[-1])
    d = [np.sum((flat[j] - flat[k]) ** 2) for j, k in itertools.combinations(range(len(flat)), 2)]
    mu = sum(d) / len(d)
    return sum((x - mu) ** 2 for x in d) / len(d)


CASES = [  # (N, C, M, D, sigma, margin)
    (7, 2, 1, 3, 1.0, 0.5),
    (5, 10, 1, 16, 90.0, 0.43),
    (6, 10, 5, 8, 90.0, 0.43),
    (4, 3, 5, 4, 2.5, 1.0),
    (9, 4, 2, 6, 10.0, 0.01),
]


def _inputs(n: int, c: int, m: int, d: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g, dtype=torch.float64) * 2
    w = torch.randn(c, m, d, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, c, (n,), generator=g)
    return f, w, y


@pytest.mark.parametrize(("n", "c", "m", "d", "sigma", "margin"), CASES)
def test_matches_numpy_reference(n: int, c: int, m: int, d: int, sigma: float, margin: float):
    f, w, y = _inputs(n, c, m, d)
    aff = AF.gaussian_affinity(f, w, sigma)
    assert_close(aff, torch.from_numpy(ref_affinity(f.numpy(), w.numpy(), sigma)))
    loss = AF.max_margin_loss(aff, y, margin)
    assert_close(
        loss, torch.tensor(ref_max_margin(aff.numpy(), y.numpy(), margin), dtype=loss.dtype)
    )
    reg = AF.diversity_regularizer(w)
    assert_close(reg, torch.tensor(ref_regularizer(w.numpy()), dtype=reg.dtype))


@pytest.mark.parametrize(("n", "c", "m", "d", "sigma", "margin"), CASES[:4])
def test_gradcheck(n: int, c: int, m: int, d: int, sigma: float, margin: float):
    f, w, y = _inputs(n, c, m, d, seed=1)
    f.requires_grad_(True)
    w.requires_grad_(True)

    def total(f: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        aff = AF.gaussian_affinity(f, w, sigma)
        return AF.max_margin_loss(aff, y, margin) + AF.diversity_regularizer(w)

    assert torch.autograd.gradcheck(total, (f, w))


def test_squared_distances_never_negative_and_no_4d_tensor():
    f = torch.full((3, 4), 1e3)
    w = torch.full((2, 1, 4), 1e3)
    dist = AF.squared_distances(f, w)
    assert dist.shape == (3, 2, 1)
    assert (dist >= 0).all()


def test_large_feature_norms_give_finite_loss_and_gradients():
    g = torch.Generator().manual_seed(0)
    f = (torch.randn(32, 256, generator=g) * 30).requires_grad_(True)  # norms ~ 500
    assert f.norm(dim=1).min() > 100
    w = (torch.randn(10, 5, 256, generator=g) * 30).requires_grad_(True)
    y = torch.randint(0, 10, (32,), generator=g)
    loss = AF.max_margin_loss(AF.gaussian_affinity(f, w, 90.0), y, 0.43)
    loss = loss + AF.diversity_regularizer(w)
    loss.backward()
    assert torch.isfinite(loss)
    assert f.grad is not None and w.grad is not None
    assert torch.isfinite(f.grad).all() and torch.isfinite(w.grad).all()


def test_argmax_is_nearest_center():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(50, 8, generator=g)
    w = torch.randn(6, 1, 8, generator=g)
    aff = AF.gaussian_affinity(f, w, 5.0)
    nearest = torch.cdist(f, w[:, 0]).argmin(dim=1)
    assert torch.equal(aff.argmax(dim=1), nearest)


def test_max_over_centers():
    f = torch.tensor([[0.0, 0.0]])
    w = torch.tensor([[[10.0, 0.0], [1.0, 0.0]], [[2.0, 0.0], [3.0, 0.0]]])
    aff = AF.gaussian_affinity(f, w, 1.0)
    assert_close(aff, torch.exp(-torch.tensor([[1.0, 4.0]])))


def test_regularizer_zero_for_equidistant_and_positive_otherwise():
    onehot = 3.0 * torch.eye(5).reshape(5, 1, 5)
    assert_close(AF.diversity_regularizer(onehot), torch.tensor(0.0))
    w = onehot.clone()
    w[0, 0, 0] = 7.0
    assert AF.diversity_regularizer(w) > 0


def test_bfloat16_runs_and_is_close_to_float32():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(16, 32, generator=g) * 3
    w = torch.randn(10, 2, 32, generator=g) * 3
    aff32 = AF.gaussian_affinity(f, w, 90.0)
    aff16 = AF.gaussian_affinity(f.bfloat16(), w.bfloat16(), 90.0)
    assert aff16.dtype == torch.bfloat16
    assert_close(aff16.float(), aff32, atol=2e-2, rtol=2e-2)


def test_margin_and_sigma_errors():
    f, w, y = _inputs(3, 2, 1, 2)
    with pytest.raises(ValueError, match="sigma must be > 0, got -1"):
        AF.gaussian_affinity(f, w, -1.0)
    with pytest.raises(ValueError, match=r"centers must have shape \(C, M, D\)"):
        AF.gaussian_affinity(f, w[:, 0], 1.0)
    with pytest.raises(ValueError, match="margin must be in"):
        AF.max_margin_loss(torch.rand(3, 2), y, 1.5)
    with pytest.raises(ValueError, match="at least 2 centers"):
        AF.diversity_regularizer(torch.randn(1, 1, 4))


def test_autocast_keeps_distances_in_float32():
    """bf16 autocast must not run the cancelling matmul in half precision."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(64, 256, generator=g) * 2
    w = torch.randn(10, 1, 256, generator=g) * 2
    ref = AF.gaussian_affinity(f.double(), w.double(), 90.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        aff = AF.gaussian_affinity(f, w, 90.0)
        reg = AF.diversity_regularizer(w)
    assert aff.dtype == torch.float32
    assert_close(aff.double(), ref, atol=1e-4, rtol=1e-4)
    assert_close(reg.double(), AF.diversity_regularizer(w.double()), rtol=1e-4, atol=1e-3)


def test_gradcheck_with_centers_on_the_features():
    """The hand-written backward of the distance is exact at distance 0 too."""
    g = torch.Generator().manual_seed(5)
    f = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = f.detach()[:2].clone().reshape(2, 1, 3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f, w: AF.gaussian_affinity(f, w, 2.0), (f, w))
    assert torch.autograd.gradcheck(AF.diversity_regularizer, (w,))
