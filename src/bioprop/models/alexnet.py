"""AlexNet: the classic single-tower net and xiao2018's BatchNorm variant.

The classic layout is the single-GPU AlexNet of Krizhevsky's "One weird trick" (2014), the usual PyTorch
AlexNet (conv maps 64, 192, 384, 256, 256; two dropout-regularised 4096-unit layers; 61.1M parameters at
1000 classes). xiao2018's variant changes three things: BatchNorm before every ReLU, no bias in the layers
followed by BatchNorm, and no dropout. Both average-pool the last feature map to 6×6 (the identity at 224×224),
so they accept any input side >= 63.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .registry import register_model

__all__ = ["alexnet", "alexnet_bn"]

# (out maps, kernel, stride, padding, max-pool after)
_FEATURES = ((64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False), (256, 3, 1, 1, False),
             (256, 3, 1, 1, True))


def _alexnet(num_classes: int, in_channels: int, *, batchnorm: bool, dropout: float, hidden: int) -> nn.Sequential:
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden must be a positive int, got {hidden!r}")
    features: list[nn.Module] = []
    channels = in_channels
    for out_channels, kernel, stride, padding, pool in _FEATURES:
        features.append(nn.Conv2d(channels, out_channels, kernel, stride=stride, padding=padding,
                                  bias=not batchnorm))
        if batchnorm:
            features.append(nn.BatchNorm2d(out_channels))
        features.append(nn.ReLU())
        if pool:
            features.append(nn.MaxPool2d(3, stride=2))
        channels = out_channels
    classifier: list[nn.Module] = []
    width = channels * 6 * 6
    for _ in range(2):
        if dropout > 0:
            classifier.append(nn.Dropout(dropout))
        classifier.append(nn.Linear(width, hidden, bias=not batchnorm))
        if batchnorm:
            classifier.append(nn.BatchNorm1d(hidden))
        classifier.append(nn.ReLU())
        width = hidden
    classifier.append(nn.Linear(width, num_classes))
    return nn.Sequential(OrderedDict(features=nn.Sequential(*features), avgpool=nn.AdaptiveAvgPool2d(6),
                                     flatten=nn.Flatten(), classifier=nn.Sequential(*classifier)))


@register_model("alexnet", paper="Krizhevsky 2014 (one weird trick); xiao2018", num_classes=1000, in_channels=3,
                image_size=224, min_image_size=63)
def alexnet(num_classes: int, in_channels: int, image_size: int, *, dropout: float = 0.5, hidden: int = 4096
            ) -> nn.Sequential:
    r"""The classic single-tower AlexNet with dropout before each hidden linear layer.

    Args:
        dropout: dropout rate in the classifier (0 removes the layers).
        hidden: units of the two hidden linear layers (4096 in the paper; smaller for quick experiments).

    Shape:
        input (B, C, S, S), S >= 63 -> output (B, num_classes).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return _alexnet(num_classes, in_channels, batchnorm=False, dropout=dropout, hidden=hidden)


@register_model("alexnet_bn", paper="xiao2018", num_classes=1000, in_channels=3, image_size=224, min_image_size=63)
def alexnet_bn(num_classes: int, in_channels: int, image_size: int, *, hidden: int = 4096) -> nn.Sequential:
    r"""xiao2018's AlexNet: BatchNorm before every ReLU, no bias before BatchNorm, no dropout.

    Args:
        hidden: units of the two hidden linear layers (4096 in the paper; smaller for quick experiments).

    Shape:
        input (B, C, S, S), S >= 63 -> output (B, num_classes).
    """
    return _alexnet(num_classes, in_channels, batchnorm=True, dropout=0.0, hidden=hidden)
