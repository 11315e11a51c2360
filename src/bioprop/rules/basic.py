"""The exact rules and fixed random feedback: ``backprop``, ``sham`` and ``fa``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .base import LayerRule, register_rule
from .scales import check_scale, draw_feedback, register_state

__all__ = ["Backprop", "Sham", "FeedbackAlignment"]


@register_rule("backprop", description="exact backprop through the native op (B = W)")
@dataclass
class Backprop(LayerRule):
    """Exact backprop, ``B = W`` through the native op. ``convert(model, "backprop")`` restores plain layers."""

    exact: ClassVar[bool] = True
    native: ClassVar[bool] = True

    def feedback_weight(self, layer: nn.Module) -> Tensor | None:
        return None


@register_rule("sham", description="B = W through the feedback op: the oracle that tests the feedback path")
@dataclass
class Sham(LayerRule):
    """``B = W`` sent through the feedback op: the oracle that tests the feedback path against autograd."""

    exact: ClassVar[bool] = True

    def feedback_weight(self, layer: nn.Module) -> Tensor | None:
        # Detached: B = W must not route a second gradient into W. The version counter is shared, so an
        # in-place change of W between forward and backward is still caught by autograd.
        return layer.weight.detach()


@register_rule("fa", description="feedback alignment (lillicrap2016): a fixed random B drawn once")
@dataclass
class FeedbackAlignment(LayerRule):
    """Feedback alignment (lillicrap2016): a fixed random ``B`` drawn once, kept in the buffer ``feedback_weight``.

    Args:
        scale: scale convention of the draw (:mod:`bioprop.rules.scales`).
        zero_init: nokland2016's start for tanh/logistic nets: ``B`` is a copy of the layer's initial (random)
            ``W``, then ``W`` and the bias are set to zero (``scale`` is then unused). FA leaves a zero start
            because its feedback is random; with ReLU units, whose derivative at 0 is 0, nothing would learn.
    """

    scale: str | float = "xiao2018"
    zero_init: bool = False

    def __post_init__(self) -> None:
        check_scale(self.scale)
        if not isinstance(self.zero_init, bool):
            raise ValueError(f"zero_init must be True or False, got {self.zero_init!r}")

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        if not self.zero_init:
            register_state(layer, "feedback_weight", draw_feedback(layer.weight.detach(), self.scale, generator))
            return
        initial = layer.weight.detach().clone()
        if not initial.any():
            raise ValueError("fa zero_init copies the layer's initial W into B, but W is all zero (was the model "
                             "built zero-initialised already?)")
        register_state(layer, "feedback_weight", initial)
        with torch.no_grad():
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()

    def feedback_weight(self, layer: nn.Module) -> Tensor | None:
        return layer.feedback_weight
