"""Peak memory of one training step per rule against native autograd, and the persistent feedback state.

For each model (the 3x800 tanh MLP and the two-stage conv net on 28x28 at batch 128, ImageNet ResNet-18 on 64x64
at batch 32) and each rule, the step (zero_grad, forward, cross-entropy, backward, SGD with momentum) runs twice,
then once under the torch profiler with its memory view (``profile_memory``, the memory timeline that
``export_memory_timeline`` draws). The peak is the largest total of live CPU tensors the timeline knows during
that step: parameters, optimizer state, gradients, activations, saved tensors and temporaries. The persistent
feedback state is what conversion adds to the model's parameters and buffers (B, magnitudes, draw counters, D),
set against the model's own parameters. The target is: peak ≤ native peak + feedback state.

    python benchmarks/memory.py                        # rewrites the memory section of docs/performance.md
    python benchmarks/memory.py --models mlp --out -   # print only
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline

import bioprop
from _timing import command_line, machine_line, set_threads
from _workloads import MODELS, layer_rules, make_batch, make_step

BATCH = {"mlp": 128, "convnet": 128, "resnet18_64": 32}
TINY_BATCH = 2
MIB = 2**20
BEGIN, END = "<!-- memory table: begin -->", "<!-- memory table: end -->"


def step_peak_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Peak total of live CPU tensors during one training step (after two unmeasured ones)."""
    step = make_step(model, x, y)
    step()
    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return max(sum(row) for row in sizes)


def state_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model``."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def measure(model_name: str, rules: list[str], batch: int) -> list[str]:
    """Table rows of one model: native, then each rule."""
    torch.manual_seed(0)
    build, sample = MODELS[model_name]
    base = build()
    x, y = make_batch(sample, batch, 10)
    params = sum(p.numel() * p.element_size() for p in base.parameters())
    native_state = state_bytes(base)
    native = step_peak_bytes(copy.deepcopy(base), x, y)
    # The state is counted after the steps: some rules draw theirs at the first training forward (dfa's D).
    rows = [f"| {model_name} | native | {native / MIB:.1f} | 1.000 | 0.0 | 0.0 | 0.00 | — |"]
    for rule in rules:
        model = bioprop.convert(copy.deepcopy(base), rule, seed=0)
        peak = step_peak_bytes(model, x, y)
        feedback = state_bytes(model) - native_state
        excess = (peak - native - feedback) / MIB
        verdict = "yes" if excess <= 0.05 * native / MIB else f"no (+{excess:.1f} MiB)"
        rows.append(f"| {model_name} | {rule} | {peak / MIB:.1f} | {peak / native:.3f} | "
                    f"{(peak - native) / MIB:+.1f} | {feedback / MIB:.1f} | {feedback / params:.2f} | {verdict} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def write_section(path: Path, section: str) -> None:
    """Replace the memory section of ``path`` (between its markers), or append it."""
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rules", nargs="+", default=None, help="rules (default: every per-layer rule, dfa)")
    parser.add_argument("--tiny", action="store_true", help=f"batch {TINY_BATCH}: a dry run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="docs/performance.md",
                        help="Markdown file whose memory section is rewritten, or - to print only")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    rules = args.rules or layer_rules() + ["dfa"]
    rows = ["| model | rule | peak step memory (MiB) | / native | − native (MiB) | feedback state (MiB) | "
            "state / model parameters | peak ≤ native + state? |", "|---|---|---|---|---|---|---|---|"]
    for name in args.models:
        rows += measure(name, rules, TINY_BATCH if args.tiny else BATCH[name])
    batches = ", ".join(f"{m} batch {TINY_BATCH if args.tiny else BATCH[m]}" for m in args.models)
    section = "\n".join([
        f"`{command_line('memory.py', argv)}` ({machine_line()}; {batches}). The peak is the largest total of "
        "live CPU tensors in the torch profiler's memory timeline during one training step, resident state "
        "included (parameters, momentum, gradients, feedback state); the feedback state is what conversion adds "
        "to the parameters and buffers. \"peak ≤ native + state\" allows 5 % of the native peak for allocator "
        "noise.",
        "",
        *rows,
    ])
    if args.out == "-":
        print(section)
    else:
        write_section(Path(args.out), section)
        print(f"wrote the memory section of {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
