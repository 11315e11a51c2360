"""Multi-process training with ``torchrun``: rank detection, process group, device choice and reductions.

``torchrun --nproc_per_node=N -m bioprop train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the
rendezvous address) for each process; the engine reads them, joins the process group (NCCL on CUDA, Gloo on
CPU), and gives each process ``batch_size / N`` samples of every global batch. Without those variables it runs
as a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError

__all__ = ["DistEnv", "detect", "setup", "teardown", "barrier", "device_kind", "choose_device", "all_reduce_sum", "sync_buffers",
           "broadcast_object", "first_error"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the one process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def detect() -> DistEnv:
    """The rank environment set by ``torchrun`` (single process when it is absent).

    Raises:
        ConfigError: when the variables are set but inconsistent.
    """
    if "WORLD_SIZE" not in os.environ:
        return DistEnv()
    try:
        world_size = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError("", "the environment variables RANK, WORLD_SIZE and LOCAL_RANK must be integers (as "
                              "torchrun sets them)") from None
    if not 0 <= rank < world_size:
        raise ConfigError("", f"the environment variable RANK={rank} is outside 0..WORLD_SIZE-1={world_size - 1}")
    return DistEnv(rank, world_size, local_rank)


def device_kind(name: str) -> str:
    """What a device setting means on this machine: ``"auto"`` becomes ``"cuda"`` or ``"cpu"``; ``"cuda:1"``
    stays as it is."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def choose_device(name: str, env: DistEnv) -> torch.device:
    """The device for this process: ``auto`` picks this process's local GPU when there is one, else the CPU.

    Raises:
        ConfigError: ``cuda`` asked for on a machine without a usable GPU.
    """
    name = device_kind(name)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device", f"device {name!r} asked for, but torch sees no CUDA GPU; allowed here: "
                                        "auto, cpu")
        count = torch.cuda.device_count()
        if name == "cuda":
            name = f"cuda:{env.local_rank % count}"
        device = torch.device(name)
        if device.index is not None and device.index >= count:
            raise ConfigError("device", f"device {name!r} does not exist; this machine has cuda:0..cuda:{count - 1}")
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


def setup(env: DistEnv, device: torch.device) -> bool:
    """Join the process group when running under torchrun (a no-op for a single process, or when this process
    is already in one).

    Returns:
        True when this call joined the group: the caller then leaves it with :func:`teardown`.
    """
    if not env.distributed or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                            **({"device_id": device} if device.type == "cuda" else {}))
    return True


def barrier(env: DistEnv) -> None:
    """Wait until every process gets here (a no-op for a single process)."""
    if env.distributed:
        dist.barrier()


def teardown(env: DistEnv) -> None:
    """Leave the process group joined by :func:`setup`."""
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum ``values`` over all processes (returned unchanged for a single process)."""
    if env.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def sync_buffers(model: torch.nn.Module, env: DistEnv) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics, ...) to every process.

    DDP sends rank 0's buffers at the start of each training forward, but that forward then updates each rank's
    running statistics from its own batch. Called before evaluation, this makes every rank score the model that
    rank 0 checkpoints, so a sharded evaluation is the evaluation of one model.
    """
    if not env.distributed:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def broadcast_object(value: object, env: DistEnv) -> object:
    """``value`` from rank 0 on every process (e.g. a decision only rank 0 can make)."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_error(error: BaseException | None, env: DistEnv) -> BaseException | None:
    """The error of the lowest rank that has one (None when no rank has), the same on every process.

    Each rank calls this once after its own set-up checks, so an error only one rank can see (e.g. rank 0's
    look at the run directory) stops every rank with the same message instead of leaving the others blocked
    in their first collective.
    """
    if not env.distributed:
        return error
    gathered: list[object] = [None] * env.world_size
    dist.all_gather_object(gathered, _portable(error))
    return next((e for e in gathered if e is not None), None)  # type: ignore[return-value]


def _portable(error: BaseException | None) -> BaseException | None:
    """``error`` in a form that survives pickling (ConfigError keeps its key and source)."""
    if error is None or isinstance(error, ConfigError):
        return error
    import pickle
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(str(error))
