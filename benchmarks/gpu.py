"""Training throughput on one GPU: backprop, usf, fa, brsf, kp and dfa against native autograd on the same GPU.

Two workloads: ImageNet ResNet-18 at 224x224 (batch 128, bf16 autocast, channels_last), and the 3x800 tanh MLP on
28x28 inputs (batch 128, float32). A step is zero_grad, forward, cross-entropy, backward and an SGD update with
momentum on one fixed random batch kept on the GPU, so only the model's own work is timed. Every variant (the
unconverted model = native, and each rule) is built from the same initial model and stays resident; the variants
alternate within each round (A B C ... then B C ... A), and the ratio to native is the median over rounds of the
per-round ratio. The run stops starting new rounds at ``--budget-s`` and finishes within 5 minutes.

    python benchmarks/gpu.py                        # on a CUDA machine: writes docs/perf_gpu.md
    python benchmarks/gpu.py --device cpu --tiny    # dry run of the same code path at tiny sizes, prints only

Without a CUDA device the script refuses in one line, except for the ``--tiny`` dry run.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import bioprop
from _timing import Step, command_line, cuda_sync, machine_line, paired_times, paired_ratios, quartiles
from _workloads import make_batch, make_mlp, make_resnet18, make_step

RULES = ("backprop", "usf", "fa", "brsf", "kp", "dfa")


@dataclass(frozen=True)
class Workload:
    """One model and how it is trained."""

    name: str
    build: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]  # one input sample, (C, H, W)
    classes: int
    batch: int
    bf16: bool  # forward and loss under bf16 autocast
    channels_last: bool  # model and input in channels_last memory format
    steps_per_round: int


FULL = (
    Workload("resnet18_224", lambda: make_resnet18(224), (3, 224, 224), 1000, 128, True, True, 5),
    Workload("mlp_3x800", make_mlp, (1, 28, 28), 10, 128, False, False, 50),
)
TINY = (
    Workload("resnet18_tiny", lambda: make_resnet18(32, width=8, num_classes=10), (3, 32, 32), 10, 4, True, True, 1),
    Workload("mlp_tiny", lambda: make_mlp(width=32), (1, 28, 28), 10, 8, False, False, 1),
)


def variants(work: Workload, rules: list[str], device: torch.device) -> dict[str, Step]:
    """``{"native": step, rule: step, ...}``, every model a copy of one initial model, moved to ``device``."""
    torch.manual_seed(0)
    base = work.build()
    x, y = make_batch(work.sample_shape, work.batch, work.classes, device, work.channels_last)
    steps: dict[str, Step] = {}
    for name in ["native", *rules]:
        model = copy.deepcopy(base) if name == "native" else bioprop.convert(copy.deepcopy(base), name, seed=0)
        model = model.to(device)
        if work.channels_last:
            model = model.to(memory_format=torch.channels_last)
        steps[name] = make_step(model, x, y, autocast_dtype=torch.bfloat16 if work.bf16 else None)
    return steps


def step_peak_mib(step: Step, device: torch.device) -> float | None:
    """Peak memory one step allocates above what is resident before it (MiB), on a CUDA device; else None."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - resident) / 2**20


def measure(work: Workload, rules: list[str], device: torch.device, rounds: int, deadline: float) -> list[str]:
    """Table rows of one workload: images/s, step time, ratio to native and step memory of every variant."""
    steps = variants(work, rules, device)
    times = paired_times(steps, rounds, work.steps_per_round, warmup=3, sync=cuda_sync(device), deadline=deadline)
    rows = []
    for name, step in steps.items():
        q1, ratio, q3 = quartiles(paired_ratios(times, name, "native"))
        seconds = statistics.median(times[name])
        peak = step_peak_mib(step, device)
        rows.append(f"| {work.name} | {name} | {work.batch / seconds:,.0f} | {1e3 * seconds:.2f} | "
                    f"{ratio:.3f} [{q1:.3f}, {q3:.3f}] | {'—' if peak is None else f'{peak:,.0f}'} | "
                    f"{len(times[name])} |")
        print(rows[-1], flush=True)
    return rows


def check_device(device: str, tiny: bool) -> torch.device:
    """The device to run on; exits with a one-line message where this benchmark cannot measure anything."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu.py: no CUDA device is available; run it on a GPU machine "
                 "(or `--device cpu --tiny` for a dry run of the code path)")
    if dev.type != "cuda" and not tiny:
        sys.exit(f"gpu.py: --device {device} is allowed only with --tiny (a dry run); the benchmark measures CUDA")
    return dev


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --tiny")
    parser.add_argument("--tiny", action="store_true", help="tiny models and batches, 2 rounds: a dry run")
    parser.add_argument("--rules", nargs="+", default=list(RULES), help="rules to compare with native")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds per workload (20; 2 with --tiny)")
    parser.add_argument("--budget-s", type=float, default=200.0,
                        help="no new round starts after this many seconds (shared by the workloads)")
    parser.add_argument("--out", default=None, help="Markdown file, or - to print only "
                                                    "(default docs/perf_gpu.md; - with --tiny)")
    args = parser.parse_args(argv)
    device = check_device(args.device, args.tiny)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the warm-up steps pick the convolution algorithms
    workloads = TINY if args.tiny else FULL
    rounds = args.rounds or (2 if args.tiny else 20)
    out = args.out or ("-" if args.tiny else "docs/perf_gpu.md")
    start = time.perf_counter()
    rows = ["| model | variant | images/s | step (ms) | step / native: median [q1, q3] | step peak above "
            "resident (MiB) | rounds |", "|---|---|---|---|---|---|---|"]
    for i, work in enumerate(workloads):
        deadline = start + args.budget_s * (i + 1) / len(workloads)
        rows += measure(work, args.rules, device, rounds, deadline)
    elapsed = time.perf_counter() - start
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    sizes = "; ".join(f"{w.name}: batch {w.batch} of {'x'.join(map(str, w.sample_shape))}"
                      f"{', bf16 autocast' if w.bf16 else ', float32'}{', channels_last' if w.channels_last else ''}"
                      f", {w.steps_per_round} steps per variant per round" for w in workloads)
    text = "\n".join([
        "# Training throughput on one GPU",
        "",
        f"Produced by `{command_line('gpu.py', argv)}` on {name}{cuda} ({machine_line()}); the whole run took "
        f"{elapsed:.0f} s.",
        "",
        f"{sizes}. native = the unconverted model under plain autograd; backprop = `bioprop.convert(model, "
        "\"backprop\")`. Images/s and step time are medians over rounds; the ratio is the median (and quartiles) "
        "over rounds of the per-round ratio of the variant's step time to native's, the variants alternating "
        "within each round (below 1: faster than native). Step peak is the memory one step allocates above "
        "what is resident before it (parameters, gradients, optimizer and feedback state of all variants), read "
        "from `torch.cuda.max_memory_allocated`.",
        "",
        *rows,
    ]) + "\n"
    if out != "-":
        Path(out).write_text(text)
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
