"""Where the sign rules build B: in the backward from the saved W (bioprop since issue 16) or in the forward.

On the 3x800 tanh MLP (batch 128, 28x28 inputs, SGD with momentum), for each sign rule, three variants alternate
in every round: native autograd, the rule as bioprop runs it (its ``feedback`` hook hands the op a
``SignFeedback``: ``sign(W) ∘ magnitude`` is built in the backward, a uniform scale multiplies δx) and the same
rule with ``feedback`` replaced by ``feedback_weight`` (B built in the forward, scale inside, saved until the
backward: the path before issue 16, which the op still takes for a built B). Both bioprop variants compute the same
B and the same draws; ratios are medians of paired per-round ratios, CPU time of this process.

    python benchmarks/build_site.py --rounds 30
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import bioprop
from bioprop.layers import FeedbackLayer
from _timing import Step, command_line, machine_line, median_ratio, paired_times, set_threads

SIGN_RULES = ("usf", "frsf", "brsf", "partial_concordance")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 800), nn.Tanh(), nn.Linear(800, 800), nn.Tanh(),
                         nn.Linear(800, 800), nn.Tanh(), nn.Linear(800, 10))


def stepper(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return step


def built_in_forward(net: nn.Module) -> nn.Module:
    """``net`` with every feedback layer's rule handing the op a built B (a copy of the rule per layer)."""
    for layer in net.modules():
        if isinstance(layer, FeedbackLayer):
            rule = type(layer.rule)(**layer.rule.options())
            rule.feedback = rule.feedback_weight  # type: ignore[method-assign]
            layer.rule = rule
    return net


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--rules", nargs="+", default=list(SIGN_RULES))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    print(f"`{command_line('build_site.py', argv)}` ({machine_line()}; CPU time, {args.rounds} rounds of "
          f"{args.steps} steps)\n")
    print("| rule | backward build / native | forward build / native | backward / forward build |")
    print("|---|---|---|---|")
    for rule in args.rules:
        steps = {"native": stepper(mlp(), x, y),
                 "backward": stepper(bioprop.convert(mlp(), rule, seed=0), x, y),
                 "forward": stepper(built_in_forward(bioprop.convert(mlp(), rule, seed=0)), x, y)}
        times = paired_times(steps, args.rounds, args.steps, clock=time.process_time)
        print(f"| {rule} | {median_ratio(times, 'backward', 'native'):.3f} | "
              f"{median_ratio(times, 'forward', 'native'):.3f} | {median_ratio(times, 'backward', 'forward'):.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
