"""Paired timing, the one measuring loop of the benchmarks: variants alternate inside each round and the ratio to
a baseline is taken within the round, so that the drift of a noisy, shared machine moves both sides together.

    times = paired_times({"native": native_step, "usf": usf_step}, rounds=30)
    ratio = median_ratio(times, "usf", "native")       # median over rounds of usf / native

Tests never assert on these numbers; the benchmarks write them to ``docs/``.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Callable, Sequence

import torch

__all__ = ["Step", "paired_times", "paired_ratios", "median_ratio", "quartiles", "set_threads", "machine_line",
           "command_line", "cuda_sync"]

Step = Callable[[], None]


def paired_times(steps: dict[str, Step], rounds: int, per_round: int = 1, *, warmup: int = 3,
                 clock: Callable[[], float] = time.perf_counter, rotate: bool = True,
                 sync: Callable[[], None] | None = None, deadline: float | None = None) -> dict[str, list[float]]:
    """Seconds per step of every variant in every round.

    Args:
        steps: variant name -> a callable running one step (forward, loss, backward, optimizer update).
        rounds: measured rounds; every variant runs ``per_round`` steps in each.
        per_round: steps per variant per round (more steps per round average out timer resolution).
        warmup: unmeasured steps per variant first (allocator, thread pool, lazily drawn state, cuDNN choice).
        clock: ``time.perf_counter`` (elapsed) or ``time.process_time`` (CPU time of this process, which other
            processes on a shared machine do not inflate; single-threaded runs only).
        rotate: start each round with the next variant, so that no variant always runs first.
        sync: called before reading the clock (``torch.cuda.synchronize`` on a GPU, whose steps are asynchronous).
        deadline: a ``time.perf_counter()`` value after which no new round starts (at least one round runs).

    Returns:
        ``{name: [seconds per step in round 0, round 1, ...]}``; every list has the same length.
    """
    names = list(steps)
    wait = sync or (lambda: None)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    wait()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        if r and deadline is not None and time.perf_counter() > deadline:
            break
        shift = r % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            start = clock()
            for _ in range(per_round):
                steps[name]()
            wait()
            times[name].append((clock() - start) / per_round)
    return times


def paired_ratios(times: dict[str, list[float]], name: str, baseline: str) -> list[float]:
    """Per-round ratios ``times[name] / times[baseline]``."""
    return [t / b for t, b in zip(times[name], times[baseline])]


def median_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of the paired ratio of ``name`` to ``baseline`` (below 1: ``name`` is faster)."""
    return statistics.median(paired_ratios(times, name, baseline))


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile (the value three times when there is only one)."""
    if len(values) < 2:
        return (values[0],) * 3  # type: ignore[return-value]
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads (0 keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def cuda_sync(device: torch.device | str) -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` for a CUDA device, None for the CPU (whose steps are synchronous)."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else None


def machine_line() -> str:
    """Torch version, threads, CPU count, load average and Python: what a reader needs to weigh the numbers."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()} with "
            f"{os.cpu_count()} CPUs (load average {load:.1f} at the start), Python {platform.python_version()}")


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces this run: ``python benchmarks/<script> <its arguments>``."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{script}", *args])
