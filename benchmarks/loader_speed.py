"""In-memory tensor loader versus a per-sample DataLoader, and the MNIST cache load time.

Measures, on real MNIST from the data cache (run ``bioprop data get mnist`` first):

1. one training epoch of nokland2016's 2x800 tanh MLP (SGD, batch 128) fed by ``bioprop.data.create_loader``
   versus the same model fed by ``torch.utils.data.DataLoader`` over the per-sample ``Dataset`` (each sample
   normalised in ``__getitem__``, batches collated), the usual torchvision-style pipeline. The two variants
   alternate (A B A B ...) in one process and the result is the median of the paired ratios;
2. the same epochs without the model (data only);
3. the time to load the full MNIST (60k + 10k) from the cache into tensors, in fresh processes.

Usage::

    python benchmarks/loader_speed.py                   # writes docs/perf_data.md
    python benchmarks/loader_speed.py --pairs 5 --out -  # print only
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from bioprop.data import create_loader, load_dataset
from bioprop.models import create_model

ROOT = Path(__file__).resolve().parents[1]
LOAD_SNIPPET = ("import time, bioprop.data as d; t = time.perf_counter(); d.load_dataset('mnist', 'train'); "
                "d.load_dataset('mnist', 'test'); print(time.perf_counter() - t)")


def train_epoch(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Seconds for one SGD epoch over ``batches``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return time.perf_counter() - start


def data_epoch(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Seconds to draw every batch of one epoch."""
    start = time.perf_counter()
    for x, _ in batches:
        x.sum()  # touch the data so lazy work is not skipped
    return time.perf_counter() - start


def paired(run_a: Callable[[], float], run_b: Callable[[], float], pairs: int) -> tuple[list[float], list[float]]:
    """Alternate A and B ``pairs`` times after one warm-up of each; returns the two lists of seconds."""
    run_a(), run_b()
    times_a, times_b = [], []
    for _ in range(pairs):
        times_a.append(run_a())
        times_b.append(run_b())
    return times_a, times_b


def cache_load_times(runs: int) -> list[float]:
    """Seconds to load MNIST train + test from the cache, each in a fresh interpreter (imports not counted)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    times = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", LOAD_SNIPPET], capture_output=True, text=True, check=True, env=env)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs per measurement (default 3)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--load-runs", type=int, default=3, help="fresh processes for the cache load time")
    parser.add_argument("--out", default=str(ROOT / "docs" / "perf_data.md"), help="Markdown file, or - for stdout")
    args = parser.parse_args()

    train = load_dataset("mnist", "train")
    torch.manual_seed(0)
    base = create_model("mlp", depth=2, width=800, activation="tanh", num_classes=10, in_channels=1, image_size=28)
    ours = create_loader(train, args.batch_size, train=True, seed=0)
    reference = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=0,
                           generator=torch.Generator().manual_seed(0))
    assert len(ours) == len(reference)

    print(f"training epochs: {args.pairs} pairs ...", flush=True)
    train_a, train_b = paired(lambda: train_epoch(copy.deepcopy(base), ours),
                              lambda: train_epoch(copy.deepcopy(base), reference), args.pairs)
    print("data-only epochs ...", flush=True)
    data_a, data_b = paired(lambda: data_epoch(ours), lambda: data_epoch(reference), args.pairs)
    print("cache load ...", flush=True)
    loads = cache_load_times(args.load_runs)

    def ratio(a: list[float], b: list[float]) -> float:
        return statistics.median(tb / ta for ta, tb in zip(a, b))

    command = f"python benchmarks/loader_speed.py --pairs {args.pairs} --batch-size {args.batch_size}"
    lines = [
        "## Data loading",
        "",
        f"Command: `{command}` (MNIST from the data cache, written by `bioprop data get mnist`).",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
        f"{torch.get_num_threads()} intra-op threads, CPU only. Times are medians over {args.pairs} alternating "
        "A/B pairs; the ratio is the median of the paired ratios (DataLoader time / our time).",
        "",
        "| measurement | `create_loader` (in-memory) | `DataLoader` over the per-sample Dataset | speed-up | target |",
        "|---|---|---|---|---|",
        f"| one epoch, 2x800 tanh MLP, SGD, batch {args.batch_size} ({len(ours)} steps) | "
        f"{statistics.median(train_a):.2f} s | {statistics.median(train_b):.2f} s | "
        f"**{ratio(train_a, train_b):.2f}×** | ≥ 1.5× |",
        f"| data only, one epoch | {statistics.median(data_a):.3f} s | {statistics.median(data_b):.3f} s | "
        f"{ratio(data_a, data_b):.1f}× | — |",
        "",
        f"Loading the full MNIST (60,000 + 10,000 images) from the cache into uint8 tensors, including the sha256 "
        f"check of the cache file, in {args.load_runs} fresh processes: median **{statistics.median(loads):.2f} s**, "
        f"max {max(loads):.2f} s (target ≤ 2 s; interpreter and torch import not included).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
