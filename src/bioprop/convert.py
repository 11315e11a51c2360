"""``convert()``: turn any ``nn.Module`` into one that learns with a feedback rule.

Conversion swaps every ``nn.Linear`` and ``nn.Conv{1,2,3}d`` for its feedback counterpart. The new layer
takes over the old one's attributes as they are (the same ``weight``/``bias`` Parameter objects, hooks,
training flag), so an optimizer created before conversion keeps working, and adds the rule's state.
Normalisation, pooling and residual sums are untouched and keep exact backprop inside them.
"""
from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from .layers import FEEDBACK_TYPES, FeedbackLayer, init_feedback_state
from .rules import DirectRule, LayerRule, create_rule

__all__ = ["convert", "feedback_weights", "conversion_summary", "ConversionSummary", "reset_feedback"]

#: layers whose backward is exact by design (no weight is transported through them to the input)
EXACT_BY_DESIGN: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.Embedding,
    nn.EmbeddingBag, nn.PReLU,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

#: modules that read their own sub-layers' weights directly, so swapping those sub-layers would change nothing
READS_WEIGHTS_DIRECTLY: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)

SUPPORTED_NAMES = "nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d"


@dataclass
class ConversionSummary:
    """What :func:`convert` did: the layers converted and the parametrised layers left exact, with why."""

    rule: str
    options: dict[str, Any]
    seed: int
    converted: list[tuple[str, str, str]] = field(default_factory=list)  # (name, type, rule)
    kept: list[tuple[str, str, str]] = field(default_factory=list)  # (name, type, reason)
    #: {name in ``converted``: the other names the same module object is registered under}
    aliases: dict[str, list[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"bioprop.convert: rule={self.rule!r} seed={self.seed} options={self.options}",
                 f"  converted {len(self.converted)} layer(s):"]
        lines += [f"    {name or '(root)'}: {kind} -> {rule}"
                  + (f" (also registered as {', '.join(self.aliases[name])})" if name in self.aliases else "")
                  for name, kind, rule in self.converted]
        if self.kept:
            lines.append(f"  left with exact backprop ({len(self.kept)}):")
            lines += [f"    {name or '(root)'}: {kind} ({reason})" for name, kind, reason in self.kept]
        return "\n".join(lines)


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
    exclude_list = _as_list(exclude)
    if last_layer is not None:
        last_policy = create_rule(last_layer)
        if not isinstance(last_policy, LayerRule):
            raise ValueError(f"last_layer must be a per-layer rule such as 'backprop', got {last_layer!r}")
    from .direct import remove_direct_feedback  # local: direct imports this module's helpers
    model = remove_direct_feedback(model)
    if isinstance(policy, DirectRule):
        refusal = getattr(model, "direct_feedback_refusal", None)
        if refusal:
            raise ValueError(f"rule {policy.name!r} is not defined for {type(model).__name__}: {refusal}")
        model = policy.apply(model, seed=seed, exclude=tuple(exclude_list), last_layer=last_layer)
        return model

    summary = ConversionSummary(policy.name, policy.options(), seed)
    names = _all_names(model)
    candidates, kept = _scan(model, exclude_list, names)
    output_names = set(getattr(model, "output_layers", ()) or ([candidates[-1][0]] if candidates else []))
    unsupported = [(n, k) for n, k, reason in kept if reason.startswith("cannot take feedback")]
    if unsupported:
        warnings.warn("bioprop.convert: these layers cannot take feedback and keep exact backprop: "
                      + "; ".join(f"{n} ({k})" for n, k in unsupported)
                      + f". Supported layer types: {SUPPORTED_NAMES}.", UserWarning, stacklevel=2)
    summary.kept.extend(kept)
    for name, module in candidates:
        layer_policy = last_policy if (last_layer is not None and name in output_names) else policy
        new = _convert_layer(module, layer_policy, seed, name)  # type: ignore[arg-type]
        if new is not module:
            for alias in names[id(module)]:
                model = _replace(model, alias, new)
        summary.converted.append((name, type(module).__name__, layer_policy.name))
        if len(names[id(module)]) > 1:
            summary.aliases[name] = [n for n in names[id(module)] if n != name]
    object.__setattr__(model, "_bioprop_summary", summary)
    return model


def conversion_summary(model: nn.Module) -> ConversionSummary:
    """The :class:`ConversionSummary` of the last :func:`convert` call on ``model``.

    Raises:
        ValueError: if ``model`` was never converted.
    """
    summary = getattr(model, "_bioprop_summary", None)
    if summary is None:
        raise ValueError("this model has not been converted; call bioprop.convert(model, rule) first")
    return summary


@torch.no_grad()
def feedback_weights(model: nn.Module) -> dict[str, Tensor]:
    """``{layer name: the feedback weight that layer uses now}``; detached copies, computed without side effects.

    Per-layer rules give ``B`` with ``W``'s shape (``W`` itself for exact layers left as feedback layers with the
    backprop rule). Direct rules give each marker's projection matrix.
    """
    return {name: module.current_feedback() for name, module in model.named_modules()
            if hasattr(module, "current_feedback")}


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
    from .direct import redraw_direct_feedback  # local: direct imports this module's helpers
    redraw_direct_feedback(model)
    return model


# ----------------------------------------------------------------------------------------------- internals


def _as_list(exclude: Iterable[str | type] | str | type) -> list[str | type]:
    if isinstance(exclude, (str, type)):
        return [exclude]
    items = list(exclude)
    for item in items:
        if not isinstance(item, (str, type)):
            raise ValueError(f"exclude takes layer names, fnmatch patterns or module types, got {item!r}")
    return items


def is_excluded(name: str, module: nn.Module, exclude: Sequence[str | type]) -> bool:
    """Whether ``exclude`` (names, ``fnmatch`` patterns, container prefixes or module types) names this module."""
    for item in exclude:
        if isinstance(item, type):
            if isinstance(module, item):
                return True
        elif name == item or fnmatch.fnmatchcase(name, item) or name.startswith(item + "."):
            return True
    return False


def _all_names(model: nn.Module) -> dict[int, list[str]]:
    """``{id(module): every name it is registered under}``, first name first (the one ``named_modules`` gives)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _scan(model: nn.Module, exclude: Sequence[str | type], names: dict[int, list[str]] | None = None
          ) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str, str]]]:
    """Split the model's parametrised leaf layers into convertible candidates and kept ones (with reasons).

    ``names`` (from :func:`_all_names`) lets an exclusion match any name of a module registered twice."""
    candidates: list[tuple[str, nn.Module]] = []
    kept: list[tuple[str, str, str]] = []
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        kind = type(module).__name__
        is_candidate = type(module) in FEEDBACK_TYPES or isinstance(module, FeedbackLayer)
        if isinstance(module, READS_WEIGHTS_DIRECTLY):
            kept.append((name, kind, "cannot take feedback: reads its projection weights directly"))
            skip_prefixes.append(name + "." if name else "")
            continue
        has_params = any(True for _ in module.parameters(recurse=False))
        if any(is_excluded(n, module, exclude) for n in (names or {}).get(id(module), [name])):
            if is_candidate or has_params:
                kept.append((name, kind, "excluded"))
            if is_candidate or has_params or name:
                skip_prefixes.append(name + ".")
            continue
        if is_candidate:
            candidates.append((name, module))
        elif has_params:
            if isinstance(module, EXACT_BY_DESIGN):
                kept.append((name, kind, "exact by design"))
            elif isinstance(module, tuple(FEEDBACK_TYPES)):
                kept.append((name, kind, f"cannot take feedback: a subclass of {_base_name(module)} with its "
                                         "own forward; exclude it or convert its parent's layers"))
            else:
                kept.append((name, kind, "cannot take feedback: its weights are used by its own forward"))
    return candidates, kept


def _base_name(module: nn.Module) -> str:
    return next(f"nn.{t.__name__}" for t in FEEDBACK_TYPES if isinstance(module, t))


def _native_type(module: nn.Module) -> type[nn.Module]:
    return next(t for t in FEEDBACK_TYPES if isinstance(module, t))


def _convert_layer(module: nn.Module, policy: LayerRule, seed: int, name: str) -> nn.Module:
    native = _native_type(module)
    if isinstance(module, FeedbackLayer):
        if module.rule.name == policy.name and module.rule.options() == policy.options():
            return module  # already converted this way: keep its state
    target = native if policy.name == "backprop" else FEEDBACK_TYPES[native]
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
