"""Learned feedback (akrout2019): ``kp`` (Kolen-Pollack) and ``wm`` (weight mirrors)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..functional import AffineFeedback, Feedback
from ..learned import shared_update_decay
from ..mirror import mirror_layer
from .base import LayerRule, register_rule
from .scales import check_scale, draw_feedback, register_state

__all__ = ["KolenPollack", "WeightMirror"]


@register_rule("kp", aliases=("kolen_pollack",),
               description="Kolen-Pollack (akrout2019): B receives W's update and weight decay")
@dataclass
class KolenPollack(LayerRule):
    """Kolen-Pollack (akrout2019): ``B`` receives exactly ``W``'s update, weight decay included, so ``W − B``
    decays to 0.

    Since ``B`` and ``W`` get the same gradient and the same optimizer settings, their difference after any number
    of steps is a multiple of the first one: ``B_t = W_t + c_t·(B₀ − W₀)``, where the scalar ``c_t`` (1 at first)
    moves only through the weight decay (:func:`bioprop.learned.shared_update_decay`: exact for SGD and Batch
    Manhattan with any momentum and weight decay, for AdamW, and for the adaptive optimizers without weight decay;
    any other optimizer is refused at its first step). So the layer keeps ``B₀ − W₀`` (buffer
    ``feedback_offset``) and ``c_t`` with its momentum multiple (buffer ``feedback_offset_state``: ``[c, k]``,
    float64 values kept as int64 bits); the op builds ``B`` in the backward from the current ``W``, and no
    gradient, optimizer state or update of ``B`` exists. The optimizer may be built before or after conversion:
    after each of its steps, :meth:`after_optimizer_step` advances ``c`` with that step's lr, momentum and decay.

    ``B`` is tied to ``W``: a change of ``W`` outside the optimizer (a weight constraint, re-initialising or
    loading ``W`` alone) moves ``B`` with it. Call :func:`bioprop.reset_feedback` after changing ``W`` by hand (it
    draws ``B₀`` anew against the current ``W``); ``bioprop train`` refuses weight constraints with this rule.

    Args:
        scale: scale convention of the initial random ``B₀``.
    """

    scale: str | float = "xiao2018"
    learns_feedback: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_scale(self.scale)

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        weight = layer.weight.detach()
        b0 = draw_feedback(weight, self.scale, generator).to(weight.device)
        register_state(layer, "feedback_offset", b0.sub_(weight))
        register_state(layer, "feedback_offset_state", _as_bits(1.0, 0.0))
        layer.__dict__["_kp_offset_state"] = (1.0, 0.0)

    def after_load(self, layer: nn.Module) -> None:
        state = layer.feedback_offset_state
        if not state.is_meta:
            c, k = state.detach().cpu().view(torch.float64).tolist()
            layer.__dict__["_kp_offset_state"] = (c, k)

    def after_optimizer_step(self, layer: nn.Module, optimizer: torch.optim.Optimizer, group: dict,
                             first: bool) -> None:
        """Advance ``c`` (and ``k``) by the step ``optimizer`` has just taken in ``group``."""
        c, k = shared_update_decay(optimizer, group, *layer.__dict__.get("_kp_offset_state", (1.0, 0.0)), first)
        layer.__dict__["_kp_offset_state"] = (c, k)
        layer.feedback_offset_state.copy_(_as_bits(c, k))  # saved state and the op's c stay in step with it

    def feedback(self, layer: nn.Module) -> Feedback | None:
        # c as a 0-dim view of the state buffer, not a Python float: torch.compile then reads it as a tensor
        # instead of recompiling for every new value
        return AffineFeedback(layer.feedback_offset, 1.0, layer.feedback_offset_state.view(torch.float64)[0])


def _as_bits(c: float, k: float) -> Tensor:
    """``[c, k]`` as float64 values stored in an int64 tensor: ``.half()``, ``.to(bfloat16)`` and friends cast
    floating-point buffers, which would round ``c``; integer buffers keep their bits (and every device has int64)."""
    return torch.tensor([c, k], dtype=torch.float64).view(torch.int64)


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
