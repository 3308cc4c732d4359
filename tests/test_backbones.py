"""Tests for aff_lightning.backbones: shapes, layer counts, small-input strides, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aff_lightning.backbones import (
    BACKBONES,
    Backbone,
    MobileNetV2Backbone,
    PlainCNN,
    ResNet50Backbone,
    build_backbone,
)

# (in_channels, image_size): MNIST-like and CIFAR-10 inputs.
SHAPES = [(1, 28), (3, 32)]
OUT_FEATURES = {"cnn10": 256, "cnn3": 256, "mobilenet": 1280, "resnet50": 2048}


@pytest.fixture(scope="module")
def backbones() -> dict[tuple[str, int, int], Backbone]:
    """Every backbone for every input shape, built once (resnet50 takes ~0.5 s to build)."""
    torch.manual_seed(0)
    return {
        (name, c, s): build_backbone(name, in_channels=c, image_size=s).eval()
        for name in BACKBONES
        for c, s in SHAPES
    }


def test_backbones_tuple() -> None:
    assert BACKBONES == ("cnn10", "cnn3", "mobilenet", "resnet50")
    assert set(OUT_FEATURES) == set(BACKBONES)


@pytest.mark.parametrize(("in_channels", "image_size"), SHAPES)
@pytest.mark.parametrize("name", BACKBONES)
def test_output_shape_and_finite(
    backbones: dict[tuple[str, int, int], Backbone], name: str, in_channels: int, image_size: int
) -> None:
    net = backbones[(name, in_channels, image_size)]
    assert net.out_features == OUT_FEATURES[name]
    images = torch.rand(2, in_channels, image_size, image_size)
    with torch.no_grad():
        out = net(images)
    assert out.shape == (2, net.out_features)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("in_channels", "image_size"), SHAPES)
@pytest.mark.parametrize("name", ["mobilenet", "resnet50"])
def test_small_input_feature_map_is_4x4(
    backbones: dict[tuple[str, int, int], Backbone], name: str, in_channels: int, image_size: int
) -> None:
    """The small-input stems keep an overall stride of 8: 28 and 32 px end at 4x4, not 1x1."""
    net = backbones[(name, in_channels, image_size)]
    images = torch.rand(2, in_channels, image_size, image_size)
    with torch.no_grad():
        fmap = net.forward_features(images)
        pooled = net(images)
    assert fmap.shape == (2, net.out_features, 4, 4)
    torch.testing.assert_close(pooled, fmap.mean(dim=(-2, -1)))


def test_mobilenet_large_input_keeps_stride_16() -> None:
    net = MobileNetV2Backbone(in_channels=3, image_size=64).eval()
    with torch.no_grad():
        fmap = net.forward_features(torch.rand(1, 3, 64, 64))
    assert fmap.shape == (1, 1280, 4, 4)


@pytest.mark.parametrize(("name", "n_conv"), [("cnn10", 9), ("cnn3", 3)])
def test_plain_cnn_conv_count(name: str, n_conv: int) -> None:
    net = build_backbone(name)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == n_conv
    assert [m.out_channels for m in convs] == sorted(m.out_channels for m in convs)
    assert {m.out_channels for m in convs} == {64, 128, 256}
    assert all(m.bias is None and m.kernel_size == (3, 3) for m in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == n_conv
    assert sum(isinstance(m, nn.AvgPool2d) for m in net.modules()) == 2


def test_plain_cnn_feature_map() -> None:
    net = PlainCNN(in_channels=3).eval()
    with torch.no_grad():
        assert net.forward_features(torch.rand(2, 3, 32, 32)).shape == (2, 256, 8, 8)
        assert net.forward_features(torch.rand(2, 3, 28, 28)).shape == (2, 256, 7, 7)


def test_plain_cnn_custom_widths() -> None:
    net = PlainCNN(in_channels=2, widths=(8, 16), convs_per_stage=2)
    assert net.out_features == 16
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 4
    assert net(torch.rand(3, 2, 16, 16)).shape == (3, 16)


@pytest.mark.parametrize("image_size", [8, 64])
def test_larger_and_smallest_inputs(image_size: int) -> None:
    net = build_backbone("cnn3", in_channels=3, image_size=image_size)
    assert net(torch.rand(2, 3, image_size, image_size)).shape == (2, 256)


def test_resnet50_stem_adapted() -> None:
    net = ResNet50Backbone(in_channels=1)
    assert net.conv1.in_channels == 1
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert not hasattr(net, "maxpool") and not hasattr(net, "fc")


def test_mobilenet_stem_adapted() -> None:
    net = MobileNetV2Backbone(in_channels=1, image_size=28)
    stride2 = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert len(stride2) == 3  # torchvision's V2 has 5 stride-2 convs: stem and block 2 are now 1
    stem = net.features[0][0]
    assert stem.in_channels == 1 and stem.stride == (1, 1)


@pytest.mark.parametrize("name", ["cnn10", "cnn3", "mobilenet"])
def test_deterministic_under_seed(name: str) -> None:
    torch.manual_seed(123)
    first = build_backbone(name).state_dict()
    torch.manual_seed(123)
    second = build_backbone(name).state_dict()
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)


def test_cnn3_backward_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    net = build_backbone("cnn3", in_channels=3, image_size=32).train()
    net(torch.rand(2, 3, 32, 32)).pow(2).sum().backward()
    for pname, param in net.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, pname


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'vgg16'.*cnn10, cnn3, mobilenet"):
        build_backbone("vgg16")


def test_name_not_a_string() -> None:
    with pytest.raises(TypeError, match="name must be a str, got int"):
        build_backbone(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("in_channels", [0, -1, 1.5, True])
def test_bad_in_channels(name: str, in_channels: object) -> None:
    with pytest.raises(ValueError, match=r"in_channels must be an int >= 1, got"):
        build_backbone(name, in_channels=in_channels)  # type: ignore[arg-type]


@pytest.mark.parametrize("image_size", [7, 0, 32.0])
def test_bad_image_size(image_size: object) -> None:
    with pytest.raises(ValueError, match=r"image_size must be an int >= 8, got"):
        build_backbone("cnn3", image_size=image_size)  # type: ignore[arg-type]


def test_bad_plain_cnn_args() -> None:
    with pytest.raises(ValueError, match=r"widths must name at least one stage"):
        PlainCNN(3, widths=())
    with pytest.raises(ValueError, match=r"every entry of widths must be an int >= 1, got 0"):
        PlainCNN(3, widths=(8, 0))
    with pytest.raises(ValueError, match=r"convs_per_stage must be an int >= 1, got 0"):
        PlainCNN(3, convs_per_stage=0)


def test_wrong_input_channels() -> None:
    net = build_backbone("cnn3", in_channels=1)
    with pytest.raises(
        ValueError, match=r"images must have shape \(N, 1, H, W\), got \(2, 3, 8, 8\)"
    ):
        net(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"images must have shape"):
        net(torch.rand(1, 8, 8))


def test_integer_images_rejected() -> None:
    net = build_backbone("cnn3", in_channels=3)
    with pytest.raises(TypeError, match=r"floating-point tensor, got dtype torch.uint8"):
        net(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"images must be a torch.Tensor, got list"):
        net([[0.0]])
