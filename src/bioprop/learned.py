"""Learned feedback parameters (Kolen-Pollack) and optimizers built before :func:`bioprop.convert`.

A rule with ``learns_feedback`` gives each layer new ``feedback_*`` parameters at conversion, which an optimizer
built before then does not hold. So that such an optimizer still trains them, a global optimizer step pre-hook
(installed once the first learned-feedback layer exists) runs before every optimizer step: a learned feedback
parameter whose layer's ``weight`` is in one of the optimizer's param groups, while no group holds the feedback
parameter itself, is added to that group, right after the layer's other parameters there. The optimizer then
gives ``B`` the same lr, momentum and weight decay as ``W``, exactly as if it had been built after conversion
(with the same parameter order, for groups built from ``model.parameters()``); its ``state_dict`` holds ``B``
from that step on. The check costs one lookup per parameter, and only when the optimizer's parameters or the set
of learned-feedback layers changed since its last step.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["track_learned_feedback"]

_LAYERS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight Parameter -> weakref to its layer
_CHECKED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[int, int]]" = weakref.WeakKeyDictionary()
_generation = 0
_handle: Any = None


def track_learned_feedback(layer: nn.Module) -> None:
    """Record ``layer`` if its rule learns feedback parameters (or forget it if not). Call it whenever a layer's
    rule or parameter objects change: conversion, unpickling or deep copy, ``to_empty``."""
    global _generation, _handle
    weight = layer.weight
    if getattr(layer.rule, "learns_feedback", False):
        _LAYERS[weight] = weakref.ref(layer)
        if _handle is None:
            _handle = register_optimizer_step_pre_hook(_adopt_feedback_parameters)
    elif weight in _LAYERS:
        del _LAYERS[weight]
    _generation += 1


def _feedback_parameters(layer: nn.Module) -> list[nn.Parameter]:
    return [p for key, p in layer._parameters.items() if key.startswith("feedback_") and p is not None]


def _adopt_feedback_parameters(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    signature = (_generation, sum(len(group["params"]) for group in optimizer.param_groups))
    if _CHECKED.get(optimizer) == signature:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for group in optimizer.param_groups:
        params = group["params"]
        for p in list(params):
            ref = _LAYERS.get(p)
            layer = None if ref is None else ref()
            if layer is None or layer.weight is not p or not getattr(layer.rule, "learns_feedback", False):
                continue
            missing = [q for q in _feedback_parameters(layer) if id(q) not in held and q.requires_grad]
            if not missing:
                continue
            own = {id(q) for q in layer.parameters(recurse=False)}
            at = max(i for i, q in enumerate(params) if id(q) in own) + 1
            params[at:at] = missing
            held.update(id(q) for q in missing)
    _CHECKED[optimizer] = (_generation, sum(len(group["params"]) for group in optimizer.param_groups))
