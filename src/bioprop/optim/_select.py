"""Choosing layers and parameters of a model by name, pattern or type (shared by the optimizer and constraints).

A selector item is a layer name (``"fc"``), a parameter name (``"fc.bias"``), an ``fnmatch`` pattern
(``"layer4.*"``) or a module type (``nn.Conv2d``); a name also selects everything inside it, exactly as
``bioprop.convert(..., exclude=...)`` reads its items.
"""
from __future__ import annotations

from typing import Iterable, Iterator

from torch import nn

from ..convert import is_excluded as _matches
from ..layers import FEEDBACK_TYPES

__all__ = ["Selector", "WEIGHT_LAYER_TYPES", "as_selector", "unwrap_model", "weight_layers", "named_trainable",
           "check_all_used", "last_weight_layer"]

Selector = Iterable["str | type[nn.Module]"] | str | type

#: the layers whose ``weight`` the constraints act on: nn.Linear and nn.Conv{1,2,3}d, converted or not
WEIGHT_LAYER_TYPES: tuple[type[nn.Module], ...] = tuple(FEEDBACK_TYPES)


def as_selector(items: Selector | None, what: str) -> list[str | type]:
    """``items`` as a list, checked.

    Raises:
        ValueError: if an item is neither a name/pattern (str) nor a module type.
    """
    if items is None:
        return []
    if isinstance(items, (str, type)):
        items = [items]
    out = list(items)
    for item in out:
        if not isinstance(item, (str, type)):
            raise ValueError(f"{what} takes layer or parameter names, fnmatch patterns or module types, "
                             f"got {item!r}")
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DDP/DataParallel/``torch.compile`` wrappers, so names never carry ``module.``."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def weight_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for every linear/conv layer that owns a ``weight`` Parameter, in registration order."""
    for name, module in unwrap_model(model).named_modules():
        if isinstance(module, WEIGHT_LAYER_TYPES) and isinstance(getattr(module, "weight", None), nn.Parameter):
            yield name, module


def last_weight_layer(model: nn.Module) -> str:
    """Name of the output layer: the last linear/conv layer in registration order (as ``convert`` reads it).

    Raises:
        ValueError: if the model has no linear/conv layer.
    """
    names = [name for name, _ in weight_layers(model)]
    if not names:
        raise ValueError("the model has no nn.Linear/nn.Conv1d/2d/3d layer, so it has no last layer")
    return names[-1]


def named_trainable(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Parameter]]:
    """``(parameter name, owning module, parameter)`` for every parameter with ``requires_grad``."""
    seen: set[int] = set()
    for module_name, module in unwrap_model(model).named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue  # a shared parameter belongs to the first module that registers it
            seen.add(id(param))
            yield (f"{module_name}.{param_name}" if module_name else param_name), module, param


def matches(name: str, module: nn.Module, items: list[str | type]) -> bool:
    """True when ``name`` (of a layer or parameter owned by ``module``) is selected by one of ``items``."""
    return bool(items) and _matches(name, module, items)


def check_all_used(items: list[str | type], candidates: list[tuple[str, nn.Module]], what: str, noun: str) -> None:
    """Fail when an item selects nothing, which is almost always a typo.

    Raises:
        ValueError: naming the unused items and listing the names that exist.
    """
    unused = [item for item in items if not any(_matches(name, module, [item]) for name, module in candidates)]
    if unused:
        names = [name for name, _ in candidates]
        shown = ", ".join(names[:40]) + (f", … ({len(names) - 40} more)" if len(names) > 40 else "")
        raise ValueError(f"{what} item(s) {', '.join(map(repr, unused))} match nothing in the model; "
                         f"its {noun}: {shown or '(none)'}")
