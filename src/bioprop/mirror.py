"""Weight mirrors (akrout2019): learn each layer's feedback weight from noise, between training batches.

For a layer ``y = W x`` driven by zero-mean noise ``x`` with variance σ², ``E[y xᵀ] = σ² W``. A mirror step
therefore moves ``B`` towards (a multiple of) ``W`` using only quantities local to the layer::

    B ← (1 − decay) · B + lr · (y xᵀ) / n            (n = number of noise samples)

For a convolution ``y xᵀ`` is the weight-gradient correlation of the noise input with the response, the same
product a convolution's weight gradient computes.

The ``wm`` rule runs a mirror step after every optimizer step (:func:`bioprop.after_step`); :func:`mirror_step`
runs one on demand.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .seeding import derive_seed

__all__ = ["mirror_step", "mirror_layer", "mirror_seed"]


def mirror_seed(seed: int, count: int, name: str) -> int:
    """The seed of the noise of mirror step ``count`` of the layer ``name``."""
    return derive_seed(int(seed), "weight_mirror", int(count), name)


@torch.no_grad()
def mirror_layer(layer: nn.Module, feedback: Tensor, *, lr: float, decay: float, noise_std: float,
                 batch_size: int, seed: int, name: str, count: int) -> None:
    """One mirror step of ``layer``: ``feedback ← (1 − decay)·feedback + lr · y xᵀ / n``, in place.

    Args:
        layer: an ``nn.Linear`` or ``nn.Conv{1,2,3}d`` (converted or not).
        feedback: its ``B``, shape of ``W``: ``(out, in)`` or ``(C_out, C_in/groups, *kernel)``.
        batch_size: the number n of noise samples.
        seed, name, count: fix the noise (:func:`mirror_seed`).
    """
    generator = torch.Generator(device=layer.weight.device)
    generator.manual_seed(mirror_seed(seed, count, name))
    _add_response_correlation(layer, feedback, batch_size, noise_std, generator, keep=1.0 - decay, lr=lr)


def mirror_step(model: nn.Module, batch_size: int = 64, *, step: int | None = None, seed: int = 0) -> int:
    """Apply one weight-mirror update to every layer whose rule mirrors (``bioprop.convert(model, "wm")``).

    Args:
        model: a converted model.
        batch_size: number of noise samples per layer.
        step: index of this mirror step; with ``seed`` it fixes the noise, so every DDP rank draws the same
            noise and a resumed run repeats it. Defaults to each layer's own mirror-step counter (buffer
            ``feedback_mirror_steps``).
        seed: seed of the noise.

    Returns:
        The number of layers updated.
    """
    updated = 0
    for name, layer in model.named_modules():
        mirror = getattr(getattr(layer, "rule", None), "mirror", None)
        if callable(mirror):
            mirror(layer, name, batch_size=batch_size, step=step, seed=seed)
            updated += 1
    return updated


def _add_response_correlation(layer: nn.Module, feedback: Tensor, n: int, noise_std: float,
                              generator: torch.Generator, *, keep: float, lr: float) -> None:
    """``feedback ← keep · feedback + lr · y xᵀ / n`` in place, for noise input x through the layer's forward
    weight alone (no bias). A linear layer's ``y xᵀ`` is accumulated into ``feedback`` by one fused matrix
    product, without a W-sized temporary."""
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        x = torch.randn(n, weight.shape[1], generator=generator, device=weight.device, dtype=weight.dtype)
        x.mul_(noise_std)  # (n, in)
        y = x @ weight.t()  # (n, out)
        feedback.addmm_(y.t(), x, beta=keep, alpha=lr / n)  # (out, n) @ (n, in)
        return
    # Convolution: noise images just large enough for one kernel footprint per output position.
    spatial = [d * (k - 1) + 1 for k, d in zip(weight.shape[2:], layer.dilation)]
    in_channels = weight.shape[1] * layer.groups
    x = torch.randn(n, in_channels, *spatial, generator=generator, device=weight.device, dtype=weight.dtype)
    x.mul_(noise_std)  # (n, C_in, *kernel_span)
    y = torch.convolution(x, weight, None, [1] * len(spatial), [0] * len(spatial), list(layer.dilation), False,
                          [0] * len(spatial), layer.groups)  # (n, C_out, 1, 1)
    _, grad_weight, _ = torch.ops.aten.convolution_backward(
        y, x, weight, None, [1] * len(spatial), [0] * len(spatial), list(layer.dilation), False,
        [0] * len(spatial), layer.groups, [False, True, False])  # y xᵀ, shape of W
    feedback.mul_(keep).add_(grad_weight, alpha=lr / n)
