"""Step time of a RetinaNet training step per rule, as a ratio to backprop, measured in one process.

One step = forward, focal + smooth-L1 loss, backward, SGD step, on a fixed batch. In each round the rules run
back to back and the ratios to backprop are taken within the round; the table reports the median over rounds.

    python benchmarks/detection_step_time.py                        # reduced CPU net, writes docs/perf_detection.md
    python benchmarks/detection_step_time.py --rounds 3 --out -     # quick look, print only
    python benchmarks/detection_step_time.py --compile              # compiled rules, docs/perf_detection_compile.md
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

import bioprop
from bioprop.models import create_model
from _timing import paired_ratios, paired_times

REDUCED = dict(backbone="resnet18", width=16, fpn_channels=64, head_convs=2, anchor_size=2.0)


def make_step(rule: str, batch: int, size: int, device: str,  # type: ignore[no-untyped-def]
              compile_mode: bool = False):
    torch.manual_seed(0)
    det = create_model("retinanet", num_classes=10, in_channels=3, image_size=size, **REDUCED)
    det = bioprop.convert(det, rule, last_layer="backprop").to(device)
    opt = torch.optim.SGD(det.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    targets = [{"boxes": torch.tensor([[10.0, 12, 40, 44], [60, 60, 100, 90]], device=device),
                "labels": torch.tensor([3, 7], device=device), "iscrowd": torch.zeros(2, dtype=torch.int64,
                                                                                         device=device)}] * batch

    forward = torch.compile(det) if compile_mode else det  # compiled at its first call (the warm-up)

    def step() -> None:
        loss = det.loss(forward(x), targets, (size, size))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", default="backprop,usf,fa,frsf,brsf")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per rule and round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu",
                        help="cpu: CPU time of this process (one thread; other jobs do not inflate it); wall: elapsed")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each detector's forward (and so its backward); the update stays eager")
    parser.add_argument("--out", default=None, help="Markdown file, or - to print only (default "
                        "docs/perf_detection.md, docs/perf_detection_compile.md with --compile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rules = args.rules.split(",")
    out = args.out or ("docs/perf_detection_compile.md" if args.compile else "docs/perf_detection.md")
    steps = {r: make_step(r, args.batch, args.size, args.device, args.compile) for r in rules}
    clock = time.process_time if args.clock == "cpu" and args.device == "cpu" else time.perf_counter
    # rotate: each round starts with the next rule, so that no rule always runs right after another one
    times = paired_times(steps, args.rounds, args.steps, warmup=1, rotate=True, clock=clock,
                         sync=torch.cuda.synchronize if args.device.startswith("cuda") else None)
    ratios = {r: paired_ratios(times, r, "backprop") for r in rules}
    lines = ["# Detector step time per rule" + (", compiled (torch.compile)" if args.compile else ""), "",
             f"RetinaNet reduced net ({', '.join(f'{k}={v}' for k, v in REDUCED.items())}), batch {args.batch} "
             f"of {args.size}×{args.size} images, {args.device}, {args.threads} thread(s), torch "
             f"{torch.__version__}, {platform.processor() or platform.machine()}; median over {args.rounds} "
             f"rounds of {args.steps} steps, each round starting with the next rule; the heads' output layers use "
             "backprop.", "",
             f"Command: `python benchmarks/detection_step_time.py --rules {args.rules} --rounds {args.rounds} "
             f"--steps {args.steps} "
             f"--batch {args.batch} --size {args.size} --device {args.device} --threads {args.threads} "
             f"--clock {args.clock}{' --compile' if args.compile else ''}`", "",
             "| rule | ms / step | × backprop |", "|---|---|---|"]
    for rule in rules:
        lines.append(f"| {rule} | {1000 * statistics.median(times[rule]):.0f} | "
                     f"{statistics.median(ratios[rule]):.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if out != "-":
        Path(out).write_text(text)


if __name__ == "__main__":
    main()
