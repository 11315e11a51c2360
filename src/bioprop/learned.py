"""Feedback that follows the optimizer's steps of W (Kolen-Pollack), for optimizers built before or after convert.

A rule with ``learns_feedback`` changes its ``B`` at every optimizer step that updates the layer's ``W``. Two global
optimizer step hooks (installed once the first such layer exists) find, for every optimizer, the param groups that
hold such a layer's ``weight``. Before the step they note whether the optimizer already holds momentum state for
``W``; after it, for every ``W`` that had a gradient (the optimizer skips the others) they call the rule's
``after_optimizer_step(layer, optimizer, group, first)``. Working after the step keeps a closure's backward
(``optimizer.step(closure)``, as Lightning steps) on the ``B`` of the step it belongs to, and lets a step that a
fused optimizer skipped for an inf gradient under ``GradScaler`` (``optimizer.found_inf``) change nothing. The
optimizer may be built before or after conversion: it only needs to hold ``W``. The look-up is redone only when
the optimizer's parameters or the set of such layers changed since its last step.

:func:`shared_update_decay` is the scalar recursion behind Kolen-Pollack: two parameters that receive the same
gradient in the same param group differ, after any number of steps, by a multiple ``c`` of their first
difference, for every optimizer whose update is linear in (gradient, parameter) or independent of the parameter.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["track_learned_feedback", "shared_update_decay", "check_optimizer", "SHARED_UPDATE_OPTIMIZERS"]

_LAYERS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight Parameter -> weakrefs to the layers using it
_PLAN: "weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[tuple[int, int], list]]" = \
    weakref.WeakKeyDictionary()
_FIRST: "weakref.WeakKeyDictionary[torch.optim.Optimizer, list[bool]]" = weakref.WeakKeyDictionary()
_generation = 0
_handles: list[Any] = []

#: optimizers whose weight decay is added to the gradient (``d = g + λW``, then momentum): the difference of two
#: parameters with the same gradient follows SGD's momentum recursion on ``λ·c``
_COUPLED = ("SGD", "BatchManhattan")
#: optimizers whose update is a function of the gradients alone when ``weight_decay`` is 0, and with decoupled
#: weight decay (``W ← (1 − ηλ)W`` first) when their ``decoupled_weight_decay`` is set (always for AdamW)
_GRADIENT_ONLY = ("Adam", "AdamW", "NAdam", "RAdam", "Adamax", "RMSprop", "Adagrad", "Adadelta")
_DECOUPLED = ("Adam", "AdamW", "NAdam", "RAdam")
#: every optimizer (by class name, subclasses included) for which :func:`shared_update_decay` is exact
SHARED_UPDATE_OPTIMIZERS = _COUPLED + _GRADIENT_ONLY


def track_learned_feedback(layer: nn.Module) -> None:
    """Record ``layer`` if its rule learns feedback (or forget it if not). Call it whenever a layer's rule or
    parameter objects change: conversion, unpickling or deep copy, ``to_empty``. Layers that share one ``W``
    (tied weights) are each recorded."""
    global _generation
    weight = layer.weight
    refs = [r for r in _LAYERS.get(weight, []) if r() is not None and r() is not layer]
    if getattr(layer.rule, "learns_feedback", False):
        refs.append(weakref.ref(layer))
        if not _handles:
            _handles.extend([register_optimizer_step_pre_hook(_before_optimizer_step),
                             register_optimizer_step_post_hook(_after_optimizer_step)])
    if refs:
        _LAYERS[weight] = refs
    elif weight in _LAYERS:
        del _LAYERS[weight]
    _generation += 1


def shared_update_decay(optimizer: torch.optim.Optimizer, group: dict[str, Any], c: float, k: float,
                        first: bool) -> tuple[float, float]:
    """One step of the difference of two parameters that get the same gradient in ``group``: ``(c, k)`` after it.

    Let ``W`` and ``B`` receive the same gradient at every step, in the same param group, from the same start of
    the optimizer's state. Then ``B − W = c·(B₀ − W₀)`` at every step, and this function advances ``c`` (and ``k``,
    the same multiple for the momentum buffers, ``m_B − m_W = k·(B₀ − W₀)``) by one step of ``optimizer``:

    - SGD and BatchManhattan, any momentum μ, dampening, Nesterov and weight decay λ: the gradient of the difference
      is ``λ·c``; ``k ← λc`` at the first step with momentum (``first``: the optimizer held no momentum buffer for
      the parameters before this step), else
      ``k ← μk + (1 − dampening)·λc``; ``c ← c − η·k`` (Nesterov: ``c ← c − η(λc + μk)``; no momentum:
      ``c ← c − ηλc``).
    - AdamW, and Adam, NAdam, RAdam with decoupled weight decay: ``c ← (1 − ηλ)·c`` (the moment estimates of the
      two parameters are equal, so are their Adam steps).
    - Adam, NAdam, RAdam, Adamax, RMSprop, Adagrad, Adadelta without weight decay: ``c`` stays (the update is a
      function of the gradients only).

    Raises:
        ValueError: for any other optimizer, or coupled weight decay with an adaptive optimizer (whose step is
            not linear in the parameter), naming what is allowed.
    """
    names = {cls.__name__ for cls in type(optimizer).__mro__}
    lr, decay = float(group["lr"]), float(group.get("weight_decay", 0.0))
    if names & set(_COUPLED):
        momentum = float(group.get("momentum", 0.0))
        grad = decay * c
        if momentum == 0.0:
            return c - lr * grad, k
        k = grad if first else momentum * k + (1.0 - float(group.get("dampening", 0.0))) * grad
        step = grad + momentum * k if group.get("nesterov", False) else k
        return c - lr * step, k
    if names & set(_GRADIENT_ONLY):
        if decay == 0.0:
            return c, k
        if names & set(_DECOUPLED) and (group.get("decoupled_weight_decay", False) or "AdamW" in names):
            return c * (1.0 - lr * decay), k
    what = type(optimizer).__name__ + (f" with coupled weight_decay={decay:g}" if decay else "")
    raise ValueError(f"Kolen-Pollack needs B's update to equal W's, which {what} does not give; allowed: SGD or "
                     "BatchManhattan (any momentum, weight decay), AdamW or decoupled weight decay, or no weight "
                     f"decay with {', '.join(_GRADIENT_ONLY)}")


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise now the error the first step would raise: for every param group holding a learned-feedback layer's
    ``W``, whether :func:`shared_update_decay` can follow that group's steps (ValueError, one line, if not)."""
    for index, _ in _plan(optimizer):
        shared_update_decay(optimizer, optimizer.param_groups[index], 1.0, 0.0, True)


def _plan(optimizer: torch.optim.Optimizer) -> list[tuple[int, "weakref.ref[nn.Module]"]]:
    """(index of the param group, layer) for every tracked layer whose ``weight`` the optimizer holds; cached per
    optimizer (by index: ``load_state_dict`` replaces the group dicts)."""
    signature = (_generation, sum(len(group["params"]) for group in optimizer.param_groups))
    cached = _PLAN.get(optimizer)
    if cached is not None and cached[0] == signature:
        return cached[1]
    plan = []
    for index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            for ref in _LAYERS.get(p, []):
                layer = ref()
                if layer is not None and layer.weight is p and getattr(layer.rule, "learns_feedback", False):
                    plan.append((index, ref))
    _PLAN[optimizer] = (signature, plan)
    return plan


def _before_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    plan = _plan(optimizer)
    if plan:  # SGD and BatchManhattan start a momentum buffer at a parameter's first step (shared_update_decay)
        _FIRST[optimizer] = [_momentum_fresh(optimizer, ref()) for _, ref in plan]


def _momentum_fresh(optimizer: torch.optim.Optimizer, layer: Any) -> bool:
    """True when ``layer`` is gone or its W has no momentum buffer yet (the optimizer starts one this step)."""
    return layer is None or optimizer.state.get(layer.weight, {}).get("momentum_buffer") is None


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    plan, first = _plan(optimizer), _FIRST.pop(optimizer, None)
    if not plan or first is None or len(first) != len(plan):
        return
    found_inf = getattr(optimizer, "found_inf", None)  # GradScaler with a fused optimizer: the step was skipped
    if found_inf is not None and float(found_inf) != 0.0:
        return
    for (index, ref), fresh in zip(plan, first):
        layer = ref()
        if layer is not None and layer.weight.grad is not None:  # the optimizer skips a W without gradient
            layer.rule.after_optimizer_step(layer, optimizer, optimizer.param_groups[index], fresh)
