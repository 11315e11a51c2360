"""Shared harness of the DDP tests: the same few training steps on 2 gloo processes (each on its shard of the
global batch) and the final state of every rank, to compare with one process that sees the whole batch."""
from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

Batches = list[tuple[Tensor, Tensor]]


def _worker(rank: int, world: int, init_file: str, out_dir: str, rules: list[str],
            make_model: Callable[[str], nn.Module], make_batches: Callable[[], Batches],
            train: Callable[[nn.Module, Batches], None], check_initial_state: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ddp = None
    try:
        for rule in rules:
            model = make_model(rule)
            if check_initial_state:
                # The feedback state each rank drew on its own must agree before DDP broadcasts anything.
                state = [t.clone() for k, t in model.state_dict().items() if "feedback" in k]
                gathered: list[list[Tensor]] = [None] * world  # type: ignore[list-item]
                dist.all_gather_object(gathered, state)
                for other in gathered[1:]:
                    assert all(torch.equal(a, b) for a, b in zip(gathered[0], other)), rule
            ddp = DistributedDataParallel(model)
            global_batch = len(make_batches()[0][0])
            shard = global_batch // world
            train(ddp, [(x[rank * shard:(rank + 1) * shard], y[rank * shard:(rank + 1) * shard])
                        for x, y in make_batches()])
            final = {k: v.clone() for k, v in model.state_dict().items()}
            gathered_final: list[dict] = [None] * world  # type: ignore[list-item]
            dist.all_gather_object(gathered_final, final)
            if rank == 0:
                torch.save(gathered_final, os.path.join(out_dir, f"{rule}.pt"))
    finally:
        # Drop the DDP reducer before the group: a reducer that outlives its group can deadlock at exit.
        ddp = None  # noqa: F841
        gc.collect()
        dist.destroy_process_group()


def run_two_processes(tmp_path: Path, rules: list[str], make_model: Callable[[str], nn.Module],
                      make_batches: Callable[[], Batches], train: Callable[[nn.Module, Batches], None],
                      check_initial_state: bool = False) -> dict[str, list[dict[str, Tensor]]]:
    """``{rule: [state_dict of rank 0, state_dict of rank 1]}`` after training under DDP on 2 processes.

    The callables must be module-level functions (they are sent to the spawned processes by reference).
    """
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), rules, make_model, make_batches, train,
                            check_initial_state), nprocs=2, join=True)
    return {rule: torch.load(tmp_path / f"{rule}.pt", weights_only=True) for rule in rules}
