"""Residual nets: the CIFAR ResNet-20/32/56 of He et al. (2016) and the ImageNet ResNet-18/34/50.

Each net is an ``nn.Sequential`` of named stages (``conv1, bn1, relu, [maxpool], layer1…, avgpool, flatten, fc``),
so parameter names match the common checkpoints and the last layer is ``fc``. Residual blocks are small modules;
the addition and BatchNorm keep exact gradients whatever rule converts the convolutions.

- CIFAR nets: a 3×3 stem with 16 maps, three stages of n basic blocks with 16, 32, 64 maps (n = 3, 5, 9 for
  depth 20, 32, 56), and the parameter-free "option A" shortcut (subsample, zero-pad the channels) as in the
  paper and in BioTorch (0.27M parameters for ResNet-20).
- ImageNet nets: 7×7 stride-2 stem and 3×3 max pooling, four stages (64…512 maps), 1×1 conv + BN projection
  shortcuts, and the stride in the 3×3 conv of bottleneck blocks (11,689,512 parameters for ResNet-18).
"""
from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_model

__all__ = ["BasicBlock", "Bottleneck", "PadShortcut", "cifar_resnet", "imagenet_resnet"]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option-A shortcut: keep every ``stride``-th pixel and zero-pad the new channels evenly on both sides."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::self.stride, ::self.stride]  # (B, C_in, H/s, W/s)
        return F.pad(x, (0, 0, 0, 0, *self.pad))  # (B, C_out, H/s, W/s)


class BasicBlock(nn.Module):
    r"""Two 3×3 conv → BN layers with a ReLU between them, a shortcut, and a ReLU after the sum.

    Args:
        in_channels, out_channels: maps in and out.
        stride: stride of the first conv (2 halves the resolution).
        shortcut: ``"A"`` (parameter-free padding, CIFAR) or ``"B"`` (1×1 conv + BN projection, ImageNet),
            used only when the shape changes; otherwise the identity.
    """

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = _shortcut(in_channels, out_channels, stride, shortcut)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    r"""1×1 reduce → 3×3 (with the stride) → 1×1 expand (×4), each followed by BN, ReLU after the sum."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = _shortcut(in_channels, out_channels, stride, shortcut)
        self.relu3 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


def _shortcut(in_channels: int, out_channels: int, stride: int, kind: str) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if kind == "A":
        return PadShortcut(in_channels, out_channels, stride)
    if kind == "B":
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                             nn.BatchNorm2d(out_channels))
    raise ValueError(f"unknown shortcut {kind!r}; allowed: 'A', 'B'")


def _stage(block: type[BasicBlock] | type[Bottleneck], in_channels: int, planes: int, blocks: int, stride: int,
           shortcut: str) -> tuple[nn.Sequential, int]:
    layers = []
    for i in range(blocks):
        layers.append(block(in_channels, planes, stride if i == 0 else 1, shortcut))
        in_channels = planes * block.expansion
    return nn.Sequential(*layers), in_channels


def _init(net: nn.Module, zero_init_residual: bool) -> nn.Module:
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if zero_init_residual:  # each block starts as the identity (Goyal et al. 2017)
        for module in net.modules():
            if isinstance(module, (BasicBlock, Bottleneck)):
                last_bn = module.bn3 if isinstance(module, Bottleneck) else module.bn2
                nn.init.zeros_(last_bn.weight)
    return net


def cifar_resnet(depth: int, num_classes: int, in_channels: int, zero_init_residual: bool = False) -> nn.Sequential:
    """A CIFAR ResNet of ``depth`` = 6n + 2 layers (module docstring)."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    layer1, channels = _stage(BasicBlock, 16, 16, n, 1, "A")
    layer2, channels = _stage(BasicBlock, channels, 32, n, 2, "A")
    layer3, channels = _stage(BasicBlock, channels, 64, n, 2, "A")
    net = nn.Sequential(OrderedDict(
        conv1=_conv3x3(in_channels, 16), bn1=nn.BatchNorm2d(16), relu=nn.ReLU(),
        layer1=layer1, layer2=layer2, layer3=layer3,
        avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(channels, num_classes),
    ))
    return _init(net, zero_init_residual)


_IMAGENET_CONFIGS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}


def imagenet_resnet(depth: int, num_classes: int, in_channels: int, zero_init_residual: bool = False,
                    width: int = 64) -> nn.Sequential:
    """An ImageNet ResNet-18/34/50 (module docstring); ``width`` maps in the stem and first stage, doubling after."""
    if depth not in _IMAGENET_CONFIGS:
        raise ValueError(f"ImageNet ResNet depth must be one of {sorted(_IMAGENET_CONFIGS)}, got {depth}")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    block, counts = _IMAGENET_CONFIGS[depth]
    stages: dict[str, nn.Module] = {}
    channels = width
    for i, (planes, blocks) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), counts)):
        stages[f"layer{i + 1}"], channels = _stage(block, channels, planes, blocks, 1 if i == 0 else 2, "B")
    net = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False), bn1=nn.BatchNorm2d(width),
        relu=nn.ReLU(), maxpool=nn.MaxPool2d(3, stride=2, padding=1), **stages,
        avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(channels, num_classes),
    ))
    return _init(net, zero_init_residual)


def _register_cifar(depth: int) -> None:
    @register_model(f"resnet{depth}", paper="He et al. 2016 (CIFAR); sanfiz2021", num_classes=10, in_channels=3,
                    image_size=32)
    def builder(num_classes: int, in_channels: int, image_size: int, *, zero_init_residual: bool = False
                ) -> nn.Sequential:
        return cifar_resnet(depth, num_classes, in_channels, zero_init_residual)

    builder.__doc__ = f"CIFAR ResNet-{depth} (option-A shortcuts). Any input side works (global pooling)."
    builder.__name__ = f"resnet{depth}"


def _register_imagenet(depth: int) -> None:
    @register_model(f"resnet{depth}", paper="He et al. 2016 (ImageNet); xiao2018, akrout2019", num_classes=1000,
                    in_channels=3, image_size=224)
    def builder(num_classes: int, in_channels: int, image_size: int, *, zero_init_residual: bool = False,
                width: int = 64) -> nn.Sequential:
        return imagenet_resnet(depth, num_classes, in_channels, zero_init_residual, width)

    builder.__doc__ = (f"ImageNet ResNet-{depth}. Any input side works (global pooling); 224 is standard. "
                       f"``width`` (64) sets the maps of the first stage; smaller values give quick test nets.")
    builder.__name__ = f"resnet{depth}"


for _depth in (20, 32, 56):
    _register_cifar(_depth)
for _depth in (18, 34, 50):
    _register_imagenet(_depth)
del _depth
