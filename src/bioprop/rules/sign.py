"""Sign-concordant feedback (liao2016, xiao2018, moskovitz2018): ``usf``, ``brsf``, ``frsf``, ``partial_concordance``.

Every rule here sends the error through ``B = magnitude ∘ sign(W)``, with the signs of the current ``W``; they
differ in the magnitudes. The once-per-update redraw of brsf (:class:`RedrawnPerUpdate`) is shared with the
backprop controls (:mod:`bioprop.rules_controls`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..functional import Feedback, SignFeedback
from ..redraw import rebase_redraw_state, redraw_due, sync_redraw_state
from ..seeding import derive_seed
from .base import LayerRule, register_rule
from .scales import NORM_MODES, check_norm, check_scale, draw_feedback, draw_magnitude_8bit, feedback_scale, \
    register_state

__all__ = ["RedrawnPerUpdate", "UniformSignConcordant", "BatchRandomSignConcordant", "FixedRandomSignConcordant",
           "PartialSignConcordant"]


class RedrawnPerUpdate(LayerRule):
    """Random state drawn anew for every weight update: the redraw life cycle, shared by every such rule.

    A redraw happens at the first forward pass (with gradients on) after W has changed in place
    (:func:`bioprop.redraw.redraw_due`); the draw made at conversion serves the first forward pass. Draw ``k``
    of a layer is a pure function of the layer seed and ``k`` (buffers ``feedback_seed``, ``feedback_draws``),
    and whether the next forward pass draws is saved too (buffer ``feedback_used``). A subclass fills its own
    state from a generator in :meth:`_draw`.
    """

    def _draw(self, layer: nn.Module, generator: torch.Generator) -> None:
        """Fill the per-update random state of ``layer`` from ``generator``."""
        raise NotImplementedError

    def _init_draws(self, layer: nn.Module, generator: torch.Generator) -> None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        register_state(layer, "feedback_seed", torch.tensor(seed, dtype=torch.int64))
        register_state(layer, "feedback_draws", torch.tensor(0, dtype=torch.int64))
        register_state(layer, "feedback_used", torch.tensor(0, dtype=torch.int64))  # int: gloo has no bool
        if not layer.weight.is_meta:  # on meta there is nothing to draw into: bioprop.reset_feedback draws later
            self._redraw(layer)

    def _redraw(self, layer: nn.Module) -> None:
        draws = int(layer.feedback_draws)
        generator = torch.Generator(device=layer.weight.device)
        generator.manual_seed(derive_seed(int(layer.feedback_seed), draws))
        with torch.no_grad():
            self._draw(layer, generator)
            layer.feedback_draws.fill_(draws + 1)

    def before_forward(self, layer: nn.Module) -> None:
        if redraw_due(layer):
            self._redraw(layer)

    def after_load(self, layer: nn.Module) -> None:
        rebase_redraw_state(layer)

    def before_save(self, layer: nn.Module) -> None:
        sync_redraw_state(layer)


@dataclass
class _SignConcordant(LayerRule):
    """Shared machinery of the sign-concordant rules: ``B = c · magnitude ∘ sign(W)``.

    ``norm`` selects the moskovitz2018 norm control: None leaves B at its convention's scale; ``"init"``
    rescales B once, at conversion, so that ``‖B‖_F = ‖W_0‖_F`` (the factor is kept in the buffer
    ``feedback_norm_scale``); ``"sn"`` rescales B at every step so that ``‖B‖_F = ‖W_t‖_F``. ``usf`` also takes
    ``"fa_init"`` (a third-party reading of "Init.", see :class:`UniformSignConcordant`).
    """

    scale: str | float = "xiao2018"
    norm: str | None = None

    allowed_norms: ClassVar[tuple] = NORM_MODES[:3]

    def __post_init__(self) -> None:
        check_scale(self.scale)
        check_norm(self.norm, self.allowed_norms)

    def _magnitude(self, layer: nn.Module) -> Tensor | float:
        raise NotImplementedError

    def _unnormed(self, layer: nn.Module) -> Tensor:
        return torch.sign(layer.weight).mul_(self._magnitude(layer))

    def _recipe(self, layer: nn.Module) -> SignFeedback:
        """``B`` as ``scale · magnitude ∘ sign(W)``: a per-entry magnitude stays a matrix, a uniform one (usf's s,
        norm="init"'s factor) becomes the float (or 0-dim) scale the op applies to ``δx``."""
        magnitude = self._magnitude(layer)
        if isinstance(magnitude, Tensor):
            scale: float | Tensor = 1.0 if self.norm != "init" else layer.feedback_norm_scale
            return SignFeedback(magnitude=magnitude, scale=scale)
        if self.norm == "init":
            return SignFeedback(scale=layer.feedback_norm_scale * magnitude)
        return SignFeedback(scale=magnitude)

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        if self.norm == "init":
            with torch.no_grad():
                b0 = self._unnormed(layer)
                factor = layer.weight.norm() / b0.norm().clamp_min(torch.finfo(b0.dtype).tiny)
            register_state(layer, "feedback_norm_scale", factor.detach().reshape(()))

    def feedback_weight(self, layer: nn.Module) -> Tensor | None:
        if self.norm != "sn":
            return self._recipe(layer).build(layer.weight)
        with torch.no_grad():
            b = self._unnormed(layer)
            b.mul_(layer.weight.norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny))
        return b

    def feedback(self, layer: nn.Module) -> Feedback | None:
        # "sn" needs ‖B‖, i.e. B itself, in the forward; every other mode leaves B to the op's backward.
        return self.feedback_weight(layer) if self.norm == "sn" else self._recipe(layer)


@register_rule("usf", aliases=("sign_symmetry", "ss"),
               description="uniform sign-concordant feedback / sign symmetry (liao2016, xiao2018): B = s·sign(W)")
@dataclass
class UniformSignConcordant(_SignConcordant):
    """Uniform sign-concordant feedback / sign symmetry (liao2016, xiao2018): ``B = s · sign(W)``, from the
    current W at every step.

    ``norm="fa_init"`` is a third-party reading of moskovitz2018's "Init.": ``B_t = |B₀| ∘ sign(W_t)`` with
    ``B₀`` drawn as ``fa`` draws its B (same seed, same scale: ``|B₀|`` is the magnitude of the B that ``fa``
    would use), kept in the buffer ``feedback_magnitude``. The B is then the one ``frsf`` gives.

    Args:
        scale: the magnitude convention of s (:mod:`bioprop.rules.scales`).
        norm: None, ``"init"``, ``"sn"`` (moskovitz2018 norm control, see :class:`_SignConcordant`) or
            ``"fa_init"``.
    """

    allowed_norms: ClassVar[tuple] = NORM_MODES

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        if self.norm == "fa_init":
            magnitude = draw_feedback(layer.weight.detach(), self.scale, generator).abs_()
            register_state(layer, "feedback_magnitude", magnitude)
        super().init_state(layer, generator)

    def _magnitude(self, layer: nn.Module) -> Tensor | float:
        if self.norm == "fa_init":
            return layer.feedback_magnitude
        return feedback_scale(layer.weight, self.scale)


@register_rule("brsf", description="batchwise random-magnitude sign-concordant feedback (liao2016): "
                                   "B = |M_t|·sign(W), new |M_t| every update")
@dataclass
class BatchRandomSignConcordant(RedrawnPerUpdate, _SignConcordant):
    """Batchwise random-magnitude sign-concordant feedback (liao2016): ``B = |M_t| ∘ sign(W)``, with new
    magnitudes for every weight update.

    Each draw is quantised to 256 equiprobable levels of ``|M|``'s distribution (:func:`draw_magnitude_8bit`),
    eight levels per 64-bit random word: a redraw costs a fraction of a float draw on a CPU. The redraw follows
    :class:`RedrawnPerUpdate`: several forward/backward passes between two optimizer steps (gradient
    accumulation) share one draw, and evaluation passes never draw. Every DDP rank draws the same magnitudes,
    and a deep copy, a loaded ``state_dict`` or a resumed run continues the same sequence, also inside a
    gradient-accumulation window.
    """

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        register_state(layer, "feedback_magnitude", torch.zeros_like(layer.weight.detach()))
        self._init_draws(layer, generator)
        _SignConcordant.init_state(self, layer, generator)

    def _draw(self, layer: nn.Module, generator: torch.Generator) -> None:
        """The magnitudes ``|M_t|``."""
        draw_magnitude_8bit(layer.weight, self.scale, generator, out=layer.feedback_magnitude)

    def _magnitude(self, layer: nn.Module) -> Tensor | float:
        return layer.feedback_magnitude


@register_rule("frsf", description="fixed random-magnitude sign-concordant feedback (liao2016): B = |M_0|·sign(W)")
@dataclass
class FixedRandomSignConcordant(_SignConcordant):
    """Fixed random-magnitude sign-concordant feedback (liao2016): ``B = |M₀| ∘ sign(W)``.

    ``|M₀|`` is drawn once (buffer ``feedback_magnitude``); the signs follow the current W.
    """

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        magnitude = draw_feedback(layer.weight.detach(), self.scale, generator).abs_()
        register_state(layer, "feedback_magnitude", magnitude)
        super().init_state(layer, generator)

    def _magnitude(self, layer: nn.Module) -> Tensor | float:
        return layer.feedback_magnitude


@register_rule("partial_concordance", aliases=("psf",),
               description="partial sign concordance (liao2016): a fraction of B's signs agrees with W's")
@dataclass
class PartialSignConcordant(FixedRandomSignConcordant):
    """Partial sign concordance (liao2016): random magnitudes; a fraction ``concordance`` of the entries take
    sign(W) and the rest the opposite sign. 1.0 is frsf, 0.5 random signs, 0.0 sign-inverted.

    The magnitudes and which entries are concordant are drawn once; the signs follow W. Both are kept in the
    buffer ``feedback_magnitude``, whose entries are negative where the sign is inverted.
    """

    concordance: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.concordance, bool) or not isinstance(self.concordance, (int, float)) \
                or not 0.0 <= self.concordance <= 1.0:
            raise ValueError(f"concordance must be a fraction in [0, 1], got {self.concordance!r}")

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        magnitude = draw_feedback(layer.weight.detach(), self.scale, generator).abs_()
        flip = torch.rand(magnitude.shape, generator=generator, device=generator.device) >= self.concordance
        magnitude[flip] *= -1
        register_state(layer, "feedback_magnitude", magnitude)
        _SignConcordant.init_state(self, layer, generator)
