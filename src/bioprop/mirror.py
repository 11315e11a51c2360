"""Weight mirrors (akrout2019): learn each layer's feedback weight from noise, between training batches.

For a layer ``y = W x`` driven by zero-mean noise ``x`` with variance σ², ``E[y xᵀ] = σ² W``. A mirror step
therefore moves ``B`` towards (a multiple of) ``W`` using only quantities local to the layer::

    B ← (1 − decay) · B + lr · (y xᵀ) / n            (n = number of noise samples)

For a convolution ``y xᵀ`` is the weight-gradient correlation of the noise input with the response, the same
product a convolution's weight gradient computes.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .rules import WeightMirror, layer_seed

__all__ = ["mirror_step"]


@torch.no_grad()
def mirror_step(model: nn.Module, batch_size: int = 64, *, step: int | None = None, seed: int = 0) -> int:
    """Apply one weight-mirror update to every layer converted with the ``"wm"`` rule.

    Args:
        model: a model converted with ``bioprop.convert(model, "wm")``.
        batch_size: number of noise samples per layer.
        step: index of this mirror step; with ``seed`` it fixes the noise, so every DDP rank draws the same
            noise and a resumed run repeats it. Defaults to each layer's own mirror-step counter (buffer ``feedback_mirror_steps``).
        seed: seed of the noise.

    Returns:
        The number of layers updated.
    """
    updated = 0
    for name, layer in model.named_modules():
        rule = getattr(layer, "rule", None)
        if not isinstance(rule, WeightMirror):
            continue
        count = int(layer.feedback_mirror_steps) if step is None else step
        generator = torch.Generator(device=layer.weight.device)
        generator.manual_seed(layer_seed(seed + 1_000_003 * count, name))
        b = layer.feedback_weight  # (out, in) or (C_out, C_in/groups, *kernel)
        update = _response_correlation(layer, batch_size, rule.noise_std, generator)
        b.mul_(1.0 - rule.decay).add_(update, alpha=rule.lr)
        layer.feedback_mirror_steps.fill_(count + 1)
        updated += 1
    return updated


def _response_correlation(layer: nn.Module, n: int, noise_std: float, generator: torch.Generator) -> Tensor:
    """``y xᵀ / n`` for noise input x through the layer's forward weight alone (no bias)."""
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        x = torch.randn(n, weight.shape[1], generator=generator, device=weight.device, dtype=weight.dtype)
        x.mul_(noise_std)  # (n, in)
        y = x @ weight.t()  # (n, out)
        return y.t() @ x / n  # (out, in)
    # Convolution: noise images just large enough for one kernel footprint per output position.
    spatial = [d * (k - 1) + 1 for k, d in zip(weight.shape[2:], layer.dilation)]
    in_channels = weight.shape[1] * layer.groups
    x = torch.randn(n, in_channels, *spatial, generator=generator, device=weight.device, dtype=weight.dtype)
    x.mul_(noise_std)  # (n, C_in, *kernel_span)
    y = torch.convolution(x, weight, None, [1] * len(spatial), [0] * len(spatial), list(layer.dilation), False,
                          [0] * len(spatial), layer.groups)  # (n, C_out, 1, 1)
    _, grad_weight, _ = torch.ops.aten.convolution_backward(
        y, x, weight, None, [1] * len(spatial), [0] * len(spatial), list(layer.dilation), False,
        [0] * len(spatial), layer.groups, [False, True, False])
    return grad_weight / n
