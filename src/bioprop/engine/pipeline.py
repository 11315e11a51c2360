"""The named steps every training run goes through, whatever its task::

    build data (Task.build_data) → build model → build optimisation → restore (the run's checkpoint) → wrap

Each step is a function of the config and what the steps before it built, so every run (the engine's loop,
:mod:`bioprop.engine.loop`, for classification and detection alike, or a task's own ``run_class``) composes the
same pieces, and the seeds of every epoch come from :func:`epoch_seed`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..convert import convert
from ..models import create_model
from ..optim import Constraint, apply_constraints, create_constraint
from ..rules import prepare
from ..seeding import derive_seed
from .build import LossFn, build_optimizer
from .config import ConfigError, TrainConfig, rule_options_of
from .distributed import DistEnv

__all__ = ["seed_everything", "epoch_seed", "rank_batch", "build_model",
           "Optimisation", "build_optimisation", "wrap_model", "set_lr"]


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), NumPy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A well-mixed seed for one epoch of one process, a function of ``(seed, epoch, rank)`` only.

    The low 32 bits of :func:`~bioprop.seeding.derive_seed`: the seed earlier versions drew
    (``SeedSequence([seed, epoch, rank])``'s first 32-bit word), so runs and their checkpoints continue the same
    streams.
    """
    return derive_seed(seed, epoch, rank) % 2**32


def rank_batch(config: TrainConfig, env: DistEnv, what: str = "") -> int:
    """The batch of one process: ``batch_size / world_size``.

    Args:
        what: how the error names the global batch (default ``batch <batch_size>``).

    Raises:
        ConfigError: the global batch does not divide evenly over the processes.
    """
    if config.batch_size % env.world_size:
        raise ConfigError("batch_size", f"the global {what or f'batch {config.batch_size}'} must divide evenly over "
                                        f"{env.world_size} processes")
    return config.batch_size // env.world_size


def build_model(config: TrainConfig, device: torch.device, model_kwargs: dict[str, int],
                example_input: Tensor | None, *, rule_error_prefix: bool = True) -> nn.Module:
    """Create the config's model for the data's shape, convert it to the config's rule and move it to ``device``.

    Args:
        model_kwargs: ``num_classes``, ``in_channels``, ``image_size`` of the data.
        example_input: a batch of the data's shape on ``device``, for :func:`bioprop.prepare`.
        rule_error_prefix: start a rule error with ``rule 'x' on model 'y': `` (classification does).

    Raises:
        ConfigError: a bad ``model_args`` entry, or a rule (or ``last_layer``) that cannot apply to the model.
    """
    try:
        model = create_model(config.model, **model_kwargs, **config.model_args)
    except (TypeError, ValueError) as err:  # an unknown or bad keyword in model_args
        raise ConfigError("model_args", f"model_args of {config.model!r}: {err}") from None
    try:
        model = convert(model, config.rule, seed=config.seed, last_layer=config.last_layer or None,
                        **rule_options_of(config))
        model.to(device)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        if example_input is not None:
            prepare(model, example_input)  # e.g. direct feedback's D, sized by the output
    except ValueError as err:  # a rule that cannot apply to this model or this last_layer
        if not rule_error_prefix:
            raise ConfigError("rule", str(err)) from None
        key = "last_layer" if config.last_layer and "last_layer" in str(err) else "rule"
        raise ConfigError(key, f"rule {config.rule!r} on model {config.model!r}: {err}") from None
    return model


# --- rule life cycle: what the rules need from the loop before the first step and after each step -------------


# ----------------------------------------------------------------------------------------------- optimisation


@dataclass
class Optimisation:
    """Constraints, optimizer and loss of a run: one :meth:`step` per batch after ``loss.backward()``."""

    constraints: list[Constraint]
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn | None

    def step(self) -> None:
        """``optimizer.step()``, then the constraints, sign projections before rescaling so both hold exactly."""
        self.optimizer.step()
        apply_constraints(self.constraints)


def build_optimisation(config: TrainConfig, model: nn.Module, loss_fn: LossFn | None) -> Optimisation:
    """The config's constraints (built from the model's current weights), optimizer and the task's loss.

    Raises:
        ConfigError: a constraint that cannot apply (e.g. ``constant_norm`` on zero-initialised weights), or an
            optimizer that a rule cannot follow (``kp`` with Adam and coupled weight decay).
    """
    try:
        constraints = [create_constraint(name, model) for name in config.constraints]
    except ValueError as err:
        raise ConfigError("constraints", f"constraints: {err}") from None
    try:
        optimizer = build_optimizer(config, model)
    except ValueError as err:  # e.g. kp with an optimizer whose update of B it cannot follow
        raise ConfigError("optimizer", str(err)) from None
    return Optimisation(constraints, optimizer, loss_fn)


def wrap_model(model: nn.Module, config: TrainConfig, env: DistEnv, device: torch.device) -> nn.Module:
    """DDP (under torchrun) and ``torch.compile`` (``config.compile``) around the model, in that order."""
    wrapped: nn.Module = model
    if env.distributed:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the lr of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr

