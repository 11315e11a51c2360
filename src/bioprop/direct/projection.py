r"""The output projections: autograd Functions that hand the output error straight to the hidden blocks.

Both Functions are the identity on the model output :math:`\hat y` and also take the marked block outputs
:math:`h_1 \dots h_L` (still attached to their blocks' graphs) as inputs. Their backward receives
:math:`e = \partial L/\partial \hat y` from whatever loss the user computed, passes it on unchanged to the output
layer, and returns a signal for every :math:`h_l`; autograd then runs each block's own backward. The blocks are
cut from each other by the markers, so no gradient runs through the chain of blocks.

DFA (:class:`DirectProjection`): :math:`\delta h_l = e\,D_l` for every block, computed as one matmul
:math:`e\,[D_1 \dots D_L]` and sliced.

IFA (:class:`IndirectProjection`): :math:`\delta h_1 = e\,D_1`; for :math:`l \ge 2`,
:math:`\delta h_l = F_l(\delta a_{l-1})`, where :math:`\delta a_{l-1}` is the error at the output of block
:math:`l-1`'s first layer (what autograd gives inside block :math:`l-1` for :math:`\delta h_{l-1}`) and
:math:`F_l` is block :math:`l`'s first layer without its bias (the signal travels forward through the forward
weights). For a tanh MLP this is nokland2016's :math:`\delta a_l = (W_l\,\delta a_{l-1}) \odot f'(a_l)`.

DenseFA (:class:`DenseProjection`): from the top block down,
:math:`\delta h_l = [e, \delta a_L, \dots, \delta a_{l+1}]\,D_l`, one matmul per block, with the same
:math:`\delta a_k` as IFA reads (the error at block :math:`k`'s first-layer output).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ..functional import PositionalFunction
from .marker import DirectFeedback

__all__ = ["DirectProjection", "IndirectProjection", "DenseProjection", "Plan"]


@dataclass
class Plan:
    """What one forward pass recorded, for the backward.

    Attributes:
        markers: the markers in the order they ran, one per hidden input.
        sizes: units per position of each marked tensor (its size after the batch dims).
        pre_activations: ifa only: ``pre_activations[l]`` is the output of block ``l``'s first layer (attached).
        relays: ifa only: ``relays[l]`` (``l >= 1``) is block ``l``'s first layer without bias; it maps the error
            at ``pre_activations[l - 1]`` to the signal for block ``l``.
        feedback: dense_fa only: ``feedback[l]`` is block ``l``'s stacked ``D_l``,
            ``(n_out + Σ_{k>l} n_a_k, n_units_l)``.
    """

    markers: list[DirectFeedback]
    sizes: list[int]
    pre_activations: list[Tensor] | None = None
    relays: list[Callable[[Tensor], Tensor] | None] | None = None
    feedback: list[Tensor] | None = None


def _errors(grad_output: Tensor, feedback: Tensor) -> Tensor:
    return grad_output.reshape(-1, feedback.shape[0])  # (N, n_out), N = product of the batch dims


class _OutputProjection(PositionalFunction):
    """Identity on the model output whose inputs also include the marked block outputs ``h_l``, so that its
    backward, which receives ``e = dL/dŷ``, can hand each block its direct signal. Subclasses define the signal."""

    @staticmethod
    def forward(output: Tensor, feedback: Tensor, plan: Plan, *hidden: Tensor) -> Tensor:
        return output

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        _, feedback, plan, *hidden = inputs
        ctx.save_for_backward(feedback)
        ctx.plan = plan
        ctx.shapes = [h.shape for h in hidden]


class DirectProjection(_OutputProjection):
    """Identity on the output; backward sends ``e · D_l`` to every marked tensor ``h_l`` (one matmul)."""

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        (feedback,) = ctx.saved_tensors  # (n_out, Σ n_units)
        errors = _errors(grad_output, feedback)
        projected = errors.mm(feedback.to(errors.dtype))  # (N, Σ n_units): every block's signal at once
        grads: list[Tensor | None] = []
        offset = 0
        for index, (marker, shape, size) in enumerate(zip(ctx.plan.markers, ctx.shapes, ctx.plan.sizes)):
            if ctx.needs_input_grad[3 + index]:
                # a column slice viewed as h's shape: the rows stay contiguous, so no copy is made
                signal = projected[:, offset:offset + size].view(shape)
                marker.store_signal(signal)
                grads.append(signal)
            else:
                grads.append(None)
            offset += size
        return (grad_output, None, None, *grads)


class IndirectProjection(_OutputProjection):
    """Identity on the output; backward sends ``e · D_1`` to the first block and relays the error forward."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        _OutputProjection.setup_context(ctx, inputs, output)
        hidden = inputs[3:]
        # The attached block outputs are needed to run each block's backward as far as its first layer. They are
        # inputs of this node, so keeping them here creates no reference cycle.
        ctx.hidden = hidden

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        (feedback,) = ctx.saved_tensors  # (n_out, n_units of block 1)
        plan: Plan = ctx.plan
        hidden: tuple[Tensor, ...] = ctx.hidden
        assert plan.pre_activations is not None and plan.relays is not None
        errors = _errors(grad_output, feedback)
        signal = errors.mm(feedback.to(errors.dtype)).view(hidden[0].shape)
        grads = [signal]
        plan.markers[0].store_signal(signal)
        for index in range(1, len(hidden)):
            delta = _block_error(plan, hidden, index - 1, grads[-1])
            signal = plan.relays[index](delta).reshape(hidden[index].shape)  # type: ignore[misc]
            plan.markers[index].store_signal(signal)
            grads.append(signal)
        return (grad_output, None, None, *grads)


class DenseProjection(IndirectProjection):
    """Identity on the output; backward sends ``[e, δa_L, …, δa_{l+1}] · D_l`` to every block, top block first.

    It keeps the attached block outputs as :class:`IndirectProjection` does (to read each ``δa_k``).
    """

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        plan: Plan = ctx.plan
        hidden: tuple[Tensor, ...] = ctx.hidden
        assert plan.pre_activations is not None and plan.feedback is not None
        sources = _errors(grad_output, plan.feedback[-1])  # (N, n_out): e; then δa of each block, top first
        grads: list[Tensor | None] = [None] * len(hidden)
        for index in reversed(range(len(hidden))):
            feedback = plan.feedback[index]  # (n_out + Σ_{k>index} n_a_k, n_units)
            signal = sources.mm(feedback.to(sources.dtype)).view(hidden[index].shape)
            plan.markers[index].store_signal(signal)
            grads[index] = signal
            if index > 0:
                delta = _block_error(plan, hidden, index, signal)  # (N, ...) at block index's first layer
                sources = torch.cat([sources, delta.reshape(sources.shape[0], -1).to(sources.dtype)], dim=1)
        return (grad_output, None, None, *grads)


def _block_error(plan: Plan, hidden: tuple[Tensor, ...], index: int, signal: Tensor) -> Tensor:
    """δa of block ``index``: its signal taken back through the block's own ops to its first layer's output (a
    local backward touching no parameter; autograd repeats these cheap steps when it runs the whole block)."""
    try:
        (delta,) = torch.autograd.grad(hidden[index], plan.pre_activations[index], signal,  # type: ignore[index]
                                       retain_graph=True, create_graph=torch.is_grad_enabled())
    except RuntimeError as error:
        raise RuntimeError(f"the output of the block marked by {plan.markers[index].feedback_name!r} does not "
                           "depend on the output of the layer named as its entry; check DirectFeedback(entry=...) "
                           f"({error})") from error
    return delta

