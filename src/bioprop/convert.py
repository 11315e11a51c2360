"""``convert()``: turn any ``nn.Module`` into one that learns with a feedback rule.

:func:`convert` builds the rule and hands the model to the rule's ``apply``: the one entry for every kind of
rule. For per-layer rules that is the layer swap below, which replaces every ``nn.Linear`` and
``nn.Conv{1,2,3}d`` by its feedback counterpart. The new layer takes over the old one's attributes as they are
(the same ``weight``/``bias`` Parameter objects, hooks, training flag), so an optimizer created before
conversion keeps working, and adds the rule's state. Normalisation, pooling and residual sums are untouched and
keep exact backprop inside them.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from .layers import FEEDBACK_TYPES, FeedbackLayer, init_feedback_state, layer_feedback
from .rules import (LayerRule, create_rule, model_rule, register_layer_conversion, remove_model_rules,
                    reset_model_rules)
from .selection import (SUPPORTED_NAMES, ConversionSummary, all_names, as_exclude_list, conversion_summary,
                        is_excluded, native_type, output_layer_names, scan, set_conversion_summary)

__all__ = ["convert", "feedback_weights", "conversion_summary", "ConversionSummary", "reset_feedback",
           "is_excluded"]


def convert(model: nn.Module, rule: str, *, seed: int = 0, exclude: Iterable[str | type] | str | type = (),
            last_layer: str | None = None, **options: Any) -> nn.Module:
    """Convert ``model`` in place to learn with ``rule``; returns the converted model.

    Args:
        model: any ``nn.Module`` (convert before wrapping it in DDP or ``torch.compile``).
        rule: a name from :func:`bioprop.list_rules`, e.g. ``"fa"``, ``"usf"``, ``"dfa"``.
        seed: seed of all random feedback state. Each layer's draw depends only on ``seed`` and the layer's
            name, so it is the same on every device and DDP rank.
        exclude: layer names (exact or ``fnmatch`` patterns such as ``"head.*"``) or module types left exact.
        last_layer: a rule name for the output layer (the last convertible layer in registration order, or the
            layers a model names in its ``output_layers`` attribute, e.g. a detector's class and box outputs),
            e.g. ``"backprop"`` to keep it exact as in xiao2018's reference code.
        **options: options of the rule (see :func:`bioprop.rule_options`), e.g. ``scale="biotorch"``.

    Returns:
        The converted model (a new object only when ``model`` itself is a single convertible layer). The
        summary of what was converted is available as :func:`conversion_summary`.

    A layer registered under several names (``self.b = self.a``) is one layer: every name gets the same new
    layer object, so the sharing survives, and it is converted (and listed in the summary) once, under its first
    name, which also seeds its state. Excluding any of its names excludes it.

    Converting twice is safe: a layer that already has the same rule and options keeps its state (a fixed B is
    never redrawn); a layer converted to another rule gets the new rule's state; ``"backprop"`` restores the
    native layer types.

    Raises:
        ValueError: unknown rule or option (the message lists the allowed ones), a bad ``last_layer``, or a
            direct rule on a model that refuses it (its ``direct_feedback_refusal`` attribute says why).
    """
    policy = create_rule(rule, **options)
    exclude_list = as_exclude_list(exclude)
    if last_layer is not None and not isinstance(create_rule(last_layer), LayerRule):
        raise ValueError(f"last_layer must be a per-layer rule such as 'backprop', got {last_layer!r}")
    model = remove_model_rules(model)
    return policy.apply(model, seed=seed, exclude=tuple(exclude_list), last_layer=last_layer)


@torch.no_grad()
def feedback_weights(model: nn.Module) -> dict[str, Tensor]:
    """``{layer name: the feedback weight that layer uses now}``; detached copies, computed without side effects.

    Per-layer rules give ``B`` with ``W``'s shape (:func:`bioprop.layers.layer_feedback`; ``W`` itself where a
    feedback layer runs the native op). Direct rules give each marker's matrix (their ``feedback_weights`` hook).
    """
    out: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, FeedbackLayer):
            feedback = layer_feedback(module)
            out[name] = (module.weight if feedback is None else feedback).detach().clone()
        root_rule = model_rule(module)
        if root_rule is not None:
            prefix = f"{name}." if name else ""
            out.update({prefix + key: value for key, value in root_rule.feedback_weights(module).items()})
    return out


@torch.no_grad()
def reset_feedback(model: nn.Module) -> nn.Module:
    """Draw every rule's state in ``model`` again from its conversion seed, exactly as :func:`convert` drew it.

    This completes deferred initialisation: convert a model built on the ``meta`` device, ``to_empty(device=...)``
    it, give W its values (``reset_parameters()`` or a load), then call ``reset_feedback``; the state equals that of
    the same model converted on a real device with the same seed. State tensors keep their identity, so an
    optimizer or DDP built earlier keeps working. Direct-feedback matrices already drawn are drawn again.

    Returns:
        ``model``.

    Raises:
        ValueError: if a layer is still on the meta device.
    """
    for module in model.modules():
        if isinstance(module, FeedbackLayer):
            module.reset_feedback()
    reset_model_rules(model)
    return model


# ----------------------------------------------------------------------------------------------- the layer swap


def convert_layers(model: nn.Module, policy: LayerRule, *, seed: int, exclude: tuple,
                   last_layer: str | None) -> nn.Module:
    """Swap every convertible layer of ``model`` for one with ``policy`` (``last_layer``'s rule for the output
    layers); what :meth:`bioprop.rules.LayerRule.apply` runs. Returns the model (a new object only when it is a
    single convertible layer)."""
    last_policy = create_rule(last_layer) if last_layer is not None else policy
    summary = ConversionSummary(policy.name, policy.options(), seed)
    names = all_names(model)
    candidates, kept = scan(model, list(exclude), names)
    output_names = output_layer_names(model, candidates)
    unsupported = [(n, k) for n, k, reason in kept if reason.startswith("cannot take feedback")]
    if unsupported:
        warnings.warn("bioprop.convert: these layers cannot take feedback and keep exact backprop: "
                      + "; ".join(f"{n} ({k})" for n, k in unsupported)
                      + f". Supported layer types: {SUPPORTED_NAMES}.", UserWarning, stacklevel=4)
    summary.kept.extend(kept)
    for name, module in candidates:
        layer_policy = last_policy if name in output_names else policy
        new = _convert_layer(module, layer_policy, seed, name)  # type: ignore[arg-type]
        if new is not module:
            for alias in names[id(module)]:
                model = _replace(model, alias, new)
        summary.converted.append((name, type(module).__name__, layer_policy.name))
        if len(names[id(module)]) > 1:
            summary.aliases[name] = [n for n in names[id(module)] if n != name]
    set_conversion_summary(model, summary)
    return model


register_layer_conversion(convert_layers)


def _convert_layer(module: nn.Module, policy: LayerRule, seed: int, name: str) -> nn.Module:
    native = native_type(module)
    if isinstance(module, FeedbackLayer) and module.rule == policy:
        return module  # already converted this way (same rule, same options): keep its state
    target = native if policy.native else FEEDBACK_TYPES[native]
    new = target.__new__(target)
    # Take over every attribute of the old layer, with fresh containers so the two objects stay independent;
    # the Parameter objects themselves are shared, which keeps optimizer references valid.
    for key, value in module.__dict__.items():
        new.__dict__[key] = type(value)(value) if isinstance(value, dict) else value
    for container in (new._parameters, new._buffers):
        for key in [k for k in container if k.startswith("feedback_")]:
            del container[key]
    for key in ("rule", "_feedback_seen_version", "_feedback_origin", "_feedback_pending"):
        new.__dict__.pop(key, None)
    if isinstance(new, FeedbackLayer):
        init_feedback_state(new, policy, seed, name)
    return new


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return model
