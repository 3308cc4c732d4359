"""Feature extractors: images (N, C_in, H, W) float -> pooled features (N, D).

Every backbone follows timm's contract: ``forward`` returns globally average-pooled features
(N, D), ``forward_features`` the last feature map (N, D, h, w) before pooling, and the attribute
``out_features`` is D, so a head can be sized without knowing which backbone it sits on.

=============  =====  ======================================================================
name           D      what
=============  =====  ======================================================================
``cnn10``      256    the reference 10-layer CNN: 3 conv3x3-BN-ReLU per stage, 64/128/256 wide
``cnn3``       256    the same with one conv3x3-BN-ReLU per stage
``mobilenet``  1280   torchvision MobileNetV2 trunk with a stride-1 stem for small inputs
``resnet50``   2048   torchvision ResNet-50 trunk with a CIFAR-style 3x3 stride-1 stem
=============  =====  ======================================================================

No pretrained weights are loaded anywhere (the reference trains from scratch too, and tests and
TPU hosts have no network).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.models import mobilenet_v2, resnet50
from torchvision.models.mobilenetv2 import InvertedResidual

__all__ = [
    "BACKBONES",
    "Backbone",
    "MobileNetV2Backbone",
    "PlainCNN",
    "ResNet50Backbone",
    "build_backbone",
]

BACKBONES: tuple[str, ...] = ("cnn10", "cnn3", "mobilenet", "resnet50")

# Inputs at most this many pixels a side get the extra stride-1 block in MobileNetV2.
_SMALL_INPUT_PX = 32
_MIN_IMAGE_SIZE = 8


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class Backbone(nn.Module, metaclass=abc.ABCMeta):
    """Base of all backbones: input checks and global average pooling over ``forward_features``.

    Subclasses set ``in_channels`` and ``out_features`` and define ``forward_features``.
    """

    in_channels: int
    out_features: int

    @abc.abstractmethod
    def forward_features(self, images: Tensor) -> Tensor:
        """Last feature map before pooling.

        Args:
            images: (N, C_in, H, W) float.

        Returns:
            (N, D, h, w).
        """

    def forward(self, images: Tensor) -> Tensor:
        """Globally average-pooled features.

        Args:
            images: (N, C_in, H, W) float.

        Returns:
            (N, D) with D = ``out_features``.
        """
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"images must have shape (N, {self.in_channels}, H, W), got {tuple(images.shape)}"
            )
        if not images.dtype.is_floating_point:
            raise TypeError(f"images must be a floating-point tensor, got dtype {images.dtype}")
        return self.forward_features(images).mean(dim=(-2, -1))  # (N, D, h, w) -> (N, D)


class PlainCNN(Backbone):
    """VGG-style stack of conv3x3-BN-ReLU stages separated by 2x2 average pooling.

    With the defaults this is the reference study's 10-layer CNN (9 conv layers plus the
    classifier that sits on top of it): 3 x (conv3x3 pad 1, BatchNorm, ReLU) at 64 channels,
    AvgPool 2x2, the same at 128, AvgPool 2x2, the same at 256, global average pool -> 256.
    ``convs_per_stage=1`` gives the 3-conv ``cnn3``. Conv kernels are initialised with
    Glorot-uniform, the Keras ``Conv2D`` default the reference used; convs carry no bias since
    a BatchNorm follows each one.

    Inputs must be at least 2 ** (len(widths) - 1) pixels a side; 28 and 32 px end at 7x7 and 8x8.

    Args:
        in_channels: C_in >= 1 (1 for MNIST-like sets, 3 for CIFAR-10).
        widths: output channels of each stage, all >= 1.
        convs_per_stage: conv-BN-ReLU blocks per stage, >= 1.

    Example:
        >>> import torch
        >>> net = PlainCNN(in_channels=3)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 256])
    """

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int] = (64, 128, 256),
        convs_per_stage: int = 3,
    ) -> None:
        super().__init__()
        self.in_channels = _check_int("in_channels", in_channels, 1)
        widths = tuple(widths)
        if not widths:
            raise ValueError("widths must name at least one stage, got ()")
        for width in widths:
            _check_int("every entry of widths", width, 1)
        self.convs_per_stage = _check_int("convs_per_stage", convs_per_stage, 1)
        self.widths = widths
        self.out_features = widths[-1]

        layers: list[nn.Module] = []
        channels = in_channels
        for stage, width in enumerate(widths):
            if stage > 0:
                layers.append(nn.AvgPool2d(2))
            for _ in range(convs_per_stage):
                layers += [
                    nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
        self.features = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot-uniform conv kernels (Keras default); BatchNorm weight 1, bias 0."""
        for module in self.features.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()

    def forward_features(self, images: Tensor) -> Tensor:
        """Last feature map before pooling.

        Args:
            images: (N, C_in, H, W) float.

        Returns:
            (N, widths[-1], H / 2 ** (S - 1), W / 2 ** (S - 1)) for S stages (floor division).
        """
        fmap: Tensor = self.features(images)
        return fmap

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, widths={self.widths}, "
            f"convs_per_stage={self.convs_per_stage}"
        )


class MobileNetV2Backbone(Backbone):
    """MobileNetV2 (Sandler et al. 2018) trunk from torchvision, adapted to small images.

    This is torchvision's ``mobilenet_v2(weights=None).features`` (inverted residuals with
    linear bottlenecks, width multiplier 1.0) ending in the 1x1 conv to 1280 channels, then a
    global average pool -> 1280 features. Changes for small inputs, as in common CIFAR variants:

    - the stem conv takes ``in_channels`` and has stride 1 instead of 2;
    - for ``image_size <= 32`` the first stride-2 inverted-residual block also gets stride 1.

    The overall stride is then 8 for small inputs (32x32 -> 4x4, 28x28 -> 4x4 instead of 1x1)
    and 16 for larger ones.

    It is not the network the reference study ran: that was Keras' ``MobileNet``, i.e.
    MobileNetV1 (a plain stack of depthwise-separable conv blocks, no residuals, 1024 pooled
    features), with alpha=1 and ``weights=None`` (also trained from scratch). V2 is the version
    torchvision ships and is the stronger, more common choice today.

    Args:
        in_channels: C_in >= 1.
        image_size: side of the (square) input images in pixels, >= 8; only chooses the
            small-input adaptation above.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        self.in_channels = _check_int("in_channels", in_channels, 1)
        self.image_size = _check_int("image_size", image_size, _MIN_IMAGE_SIZE)
        features = mobilenet_v2(weights=None).features
        stem = features[0][0]
        if not isinstance(stem, nn.Conv2d):  # guards against a torchvision layout change
            raise TypeError(f"unexpected MobileNetV2 stem {type(stem).__name__}")
        new_stem = nn.Conv2d(
            in_channels, stem.out_channels, kernel_size=3, stride=1, padding=1, bias=False
        )
        nn.init.kaiming_normal_(new_stem.weight, mode="fan_out")  # torchvision's conv init
        features[0][0] = new_stem
        if image_size <= _SMALL_INPUT_PX:
            self._unstride_first_downsampling_block(features)
        self.features = features
        self.out_features = 1280

    @staticmethod
    def _unstride_first_downsampling_block(features: nn.Sequential) -> None:
        """Set the depthwise conv of the first stride-2 inverted residual to stride 1."""
        for block in list(features)[1:]:
            if isinstance(block, InvertedResidual) and block.stride == 2:
                for module in block.modules():
                    if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
                        module.stride = (1, 1)
                block.stride = 1  # input and output widths differ, so still no residual
                return
        raise RuntimeError("MobileNetV2 trunk has no stride-2 block")  # pragma: no cover

    def forward_features(self, images: Tensor) -> Tensor:
        """Last feature map before pooling.

        Args:
            images: (N, C_in, H, W) float.

        Returns:
            (N, 1280, ceil(H / 8), ceil(W / 8)) for image_size <= 32, else stride 16.
        """
        fmap: Tensor = self.features(images)
        return fmap

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, image_size={self.image_size}"


class ResNet50Backbone(Backbone):
    """ResNet-50 (He et al. 2016) trunk from torchvision with a CIFAR-style stem.

    torchvision's ``resnet50(weights=None)`` with the 7x7 stride-2 stem conv replaced by a 3x3
    stride-1 conv taking ``in_channels``, the stem max-pool dropped and the fc layer dropped;
    global average pool -> 2048 features. The overall stride is 8: 32x32 -> 4x4 and
    28x28 -> 4x4. Submodule names match torchvision's (``conv1``, ``bn1``, ``layer1`` ...).

    Args:
        in_channels: C_in >= 1.
    """

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.in_channels = _check_int("in_channels", in_channels, 1)
        net = resnet50(weights=None)
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = net.bn1
        self.relu = net.relu
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4
        self.out_features = 2048

    def forward_features(self, images: Tensor) -> Tensor:
        """Last feature map before pooling.

        Args:
            images: (N, C_in, H, W) float.

        Returns:
            (N, 2048, ceil(H / 8), ceil(W / 8)).
        """
        x = self.relu(self.bn1(self.conv1(images)))  # (N, 64, H, W)
        x = self.layer1(x)  # (N, 256, H, W)
        x = self.layer2(x)  # (N, 512, H/2, W/2)
        x = self.layer3(x)  # (N, 1024, H/4, W/4)
        fmap: Tensor = self.layer4(x)  # (N, 2048, H/8, W/8)
        return fmap

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}"


def build_backbone(name: str, in_channels: int = 3, image_size: int = 32) -> Backbone:
    """Build a backbone by name.

    Args:
        name: one of :data:`BACKBONES`.
        in_channels: C_in >= 1 (1 for MNIST-like sets, 3 for CIFAR-10).
        image_size: side of the square input images in pixels, >= 8.

    Returns:
        A :class:`Backbone` (an ``nn.Module``) mapping (N, in_channels, H, W) float to (N, D), with
        ``out_features`` = D and ``forward_features`` giving the (N, D, h, w) map before pooling.

    Example:
        >>> import torch
        >>> net = build_backbone("cnn10", in_channels=1, image_size=28)
        >>> net(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 256])
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    _check_int("in_channels", in_channels, 1)
    _check_int("image_size", image_size, _MIN_IMAGE_SIZE)
    if name == "cnn10":
        return PlainCNN(in_channels, convs_per_stage=3)
    if name == "cnn3":
        return PlainCNN(in_channels, convs_per_stage=1)
    if name == "mobilenet":
        return MobileNetV2Backbone(in_channels, image_size)
    return ResNet50Backbone(in_channels)
