"""Feedback ops: the forward pass of a linear or conv layer, with the error sent down through B.

For ``y = W x + b`` the forward value, ``dL/dW`` and ``dL/db`` are exactly what autograd computes. Only the
signal sent to the input changes: ``dL/dx = dL/dy · B`` instead of ``dL/dy · W``, where the feedback weight
``B`` has the shape of ``W``. Each op computes the same products native autograd would, with ``B`` in place of
``W``, and skips ``dL/dx`` when nothing upstream needs it.

A feedback weight that itself requires grad (Kolen-Pollack) receives the same gradient as ``W``, so that any
optimizer applies the same update to both.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["feedback_linear", "feedback_conv", "FeedbackLinearFunction", "FeedbackConvFunction"]


class FeedbackLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b`` whose backward sends ``grad_y · B`` to ``x``. Use :func:`feedback_linear`."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, feedback_weight: Tensor) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, bias, feedback_weight = inputs
        # Only what the backward reads is saved: x for dW, B for dx. W itself is not needed.
        ctx.save_for_backward(x if ctx.needs_input_grad[1] or ctx.needs_input_grad[3] else None,
                              feedback_weight if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, feedback_weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = grad_feedback = None
        out_features = grad_output.shape[-1]
        grad_2d = grad_output.reshape(-1, out_features)  # (N, out), N = all leading dims
        if ctx.needs_input_grad[0]:
            grad_x = grad_output.matmul(feedback_weight)  # (..., out) @ (out, in) -> (..., in)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            grad_weight = grad_2d.t().mm(x.reshape(-1, x.shape[-1]))  # (out, N) @ (N, in) -> (out, in)
            if ctx.needs_input_grad[3]:
                grad_feedback = grad_weight
            if not ctx.needs_input_grad[1]:
                grad_weight = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_weight, grad_bias, grad_feedback


class FeedbackConvFunction(torch.autograd.Function):
    """N-d convolution whose backward uses B as the weight of the input gradient. Use :func:`feedback_conv`."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, feedback_weight: Tensor,
                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
        return torch.convolution(x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, bias, feedback_weight, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, feedback_weight)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.bias_shape = None if bias is None else list(bias.shape)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, feedback_weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        need_x, need_w, need_b, need_fb = ctx.needs_input_grad[:4]
        need_b = need_b and ctx.bias_shape is not None
        # One fused call, exactly as native autograd makes it, with B as the weight argument: the input
        # gradient is computed with B, the weight gradient reads only x and grad_output.
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_output, x, feedback_weight, ctx.bias_shape, stride, padding, dilation,
            False, [0] * len(stride), groups, [need_x, need_w or need_fb, need_b])
        grad_feedback = grad_weight if need_fb else None
        return (grad_x, grad_weight if need_w else None, grad_bias if need_b else None, grad_feedback,
                None, None, None, None)


def feedback_linear(x: Tensor, weight: Tensor, bias: Tensor | None, feedback_weight: Tensor) -> Tensor:
    """Linear map ``y = x Wᵀ + b`` that sends errors down through ``feedback_weight``.

    Args:
        x: input, ``(*, in_features)``.
        weight: forward weight W, ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None.
        feedback_weight: B, same shape as ``weight``. ``dL/dx = dL/dy · B``.

    Returns:
        ``(*, out_features)``.

    Under autocast the operands are cast to the autocast dtype first, as autocast does for ``F.linear``, so the
    backward runs in one dtype and each gradient is cast back to its leaf's dtype by autograd.
    """
    if feedback_weight.shape != weight.shape:
        raise ValueError(f"feedback_weight must have the weight's shape {tuple(weight.shape)}, "
                         f"got {tuple(feedback_weight.shape)}")
    x, weight, bias, feedback_weight, device_type = _autocast_operands(x, weight, bias, feedback_weight)
    if device_type is None:
        return FeedbackLinearFunction.apply(x, weight, bias, feedback_weight)
    with torch.autocast(device_type, enabled=False):
        return FeedbackLinearFunction.apply(x, weight, bias, feedback_weight)


def feedback_conv(x: Tensor, weight: Tensor, bias: Tensor | None, feedback_weight: Tensor,
                  stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                  groups: int = 1) -> Tensor:
    """1-, 2- or 3-d convolution (zero padding) that sends errors down through ``feedback_weight``.

    Args:
        x: input, ``(B, C_in, *spatial)``, or unbatched ``(C_in, *spatial)`` as ``F.conv{1,2,3}d`` accept it.
        weight: W, ``(C_out, C_in / groups, *kernel)``.
        bias: ``(C_out,)`` or None.
        feedback_weight: B, same shape as ``weight``.
        stride, padding, dilation: one int per spatial dimension.
        groups: number of blocked connections, as in ``torch.nn.Conv2d``.

    Returns:
        ``(B, C_out, *spatial_out)`` (``(C_out, *spatial_out)`` for an unbatched input), identical to
        ``torch.nn.functional.conv{1,2,3}d``.
    """
    if feedback_weight.shape != weight.shape:
        raise ValueError(f"feedback_weight must have the weight's shape {tuple(weight.shape)}, "
                         f"got {tuple(feedback_weight.shape)}")
    if x.dim() == weight.dim() - 1:  # unbatched: torch.convolution needs the batch dim that F.conv*d adds
        return feedback_conv(x.unsqueeze(0), weight, bias, feedback_weight, stride, padding, dilation,
                             groups).squeeze(0)
    args = (list(stride), list(padding), list(dilation), int(groups))
    x, weight, bias, feedback_weight, device_type = _autocast_operands(x, weight, bias, feedback_weight)
    if device_type is None:
        return FeedbackConvFunction.apply(x, weight, bias, feedback_weight, *args)
    with torch.autocast(device_type, enabled=False):
        return FeedbackConvFunction.apply(x, weight, bias, feedback_weight, *args)


def _autocast_operands(x: Tensor, weight: Tensor, bias: Tensor | None, feedback_weight: Tensor
                       ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, str | None]:
    """Cast the operands to the autocast dtype when autocast is on for ``x``'s device; else return them."""
    device_type = x.device.type
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):  # autocast has no meta device
        return x, weight, bias, feedback_weight, None
    dtype = torch.get_autocast_dtype(device_type)
    cast = [t if t is None or not t.is_floating_point() else t.to(dtype) for t in (x, weight, bias, feedback_weight)]
    return cast[0], cast[1], cast[2], cast[3], device_type
