"""The AffinityHead module: parameters, devices, dtypes, errors, and use in plain PyTorch."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from aff_lightning import AffinityHead
from aff_lightning import functional as AF


def test_shapes_and_parameter():
    head = AffinityHead(in_features=16, num_classes=10, n_centers=5)
    assert isinstance(head.centers, torch.nn.Parameter)
    assert head.centers.shape == (10, 5, 16)
    aff = head(torch.randn(4, 16))
    assert aff.shape == (4, 10)
    assert ((aff > 0) & (aff <= 1)).all()


def test_loss_is_margin_term_plus_weighted_regularizer():
    torch.manual_seed(0)
    head = AffinityHead(8, 4, n_centers=2, sigma=3.0, margin=0.2, reg_weight=0.5)
    f, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
    aff = head(f)
    expected = AF.max_margin_loss(aff, y, 0.2) + 0.5 * AF.diversity_regularizer(head.centers)
    assert_close(head.loss(aff, y), expected)
    head0 = AffinityHead(8, 4, reg_weight=0.0)
    assert_close(head0.loss(head0(f), y), AF.max_margin_loss(head0(f), y, 0.43))


def test_he_normal_init_std():
    torch.manual_seed(0)
    head = AffinityHead(in_features=4096, num_classes=10, n_centers=5)
    std = head.centers.detach().std().item()
    assert abs(std - math.sqrt(2 / 50)) < 0.01
    assert head.centers.detach().abs().max() <= 2 * math.sqrt(2 / 50) / 0.8796 + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes(dtype: torch.dtype):
    head = AffinityHead(8, 3).to(dtype)
    aff = head(torch.randn(5, 8, dtype=dtype))
    assert aff.dtype == dtype
    loss = head.loss(aff, torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    assert head.centers.grad is not None and torch.isfinite(head.centers.grad.float()).all()


def test_learns_a_toy_problem_in_plain_pytorch():
    torch.manual_seed(0)
    means = torch.randn(3, 2) * 4
    y = torch.randint(0, 3, (300,))
    x = means[y] + 0.5 * torch.randn(300, 2)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    head = AffinityHead(8, 3, n_centers=1, sigma=10.0, margin=0.5)
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=0.05)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = head.loss(head(net(x)), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    acc = (head(net(x)).argmax(1) == y).float().mean().item()
    assert losses[-1] < 0.1 * losses[0]
    assert acc > 0.95


def test_state_dict_round_trip():
    a, b = AffinityHead(8, 4, n_centers=3), AffinityHead(8, 4, n_centers=3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 8)
    assert_close(a(x), b(x))


def test_imports_without_lightning():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'pytorch_lightning', 'torchmetrics'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from aff_lightning import AffinityHead, functional\n"
        "import aff_lightning.heads\n"
        "import torch\n"
        "print(AffinityHead(4, 2)(torch.zeros(1, 4)).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "torch.Size([1, 2])" in out.stdout


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma": 0.0}, "sigma must be > 0, got 0.0"),
        ({"sigma": -3.0}, "sigma must be > 0, got -3.0"),
        ({"margin": 0.0}, r"margin must be in \(0, 1\], got 0.0"),
        ({"margin": 1.5}, r"margin must be in \(0, 1\], got 1.5"),
        ({"n_centers": 0}, "n_centers must be an int >= 1, got 0"),
        ({"num_classes": 1}, "num_classes must be an int >= 2, got 1"),
        ({"in_features": 0}, "in_features must be an int >= 1, got 0"),
        ({"reg_weight": -1.0}, "reg_weight must be >= 0, got -1.0"),
    ],
)
def test_constructor_errors(kwargs: dict, match: str):
    args = {"in_features": 4, "num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        AffinityHead(**args)


def test_forward_errors():
    head = AffinityHead(4, 3)
    with pytest.raises(ValueError, match=r"features must have shape \(N, 4\), got \(2, 5\)"):
        head(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"features must have shape \(N, 4\), got \(4,\)"):
        head(torch.zeros(4))
    with pytest.raises(TypeError, match="features must be a floating-point tensor"):
        head(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="features must be a torch.Tensor, got list"):
        head([[0.0] * 4])
    bad = torch.zeros(2, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        head(bad)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        head(bad)


def test_target_errors():
    head = AffinityHead(4, 3)
    aff = head(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"target values must be in \[0, 3\), got min 0 and max 3"):
        head.loss(aff, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"target values must be in \[0, 3\), got min -1"):
        head.loss(aff, torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="target must be an integer tensor"):
        head.loss(aff, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"target must have shape \(2,\), got \(3,\)"):
        head.loss(aff, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"affinity must have shape \(N, 3\)"):
        head.loss(torch.zeros(2, 4), torch.tensor([0, 1]))


def test_validate_args_off_skips_value_checks_but_keeps_shape_checks():
    head = AffinityHead(4, 3, validate_args=False)
    aff = head(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        head.loss(aff, torch.tensor([0.0, 1.0]))
    bad = torch.full((2, 4), float("nan"))
    assert head(bad).shape == (2, 3)  # no host sync, no check
