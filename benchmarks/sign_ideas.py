"""Micro-benchmarks of ways to build usf's ``B = s · sign(W)`` on the 3x800 MLP (issue 16), without changing rules.py.

Every variant trains the same 3x800 tanh MLP (batch 128, SGD with momentum) and sends ``δx = δy · s·sign(W)``;
they differ only in when and where the sign matrix is built and where the scale ``s`` goes:

- ``native``: plain autograd (the floor).
- ``bioprop_usf``: ``bioprop.convert(model, "usf")`` as it is.
- ``minimal``: the same maths as bioprop_usf in a bare layer (B = sign(W)·s built in the forward, saved): what
  the rule costs without bioprop's per-layer Python (the rule lookup, grad-mode checks, autocast check).
- ``scale_out``: B = sign(W) saved, the scale applied to δx (``(δy · sign(W)) · s``): one elementwise pass over
  a (batch, in) tensor instead of over W.
- ``buffer``: as scale_out, with sign(W) written into a persistent per-layer buffer (``torch.sign(W, out=...)``),
  so no W-sized tensor is allocated per step.
- ``cached``: as buffer, rebuilt only when W's version counter moved (several forwards per update share one
  build; with one forward per update it shows the bookkeeping cost).
- ``post_step``: as buffer, with sign(W) written right after the optimizer's write of W (an optimizer step
  post-hook), where W was just in the cache, instead of in the next forward.
- ``backward_build``: sign(W) built in the backward from the saved W: nothing W-sized is saved between forward
  and backward (less memory), at the price of building it where W is cold in the cache.

    python benchmarks/sign_ideas.py --rounds 30    # prints a Markdown table
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import bioprop
from _timing import command_line, machine_line, median_ratio, paired_times, quartiles, paired_ratios, set_threads
from _workloads import make_batch, make_mlp, make_step


class _SavedSign(torch.autograd.Function):
    """``y = x Wᵀ + b``; δx = (δy · S) · post, with S (saved) = sign(W)·pre built by the caller."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor, sign: Tensor, post: float) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, _, _, sign, post = inputs
        ctx.save_for_backward(x, sign)
        ctx.post = post

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        x, sign = ctx.saved_tensors
        grad_x = grad.mm(sign)  # (N, out) @ (out, in)
        if ctx.post != 1.0:
            grad_x.mul_(ctx.post)
        return grad_x, grad.t().mm(x), grad.sum(0), None, None


class _BackwardSign(torch.autograd.Function):
    """``y = x Wᵀ + b``; δx = (δy · sign(W)) · s, sign(W) built in the backward."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor, scale: float) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, _, scale = inputs
        ctx.save_for_backward(x, weight)
        ctx.scale = scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        x, weight = ctx.saved_tensors
        return grad.mm(torch.sign(weight)).mul_(ctx.scale), grad.t().mm(x), grad.sum(0), None


class SignLinear(nn.Linear):
    """A linear layer with usf feedback, built as ``mode`` says (module docstring)."""

    def __init__(self, source: nn.Linear, mode: str) -> None:
        super().__init__(source.in_features, source.out_features, dtype=source.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(source.weight)
            self.bias.copy_(source.bias)
        self.mode = mode
        self.scale = 1.0 / math.sqrt(self.in_features)  # xiao2018 for linear layers
        self.register_buffer("sign", torch.sign(self.weight.detach()), persistent=False)
        self.version = -1
        if mode == "post_step":
            self.weight._sign_layer = self  # type: ignore[attr-defined]  # found by _rebuild_after_step

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.mode == "minimal":
            with torch.no_grad():
                b = torch.sign(w).mul_(self.scale)
            return _SavedSign.apply(x, w, self.bias, b, 1.0)
        if self.mode == "scale_out":
            with torch.no_grad():
                b = torch.sign(w)
            return _SavedSign.apply(x, w, self.bias, b, self.scale)
        if self.mode == "buffer" or (self.mode == "cached" and self.version != w._version):
            with torch.no_grad():
                torch.sign(w, out=self.sign)
            self.version = w._version
        if self.mode in ("buffer", "cached", "post_step"):
            return _SavedSign.apply(x, w, self.bias, self.sign, self.scale)
        return _BackwardSign.apply(x, w, self.bias, self.scale)


MODES = ("minimal", "scale_out", "buffer", "cached", "post_step", "backward_build")


def _rebuild_after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Optimizer step post-hook: the post_step layers rebuild sign(W) while W is still in the cache."""
    with torch.no_grad():
        for group in optimizer.param_groups:
            for p in group["params"]:
                layer = getattr(p, "_sign_layer", None)
                if layer is not None:
                    torch.sign(p, out=layer.sign)



def with_sign_layers(model: nn.Module, mode: str) -> nn.Module:
    """A copy of ``model`` whose linear layers are :class:`SignLinear` in ``mode`` (the read-out too, as usf)."""
    model = copy.deepcopy(model)
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            setattr(model, name, SignLinear(child, mode))
    return model


def check_same_gradients(base: nn.Module, x: Tensor, y: Tensor) -> None:
    """Every variant gives bioprop's usf dx and dW (float64), so the timings compare one computation."""
    base = copy.deepcopy(base).double()
    xd = x.double()
    reference = None
    for model in [bioprop.convert(copy.deepcopy(base), "usf", seed=0)] + [with_sign_layers(base, m) for m in MODES]:
        xi = xd.clone().requires_grad_(True)
        F.cross_entropy(model(xi), y).backward()
        grads = [xi.grad] + [p.grad for p in model.parameters()]
        if reference is None:
            reference = grads
        for got, ref in zip(grads, reference):
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    torch.manual_seed(0)
    base = make_mlp()
    x, y = make_batch((1, 28, 28), args.batch, 10)
    check_same_gradients(base, x, y)
    register_optimizer_step_post_hook(_rebuild_after_step)
    # The input needs a gradient for the first layer to send δx, as in a deeper net; here the first layer's δx is
    # computed by every variant (bioprop skips it when nothing needs it, so the inputs require grad).
    x.requires_grad_(True)
    models = {"native": copy.deepcopy(base), "bioprop_usf": bioprop.convert(copy.deepcopy(base), "usf", seed=0)}
    models |= {mode: with_sign_layers(base, mode) for mode in MODES}
    steps = {name: make_step(model, x, y) for name, model in models.items()}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = paired_times(steps, args.rounds, args.steps, clock=clock)
    print(f"`{command_line('sign_ideas.py', argv)}` ({machine_line()}; {args.clock} clock, {args.rounds} rounds "
          f"of {args.steps} steps, batch {args.batch}; gradients checked equal to bioprop's usf in float64)\n")
    print("| variant | step (ms) | / native: median [q1, q3] | / bioprop_usf |\n|---|---|---|---|")
    for name in steps:
        q1, med, q3 = quartiles(paired_ratios(times, name, "native"))
        print(f"| {name} | {1e3 * sorted(times[name])[len(times[name]) // 2]:.2f} | {med:.3f} [{q1:.3f}, {q3:.3f}] "
              f"| {median_ratio(times, name, 'bioprop_usf'):.3f} |")


if __name__ == "__main__":
    main()
