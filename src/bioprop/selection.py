"""Which layers a conversion touches: exclusion matching, the scan of a model, the output layer, the summary.

Shared by :func:`bioprop.convert` (per-layer rules), the direct rules (:mod:`bioprop.direct`) and the layer
selectors of the optimizers and constraints.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from torch import nn

from .layers import FEEDBACK_TYPES, FeedbackLayer

__all__ = ["ConversionSummary", "conversion_summary", "set_conversion_summary", "is_excluded", "as_exclude_list",
           "all_names", "scan", "output_layer_names", "native_type", "EXACT_BY_DESIGN", "READS_WEIGHTS_DIRECTLY",
           "SUPPORTED_NAMES"]

#: layers whose backward is exact by design (no weight is transported through them to the input)
EXACT_BY_DESIGN: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.Embedding,
    nn.EmbeddingBag, nn.PReLU,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

#: modules that read their own sub-layers' weights directly, so swapping those sub-layers would change nothing
READS_WEIGHTS_DIRECTLY: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)

SUPPORTED_NAMES = "nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d"

_SUMMARY_ATTR = "_bioprop_summary"


@dataclass
class ConversionSummary:
    """What :func:`bioprop.convert` did: the layers converted and the parametrised layers left exact, with why."""

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


def set_conversion_summary(model: nn.Module, summary: ConversionSummary) -> None:
    """Keep ``summary`` on ``model`` (a plain attribute: it is not module state)."""
    object.__setattr__(model, _SUMMARY_ATTR, summary)


def conversion_summary(model: nn.Module) -> ConversionSummary:
    """The :class:`ConversionSummary` of the last :func:`bioprop.convert` call on ``model``.

    Raises:
        ValueError: if ``model`` was never converted.
    """
    summary = getattr(model, _SUMMARY_ATTR, None)
    if summary is None:
        raise ValueError("this model has not been converted; call bioprop.convert(model, rule) first")
    return summary


def as_exclude_list(exclude: Iterable[str | type] | str | type) -> list[str | type]:
    """``exclude`` as a list, checked.

    Raises:
        ValueError: an item is neither a name/pattern (str) nor a module type.
    """
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


def all_names(model: nn.Module) -> dict[int, list[str]]:
    """``{id(module): every name it is registered under}``, first name first (the one ``named_modules`` gives)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def scan(model: nn.Module, exclude: Sequence[str | type], names: dict[int, list[str]] | None = None
         ) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str, str]]]:
    """Split the model's parametrised leaf layers into convertible candidates and kept ones (with reasons).

    ``names`` (from :func:`all_names`) lets an exclusion match any name of a module registered twice."""
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
                kept.append((name, kind, f"cannot take feedback: a subclass of nn.{native_type(module).__name__} "
                                         "with its own forward; exclude it or convert its parent's layers"))
            else:
                kept.append((name, kind, "cannot take feedback: its weights are used by its own forward"))
    return candidates, kept


def output_layer_names(model: nn.Module, candidates: list[tuple[str, nn.Module]]) -> set[str]:
    """The output layers: those the model names in its ``output_layers`` attribute (e.g. a detector's class and
    box outputs), else the last convertible layer in registration order."""
    return set(getattr(model, "output_layers", ()) or ([candidates[-1][0]] if candidates else []))


def native_type(module: nn.Module) -> type[nn.Module]:
    """The native layer type (``nn.Linear``, ``nn.Conv2d``, ...) ``module`` is an instance of."""
    return next(t for t in FEEDBACK_TYPES if isinstance(module, t))
