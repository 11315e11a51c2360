"""Step time of every rule against native autograd backprop, and against BioTorch, measured in one process.

One training step = forward, cross-entropy, backward, SGD step. In each round the variants run back to back
(native, bioprop, BioTorch) and the ratios to native are taken within the round; the table reports the median
over rounds, which cancels most of the drift of a noisy machine.

    python benchmarks/step_time.py                 # writes docs/perf_step.md
    python benchmarks/step_time.py --rounds 10 --models mlp --out -   # quick look, print only
    python benchmarks/step_time.py --compile       # torch.compile'd rule vs compiled native, docs/perf_compile.md

BioTorch is measured when ``import biotorch`` works (``pip install --no-deps biotorch==0.0.16``), except under
``--compile``, which compares compiled bioprop against compiled native only.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import bioprop
from _timing import Step, command_line, median_ratio, paired_times, set_threads
from _workloads import make_convnet, make_mlp, make_step

BIOTORCH_MODES = {"fa": "fa", "usf": "usf", "brsf": "brsf", "frsf": "frsf", "dfa": "dfa"}
MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": make_mlp, "convnet": make_convnet}


def biotorch_step(base: nn.Module, rule: str, x: torch.Tensor, y: torch.Tensor) -> Step | None:
    """A training step of BioTorch's ``BioModule`` in the mode of ``rule``, or None (no such mode, not installed)."""
    mode = BIOTORCH_MODES.get(rule)
    if mode is None:
        return None
    try:
        from biotorch.module.biomodule import BioModule
    except ImportError:
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # BioTorch prints a conversion report
        model = BioModule(copy.deepcopy(base), mode=mode, output_dim=10 if mode == "dfa" else None)
    # BioTorch's DFA computes the loss inside its forward, as its documentation shows.
    forward = (lambda inputs: model(inputs, y, F.cross_entropy)) if mode == "dfa" else None
    return make_step(model, x, y, forward=forward)


def compiled_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    """A training step through ``torch.compile(model)`` (forward and backward compiled; the update eager)."""
    return make_step(model, x, y, forward=torch.compile(model))


def measure(model_name: str, rule: str, rounds: int, batch: int, compile_mode: bool = False,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    if compile_mode:
        # Fresh compile caches per rule: frames shared by every converted model (a feedback layer's forward, after a
        # graph break) would otherwise fill dynamo's recompile limit and fall back to eager for later rules.
        torch._dynamo.reset()
    torch.manual_seed(0)
    base = MODELS[model_name]()
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    build = compiled_step if compile_mode else make_step
    native = build(copy.deepcopy(base), x, y)
    ours = build(bioprop.convert(copy.deepcopy(base), rule, seed=0), x, y)
    try:
        ours()
    except ValueError as error:  # e.g. IFA's forward relay is undefined across pooling inside a block
        return {"skipped": str(error).split(";")[0]}
    theirs = None if compile_mode else biotorch_step(base, rule, x, y)
    steps = {"native": native, "ours": ours} | ({"biotorch": theirs} if theirs else {})
    times = paired_times(steps, rounds, rotate=False, clock=clock)
    result = {"ours": median_ratio(times, "ours", "native")}
    if theirs:
        result["biotorch"] = median_ratio(times, "biotorch", "native")
        result["ours_vs_biotorch"] = median_ratio(times, "ours", "biotorch")
    result["native_ms"] = 1e3 * statistics.median(times["native"])
    return result


def compile_works() -> str | None:
    """None when ``torch.compile`` trains a small model on this build; else a one-line reason."""
    try:
        model = nn.Linear(4, 2)
        F.cross_entropy(torch.compile(model)(torch.randn(3, 4)), torch.tensor([0, 1, 0])).backward()
    except Exception as error:  # noqa: BLE001  (any failure of the compiler stack means: not on this build)
        first = (str(error).strip().splitlines() or [""])[0]
        return f"{type(error).__name__}: {first[:200]}"
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40, help="measured rounds per rule and model")
    parser.add_argument("--batch", type=int, default=128, help="batch size")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to run")
    parser.add_argument("--rules", nargs="+", default=None, help="rules to run (default: all registered)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both the rule's model and native (BioTorch is not run)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: CPU time of this process (with --threads 1 on a shared machine)")
    parser.add_argument("--out", default=None,
                        help="Markdown output file, or - for stdout only (default docs/perf_step.md, "
                             "docs/perf_compile.md with --compile)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    out = args.out or ("docs/perf_compile.md" if args.compile else "docs/perf_step.md")
    if args.compile:
        reason = compile_works()
        if reason is not None:
            sys.exit(f"step_time.py --compile: torch.compile does not work on this build ({reason}); "
                     "run without --compile")
    rules = args.rules or [r for r in bioprop.list_rules() if r != "backprop"]
    try:
        import biotorch  # noqa: F401
        has_biotorch = not args.compile
    except ImportError:
        has_biotorch = False

    lines = [
        "| model | rule | bioprop / native | BioTorch / native | bioprop / BioTorch | native step (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for model_name in args.models:
        for rule in rules:
            r = measure(model_name, rule, args.rounds, args.batch, args.compile, clock)
            if "skipped" in r:
                print(f"skipped {model_name}/{rule}: {r['skipped']}", file=sys.stderr)
                continue
            fmt = lambda k: f"{r[k]:.3f}" if k in r else "—"  # noqa: E731
            line = (f"| {model_name} | {rule} | {fmt('ours')} | {fmt('biotorch')} | {fmt('ours_vs_biotorch')} "
                    f"| {r['native_ms']:.1f} |")
            print(line, flush=True)
            lines.append(line)
    title = ("# Step time under torch.compile: every rule against compiled native backprop" if args.compile else
             "# Step time: every rule against native backprop and BioTorch")
    compiled = (" Both sides run through `torch.compile(model)` (default mode; forward and backward compiled, "
                "the SGD update eager), after a warm-up that includes the compilation; BioTorch is not run."
                if args.compile else "")
    header = [
        title,
        "",
        f"Produced by `{command_line('step_time.py', argv)}` "
        f"(rounds={args.rounds}, batch={args.batch}, {args.clock} clock, torch {torch.__version__}, {torch.get_num_threads()} threads,"
        f" {platform.machine()}, Python {platform.python_version()}, BioTorch "
        f"{'0.0.16' if has_biotorch else 'not installed' if not args.compile else 'not run'}).",
        "",
        "Ratios are medians over rounds of per-round ratios (variants alternate within a round); below 1 means "
        "faster than native autograd. mlp = 3x800 tanh MLP, convnet = two 3x3 conv/ReLU/pool stages + linear; "
        "batch 128, 28x28 inputs, SGD with momentum. BioTorch has no sham, partial concordance, Kolen-Pollack, "
        "weight-mirror, IFA, DenseFA or backprop-control (bp_noise, bp_alignment) layers (—). The per-layer "
        "controls bp_noise and bp_alignment are measured at their default options." + compiled,
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    if out != "-":
        Path(out).write_text(text)
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
