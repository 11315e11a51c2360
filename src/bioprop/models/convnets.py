"""Plain convolutional nets: nokland2016's CIFAR net, LeNet (BioTorch's MNIST and CIFAR variants), a small test net,
and the TensorFlow CIFAR-10 tutorial net (moskovitz2018's "CIFAR-10 1").

All of them are ``nn.Sequential``, so layer names are indices and every hidden nonlinearity is a module of its own.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .registry import register_model
from .mlp import _check_rate, activation_module, zero_init_

__all__ = ["nokland_convnet", "lenet", "small_convnet", "tf_cifar10", "CropInput", "LENET_VARIANTS"]


def _pool_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


@register_model("nokland_convnet", paper="nokland2016", num_classes=10, in_channels=3, image_size=32,
                min_image_size=15)
def nokland_convnet(num_classes: int, in_channels: int, image_size: int, *, activation: str = "tanh",
                    dropout: bool = False, batchnorm: bool = False, zero_init: bool = False) -> nn.Sequential:
    r"""nokland2016's CIFAR conv net: three 5×5 conv layers (96, 128, 256 maps), two 2048-unit hidden layers.

    Each conv keeps the size (padding 2) and is followed by the nonlinearity and 3×3 max pooling with stride 2
    (32 → 15 → 7 → 3). ``dropout=True`` adds the reference code's rates: 0.1 on the input, 0.25 after the first
    two conv blocks, 0.5 after the third and after each hidden linear layer.

    Args:
        num_classes: output units (10 for CIFAR-10, 100 for CIFAR-100).
        in_channels, image_size: input C×S×S (S >= 15).
        activation: ``"tanh"`` (the paper), ``"logistic"`` or ``"relu"``.
        dropout: add the dropout layers above.
        batchnorm: BatchNorm after every conv and hidden linear layer, before the nonlinearity.
        zero_init: all weights and biases start at zero (the paper's FA/DFA setting).

    Shape:
        input (B, C, S, S) -> output (B, num_classes).
    """
    activation_module(activation)
    layers: list[nn.Module] = [nn.Dropout(0.1)] if dropout else []
    channels, size = in_channels, image_size
    for out_channels, rate in ((96, 0.25), (128, 0.25), (256, 0.5)):
        layers.append(nn.Conv2d(channels, out_channels, 5, padding=2, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(activation_module(activation))
        if dropout:
            layers.append(nn.Dropout(rate))
        layers.append(nn.MaxPool2d(3, stride=2))
        channels, size = out_channels, _pool_out(size, 3, 2)
    layers.append(nn.Flatten())
    features = channels * size * size
    for _ in range(2):
        layers.append(nn.Linear(features, 2048, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm1d(2048))
        layers.append(activation_module(activation))
        if dropout:
            layers.append(nn.Dropout(0.5))
        features = 2048
    layers.append(nn.Linear(features, num_classes))
    net = nn.Sequential(*layers)
    return zero_init_(net) if zero_init else net


#: LeNet variants: BioTorch's ``le_net_mnist`` and ``le_net_cifar`` architectures.
LENET_VARIANTS = ("auto", "mnist", "cifar")


@register_model("lenet", paper="sanfiz2021 (BioTorch LeNet)", num_classes=10, in_channels=1, image_size=28)
def lenet(num_classes: int, in_channels: int, image_size: int, *, variant: str = "auto") -> nn.Sequential:
    r"""LeNet as benchmarked by sanfiz2021, in its MNIST or CIFAR variant.

    - ``"mnist"``: 5×5 convs with 6, 16 and 120 maps, 2×2 max pooling after the first two, then 84 hidden
      units; LeNet-5 expects 32×32 inputs, so smaller images are zero-padded up to 32 by the first conv
      (padding 2 for MNIST's 28×28, the classic trick), which gives the same shapes as BioTorch's resize to 32.
      Larger images keep their size and widen the first linear layer.
    - ``"cifar"``: 3×3 convs with 32, 64 and 128 maps (no padding), 2×2 max pooling after the first two, global
      average pooling, then 256 hidden units. Needs S >= 18.
    - ``"auto"`` picks ``"mnist"`` for one input channel and ``"cifar"`` otherwise.

    All nonlinearities are ReLU.

    Shape:
        input (B, C, S, S) -> output (B, num_classes).
    """
    if variant not in LENET_VARIANTS:
        raise ValueError(f"unknown lenet variant {variant!r}; allowed: {', '.join(LENET_VARIANTS)}")
    if variant == "auto":
        variant = "mnist" if in_channels == 1 else "cifar"
    if variant == "mnist":
        padding = max(0, math.ceil((32 - image_size) / 2))
        size = image_size + 2 * padding
        size = ((size - 4) // 2 - 4) // 2 - 4  # conv5, pool2, conv5, pool2, conv5
        return nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=padding), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 120, 5), nn.ReLU(), nn.Flatten(),
            nn.Linear(120 * size * size, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )
    if ((image_size - 2) // 2 - 2) // 2 - 2 < 1:
        raise ValueError(f"lenet variant 'cifar' needs image_size >= 18, got {image_size}")
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(128, 256), nn.ReLU(),
        nn.Linear(256, num_classes),
    )


@register_model("small_convnet", paper="this library (a fast net for tests)", num_classes=10, in_channels=1,
                image_size=28, min_image_size=4)
def small_convnet(num_classes: int, in_channels: int, image_size: int, *, widths: tuple[int, int] = (16, 32),
                  batchnorm: bool = True, dropout: float = 0.0) -> nn.Sequential:
    r"""A tiny conv net for tests and quick checks: two conv → BN → ReLU → 2×2 max-pool blocks and a linear head.

    The feature map is average-pooled to 2×2 before the head, so any input side >= 4 works.

    Args:
        widths: output channels of the two 3×3 convs.
        batchnorm: BatchNorm after each conv (the conv then has no bias).
        dropout: dropout rate before the head (0 = no layer).

    Shape:
        input (B, C, S, S) -> output (B, num_classes).
    """
    if len(widths) != 2 or any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"widths must be two positive ints, got {widths!r}")
    layers: list[nn.Module] = []
    channels = in_channels
    for width in widths:
        layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm2d(width))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten()]
    if _check_rate("dropout", dropout) > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(channels * 4, num_classes))
    return nn.Sequential(*layers)


class CropInput(nn.Module):
    r"""A random ``size``×``size`` crop (and a random horizontal flip) of each image in training mode, the central
    crop in evaluation mode: the TensorFlow CIFAR-10 tutorial's 24×24 input, taken inside the model.

    The draws come from torch's global generator on the input's device, which the engine seeds per
    ``(seed, epoch, rank)`` as it does for dropout.

    Args:
        size: side of the crop.
        flip: also mirror each training image left-right with probability 1/2.

    Shape:
        input (B, C, H, W) with H, W >= size -> output (B, C, size, size).
    """

    def __init__(self, size: int, flip: bool = True) -> None:
        super().__init__()
        self.size, self.flip = size, flip

    def forward(self, x: Tensor) -> Tensor:
        from ..data.transforms import crop_windows
        b, _, h, w = x.shape  # (B, C, H, W)
        if h < self.size or w < self.size:
            raise ValueError(f"CropInput({self.size}) needs inputs of at least {self.size}×{self.size}, got {h}×{w}")
        if self.training:
            top = torch.randint(0, h - self.size + 1, (b,), device=x.device)
            left = torch.randint(0, w - self.size + 1, (b,), device=x.device)
            out = crop_windows(x, torch.stack([top, left], 1), self.size)  # (B, C, size, size)
            if self.flip:
                out = torch.where((torch.rand(b, device=x.device) < 0.5)[:, None, None, None], out.flip(3), out)
            return out
        offsets = torch.tensor([(h - self.size) // 2, (w - self.size) // 2], device=x.device).expand(b, 2)
        return crop_windows(x, offsets, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, flip={self.flip}"


def _same_max_pool(size: int) -> tuple[list[nn.Module], int]:
    """TensorFlow's 3×3/2 max pooling with "SAME" padding, for non-negative inputs (after a ReLU): zeros padded
    as TF does (the extra one at the bottom/right), which equals TF's -inf padding there. Returns the two layers
    (padding, pooling) and the output side ceil(size / 2)."""
    out = -(-size // 2)
    total = max((out - 1) * 2 + 3 - size, 0)
    before = total // 2
    pad = (before, total - before, before, total - before)  # (left, right, top, bottom)
    return [nn.ZeroPad2d(pad), nn.MaxPool2d(3, stride=2)], out


@register_model("tf_cifar10", paper="moskovitz2018 (CIFAR-10 1: the TensorFlow CIFAR-10 tutorial net)",
                num_classes=10, in_channels=3, image_size=32, min_image_size=24)
def tf_cifar10(num_classes: int, in_channels: int, image_size: int, *, crop: int = 24,
               flip: bool = True) -> nn.Sequential:
    r"""The TensorFlow CIFAR-10 tutorial net (moskovitz2018's "CIFAR-10 1"): two 5×5 conv layers with 64 maps,
    each followed by ReLU and 3×3/2 max pooling ("SAME" padding), then 384 and 192 ReLU units.

    The input is first cut to ``crop``×``crop`` (random crop and flip while training, central crop in evaluation,
    :class:`CropInput`): 32 → 24 → 12 → 6 for CIFAR, 1,068,298 parameters, the tutorial's count. Not kept from
    the tutorial: local response normalisation, random brightness/contrast and per-image standardisation (the
    data set's own normalisation is used); train with ``augment = "off"`` so the crop is the only augmentation.

    Args:
        num_classes: output units.
        in_channels, image_size: input C×S×S.
        crop: side of the crop (0 = use the whole input).
        flip: random horizontal flips while training (with ``crop > 0``).

    Shape:
        input (B, C, S, S) -> output (B, num_classes).
    """
    if isinstance(crop, bool) or not isinstance(crop, int) or not 0 <= crop <= image_size:
        raise ValueError(f"tf_cifar10 crop must be an int in [0, image_size = {image_size}], got {crop!r}")
    layers: list[nn.Module] = [CropInput(crop, flip)] if crop else []
    channels, size = in_channels, crop or image_size
    for _ in range(2):
        pool, size = _same_max_pool(size)
        layers += [nn.Conv2d(channels, 64, 5, padding=2), nn.ReLU(), *pool]
        channels = 64
    layers += [nn.Flatten(), nn.Linear(64 * size * size, 384), nn.ReLU(), nn.Linear(384, 192), nn.ReLU(),
               nn.Linear(192, num_classes)]
    return nn.Sequential(*layers)
