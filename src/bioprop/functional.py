"""Feedback ops: the forward pass of a linear or conv layer, with the error sent down through B.

For ``y = W x + b`` the forward value, ``dL/dW`` and ``dL/db`` are exactly what autograd computes. Only the
signal sent to the input changes: ``dL/dx = dL/dy · B`` instead of ``dL/dy · W``, where the feedback weight
``B`` has the shape of ``W``. Each op computes the same products native autograd would, with ``B`` in place of
``W``, and skips ``dL/dx`` when nothing upstream needs it.

A feedback weight that itself requires grad receives the same gradient as ``W``, so that any optimizer applies
the same update to both (the literal form of Kolen-Pollack; the ``kp`` rule gets the same result without a ``B``
parameter, see :mod:`bioprop.learned`).

A ``B`` that is a function of ``W`` (the sign-concordant rules) is passed as a :class:`SignFeedback` recipe,
``B = scale · magnitude ∘ sign(W)``, instead of a built matrix: the op then builds ``sign(W) ∘ magnitude`` in the
backward from the ``W`` it saves anyway (no copy), and applies the float ``scale`` to whichever of the built
``B`` and ``δx`` has fewer entries (``δx`` for a wide linear layer, ``B`` for a convolution), so no ``B`` is held
from the forward to the backward and the scale costs the smaller of the two passes. A ``B`` of the form
``alpha · W + beta · offset`` (the backprop controls: W plus noise, W rotated towards a direction) is passed as an
:class:`AffineFeedback` and built in the backward in the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["feedback_linear", "feedback_conv", "FeedbackLinearFunction", "FeedbackConvFunction", "SignFeedback",
           "AffineFeedback", "Feedback", "built_feedback", "PositionalFunction"]


class PositionalFunction(torch.autograd.Function):
    """An autograd Function whose ``apply`` takes every argument positionally and skips the per-call signature
    binding that ``torch.autograd.Function.apply`` does for Functions with ``setup_context``.

    That binding (``inspect.signature`` + ``bind`` + ``apply_defaults``) costs about 60 µs per call on a CPU,
    more than a small layer's forward and backward together; bioprop's feedback ops are called once per
    converted layer and per forward pass, so they pass every argument, defaults included, and bind nothing.
    Under functorch transforms (``torch.func``), ``apply`` goes through torch's own path unchanged.
    """

    @classmethod
    def apply(cls, *args: Any) -> Any:  # type: ignore[override]
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*args)  # the C++ apply: no signature binding


class _Recipe:
    """A ``B`` that the op builds from W in the backward: ``op_args`` is all the op needs to know of it."""

    #: how the op builds B (see :func:`_build`), and the name of the recipe's W-shaped tensor
    mode: ClassVar[str] = ""
    operand_name: ClassVar[str] = ""

    def op_args(self) -> tuple[Tensor | None, float | Tensor, float | Tensor, float | Tensor]:
        """``(operand, alpha, beta, scale)`` for :func:`_build` and the op (``scale`` multiplies ``δx``)."""
        raise NotImplementedError

    def build(self, weight: Tensor) -> Tensor:
        """``B`` for ``weight`` as a new tensor, shape of ``weight``: what the op sends ``δx`` through."""
        operand, alpha, beta, scale = self.op_args()
        with torch.no_grad():
            feedback = _build(self.mode, weight.detach(), operand, alpha, beta, weight.dtype)
            if not _is_one(scale):
                feedback.mul_(scale)
        return feedback


@dataclass(frozen=True)
class SignFeedback(_Recipe):
    """A feedback weight built from W: ``B = scale · magnitude ∘ sign(W)``, with the signs of the W the op saves.

    Attributes:
        magnitude: a tensor of W's shape (entries may be negative: partial concordance), or None for 1.
        scale: a float or a 0-dim tensor; the op multiplies ``δx`` (or the built B, if smaller) by it.
    """

    magnitude: Tensor | None = None
    scale: float | Tensor = 1.0

    mode: ClassVar[str] = "sign"
    operand_name: ClassVar[str] = "magnitude"

    def op_args(self) -> tuple[Tensor | None, float | Tensor, float | Tensor, float | Tensor]:
        return self.magnitude, 1.0, 1.0, self.scale


@dataclass(frozen=True)
class AffineFeedback(_Recipe):
    """A feedback weight built from W: ``B = alpha · W + beta · offset``, with the W the op saves.

    Attributes:
        offset: a tensor of W's shape (e.g. a noise draw, a direction, Kolen-Pollack's ``B₀ − W₀``).
        alpha, beta: floats or 0-dim tensors.
    """

    offset: Tensor
    alpha: float | Tensor = 1.0
    beta: float | Tensor = 1.0

    mode: ClassVar[str] = "affine"
    operand_name: ClassVar[str] = "offset"

    def op_args(self) -> tuple[Tensor | None, float | Tensor, float | Tensor, float | Tensor]:
        return self.offset, self.alpha, self.beta, 1.0


#: what a feedback op takes as B: the matrix itself, or a recipe that builds it from W in the backward
Feedback = Tensor | SignFeedback | AffineFeedback


def built_feedback(feedback: Feedback | None, weight: Tensor) -> Tensor | None:
    """The matrix a feedback op's ``feedback_weight`` argument stands for: the tensor itself, or the recipe's B
    built from ``weight`` (None stays None)."""
    return feedback.build(weight) if isinstance(feedback, _Recipe) else feedback


def _is_one(scale: float | Tensor) -> bool:
    return not isinstance(scale, Tensor) and scale == 1.0


def _fold_scale(feedback: Tensor, scale: float | Tensor, grad_x_numel: int) -> tuple[Tensor, float | Tensor]:
    """Put a recipe's ``scale`` where it costs least: into the freshly built ``B`` (in place) when B has no more
    entries than ``δx`` (convolutions, small batches), else leave it for ``δx``. Returns ``(B, scale left)``."""
    if _is_one(scale) or feedback.numel() > grad_x_numel:
        return feedback, scale
    return feedback.mul_(scale), 1.0


def _build(mode: str, source: Tensor, operand: Tensor | None, alpha: float | Tensor, beta: float | Tensor,
           dtype: torch.dtype) -> Tensor:
    """A recipe's ``B`` from W (``source``) in W's dtype, then cast to ``dtype`` (as autocast casts a built B).

    ``mode`` "sign": ``sign(W) ∘ operand`` (operand None: 1); "affine": ``alpha · W + beta · operand``.
    """
    if mode == "sign":
        feedback = torch.sign(source)
        if operand is not None:
            feedback.mul_(operand)
    else:
        base = source if _is_one(alpha) else source * alpha
        feedback = torch.addcmul(base, operand, beta) if isinstance(beta, Tensor) else \
            torch.add(base, operand, alpha=beta)
    return feedback if feedback.dtype == dtype else feedback.to(dtype)


class FeedbackLinearFunction(PositionalFunction):
    """``y = x Wᵀ + b`` whose backward sends ``grad_y · B`` to ``x``. Use :func:`feedback_linear`.

    ``B`` is ``feedback_weight`` when ``mode`` is ""; else it is built in the backward by :func:`_build` from
    ``source`` (W before any autocast cast, None for ``weight`` itself) and ``operand``, ``alpha``, ``beta``, and
    ``δx`` is multiplied by ``scale``.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, feedback_weight: Tensor | None, mode: str,
                operand: Tensor | None, alpha: float | Tensor, beta: float | Tensor, scale: float | Tensor,
                source: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, bias, feedback_weight, mode, operand, alpha, beta, scale, source = inputs
        need_x = ctx.needs_input_grad[0]
        ctx.mode = mode
        if mode:  # B is built in the backward from W (no copy: W is alive anyway) and the operand
            feedback_weight = (weight if source is None else source) if need_x else None
            operand = operand if need_x else None
        # Only what the backward reads is saved: x for dW, B (or what builds it) for dx.
        ctx.save_for_backward(x if ctx.needs_input_grad[1] or ctx.needs_input_grad[3] else None,
                              feedback_weight if need_x else None, operand if mode else None)
        ctx.recipe = (alpha, beta, scale) if mode else (1.0, 1.0, 1.0)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, feedback_weight, operand = ctx.saved_tensors
        alpha, beta, scale = ctx.recipe
        grad_x = grad_weight = grad_bias = grad_feedback = None
        out_features = grad_output.shape[-1]
        grad_2d = grad_output.reshape(-1, out_features)  # (N, out), N = all leading dims
        if ctx.needs_input_grad[0]:
            if ctx.mode:
                feedback_weight = _build(ctx.mode, feedback_weight, operand, alpha, beta, grad_output.dtype)
                feedback_weight, scale = _fold_scale(feedback_weight, scale,
                                                     grad_2d.shape[0] * feedback_weight.shape[-1])
            grad_x = grad_output.matmul(feedback_weight)  # (..., out) @ (out, in) -> (..., in)
            del feedback_weight  # a built B lives only for this product
            if not _is_one(scale):
                grad_x.mul_(scale)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            grad_weight = grad_2d.t().mm(x.reshape(-1, x.shape[-1]))  # (out, N) @ (N, in) -> (out, in)
            if ctx.needs_input_grad[3]:
                grad_feedback = grad_weight
            if not ctx.needs_input_grad[1]:
                grad_weight = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_weight, grad_bias, grad_feedback, None, None, None, None, None, None


class FeedbackConvFunction(PositionalFunction):
    """N-d convolution whose backward uses B as the weight of the input gradient. Use :func:`feedback_conv`.

    ``B`` is ``feedback_weight``, or built in the backward as in :class:`FeedbackLinearFunction` when ``mode``
    is not "".
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, feedback_weight: Tensor | None,
                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int, mode: str,
                operand: Tensor | None, alpha: float | Tensor, beta: float | Tensor, scale: float | Tensor,
                source: Tensor | None) -> Tensor:
        return torch.convolution(x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        (x, weight, bias, feedback_weight, stride, padding, dilation, groups, mode, operand, alpha, beta, scale,
         source) = inputs
        ctx.mode = mode
        if mode:  # the fused backward needs a weight of W's shape even when dx is not wanted: W itself
            feedback_weight = weight if source is None else source
        ctx.save_for_backward(x, feedback_weight, operand if mode and ctx.needs_input_grad[0] else None)
        ctx.recipe = (alpha, beta, scale) if mode else (1.0, 1.0, 1.0)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.bias_shape = None if bias is None else list(bias.shape)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, feedback_weight, operand = ctx.saved_tensors
        alpha, beta, scale = ctx.recipe
        stride, padding, dilation, groups = ctx.conv_args
        need_x, need_w, need_b, need_fb = ctx.needs_input_grad[:4]
        need_b = need_b and ctx.bias_shape is not None
        if ctx.mode:
            feedback_weight = _build(ctx.mode, feedback_weight, operand, alpha, beta, grad_output.dtype) \
                if need_x else feedback_weight.to(grad_output.dtype)  # only its shape is read then
            if need_x:
                feedback_weight, scale = _fold_scale(feedback_weight, scale, x.numel())
        # One fused call, exactly as native autograd makes it, with B as the weight argument: the input
        # gradient is computed with B, the weight gradient reads only x and grad_output.
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_output, x, feedback_weight, ctx.bias_shape, stride, padding, dilation,
            False, [0] * len(stride), groups, [need_x, need_w or need_fb, need_b])
        del feedback_weight
        if need_x and not _is_one(scale):
            grad_x.mul_(scale)
        grad_feedback = grad_weight if need_fb else None
        return (grad_x, grad_weight if need_w else None, grad_bias if need_b else None, grad_feedback,
                None, None, None, None, None, None, None, None, None, None)


def feedback_linear(x: Tensor, weight: Tensor, bias: Tensor | None, feedback_weight: Feedback) -> Tensor:
    """Linear map ``y = x Wᵀ + b`` that sends errors down through ``feedback_weight``.

    Args:
        x: input, ``(*, in_features)``.
        weight: forward weight W, ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None.
        feedback_weight: B, same shape as ``weight``, or a :class:`SignFeedback` or :class:`AffineFeedback` that
            the backward builds B from. ``dL/dx = dL/dy · B``.

    Returns:
        ``(*, out_features)``.

    Under autocast the operands are cast to the autocast dtype first, as autocast does for ``F.linear``, so the
    backward runs in one dtype and each gradient is cast back to its leaf's dtype by autograd. A recipe builds B
    from the uncast W.
    """
    _check_shape(weight, feedback_weight)
    weight_in = weight
    x, weight, bias, feedback, device_type = _autocast_operands(x, weight, bias, feedback_weight)
    args = _feedback_args(feedback, weight_in, weight)
    if device_type is None:
        return FeedbackLinearFunction.apply(x, weight, bias, *args)
    with torch.autocast(device_type, enabled=False):
        return FeedbackLinearFunction.apply(x, weight, bias, *args)


def feedback_conv(x: Tensor, weight: Tensor, bias: Tensor | None, feedback_weight: Feedback,
                  stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                  groups: int = 1) -> Tensor:
    """1-, 2- or 3-d convolution (zero padding) that sends errors down through ``feedback_weight``.

    Args:
        x: input, ``(B, C_in, *spatial)``, or unbatched ``(C_in, *spatial)`` as ``F.conv{1,2,3}d`` accept it.
        weight: W, ``(C_out, C_in / groups, *kernel)``.
        bias: ``(C_out,)`` or None.
        feedback_weight: B, same shape as ``weight``, or a recipe (:class:`SignFeedback`, :class:`AffineFeedback`)
            that the backward builds B from.
        stride, padding, dilation: one int per spatial dimension.
        groups: number of blocked connections, as in ``torch.nn.Conv2d``.

    Returns:
        ``(B, C_out, *spatial_out)`` (``(C_out, *spatial_out)`` for an unbatched input), identical to
        ``torch.nn.functional.conv{1,2,3}d``.
    """
    _check_shape(weight, feedback_weight)
    if x.dim() == weight.dim() - 1:  # unbatched: torch.convolution needs the batch dim that F.conv*d adds
        return feedback_conv(x.unsqueeze(0), weight, bias, feedback_weight, stride, padding, dilation,
                             groups).squeeze(0)
    conv_args = (list(stride), list(padding), list(dilation), int(groups))
    weight_in = weight
    x, weight, bias, feedback, device_type = _autocast_operands(x, weight, bias, feedback_weight)
    b, *recipe = _feedback_args(feedback, weight_in, weight)
    if device_type is None:
        return FeedbackConvFunction.apply(x, weight, bias, b, *conv_args, *recipe)
    with torch.autocast(device_type, enabled=False):
        return FeedbackConvFunction.apply(x, weight, bias, b, *conv_args, *recipe)


def _check_shape(weight: Tensor, feedback: Feedback) -> None:
    if isinstance(feedback, Tensor):
        tensor, what = feedback, "feedback_weight"
    else:
        tensor, what = feedback.op_args()[0], f"{type(feedback).__name__}.{feedback.operand_name}"
    if tensor is not None and tensor.shape != weight.shape:
        raise ValueError(f"{what} must have the weight's shape {tuple(weight.shape)}, got {tuple(tensor.shape)}")


def _feedback_args(feedback: Feedback, weight_in: Tensor, weight: Tensor) -> tuple[Any, ...]:
    """``(B, mode, operand, alpha, beta, scale, source)`` for the Functions: a built B (mode ""), or None and the
    recipe that builds it."""
    if isinstance(feedback, Tensor):
        return feedback, "", None, 1.0, 1.0, 1.0, None
    # Under autocast W was cast: B is built from the uncast W (detached: it is not an input of dx).
    source = None if weight is weight_in else weight_in.detach()
    return (None, feedback.mode, *feedback.op_args(), source)


def _autocast_operands(x: Tensor, weight: Tensor, bias: Tensor | None, feedback_weight: Feedback
                       ) -> tuple[Tensor, Tensor, Tensor | None, Feedback, str | None]:
    """Cast the operands to the autocast dtype when autocast is on for ``x``'s device; else return them. A recipe
    is left as it is (its B is built in W's dtype and cast in the backward)."""
    device_type = x.device.type
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):  # autocast has no meta device
        return x, weight, bias, feedback_weight, None
    dtype = torch.get_autocast_dtype(device_type)
    cast = [t if t is None or not t.is_floating_point() else t.to(dtype) for t in (x, weight, bias)]
    feedback = feedback_weight.to(dtype) if isinstance(feedback_weight, Tensor) and \
        feedback_weight.is_floating_point() else feedback_weight
    return cast[0], cast[1], cast[2], feedback, device_type
