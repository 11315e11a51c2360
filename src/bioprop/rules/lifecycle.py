"""The two calls of a training loop: :func:`prepare` once before training, :func:`after_step` after every step.

Both find every rule a model holds (:func:`attached_rules`) and run its hook; rules without work there cost one
walk over the modules::

    net = bioprop.convert(net, "wm", seed=0)
    bioprop.prepare(net, example_input)        # direct rules draw their D matrices; a no-op for most rules
    for x, y in loader:
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        bioprop.after_step(net)                # weight mirrors learn B; a no-op for rules without per-step work
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .base import MODEL_RULE_ATTR, DirectRule, Rule

__all__ = ["attached_rules", "model_rule", "after_step", "prepare", "remove_model_rules", "reset_model_rules"]


def model_rule(module: nn.Module) -> DirectRule | None:
    """The model-level (direct) rule whose run-time object ``module`` holds as a converted root, or None."""
    rule = getattr(module.__dict__.get(MODEL_RULE_ATTR), "rule", None)
    return rule if isinstance(rule, DirectRule) else None


def attached_rules(model: nn.Module) -> list[tuple[nn.Module, Rule]]:
    """``(module, rule)`` for every rule in ``model``: each feedback layer with its rule, and each converted root
    of a model-level (direct) rule with that rule, in module order (DDP / compile wrappers are looked into)."""
    found: list[tuple[nn.Module, Rule]] = []
    for module in model.modules():
        rule = module.__dict__.get("rule")
        if isinstance(rule, Rule):
            found.append((module, rule))
        root_rule = model_rule(module)
        if root_rule is not None:
            found.append((module, root_rule))
    return found


def after_step(model: nn.Module, step: int | None = None) -> None:
    """Run every rule's per-step work after ``optimizer.step()`` (e.g. a weight-mirror step); the only call a
    training loop needs. A no-op for rules without per-step work.

    Args:
        model: the converted model (or its DDP / compile wrapper).
        step: the index of the step just taken (0 for the first); with the conversion seed it fixes any noise,
            so every DDP rank and a resumed run repeat it. None: each layer's own counter.
    """
    for module, rule in attached_rules(model):
        if type(rule).after_step is not Rule.after_step:
            rule.after_step(module, step)


def prepare(model: nn.Module, example_batch: Any) -> nn.Module:
    """Make every rule's state ready before training (or before a checkpoint is loaded, or DDP registers the
    buffers): direct rules draw their ``D`` matrices, whose size depends on the model output, by running the
    model once on ``example_batch`` in eval mode. A no-op for rules that need nothing. Returns ``model``.

    Args:
        example_batch: an input of the model (a tensor, or a tuple of ``forward``'s positional arguments); a
            batch of two zero inputs of the right shape will do.
    """
    seen: set[int] = set()
    for _, rule in attached_rules(model):
        if id(rule) not in seen and type(rule).prepare is not Rule.prepare:
            seen.add(id(rule))
            rule.prepare(model, example_batch)
    return model


def remove_model_rules(model: nn.Module) -> nn.Module:
    """Take the model-level (direct) rule off ``model``'s root, if it has one; returns the model."""
    rule = model_rule(model)
    return model if rule is None else rule.remove(model)


def reset_model_rules(model: nn.Module) -> None:
    """Draw the state of every model-level (direct) rule in ``model`` again from its conversion seed."""
    for module, rule in attached_rules(model):
        if isinstance(rule, DirectRule):
            rule.reset_state(module)
