"""The pieces a config names, each behind a :class:`~bioprop.registry.Registry`: optimizers, learning-rate
schedules and losses.

Each registry's names are what ``TrainConfig`` accepts for its key (``optimizer``, ``schedule``, ``loss``), its
descriptions are what ``bioprop list optimizers|schedules|losses`` shows, and its unknown-name message is the one
a bad config value gets: ``unknown optimizer 'lbfgs'; allowed: sgd, adam, adamw, rmsprop, bm``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..learned import check_optimizer
from ..optim import BatchManhattan, manhattan_param_groups
from ..registry import Registry

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["build_optimizer", "lr_factor", "build_loss", "LossFn", "OPTIMIZERS", "SCHEDULES", "LOSSES",
           "DEFAULT_MOMENTUM"]

#: ``loss_fn(logits (B, K), targets (B,) int64) -> scalar mean loss``
LossFn = Callable[[Tensor, Tensor], Tensor]
#: ``builder(config, model, params, momentum) -> optimizer`` over ``params`` (the trainable parameters of ``model``)
OptimizerBuilder = Callable[["TrainConfig", nn.Module, list, float], torch.optim.Optimizer]
#: ``factor(config, step, steps_per_epoch) -> lr multiplier`` after warmup
ScheduleFactor = Callable[["TrainConfig", int, int], float]

OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer")
SCHEDULES: Registry[ScheduleFactor] = Registry("schedule")
LOSSES: Registry[Callable[[int], LossFn]] = Registry("loss")


# ------------------------------------------------------------------------------------------------ optimizers


@OPTIMIZERS.register("sgd", description="SGD with momentum (default 0.9)", options=False, default_momentum=0.9)
def _sgd(config: TrainConfig, model: nn.Module, params: list, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=config.lr, momentum=momentum, weight_decay=config.weight_decay)


@OPTIMIZERS.register("adam", description="Adam with its default betas", options=False, default_momentum=0.9)
def _adam(config: TrainConfig, model: nn.Module, params: list, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


@OPTIMIZERS.register("adamw", description="AdamW (decoupled weight decay) with its default betas", options=False,
                     default_momentum=0.9)
def _adamw(config: TrainConfig, model: nn.Module, params: list, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


@OPTIMIZERS.register("rmsprop", description="RMSprop, plain by default (nokland2016's optimizer)", options=False,
                     default_momentum=0.0)
def _rmsprop(config: TrainConfig, model: nn.Module, params: list, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=config.lr, momentum=momentum, weight_decay=config.weight_decay)


@OPTIMIZERS.register("bm", description="Batch Manhattan: sign-of-gradient steps with momentum (liao2016)",
                     options=False, default_momentum=0.9)
def _batch_manhattan(config: TrainConfig, model: nn.Module, params: list, momentum: float) -> torch.optim.Optimizer:
    groups = manhattan_param_groups(model, plain_last_layer=config.bm_plain_last_layer)
    return BatchManhattan(groups, lr=config.lr, momentum=momentum, weight_decay=config.weight_decay)


#: ``momentum`` when the config leaves it unset: plain RMSprop (nokland2016's optimizer) has none; adam/adamw
#: ignore the key (they use their betas), so it keeps the value older runs stored for it
DEFAULT_MOMENTUM: dict[str, float] = {name: OPTIMIZERS.entry(name).meta["default_momentum"]
                                      for name in OPTIMIZERS.names()}


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer the config names, over every trainable parameter of ``model`` (``kp``'s ``B`` follows the
    steps it makes of each ``W``: :mod:`bioprop.learned`).

    ``momentum`` is used by sgd, rmsprop and bm (unset: ``DEFAULT_MOMENTUM``, 0 for rmsprop); adam/adamw use
    their default betas.

    Raises:
        ValueError: an unknown optimizer, listing the allowed ones; or one that a learned-feedback rule (kp)
            cannot follow (:func:`bioprop.learned.check_optimizer`).
    """
    builder = OPTIMIZERS.get(config.optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    momentum = DEFAULT_MOMENTUM[OPTIMIZERS.resolve(config.optimizer)] if config.momentum is None else config.momentum
    optimizer = builder(config, model, params, momentum)
    check_optimizer(optimizer)  # kp refuses, before any training, an optimizer whose B update it cannot follow
    return optimizer


# ------------------------------------------------------------------------------------------------- schedules


@SCHEDULES.register("none", description="constant lr (after warmup)", options=False)
def _constant(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    return 1.0


@SCHEDULES.register("step", description="lr x gamma every step_size epochs", options=False)
def _step(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    return config.gamma ** ((step // steps_per_epoch) // config.step_size)


@SCHEDULES.register("multistep", description="lr x gamma at each epoch in milestones", options=False)
def _multistep(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    epoch = step // steps_per_epoch
    return config.gamma ** sum(1 for m in config.milestones if m <= epoch)


@SCHEDULES.register("cosine", description="cosine from lr down to min_lr over the epochs after warmup, every step",
                    options=False)
def _cosine(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    span = max(config.epochs - config.warmup_epochs, 1e-12)
    t = min(max((step / steps_per_epoch - config.warmup_epochs) / span, 0.0), 1.0)
    floor = config.min_lr / config.lr if config.lr > 0 else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


@SCHEDULES.register("halve_on_plateau", description="halve the lr when the smoothed train error stops falling "
                                                    "(liao2016); stops after plateau_halvings", options=False)
def _plateau(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    return 1.0  # the halvings are state (PlateauHalving), applied by the loop on top of this factor


def lr_factor(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The multiplier of ``config.lr`` for optimizer step ``step`` (0-based), a pure function of the step.

    Being a function of the step alone, the schedule needs no state of its own to resume exactly.

    - warmup: linear from ``1/warmup_steps`` up to 1 over the first ``warmup_epochs`` epochs;
    - ``step``: ``gamma ** (epoch // step_size)``; ``multistep``: ``gamma ** (number of milestones <= epoch)``,
      with ``epoch`` the 0-based epoch of the step, so the lr changes exactly at epoch boundaries;
    - ``cosine``: from ``lr`` down to ``min_lr`` over the epochs after warmup, updated every step.
    """
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return SCHEDULES.get(config.schedule)(config, step, steps_per_epoch)


# ---------------------------------------------------------------------------------------------------- losses


@LOSSES.register("ce", description="softmax cross-entropy", options=False)
def _cross_entropy_loss(num_classes: int) -> LossFn:
    def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), target)
    return cross_entropy


@LOSSES.register("bce", description="sigmoid outputs against one-hot targets, summed over classes (nokland2016)",
                 options=False)
def _binary_cross_entropy_loss(num_classes: int) -> LossFn:
    def binary_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
        logits = logits.float()  # (B, K)
        one_hot = F.one_hot(target, num_classes).to(logits.dtype)  # (B, K)
        return F.binary_cross_entropy_with_logits(logits, one_hot, reduction="sum") / logits.shape[0]
    return binary_cross_entropy


def build_loss(name: str, num_classes: int) -> LossFn:
    """``ce``: softmax cross-entropy. ``bce``: sigmoid outputs against one-hot targets (nokland2016), summed
    over the classes and averaged over the batch, so its size per sample is comparable to ``ce``.

    Both take logits ``(B, K)`` in any float dtype and compute in float32.

    Raises:
        ValueError: an unknown loss, listing the allowed ones.
    """
    return LOSSES.get(name)(num_classes)
