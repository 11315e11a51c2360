"""The CUDA paths benchmarks/gpu.py relies on: a bf16 autocast step, channels_last, the draws of fa and brsf on a
CUDA device, and DDP over NCCL. Every test skips without a GPU."""
from __future__ import annotations

import copy
import gc
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import bioprop

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

RULES = ("sham", "usf", "fa", "brsf", "kp")


def conv_net(batchnorm: bool = True) -> nn.Sequential:
    """A small conv net (conv, BN, ReLU, pool, conv, ReLU, linear read-out) for 3x16x16 inputs."""
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(8) if batchnorm else nn.Identity()
    # No bias before BN: BN removes it, its gradient is zero up to rounding, and no direction to compare.
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=not batchnorm), norm, nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))


def batch(device: str = "cuda") -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 16, 16, generator=g).to(device), torch.randint(0, 10, (8,), generator=g).to(device)


def grads(model: nn.Module, x: Tensor, y: Tensor, bf16: bool) -> dict[str, Tensor]:
    """Gradient of every trainable parameter after one forward/backward (forward and loss under bf16 autocast
    when ``bf16``)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
        assert out.dtype == (torch.bfloat16 if bf16 else torch.float32)
        loss = F.cross_entropy(out, y)
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def cosine(a: Tensor, b: Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("rule", RULES)
def test_bf16_autocast_step_follows_float32(rule: str) -> None:
    """Under bf16 autocast every gradient is float32 (the leaf's dtype) and points where the float32 step's does."""
    model = bioprop.convert(conv_net(), rule, seed=0).cuda()
    x, y = batch()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        reference = grads(model, x, y, bf16=False)
        low = grads(model, x, y, bf16=True)
    assert reference.keys() == low.keys() and reference
    for key, value in low.items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), key
        assert cosine(value, reference[key]) > 0.99, key


def test_bf16_autocast_sham_equals_native() -> None:
    """sham under bf16 autocast is backprop under bf16 autocast: the same bf16 products, the same gradients."""
    native = conv_net().cuda()
    sham = bioprop.convert(copy.deepcopy(native), "sham")
    x, y = batch()
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
        ours, theirs = grads(sham, x, y, bf16=True), grads(native, x, y, bf16=True)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=2e-2, atol=1e-3, msg=key)


@pytest.mark.parametrize("rule", RULES)
def test_channels_last_matches_contiguous(rule: str) -> None:
    """A converted net in channels_last gives the contiguous net's output and gradients; its convolutions keep the
    channels_last layout."""
    contiguous = bioprop.convert(conv_net(), rule, seed=0).cuda()
    last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    x, y = batch()
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
        x_last = x.contiguous(memory_format=torch.channels_last)
        first_conv = last[0](x_last.detach().requires_grad_(True))
        assert first_conv.is_contiguous(memory_format=torch.channels_last)
        ref, got = grads(contiguous, x, y, bf16=False), grads(last, x_last, y, bf16=False)
        torch.testing.assert_close(last(x_last), contiguous(x), rtol=1e-4, atol=1e-5)
    for key, value in ref.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_fa_feedback_drawn_on_cuda_equals_cpu_draw() -> None:
    """fa's B comes from the layer's CPU generator, so converting on the GPU gives the B of the CPU conversion."""
    on_cpu = bioprop.convert(conv_net(), "fa", seed=3)
    on_gpu = bioprop.convert(conv_net().cuda(), "fa", seed=3)
    cpu_b, gpu_b = bioprop.feedback_weights(on_cpu), bioprop.feedback_weights(on_gpu)
    assert cpu_b.keys() == gpu_b.keys() and cpu_b
    for key, value in gpu_b.items():
        assert value.device.type == "cuda"
        assert torch.equal(value.cpu(), cpu_b[key]), key


def train_steps(model: nn.Module, steps: int) -> list[dict[str, Tensor]]:
    """brsf's magnitudes (buffers ``*.feedback_magnitude``) used in each of ``steps`` SGD steps on a fixed batch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batch()
    seen = []
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        seen.append({k: v.clone() for k, v in model.state_dict().items() if k.endswith("feedback_magnitude")})
        opt.step()
    return seen


def test_brsf_draws_on_cuda_are_reproducible_and_renewed_per_update() -> None:
    """brsf draws its magnitudes with a CUDA generator: two conversions with one seed see the same sequence, a
    new one at every update, and a copy loaded from a state_dict continues it."""
    first = bioprop.convert(conv_net().cuda(), "brsf", seed=4)
    second = bioprop.convert(conv_net().cuda(), "brsf", seed=4)
    resumed = bioprop.convert(conv_net().cuda(), "brsf", seed=9)
    a, b = train_steps(first, 2), train_steps(second, 2)
    assert a[0] and all(v.device.type == "cuda" for v in a[0].values())
    for step_a, step_b in zip(a, b):
        for key in step_a:
            assert torch.equal(step_a[key], step_b[key]), key
    assert any(not torch.equal(a[0][k], a[1][k]) for k in a[0])  # renewed after the update
    resumed.load_state_dict(first.state_dict())
    second_next, resumed_next = train_steps(second, 1)[0], train_steps(resumed, 1)[0]
    for key, value in second_next.items():
        assert torch.equal(resumed_next[key], value), key


def _nccl_worker(rank: int, world: int, init_file: str, out_dir: str, rules: list[str]) -> None:
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    ddp = None
    try:
        for rule in rules:
            model = bioprop.convert(conv_net(batchnorm=False), rule, seed=5).cuda(rank)
            ddp = DistributedDataParallel(model, device_ids=[rank])
            x, y = batch(f"cuda:{rank}")
            shard = len(y) // world
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
            for _ in range(3):
                opt.zero_grad()
                F.cross_entropy(ddp(x[rank * shard:(rank + 1) * shard]), y[rank * shard:(rank + 1) * shard]).backward()
                opt.step()
            if rank == 0:
                torch.save({k: v.cpu() for k, v in model.state_dict().items()}, Path(out_dir, f"{rule}.pt"))
            dist.barrier()
    finally:
        ddp = None  # noqa: F841  (the reducer must not outlive its group)
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_over_nccl_matches_one_process(tmp_path: Path) -> None:
    """DDP over NCCL (2 GPUs when present, else 1) trains as one process on the whole batch: same weights, same
    feedback state."""
    rules = ["usf", "brsf", "kp"]
    world = min(2, torch.cuda.device_count())
    mp.spawn(_nccl_worker, args=(world, str(tmp_path / "init"), str(tmp_path), rules), nprocs=world, join=True)
    for rule in rules:
        got = torch.load(tmp_path / f"{rule}.pt", weights_only=True)
        single = bioprop.convert(conv_net(batchnorm=False), rule, seed=5).cuda()
        opt = torch.optim.SGD(single.parameters(), lr=0.1, momentum=0.9)
        x, y = batch()
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(single(x), y).backward()
            opt.step()
        for key, value in single.state_dict().items():  # no BN: a shard's statistics would differ from the batch's
            torch.testing.assert_close(got[key], value.cpu(), rtol=1e-4, atol=1e-5, msg=f"{rule}: {key}")
