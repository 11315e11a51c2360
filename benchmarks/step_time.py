"""Step time of every rule against native autograd backprop, and against BioTorch, measured in one process.

One training step = forward, cross-entropy, backward, SGD step. In each round the variants run back to back
(native, bioprop, BioTorch) and the ratios to native are taken within the round; the table reports the median
over rounds, which cancels most of the drift of a noisy machine.

    python benchmarks/step_time.py                 # writes docs/perf_step.md
    python benchmarks/step_time.py --rounds 10 --models mlp --out -   # quick look, print only

BioTorch is measured when ``import biotorch`` works (``pip install --no-deps biotorch==0.0.16``).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import bioprop

BIOTORCH_MODES = {"fa": "fa", "usf": "usf", "brsf": "brsf", "frsf": "frsf", "dfa": "dfa"}


def make_mlp() -> nn.Module:
    """3x800 tanh MLP on flattened 28x28 inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 800), nn.Tanh(), nn.Linear(800, 800), nn.Tanh(),
                         nn.Linear(800, 800), nn.Tanh(), nn.Linear(800, 10))


def make_convnet() -> nn.Module:
    """Small conv net for 28x28 inputs: two 3x3 conv/ReLU/max-pool stages and a linear read-out."""
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 7 * 7, 10))


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": make_mlp, "convnet": make_convnet}


@dataclass
class Variant:
    """One model ready to step: ``step()`` runs forward, loss, backward and the optimizer update."""

    model: nn.Module
    step: Callable[[], None]


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, biotorch_dfa: bool = False) -> Callable[[], None]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x, y, F.cross_entropy) if biotorch_dfa else model(x)
        F.cross_entropy(out, y).backward()
        opt.step()
    return step


def biotorch_variant(base: nn.Module, rule: str, x: torch.Tensor, y: torch.Tensor) -> Variant | None:
    mode = BIOTORCH_MODES.get(rule)
    if mode is None:
        return None
    try:
        from biotorch.module.biomodule import BioModule
    except ImportError:
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # BioTorch prints a conversion report
        model = BioModule(copy.deepcopy(base), mode=mode, output_dim=10 if mode == "dfa" else None)
    return Variant(model, make_step(model, x, y, biotorch_dfa=mode == "dfa"))


def time_once(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure(model_name: str, rule: str, rounds: int, batch: int) -> dict[str, float]:
    torch.manual_seed(0)
    base = MODELS[model_name]()
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    native_model = copy.deepcopy(base)
    native = Variant(native_model, make_step(native_model, x, y))
    ours_model = bioprop.convert(copy.deepcopy(base), rule, seed=0)
    ours = Variant(ours_model, make_step(ours_model, x, y))
    try:
        ours.step()
    except ValueError as error:  # e.g. IFA's forward relay is undefined across pooling inside a block
        return {"skipped": str(error).split(";")[0]}
    theirs = biotorch_variant(base, rule, x, y)
    variants = [native, ours] + ([theirs] if theirs else [])
    for _ in range(3):  # warm-up: allocator, thread pool, lazy state
        for v in variants:
            v.step()
    ours_ratio, theirs_ratio, vs_theirs = [], [], []
    for _ in range(rounds):
        times = [time_once(v.step) for v in variants]
        ours_ratio.append(times[1] / times[0])
        if theirs:
            theirs_ratio.append(times[2] / times[0])
            vs_theirs.append(times[1] / times[2])
    result = {"ours": statistics.median(ours_ratio)}
    if theirs:
        result["biotorch"] = statistics.median(theirs_ratio)
        result["ours_vs_biotorch"] = statistics.median(vs_theirs)
    result["native_ms"] = 1e3 * statistics.median(time_once(native.step) for _ in range(5))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40, help="measured rounds per rule and model")
    parser.add_argument("--batch", type=int, default=128, help="batch size")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to run")
    parser.add_argument("--rules", nargs="+", default=None, help="rules to run (default: all registered)")
    parser.add_argument("--out", default="docs/perf_step.md", help="Markdown output file, or - for stdout only")
    args = parser.parse_args(argv)
    rules = args.rules or [r for r in bioprop.list_rules() if r != "backprop"]
    try:
        import biotorch  # noqa: F401
        has_biotorch = True
    except ImportError:
        has_biotorch = False

    lines = [
        "| model | rule | bioprop / native | BioTorch / native | bioprop / BioTorch | native step (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for model_name in args.models:
        for rule in rules:
            r = measure(model_name, rule, args.rounds, args.batch)
            if "skipped" in r:
                print(f"skipped {model_name}/{rule}: {r['skipped']}", file=sys.stderr)
                continue
            fmt = lambda k: f"{r[k]:.3f}" if k in r else "—"  # noqa: E731
            line = (f"| {model_name} | {rule} | {fmt('ours')} | {fmt('biotorch')} | {fmt('ours_vs_biotorch')} "
                    f"| {r['native_ms']:.1f} |")
            print(line, flush=True)
            lines.append(line)
    header = [
        "# Step time: every rule against native backprop and BioTorch",
        "",
        "Produced by `python benchmarks/step_time.py` "
        f"(rounds={args.rounds}, batch={args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads,"
        f" {platform.machine()}, Python {platform.python_version()}, BioTorch "
        f"{'0.0.16' if has_biotorch else 'not installed'}).",
        "",
        "Ratios are medians over rounds of per-round ratios (variants alternate within a round); below 1 means "
        "faster than native autograd. mlp = 3x800 tanh MLP, convnet = two 3x3 conv/ReLU/pool stages + linear; "
        "batch 128, 28x28 inputs, SGD with momentum. BioTorch has no sham, partial concordance, Kolen-Pollack, "
        "weight-mirror, IFA, DenseFA or backprop-control (bp_noise, bp_alignment) layers (—). The per-layer "
        "controls bp_noise and bp_alignment are measured at their default options.",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    if args.out != "-":
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
