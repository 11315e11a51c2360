"""The models and the training step the benchmarks measure, defined once.

A step is ``zero_grad`` (set to None), forward, cross-entropy, backward and an SGD update on one fixed batch, so
that only the model's own work is timed (data loading has its own benchmark).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import bioprop
from bioprop.models import create_model

__all__ = ["make_mlp", "make_convnet", "make_resnet18", "MODELS", "make_step", "make_batch", "layer_rules"]


def make_mlp(width: int = 800, depth: int = 3, in_features: int = 784) -> nn.Sequential:
    """``depth`` x ``width`` tanh MLP on flattened inputs (3x800 on 28x28 by default), 10 outputs."""
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = in_features
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.Tanh()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, 10))


def make_convnet(channels: int = 32, depth: int = 2, in_channels: int = 1, image_size: int = 28) -> nn.Sequential:
    """Conv net: ``depth`` stages of 3x3 conv/ReLU/2x2 max-pool (``channels`` maps, doubling per stage) and a
    linear read-out; the default is the step-time benchmark's two-stage net on 28x28."""
    layers: list[nn.Module] = []
    maps, side = in_channels, image_size
    for i in range(depth):
        out = channels * 2 ** i
        layers += [nn.Conv2d(maps, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        maps, side = out, side // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(maps * side * side, 10))


def make_resnet18(image_size: int = 224, width: int = 64, num_classes: int = 1000) -> nn.Module:
    """ImageNet ResNet-18 (``width`` maps in the first stage; 64 is the standard net) on RGB inputs."""
    return create_model("resnet18", num_classes=num_classes, in_channels=3, image_size=image_size, width=width)


#: benchmark model name -> (builder, input shape of one sample)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (make_mlp, (1, 28, 28)),
    "convnet": (make_convnet, (1, 28, 28)),
    "resnet18_64": (lambda: make_resnet18(64, num_classes=10), (3, 64, 64)),
}


def make_batch(sample_shape: tuple[int, ...], batch: int, classes: int, device: torch.device | str = "cpu",
               channels_last: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch: inputs ``(batch, *sample_shape)`` and labels ``(batch,)`` in ``[0, classes)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *sample_shape, generator=g).to(device)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, classes, (batch,), generator=g).to(device)


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, momentum: float = 0.9,
              autocast_dtype: torch.dtype | None = None,
              forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[[], None]:
    """One training step of ``model`` on ``(x, y)``: zero_grad, forward, cross-entropy, backward, SGD update.

    Args:
        model: the model to train; its trainable parameters go to the optimizer.
        x, y: the batch, ``(B, ...)`` and ``(B,)``.
        momentum: SGD momentum (lr 1e-3).
        autocast_dtype: run forward and loss under ``torch.autocast(x.device.type, dtype)``; None: no autocast.
        forward: what to call instead of ``model`` (e.g. a ``torch.compile``d model or a BioTorch DFA module).
    """
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=momentum)
    run = forward or model
    device_type = x.device.type

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = F.cross_entropy(run(x), y)
        loss.backward()
        opt.step()
        bioprop.after_step(model)  # the rules' per-step work (a weight-mirror step for wm)
    return step


def layer_rules() -> list[str]:
    """Every registered per-layer rule except the native one (backprop leaves the layers native), in registry
    order."""
    return [r for r in bioprop.list_rules()
            if bioprop.create_rule(r).kind == "layer" and not bioprop.create_rule(r).native]
