"""What logging the metrics costs, relative to a training step; ``python -m bioprop.metrics.cost`` measures it.

The two are timed alternately in one process (step, metrics, step, metrics, ...), and the median of the paired
ratios is reported, so that drifts of a shared machine hit both alike. Logging every ``k`` steps adds
``ratio / k`` to the training time, so ``k >= ratio / budget`` keeps the overhead within ``budget``.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import convert
from .training import training_metrics

__all__ = ["MetricsCost", "measure_cost", "main"]


@dataclass
class MetricsCost:
    """Result of :func:`measure_cost`.

    Attributes:
        step_s: median time of one training step (forward, backward, optimizer step), seconds.
        metrics_s: median time of one :func:`~bioprop.metrics.training_metrics` call with a batch, seconds.
        ratio: median of the paired ratios metrics / step.
        weights_ratio: the same for a call without a batch (weight statistics only).
    """

    step_s: float
    metrics_s: float
    ratio: float
    weights_ratio: float

    def interval_for(self, budget: float = 0.05) -> int:
        """The smallest logging interval (in steps) whose overhead is at most ``budget`` of the training time."""
        return max(1, math.ceil(self.ratio / budget))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_cost(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor],
                 optimizer: torch.optim.Optimizer, *, repeats: int = 30, warmup: int = 3) -> MetricsCost:
    """Time a training step against a ``training_metrics`` call on the same batch, alternating the two.

    Args:
        model: the model, in train mode.
        x, y: one batch.
        loss_fn: the training loss.
        optimizer: the optimizer over ``model``'s parameters (it takes real steps).
        repeats: number of (step, metrics) pairs timed.
        warmup: untimed pairs first.
    """
    device = x.device
    step_times, metric_times, weight_times = [], [], []
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
        _sync(device)
        t1 = time.perf_counter()
        training_metrics(model, x, y, loss_fn)
        _sync(device)
        t2 = time.perf_counter()
        training_metrics(model)
        _sync(device)
        t3 = time.perf_counter()
        if i >= warmup:
            step_times.append(t1 - t0)
            metric_times.append(t2 - t1)
            weight_times.append(t3 - t2)
    ratios = [m / s for m, s in zip(metric_times, step_times)]
    weight_ratios = [w / s for w, s in zip(weight_times, step_times)]
    return MetricsCost(statistics.median(step_times), statistics.median(metric_times), statistics.median(ratios),
                       statistics.median(weight_ratios))


def main(argv: list[str] | None = None) -> None:
    """Measure the metrics cost on an MLP for a few rules and print a Markdown table."""
    parser = argparse.ArgumentParser(prog="python -m bioprop.metrics.cost", description=__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="+", default=["backprop", "fa", "usf", "brsf"])
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--depth", type=int, default=2, help="hidden layers")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", type=float, default=0.05, help="allowed overhead, a fraction")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 784, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    print(f"{args.depth}x{args.width} tanh MLP, batch {args.batch}, SGD momentum 0.9, device {device}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}\n")
    print(f"| rule | step (ms) | metrics (ms) | metrics / step | of which weight statistics | "
          f"interval for <= {args.budget:.0%} |")
    print("|---|---|---|---|---|---|")
    for rule in args.rules:
        torch.manual_seed(0)
        sizes = [784] + [args.width] * args.depth
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes, sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
        model = convert(nn.Sequential(*layers, nn.Linear(sizes[-1], 10)), rule).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        cost = measure_cost(model, x, y, F.cross_entropy, optimizer, repeats=args.repeats)
        print(f"| {rule} | {cost.step_s * 1e3:.2f} | {cost.metrics_s * 1e3:.2f} | {cost.ratio:.2f} | "
              f"{cost.weights_ratio:.2f} | {cost.interval_for(args.budget)} |")


if __name__ == "__main__":
    main()
