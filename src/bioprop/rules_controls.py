r"""Backprop controls of moskovitz2018: feedback that is W itself, spoiled in a controlled way.

Two per-layer rules, registered like every other (``bioprop.convert(model, "bp_noise")``):

- ``bp_noise`` ("BP + Noise"): :math:`B_t = W_t + \xi_t`, fresh Gaussian noise for every weight update.
- ``bp_alignment`` ("BP + Alignment"): :math:`B_t` of ``W_t``'s norm held at a fixed angle θ to ``W_t``.

moskovitz2018's own definitions of these controls were not available to us (a search of papers, code and
re-implementations found none), so these are the readings bioprop implements; ``docs/rules.md`` gives the
reasoning. Both are exactly ``sham`` at zero noise or zero angle: the same ``W``, through the same feedback op.

The state of both lives in the layer's ``feedback_*`` buffers, like every other rule's: saved in ``state_dict``,
moved by ``.to()``, identical on every DDP rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .functional import AffineFeedback, Feedback
from .rules import LayerRule, RedrawnPerUpdate, register_rule, register_state

__all__ = ["BackpropNoise", "BackpropAlignment", "UNIT_FEEDBACK_ANGLE"]

#: arccos(sqrt(2/π)) in degrees, about 37.0°: the angle between a Gaussian W and sign(W), i.e. the angle
#: uniform sign-concordant feedback (usf) makes with W at a Gaussian initialisation.
UNIT_FEEDBACK_ANGLE = math.degrees(math.acos(math.sqrt(2.0 / math.pi)))


def _check_number(rule: str, key: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        bound = "a non-negative number" if high == math.inf else f"a number in [{low:g}, {high:g}]"
        raise ValueError(f"{rule} option {key} must be {bound}, got {value!r}")


@register_rule("bp_noise", description="moskovitz2018 BP + Noise: B_t = W_t + fresh Gaussian noise every update")
@dataclass
class BackpropNoise(RedrawnPerUpdate):
    r"""Backprop through a noisy copy of W (moskovitz2018 "BP + Noise"): :math:`B_t = W_t + \xi_t`.

    :math:`\xi_t` has i.i.d. entries :math:`N(0, (\text{noise}\cdot\sigma_W)^2)`, where :math:`\sigma_W` is the
    standard deviation of the entries of ``W_t`` (population std, over the whole tensor), taken when the draw
    is made. The noise is redrawn once per weight update by brsf's mechanism
    (:class:`~bioprop.rules.RedrawnPerUpdate`): at the first forward pass with gradients on after ``W`` changed
    in place; gradient-accumulation passes share one draw, evaluation never draws, and draw ``k`` is a pure function of the layer seed and ``k`` (buffers
    ``feedback_seed``, ``feedback_draws``, ``feedback_used``; the scaled noise itself is ``feedback_noise``).

    For zero-mean W the angle between B and W is about ``atan(noise)``. The default ``noise=0.75`` gives
    about 36.9°, close to the 37.0° that ``usf``'s ``sign(W)`` makes with a Gaussian W, so the control carries
    as much misalignment as sign-concordant feedback at initialisation, but with no structure. ``noise=0``
    is exactly ``sham``.

    Cost: one Gaussian draw and one std per update; one elementwise add ``W + ξ`` per step, in the backward
    (only the B of the layer whose backward runs exists at a time).

    Args:
        noise: the noise std relative to W's own std (>= 0).
    """

    noise: float = 0.75

    def __post_init__(self) -> None:
        _check_number("bp_noise", "noise", self.noise, 0.0, math.inf)

    def is_exact(self) -> bool:
        return self.noise == 0  # B is W itself

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        register_state(layer, "feedback_noise", torch.zeros_like(layer.weight.detach()))
        self._init_draws(layer, generator)

    def _draw(self, layer: nn.Module, generator: torch.Generator) -> None:
        noise = layer.feedback_noise
        if self.noise == 0:
            noise.zero_()
            return
        std = self.noise * float(layer.weight.detach().float().std(correction=0)) if layer.weight.numel() else 0.0
        if std > 0:
            noise.normal_(0.0, std, generator=generator)
        else:  # a zero (or constant) W has no spread to scale the noise by
            noise.zero_()

    def feedback(self, layer: nn.Module) -> Feedback | None:
        if self.noise == 0:
            return layer.weight.detach()  # sham: the same tensor
        return AffineFeedback(layer.feedback_noise)  # W + ξ, built in the op's backward


@register_rule("bp_alignment", description="moskovitz2018 BP + Alignment: B of W's norm at a fixed angle to W")
@dataclass
class BackpropAlignment(LayerRule):
    r"""Feedback held at a fixed angle θ to W (moskovitz2018 "BP + Alignment").

    .. math:: B_t = \|W_t\|\,(\cos\theta\,\hat W_t + \sin\theta\,\hat U_t), \qquad
              \hat W_t = W_t/\|W_t\|, \quad \hat U_t = V_t/\|V_t\|, \quad V_t = U - (U\cdot\hat W_t)\,\hat W_t

    (Frobenius norms and inner products over the whole tensor). ``U`` is a random unit direction drawn once
    (buffer ``feedback_direction``); it is made orthogonal to the current W at every step, so B keeps W's
    norm and makes exactly the angle θ with it as W moves. θ = 0 is exactly ``sham``; θ = 90° sends the error
    through a direction orthogonal to W (FA-like: no alignment with W at all). The default, 37.0°
    (:data:`UNIT_FEEDBACK_ANGLE`), is the angle ``usf``'s ``sign(W)`` makes with a Gaussian W, so that the
    control has usf's angle without its sign information. If U happens to be parallel to W (a one-entry
    weight), no orthogonal direction exists and B is ``cos θ · W``.

    Computed as :math:`B = \alpha W + \beta U` with two scalars from :math:`W\cdot W` and :math:`U\cdot W`:
    per forward pass two dot products; B itself is built in the op's backward (two elementwise kernels over W).

    Args:
        angle: θ in degrees, in [0, 180].
    """

    angle: float = round(UNIT_FEEDBACK_ANGLE, 1)

    def __post_init__(self) -> None:
        _check_number("bp_alignment", "angle", self.angle, 0.0, 180.0)

    def is_exact(self) -> bool:
        return self.angle == 0  # B is W itself

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        weight = layer.weight.detach()
        direction = torch.randn(weight.shape, generator=generator, dtype=torch.float64, device=generator.device)
        direction /= direction.norm().clamp_min(1e-300)
        register_state(layer, "feedback_direction", direction.to(weight.dtype))

    def feedback(self, layer: nn.Module) -> Feedback | None:
        weight = layer.weight.detach()
        if self.angle == 0:
            return weight  # sham: the same tensor
        theta = math.radians(self.angle)
        acc = torch.promote_types(weight.dtype, torch.float32)  # reductions in float32 at least
        w, u = weight.reshape(-1).to(acc), layer.feedback_direction.reshape(-1).to(acc)
        with torch.no_grad():
            ww = torch.dot(w, w)  # (): ‖W‖²
            uw = torch.dot(u, w)  # (): U·W
            tiny = torch.finfo(acc).tiny
            ww_safe = ww.clamp_min(tiny)
            vv = (1.0 - uw * uw / ww_safe).clamp_min(0.0)  # ‖V‖², with ‖U‖ = 1
            # β = ‖W‖ sin θ / ‖V‖ and α = cos θ − β (U·W)/‖W‖²; without an orthogonal direction (‖V‖ ≈ 0), β = 0
            beta = torch.where(vv > 1e-12, math.sin(theta) * (ww / vv.clamp_min(tiny)).sqrt(),
                               torch.zeros_like(vv))
            alpha = math.cos(theta) - beta * uw / ww_safe
        # α W + β U, built in the op's backward
        return AffineFeedback(layer.feedback_direction, alpha.to(weight.dtype), beta.to(weight.dtype))
