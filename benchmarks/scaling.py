"""Cost curves: the paired ratio of a rule's training step to native autograd against width, batch and depth.

For linear stacks (``depth`` tanh layers of ``width`` units on ``width`` input features, a linear read-out to 10)
and conv stacks (``depth`` 3x3 conv/ReLU layers of ``width`` maps on 16x16 inputs with ``width`` channels, global
average pooling and a linear read-out), one axis moves at a time from a base point. At every point the unconverted
model (native) and every rule run in one process, on one thread, alternating within each round (the order
rotates from round to round), each for enough steps to fill ``--min-round-ms``; the table gives the median over
rounds of the per-round ratio to native, and the figure also draws the median paired difference per converted
layer, which separates a fixed per-call cost (flat in every axis) from the elementwise build of B (growing with
width², flat in batch) and from work that scales with the products themselves (a constant ratio).

    python benchmarks/scaling.py --quick      # about 10 minutes on one thread; writes docs/perf_scaling.md + .png
    python benchmarks/scaling.py              # more rounds
    python benchmarks/scaling.py --tiny --out /tmp/s.md   # seconds: a dry run of the code path

The clock is the CPU time of this process (``time.process_time``), which other jobs on a shared machine do not
inflate; ``--clock wall`` gives elapsed time.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import bioprop  # noqa: E402
from _timing import Step, command_line, machine_line, paired_times, set_threads  # noqa: E402
from _workloads import layer_rules, make_batch, make_mlp, make_step  # noqa: E402

AXES = ("width", "batch", "depth")
LAYERS = ("linear", "conv")


@dataclass(frozen=True)
class Point:
    """One model size: ``layer`` kind, the ``axis`` that moves, and the full size."""

    layer: str
    axis: str
    width: int
    batch: int
    depth: int

    @property
    def value(self) -> int:
        return getattr(self, self.axis)


#: layer kind -> (base point, {axis: values}); the base point's other sizes hold while one axis moves
SWEEPS = {
    "full": {
        "linear": (Point("linear", "", 1024, 128, 2),
                   {"width": (256, 512, 1024, 2048, 4096), "batch": (16, 64, 256, 1024), "depth": (1, 2, 4, 8)}),
        "conv": (Point("conv", "", 32, 16, 2),
                 {"width": (16, 32, 64, 128, 256), "batch": (16, 64, 256, 1024), "depth": (1, 2, 4, 8)}),
    },
    "tiny": {
        "linear": (Point("linear", "", 32, 8, 1), {"width": (16, 32), "batch": (4, 8), "depth": (1, 2)}),
        "conv": (Point("conv", "", 4, 2, 1), {"width": (4, 8), "batch": (2, 4), "depth": (1, 2)}),
    },
}
SIDE = 16  # conv input side (16x16)


def points(sweep: str) -> list[Point]:
    """Every point of a sweep, axis by axis, the base point counted once per axis it lies on."""
    out = []
    for layer, (base, axes) in SWEEPS[sweep].items():
        for axis in AXES:
            out += [replace(base, axis=axis, **{axis: v}) for v in axes[axis]]
    return out


def conv_stack(width: int, depth: int) -> nn.Sequential:
    """``depth`` 3x3 conv/ReLU layers of ``width`` maps (same size), global average pooling, linear to 10."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def build(point: Point) -> tuple[nn.Module, tuple[int, ...]]:
    """The model at ``point`` and the shape of one input sample."""
    if point.layer == "linear":
        return make_mlp(point.width, point.depth, in_features=point.width), (point.width,)
    return conv_stack(point.width, point.depth), (point.width, SIDE, SIDE)


def measure_point(point: Point, rules: list[str], rounds: int, min_round_s: float, clock) -> dict:  # type: ignore[no-untyped-def]
    """Native step time and, per rule, the median paired ratio and the median paired difference per layer."""
    torch.manual_seed(0)
    base, sample = build(point)
    x, y = make_batch(sample, point.batch, 10)
    steps: dict[str, Step] = {"native": make_step(copy.deepcopy(base), x, y)}
    for rule in rules:
        steps[rule] = make_step(bioprop.convert(copy.deepcopy(base), rule, seed=0), x, y)
    start = clock()
    steps["native"]()
    per_round = max(1, math.ceil(min_round_s / max(clock() - start, 1e-6)))
    times = paired_times(steps, rounds, per_round, warmup=1, clock=clock)
    layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in base.modules())
    native = times["native"]
    result = {"native_ms": 1e3 * statistics.median(native), "steps": per_round, "layers": layers, "rules": {}}
    for rule in rules:
        ratio = statistics.median(t / n for t, n in zip(times[rule], native))
        extra_us = 1e6 * statistics.median(t - n for t, n in zip(times[rule], native)) / layers
        result["rules"][rule] = (ratio, extra_us)
    return result


def figure(results: list[tuple[Point, dict]], rules: list[str], path: Path) -> None:
    """Four rows (ratio and extra µs per layer, for linear then conv) by three axes, one line per rule."""
    fig, axes = plt.subplots(4, 3, figsize=(15, 17), squeeze=False)
    colours = plt.get_cmap("tab20")
    for row, (layer, what) in enumerate([(l, w) for l in LAYERS for w in ("ratio", "extra")]):
        for col, axis in enumerate(AXES):
            ax = axes[row][col]
            chosen = [(p, r) for p, r in results if p.layer == layer and p.axis == axis]
            xs = [p.value for p, _ in chosen]
            for i, rule in enumerate(rules):
                ys = [r["rules"][rule][0 if what == "ratio" else 1] for _, r in chosen]
                ax.plot(xs, ys, marker="o", ms=3, color=colours(i % 20), label=rule,
                        linestyle="--" if rule == "dfa" else "-")
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(v) for v in xs])
            if what == "ratio":
                ax.axhline(1.0, color="black", lw=0.8)
                ax.set_ylabel("step time / native (median of paired ratios)")
            else:
                ax.axhline(0.0, color="black", lw=0.8)
                ax.set_yscale("symlog", linthresh=10)
                ax.set_ylabel("extra µs per converted layer (median)")
            ax.set_xlabel(axis + (" (maps)" if layer == "conv" and axis == "width" else ""))
            ax.set_title(f"{layer}: {axis}", fontsize=10)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(rules), 6), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def base_text(sweep: str) -> str:
    lines = []
    for layer, (base, axes) in SWEEPS[sweep].items():
        sizes = "; ".join(f"{axis} {', '.join(map(str, axes[axis]))}" for axis in AXES)
        unit = "units" if layer == "linear" else f"maps on {SIDE}x{SIDE}"
        lines.append(f"{layer}: base width {base.width} {unit}, batch {base.batch}, depth {base.depth}; {sizes}")
    return ". ".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer rounds: about 10 minutes on one thread")
    size.add_argument("--tiny", action="store_true", help="tiny sizes, one round: a dry run")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per point (default 25; 12 --quick)")
    parser.add_argument("--min-round-ms", type=float, default=None,
                        help="each variant runs enough steps per round to fill this (default 40; 20 --quick)")
    parser.add_argument("--rules", nargs="+", default=None, help="rules (default: every per-layer rule, dfa)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--out", default="docs/perf_scaling.md", help="Markdown file; the PNG goes beside it")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    sweep = "tiny" if args.tiny else "full"
    rounds = args.rounds or (1 if args.tiny else 12 if args.quick else 25)
    min_round_s = (args.min_round_ms or (1 if args.tiny else 20 if args.quick else 40)) / 1e3
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rules = args.rules or layer_rules() + ["dfa"]
    machine = machine_line()
    start = time.perf_counter()
    results = []
    for point in points(sweep):
        results.append((point, measure_point(point, rules, rounds, min_round_s, clock)))
        r = results[-1][1]
        print(f"{point.layer} {point.axis}={point.value}: native {r['native_ms']:.2f} ms, "
              + " ".join(f"{k} {v[0]:.3f}" for k, v in r["rules"].items()), file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    figure(results, rules, png)
    header = "| layer | axis | value | native step (ms) | " + " | ".join(rules) + " |"
    table = [header, "|" + "---|" * (4 + len(rules))]
    for point, r in results:
        table.append(f"| {point.layer} | {point.axis} | {point.value} | {r['native_ms']:.2f} | "
                     + " | ".join(f"{r['rules'][rule][0]:.3f}" for rule in rules) + " |")
    extra = [header.replace("native step (ms)", "layers"), "|" + "---|" * (4 + len(rules))]
    for point, r in results:
        extra.append(f"| {point.layer} | {point.axis} | {point.value} | {r['layers']} | "
                     + " | ".join(f"{r['rules'][rule][1]:.0f}" for rule in rules) + " |")
    text = "\n".join([
        "# Cost curves: step time against native as width, batch and depth grow",
        "",
        f"Produced by `{command_line('scaling.py', argv)}` ({machine}; {rounds} rounds per point, "
        f"{args.clock} clock; {elapsed / 60:.1f} min). Measured on a shared machine: other jobs ran beside it, "
        "which is why the steps run on one thread, are timed by this process's CPU time, and alternate in pairs.",
        "",
        f"Sizes: {base_text(sweep)}. A step is zero_grad, forward, cross-entropy, backward and SGD with momentum "
        "on one fixed random batch; every variant at a point is a copy of the same initial model. wm is measured "
        "without its mirror steps (its B is then fixed, as fa's).",
        "",
        f"![cost curves]({png.name})",
        "",
        "## Step time / native (median of paired ratios)",
        "",
        *table,
        "",
        "## Extra time per converted layer (µs, median of paired differences)",
        "",
        *extra,
        "",
    ])
    out.write_text(text)
    print(f"wrote {out} and {png}", file=sys.stderr)


if __name__ == "__main__":
    main()
