"""Scales, random draws and seeds of the feedback state.

Scale conventions (option ``scale``), see ``docs/rules.md``:

- ``"xiao2018"`` (default): s = sqrt(2 / (k_h·k_w·C_out)) for conv, 1/sqrt(fan_in) for linear; random draws are
  N(0, s²) for conv and U(−s, s) for linear.
- ``"biotorch"``: s = sqrt(2 / (fan_in + fan_out)), the Xavier std; random draws are Xavier-uniform,
  U(−√3·s, √3·s). The fans are ``torch.nn.init``'s: fan_in = (C_in/groups)·k_h·k_w, fan_out = C_out·k_h·k_w.
- ``"unit"``: s = 1, draws U(−1, 1).
- a positive float s: draws U(−s, s).

Every seed is derived by :func:`bioprop.seeding.derive_seed`: a layer's state from the conversion seed and the
layer's name (:func:`layer_seed`), so it is the same on every device and DDP rank.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..seeding import derive_seed

__all__ = ["SCALE_CONVENTIONS", "NORM_MODES", "check_scale", "check_norm", "feedback_scale", "draw_feedback",
           "draw_magnitude_8bit", "layer_seed", "make_generator", "register_state"]

SCALE_CONVENTIONS = ("xiao2018", "biotorch", "unit")
NORM_MODES = (None, "init", "sn", "fa_init")


def check_scale(scale: str | float, conventions: tuple[str, ...] = SCALE_CONVENTIONS) -> None:
    """The one validator of a feedback ``scale`` option, for layer and direct rules alike.

    Allowed: a name in ``conventions``, or a finite positive int/float (not a bool).

    Raises:
        ValueError: one line naming the bad value and what is allowed.
    """
    if isinstance(scale, str):
        if scale not in conventions:
            raise ValueError(f"unknown scale {scale!r}; allowed: {', '.join(conventions)} or a positive float")
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be one of {', '.join(conventions)} or a positive float, got {scale!r}")


def check_norm(norm: str | None, allowed: tuple = NORM_MODES[:3]) -> None:
    """Raise ValueError unless ``norm`` is one of ``allowed`` (the moskovitz2018 norm controls)."""
    if norm not in allowed:
        raise ValueError(f"unknown norm {norm!r}; allowed: {', '.join(map(repr, allowed))}")


def feedback_scale(weight: Tensor, scale: str | float) -> float:
    """The magnitude ``s`` of B for a weight of this shape under a scale convention.

    Args:
        weight: the forward weight, ``(out, in)`` or ``(C_out, C_in/groups, *kernel)``.
        scale: ``"xiao2018"``, ``"biotorch"``, ``"unit"`` or a positive float.

    The value depends on the shape only and is memoised per (shape, scale): usf asks for it in every forward.
    """
    key = (tuple(weight.shape), scale, type(scale))  # the type: True == 1, but True is not a valid scale
    value = _SCALES.get(key)
    if value is None:
        value = _SCALES[key] = _shape_scale(key[0], scale)
    return value


_SCALES: dict[tuple, float] = {}


def _shape_scale(shape: tuple[int, ...], scale: str | float) -> float:
    check_scale(scale)
    if not isinstance(scale, str):
        return float(scale)
    if scale == "unit":
        return 1.0
    # torch.nn.init's fans: fan_in = (C_in/groups)·prod(kernel), fan_out = C_out·prod(kernel)
    if len(shape) < 2:
        raise ValueError(f"a feedback scale needs a weight of at least 2 dimensions, got shape {shape}")
    receptive = math.prod(shape[2:])
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    if scale == "biotorch":
        return math.sqrt(2.0 / (fan_in + fan_out))
    if len(shape) > 2:  # conv: sqrt(2 / (k_h·k_w·C_out)); fan_out = C_out·prod(kernel)
        return math.sqrt(2.0 / fan_out)
    return 1.0 / math.sqrt(fan_in)


def draw_feedback(weight: Tensor, scale: str | float, generator: torch.Generator,
                  out: Tensor | None = None) -> Tensor:
    """A random matrix with ``weight``'s shape, drawn as the scale convention prescribes (module docstring)."""
    s = feedback_scale(weight, scale)
    if out is None:
        out = torch.empty(weight.shape, dtype=weight.dtype, device=generator.device)
    if scale == "xiao2018" and weight.dim() > 2:
        return out.normal_(0.0, s, generator=generator)
    bound = s * math.sqrt(3.0) if scale == "biotorch" else s
    return out.uniform_(-bound, bound, generator=generator)


def draw_magnitude_8bit(weight: Tensor, scale: str | float, generator: torch.Generator, out: Tensor) -> Tensor:
    """``|M|`` for a fresh M drawn as :func:`draw_feedback` would, quantised to 256 equiprobable levels.

    Level k in 0..255 stands for the quantile (k + 0.5)/256 of |M|'s distribution. Each 64-bit random word is
    drawn over the full int64 range, so all eight of its bytes are uniform and each gives one level, read in
    place (no copy): eight times fewer random numbers than a float draw, which keeps brsf, which redraws every
    update, close to usf in step time. The levels are a function of the generator's state only (for brsf: of
    the layer seed and the draw index).
    """
    n = out.numel()
    words = torch.empty((n + 7) // 8, dtype=torch.int64, device=out.device)
    words.random_(-2**63, None, generator=generator)  # [-2^63, 2^63): every bit uniform
    levels = words.view(torch.uint8)[:n].view(out.shape)  # (*weight.shape), a view of the words' bytes
    s = feedback_scale(weight, scale)
    if scale == "xiao2018" and weight.dim() > 2:  # half-normal quantiles of N(0, s²), looked up
        u = (torch.arange(256, dtype=torch.float64) + 0.5) / 256
        table = (s * math.sqrt(2.0) * torch.erfinv(u)).to(device=out.device, dtype=out.dtype)
        return out.copy_(table[levels.long()])
    bound = s * math.sqrt(3.0) if scale == "biotorch" else s  # |U(-b, b)| = U(0, b)
    # (k + 0.5)·bound/256 as k·c + c/2: the byte-to-float cast goes straight into out (no float temporary)
    return out.copy_(levels).mul_(bound / 256).add_(bound / 512)


def layer_seed(seed: int, layer_name: str) -> int:
    """A per-layer seed that depends only on the user's seed and the layer's name, not on the device."""
    return derive_seed(int(seed), layer_name)


def make_generator(seed: int, layer_name: str) -> torch.Generator:
    """The CPU generator a layer's state is drawn from: identical on every machine, device and rank."""
    return torch.Generator(device="cpu").manual_seed(layer_seed(seed, layer_name))


def register_state(layer: nn.Module, name: str, value: Tensor) -> None:
    """Register ``value`` as the buffer ``name`` of ``layer``, on the layer's device (keeping its dtype)."""
    layer.register_buffer(name, value.to(device=layer.weight.device, dtype=value.dtype))
