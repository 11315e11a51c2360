"""Micro-benchmarks of the per-step state work of brsf (the redraw) and kp (B's optimizer update), issue 16.

On the 3x800 MLP's weight shapes (784x800, 800x800, 800x800, 800x10), one thread, CPU time, median of paired
per-round ratios:

- brsf: bioprop's redraw (:func:`bioprop.rules.draw_magnitude_8bit`: since issue 16, eight levels from each
  full-range 64-bit word, cast straight into the magnitudes, then one multiply and one add) against its parts (the
  random words alone, the conversion of levels to magnitudes alone) and against the first prototype of the
  eight-levels draw (``random_(-2**63, None)``, bytes viewed, ``torch.add(levels, 0.5, out=)`` then a multiply,
  which makes a float temporary of the levels). Before issue 16 the redraw took seven levels per word (the top
  byte of ``random_``'s [0, 2^63) words is biased) and copied the 7-of-8 slice: 4.61 ms in docs/performance.md.
- kp: a momentum-SGD step over [W, B] (B has its own gradient and momentum, as today) against a step over [W]
  plus ``B -= lr · buf_W`` (W's update applied to B, the KP rule itself), which is exact for SGD with momentum and
  no weight decay when B's momentum starts equal to W's (both start at the same gradient).

    python benchmarks/update_ideas.py --rounds 40
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from bioprop.rules import draw_magnitude_8bit
from _timing import Step, command_line, machine_line, median_ratio, paired_times, set_threads

SHAPES = [(800, 784), (800, 800), (800, 800), (10, 800)]


def brsf_steps() -> dict[str, Step]:
    weights = [torch.randn(s) for s in SHAPES]
    out = [torch.empty(s) for s in SHAPES]
    words = [torch.empty((math.prod(s) + 6) // 7, dtype=torch.int64) for s in SHAPES]
    words8 = [torch.empty((math.prod(s) + 7) // 8, dtype=torch.int64) for s in SHAPES]
    levels = [torch.randint(0, 256, s, dtype=torch.uint8) for s in SHAPES]
    generator = torch.Generator().manual_seed(0)

    def redraw() -> None:
        for w, o in zip(weights, out):
            draw_magnitude_8bit(w, "xiao2018", generator, out=o)

    def eight_levels_per_word() -> None:
        for buffer, o, w in zip(words8, out, weights):
            buffer.random_(-2**63, None, generator=generator)  # all 64 bits uniform
            level = buffer.view(torch.uint8)[:o.numel()].view(o.shape)  # a view, no copy
            torch.add(level, 0.5, out=o).mul_(1.0 / math.sqrt(w.shape[1]) / 256)

    def words_only() -> None:
        for buffer in words:
            buffer.random_(generator=generator)

    def levels_to_magnitudes() -> None:
        for level, o, w in zip(levels, out, weights):
            torch.add(level, 0.5, out=o).mul_(1.0 / math.sqrt(w.shape[1]) / 256)

    return {"redraw": redraw, "eight_levels_per_word": eight_levels_per_word, "random_words_only": words_only, "levels_to_magnitudes_only": levels_to_magnitudes}


def kp_steps() -> dict[str, Step]:
    def params() -> list[torch.nn.Parameter]:
        return [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]

    w_two, b_two = params(), params()
    opt_two = torch.optim.SGD(w_two + b_two, lr=1e-3, momentum=0.9)
    w_one, b_one = params(), [torch.randn(s) for s in SHAPES]
    opt_one = torch.optim.SGD(w_one, lr=1e-3, momentum=0.9)
    grads = [torch.randn(s) for s in SHAPES]

    def two_updates() -> None:  # today: B is a parameter with W's gradient and its own momentum
        for w, b, g in zip(w_two, b_two, grads):
            w.grad = g.clone()
            b.grad = g.clone()
        opt_two.step()

    def apply_w_update() -> None:  # W's update applied to B
        for w, g in zip(w_one, grads):
            w.grad = g.clone()
        opt_one.step()
        with torch.no_grad():
            torch._foreach_add_(b_one, [opt_one.state[w]["momentum_buffer"] for w in w_one], alpha=-1e-3)

    return {"kp_two_updates": two_updates, "kp_apply_w_update": apply_w_update}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    print(f"`{command_line('update_ideas.py', argv)}` ({machine_line()}; CPU time, {args.rounds} rounds of "
          f"{args.steps} calls)\n\n| variant | ms per step (all four layers) | / first of its group |\n|---|---|---|")
    for group in (brsf_steps(), kp_steps()):
        times = paired_times(group, args.rounds, args.steps, clock=time.process_time)
        first = next(iter(group))
        for name in group:
            ms = 1e3 * sorted(times[name])[len(times[name]) // 2]
            print(f"| {name} | {ms:.3f} | {median_ratio(times, name, first):.3f} |")


if __name__ == "__main__":
    main()
