"""Feedback layers on inputs the native layers accept: an unbatched convolution input ``(C, *spatial)``."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import bioprop

CONV_TYPES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
#: per-layer rules whose B differs from W; two forward passes without a weight update share one B
FEEDBACK_RULES = ("fa", "usf", "brsf", "frsf", "partial_concordance", "kp", "wm")


def _grads(layer: nn.Module, x: Tensor, batched: bool) -> list[Tensor]:
    """Output and every gradient (dx, then each parameter's) of one forward/backward pass of ``layer`` on ``x``
    (``(C, *spatial)``), run either unbatched or as a batch of one; the output is returned unbatched."""
    for p in layer.parameters():
        p.grad = None
    xi = x.clone().requires_grad_(True)
    y = layer(xi.unsqueeze(0)).squeeze(0) if batched else layer(xi)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view(y.shape))
    return [y.detach(), xi.grad] + [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("rule", FEEDBACK_RULES)
@pytest.mark.parametrize("dims,padding_mode,padding", [(1, "zeros", 1), (2, "zeros", 1), (2, "reflect", "same"),
                                                       (3, "zeros", 0)])
def test_unbatched_conv_equals_batch_of_one(rule: str, dims: int, padding_mode: str, padding: int | str) -> None:
    """A converted conv trains on (C, *spatial) exactly as on the same input as a batch of one: same output, same
    dx (through B), dW, db and, for kp, dB."""
    torch.manual_seed(0)
    conv = CONV_TYPES[dims](4, 6, 3, padding=padding, padding_mode=padding_mode, groups=2).double()
    layer = bioprop.convert(nn.Sequential(conv), rule, seed=0)[0]
    x = torch.randn(4, *[5] * dims, dtype=torch.float64)
    unbatched = _grads(layer, x, batched=False)
    batched = _grads(layer, x, batched=True)
    assert unbatched[0].dim() == dims + 1
    assert len(unbatched) == len(batched) == 2 + len(list(layer.parameters()))
    for got, ref in zip(unbatched, batched):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dims", [1, 2])
def test_unbatched_conv_sham_equals_native(dims: int) -> None:
    """sham is backprop through the feedback op: on an unbatched input its output and every gradient equal the
    native layer's."""
    torch.manual_seed(1)
    native = CONV_TYPES[dims](3, 5, 3, stride=2, padding=1).double()
    converted = bioprop.convert(nn.Sequential(CONV_TYPES[dims](3, 5, 3, stride=2, padding=1).double()), "sham")[0]
    converted.load_state_dict(native.state_dict())
    x = torch.randn(3, *[7] * dims, dtype=torch.float64)
    for got, ref in zip(_grads(converted, x, batched=False), _grads(native, x, batched=False)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule", ["usf", "brsf", "frsf", "partial_concordance"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_sign_rules_hold_no_b_from_forward_to_backward(rule: str, kind: str) -> None:
    """The sign-concordant rules' B is built in the backward from the saved W: every tensor the forward saves is
    the input, W itself or the rule's own state (no W-sized B is kept alive until the backward)."""
    torch.manual_seed(0)
    native = nn.Linear(6, 4) if kind == "linear" else nn.Conv2d(3, 4, 3, padding=1)
    layer = bioprop.convert(nn.Sequential(native), rule, seed=0)[0]
    x = (torch.randn(5, 6) if kind == "linear" else torch.randn(2, 3, 5, 5)).requires_grad_()
    owned = {x.data_ptr()} | {t.data_ptr() for t in (*layer.parameters(), *layer.buffers())}
    saved: list[Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert saved and all(t.data_ptr() in owned for t in saved)
    y.backward(torch.ones_like(y))
    assert x.grad is not None and torch.isfinite(x.grad).all()
