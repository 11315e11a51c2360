"""The pieces a config names: optimizer, learning-rate schedule and loss."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DEFAULT_MOMENTUM, TrainConfig

__all__ = ["build_optimizer", "lr_factor", "build_loss", "LossFn"]

#: ``loss_fn(logits (B, K), targets (B,) int64) -> scalar mean loss``
LossFn = Callable[[Tensor, Tensor], Tensor]


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer the config names, over every trainable parameter of ``model`` (feedback parameters of
    learned-feedback rules such as ``kp`` included, with the same lr and weight decay as the forward weights).

    ``momentum`` is used by sgd, rmsprop and bm (unset: ``DEFAULT_MOMENTUM``, 0 for rmsprop); adam/adamw use
    their default betas.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    lr, wd = config.lr, config.weight_decay
    mom = DEFAULT_MOMENTUM[config.optimizer] if config.momentum is None else config.momentum
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=mom, weight_decay=wd)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=mom, weight_decay=wd)
    if config.optimizer == "bm":
        from ..optim import BatchManhattan, manhattan_param_groups
        groups = manhattan_param_groups(model, plain_last_layer=config.bm_plain_last_layer)
        return BatchManhattan(groups, lr=lr, momentum=mom, weight_decay=wd)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; allowed: sgd, adam, adamw, rmsprop, bm")


def lr_factor(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The multiplier of ``config.lr`` for optimizer step ``step`` (0-based), a pure function of the step.

    Being a function of the step alone, the schedule needs no state of its own to resume exactly.

    - warmup: linear from ``1/warmup_steps`` up to 1 over the first ``warmup_epochs`` epochs;
    - ``step``: ``gamma ** (epoch // step_size)``; ``multistep``: ``gamma ** (number of milestones <= epoch)``,
      with ``epoch`` the 0-based epoch of the step, so the lr changes exactly at epoch boundaries;
    - ``cosine``: from ``lr`` down to ``min_lr`` over the epochs after warmup, updated every step.
    """
    epoch_float = step / steps_per_epoch
    epoch = step // steps_per_epoch
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if config.schedule == "step":
        return config.gamma ** (epoch // config.step_size)
    if config.schedule == "multistep":
        return config.gamma ** sum(1 for m in config.milestones if m <= epoch)
    if config.schedule == "cosine":
        span = max(config.epochs - config.warmup_epochs, 1e-12)
        t = min(max((epoch_float - config.warmup_epochs) / span, 0.0), 1.0)
        floor = config.min_lr / config.lr if config.lr > 0 else 0.0
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0


def build_loss(name: str, num_classes: int) -> LossFn:
    """``ce``: softmax cross-entropy. ``bce``: sigmoid outputs against one-hot targets (nokland2016), summed
    over the classes and averaged over the batch, so its size per sample is comparable to ``ce``.

    Both take logits ``(B, K)`` in any float dtype and compute in float32.
    """
    if name == "ce":
        def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
            return F.cross_entropy(logits.float(), target)
        return cross_entropy
    if name == "bce":
        def binary_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
            logits = logits.float()  # (B, K)
            one_hot = F.one_hot(target, num_classes).to(logits.dtype)  # (B, K)
            return F.binary_cross_entropy_with_logits(logits, one_hot, reduction="sum") / logits.shape[0]
        return binary_cross_entropy
    raise ValueError(f"unknown loss {name!r}; allowed: ce, bce")
