"""Epoch time of the training engine against a minimal hand-written PyTorch loop over the same tensors.

Both train the 2x800 tanh MLP with backprop on MNIST (the 8x8 digits when MNIST is absent; the output says
which), batch 64, SGD with momentum 0.9, on the CPU. The hand-written loop is the floor: a random permutation,
one gather and normalisation per batch, forward, cross-entropy, backward, step, nothing else. The engine runs
as ``bioprop train`` does, with its schedule, running sums, NaN checks, metrics log and checkpoint; the epoch
time compared is the engine's own ``epoch_time_s`` (training only, as in the loop; evaluation is excluded in
both). Variants alternate (loop, engine, engine + analysis, loop, ...) and the median of the paired ratios is
reported, so the slow drift of a shared machine cancels.

    python benchmarks/engine_speed.py                 # writes docs/perf_engine.md
    python benchmarks/engine_speed.py --pairs 3 --dataset digits --no-write
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bioprop.data import list_present, load_dataset
from bioprop.engine import config_from_dict, read_records, train
from bioprop.models import create_model

BATCH, LR, MOMENTUM = 64, 0.01, 0.9


def hand_written_epoch(images: torch.Tensor, labels: torch.Tensor, mean: float, std: float, seed: int) -> float:
    """One epoch of the minimal loop; returns its wall time in seconds (model built outside the timing)."""
    torch.manual_seed(seed)
    model = create_model("mlp", num_classes=10, in_channels=images.shape[1], image_size=images.shape[-1],
                         depth=2, width=800)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    start = time.perf_counter()
    order = torch.randperm(len(labels))
    for b in range(len(labels) // BATCH):
        index = order[b * BATCH:(b + 1) * BATCH]
        x = (images[index].float() / 255 - mean) / std  # (B, C, H, W)
        loss = F.cross_entropy(model(x), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def engine_epoch(dataset: str, out: Path, metrics_every: int, seed: int) -> float:
    """One epoch through ``bioprop.engine.train``; returns the logged training time of the epoch."""
    config = config_from_dict(dict(dataset=dataset, model="mlp", model_args={"depth": 2, "width": 800},
                                   rule="backprop", epochs=1, batch_size=BATCH, lr=LR, momentum=MOMENTUM,
                                   optimizer="sgd", seed=seed, output_dir=str(out), overwrite=True, progress=False,
                                   verbose=False, metrics_every=metrics_every, device="cpu"))
    train(config)
    return read_records(out / "metrics.jsonl", "epoch")[-1]["epoch_time_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--dataset", default=None, help="mnist or digits (default: mnist if present)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: stable on a "
                                                                 "shared machine)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write docs/perf_engine.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = args.dataset or ("mnist" if list_present()["mnist"] is not None else "digits")
    note = "" if args.dataset or dataset == "mnist" else " (MNIST not present: ran on the 8x8 digits)"
    data = load_dataset(dataset, split="train")
    images, labels, mean, std = data.images, data.labels, data.mean[0], data.std[0]

    times: dict[str, list[float]] = {"loop": [], "engine": [], "engine_analysis": []}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            times["loop"].append(hand_written_epoch(images, labels, mean, std, seed=pair))
            times["engine"].append(engine_epoch(dataset, Path(tmp) / "e", metrics_every=0, seed=pair))
            times["engine_analysis"].append(engine_epoch(dataset, Path(tmp) / "a", metrics_every=200, seed=pair))
            print(f"round {pair + 1}/{args.pairs}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
                  flush=True)
    ratio = {k: statistics.median(t / floor for t, floor in zip(times[k], times["loop"]))
             for k in ("engine", "engine_analysis")}
    rows = [("hand-written loop", statistics.median(times["loop"]), 1.0),
            ("engine (`metrics_every = 0`)", statistics.median(times["engine"]), ratio["engine"]),
            ("engine, default analysis log (`metrics_every = 200`)", statistics.median(times["engine_analysis"]),
             ratio["engine_analysis"])]
    table = "\n".join(["| variant | median epoch time (s) | median paired ratio to the loop |", "|---|---|---|"]
                      + [f"| {name} | {t:.2f} | {r:.3f} |" for name, t, r in rows])
    command = "python benchmarks/engine_speed.py " + " ".join(sys.argv[1:])
    text = (f"# Engine epoch time against a hand-written loop\n\n"
            f"Command: `{command.strip()}`\n\n"
            f"2x800 tanh MLP, backprop, {dataset}{note} ({len(labels)} training images), batch {BATCH}, SGD "
            f"momentum {MOMENTUM}, CPU with {args.threads} torch thread(s), {args.pairs} alternating rounds; "
            f"torch {torch.__version__}, Python {platform.python_version()}, "
            f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores).\n\n{table}\n\n"
            f"Target: the engine at most 1.1x the loop. The engine's extra work per step is setting the scheduled lr, "
            f"the running loss/accuracy sums and, every `log_every` steps, one read of them (NaN check, metrics "
            f"record). The analysis log runs `bioprop.metrics.training_metrics` (a shadow backward) every 200 "
            f"steps.\n")
    print()
    print(text)
    if not args.no_write:
        path = Path(__file__).resolve().parents[1] / "docs" / "perf_engine.md"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        print(f"written to {path}")


if __name__ == "__main__":
    main()
