"""Step time of DFA and IFA against native backprop and against BioTorch's DFA, on nokland2016's tanh MLPs.

One training step = zero_grad, forward, cross-entropy, backward, SGD step (batch 128, 28x28 inputs, 10 classes).
Each round runs every variant for ``--steps`` steps, in an order that rotates from round to round; the ratio to
native backprop is taken within the round, and the table reports the median and the quartiles of those paired
ratios over the rounds, which cancels most of the drift of a noisy machine. By default the steps run on one
thread and are timed by the CPU time of the process, which other processes on a shared machine do not inflate;
``--clock wall --threads 0`` gives elapsed time on torch's default threads.

    python benchmarks/direct_time.py                      # writes docs/perf_direct.md
    python benchmarks/direct_time.py --rounds 10 --out -  # quick look, print only

BioTorch's DFA (``BioModule(mode="dfa")``) computes the loss inside its forward and still runs the full backward
through every layer (its hooks replace the input gradients afterwards). It is measured when ``import biotorch``
works, or when its 0.0.16 source is found in ``--biotorch-src`` (only ``biotorch.module`` is imported, which
needs no torchvision).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import bioprop
from _timing import Step, paired_times, quartiles, set_threads
from _workloads import make_mlp, make_step


MODELS: dict[str, tuple[int, int]] = {"3x800": (3, 800), "7x240": (7, 240)}


def load_biotorch(source: str) -> type | None:
    """BioTorch's ``BioModule``, from the installed package or from its source folder; None if neither works."""
    try:
        from biotorch.module.biomodule import BioModule
        return BioModule
    except ImportError:
        pass
    if source and Path(source, "biotorch").is_dir():
        sys.path.insert(0, source)
        try:
            from biotorch.module.biomodule import BioModule
            return BioModule
        except ImportError:
            return None
    return None


def variants(depth: int, width: int, batch: int, bio_module: type | None) -> dict[str, Step]:
    torch.manual_seed(0)
    base = make_mlp(width, depth)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    steps = {"backprop": make_step(copy.deepcopy(base), x, y, momentum=0.0)}
    for rule in ("dfa", "ifa"):
        steps[rule] = make_step(bioprop.convert(copy.deepcopy(base), rule, seed=0), x, y, momentum=0.0)
    if bio_module is not None:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # its conversion report
            warnings.simplefilter("ignore")
            theirs = bio_module(copy.deepcopy(base), mode="dfa", output_dim=10)
        steps["biotorch_dfa"] = make_step(theirs, x, y, momentum=0.0,
                                          forward=lambda inputs: theirs(inputs, y, F.cross_entropy))
    return steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30, help="measured rounds per model")
    parser.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    parser.add_argument("--batch", type=int, default=128, help="batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: CPU time of this process (robust on a shared machine); wall: elapsed time")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--biotorch-src", default="/tmp/wh/biotorch-0.0.16", help="BioTorch source folder")
    parser.add_argument("--out", default="docs/perf_direct.md", help="Markdown output file, or - for stdout only")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    bio_module = load_biotorch(args.biotorch_src)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    lines = ["| model | variant | step (ms) | / backprop: median [q1, q3] | DFA / this |", "|---|---|---|---|---|"]
    for model_name in args.models:
        depth, width = MODELS[model_name]
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BioTorch's deprecated module backward hooks warn on every call
            times = paired_times(variants(depth, width, args.batch, bio_module), args.rounds, args.steps,
                                 clock=clock)
        base = times["backprop"]
        for name, values in times.items():
            ratio = [v / b for v, b in zip(values, base)]
            vs_dfa = [d / v for d, v in zip(times["dfa"], values)]
            q1, med, q3 = quartiles(ratio)
            line = (f"| {model_name} | {name} | {1e3 * statistics.median(values):.2f} | "
                    f"{med:.3f} [{q1:.3f}, {q3:.3f}] | {statistics.median(vs_dfa):.3f} |")
            print(line, flush=True)
            lines.append(line)
    command = "python benchmarks/direct_time.py" + (f" {' '.join(argv)}" if argv else
                                                     (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""))
    header = [
        "# Step time of DFA and IFA",
        "",
        f"Produced by `{command.strip()}` (rounds={args.rounds}, {args.steps} steps per variant per round, "
        f"batch={args.batch}, {args.clock} clock, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{platform.machine()}, "
        f"Python {platform.python_version()}, BioTorch {'0.0.16' if bio_module else 'not available'}, "
        f"{os.cpu_count()} CPUs with load average {load:.1f} at the start).",
        "",
        "A step is zero_grad + forward + cross-entropy + backward + SGD step of an N×H tanh MLP (28x28 inputs, "
        "10 outputs). Ratios are per-round ratios to native backprop, median and quartiles over the rounds; "
        "the variants alternate within each round. `DFA / this` is the median per-round ratio of the DFA step "
        "to the row's step (below 1: DFA is faster). biotorch_dfa is BioTorch 0.0.16's `BioModule(mode=\"dfa\")`, "
        "used as its documentation shows (loss computed inside its forward, then `loss.backward()`).",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    if args.out != "-":
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
