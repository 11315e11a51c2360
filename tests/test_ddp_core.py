"""Two CPU processes under DDP (gloo): identical feedback state on every rank, and the same weights as one
process that sees the whole global batch."""
from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import bioprop

RULES = ["fa", "usf", "brsf", "frsf", "partial_concordance", "kp"]
STEPS = 3
GLOBAL_BATCH = 8


def make_model(rule: str) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.Tanh(),
                        nn.Linear(16, 3))
    return bioprop.convert(net, rule, seed=5)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 1, 6, 6, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g))
            for _ in range(STEPS)]


def train(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for rule in RULES:
            model = make_model(rule)
            # The feedback state each rank drew on its own must already agree before DDP broadcasts anything.
            state = [t.clone() for k, t in model.state_dict().items() if "feedback" in k]
            gathered: list[list[torch.Tensor]] = [None] * world  # type: ignore[list-item]
            dist.all_gather_object(gathered, state)
            for other in gathered[1:]:
                assert all(torch.equal(a, b) for a, b in zip(gathered[0], other)), rule
            ddp = DistributedDataParallel(model)
            shard = GLOBAL_BATCH // world
            train(ddp, [(x[rank * shard:(rank + 1) * shard], y[rank * shard:(rank + 1) * shard])
                        for x, y in batches()])
            final = {k: v.clone() for k, v in model.state_dict().items()}
            gathered_final: list[dict] = [None] * world  # type: ignore[list-item]
            dist.all_gather_object(gathered_final, final)
            if rank == 0:
                torch.save(gathered_final, os.path.join(out_dir, f"{rule}.pt"))
    finally:
        # Drop the DDP reducers before the group: a reducer that outlives its group can deadlock at exit.
        ddp = None  # noqa: F841
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path: Path) -> None:
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rule in RULES:
        rank0, rank1 = torch.load(tmp_path / f"{rule}.pt", weights_only=True)
        single = make_model(rule)
        train(single, batches())
        for key, value in single.state_dict().items():
            torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)  # ranks identical
            torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6, msg=f"{rule}: {key}")
        if rule == "brsf":
            assert int(rank0["3.feedback_draws"]) == STEPS  # the conversion draw serves step 1, then one per update
