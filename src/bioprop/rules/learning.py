"""Learned feedback (akrout2019): ``kp`` (Kolen-Pollack) and ``wm`` (weight mirrors)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..mirror import mirror_layer
from .base import LayerRule, register_rule
from .scales import check_scale, draw_feedback, register_state

__all__ = ["KolenPollack", "WeightMirror"]


@register_rule("kp", aliases=("kolen_pollack",),
               description="Kolen-Pollack (akrout2019): a learned B that receives W's gradient and weight decay")
@dataclass
class KolenPollack(LayerRule):
    """Kolen-Pollack (akrout2019): a learned ``B`` (parameter ``feedback_weight``) that receives exactly ``W``'s
    gradient, so any optimizer gives it ``W``'s update and weight decay makes ``W − B`` decay to 0.

    ``B`` is a new parameter. An optimizer built after conversion holds it in ``W``'s param group (same lr and
    weight decay); one built before conversion gets it added to ``W``'s group at its next step
    (:mod:`bioprop.learned`), which gives the same run.

    Args:
        scale: scale convention of the initial random ``B``.
    """

    scale: str | float = "xiao2018"
    learns_feedback: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_scale(self.scale)

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        b0 = draw_feedback(layer.weight.detach(), self.scale, generator)
        layer.register_parameter("feedback_weight", nn.Parameter(b0.to(layer.weight.device)))

    def feedback_weight(self, layer: nn.Module) -> Tensor | None:
        return layer.feedback_weight


@register_rule("wm", aliases=("weight_mirror",),
               description="weight mirrors (akrout2019): B learned from noise after every optimizer step")
@dataclass
class WeightMirror(LayerRule):
    """Weight mirrors (akrout2019): ``B`` (buffer ``feedback_weight``) is learned from noise between batches.

    After every optimizer step (:meth:`after_step`, run by :func:`bioprop.after_step`) a mirror step sends
    zero-mean noise ``x`` through the layer alone and applies ``B ← (1 − decay)·B + lr · y xᵀ / n`` with
    ``y = W x`` (:func:`bioprop.mirror.mirror_layer`); since ``E[y xᵀ] = σ² W``, B turns towards W.

    Args:
        scale: scale convention of the initial random ``B``.
        lr: mirror learning rate.
        decay: weight decay of ``B`` per mirror step.
        noise_std: std σ of the noise input.
    """

    scale: str | float = "xiao2018"
    lr: float = 0.05
    decay: float = 1e-3
    noise_std: float = 1.0

    #: noise samples per mirror step in :meth:`after_step`
    mirror_batch: ClassVar[int] = 64

    def __post_init__(self) -> None:
        check_scale(self.scale)
        for key in ("lr", "decay", "noise_std"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"wm option {key} must be a non-negative number, got {value!r}")

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        register_state(layer, "feedback_weight", draw_feedback(layer.weight.detach(), self.scale, generator))
        register_state(layer, "feedback_mirror_steps", torch.tensor(0, dtype=torch.int64))

    def feedback_weight(self, layer: nn.Module) -> Tensor | None:
        return layer.feedback_weight

    def mirror(self, layer: nn.Module, name: str, *, batch_size: int, step: int | None, seed: int) -> None:
        """One mirror step of ``layer`` (named ``name``); the noise is fixed by ``seed``, ``name`` and the step
        index (``step``, or the layer's own counter, buffer ``feedback_mirror_steps``, when None)."""
        count = int(layer.feedback_mirror_steps) if step is None else int(step)
        mirror_layer(layer, layer.feedback_weight, lr=self.lr, decay=self.decay, noise_std=self.noise_std,
                     batch_size=batch_size, seed=seed, name=name, count=count)
        layer.feedback_mirror_steps.fill_(count + 1)

    def after_step(self, module: nn.Module, step: int | None) -> None:
        """One mirror step, seeded by the layer's conversion seed and name."""
        seed, name = module.__dict__.get("_feedback_origin", (0, ""))
        self.mirror(module, name, batch_size=self.mirror_batch, step=step, seed=seed)
