"""The model registry: :func:`register_model` records a builder with its source paper and documented input,
:func:`create_model` builds one with checked options, :func:`model_table` renders ``docs/models.md``'s table.

The model modules of :mod:`bioprop.models` register themselves here; the package imports them.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from ..registry import Registry

__all__ = [
    "register_model", "list_models", "create_model", "model_info", "ModelInfo", "count_parameters", "model_table",
    "TABLE_ROWS", "MODELS", "describe_models",
]

F = TypeVar("F", bound=Callable[..., nn.Module])
_BASE_ARGS = ("num_classes", "in_channels", "image_size")


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model.

    Attributes:
        name: registry name.
        builder: ``builder(num_classes, in_channels, image_size, **options) -> nn.Module``.
        paper: where the architecture comes from.
        num_classes, in_channels, image_size: the configuration the papers use (documented in the table).
        min_image_size: the smallest square input the architecture accepts.
        options: the builder's own keyword options with their defaults.
        task: ``"classification"`` (images -> logits) or ``"detection"`` (see :mod:`bioprop.models.detection`).
        description: one line, the first of the builder's docstring (``bioprop list models``).
    """

    name: str
    builder: Callable[..., nn.Module]
    paper: str
    num_classes: int
    in_channels: int
    image_size: int
    min_image_size: int
    options: dict[str, Any] = field(default_factory=dict)
    task: str = "classification"
    description: str = ""


#: every model by name; an entry's object is its :class:`ModelInfo` and its ``task`` is kept as meta
MODELS: Registry[ModelInfo] = Registry("model")


def register_model(name: str, *, paper: str = "", num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                   min_image_size: int = 1, task: str = "classification") -> Callable[[F], F]:
    """Decorator registering a builder ``fn(num_classes, in_channels, image_size, *, options...)``.

    Args:
        name: registry name.
        paper: source of the architecture (shown in ``docs/models.md``).
        num_classes, in_channels, image_size: the configuration the source uses.
        min_image_size: smallest square input side the architecture accepts.
        task: what the model does: ``"classification"`` or ``"detection"``.

    Raises:
        ValueError: the name is already registered, or the builder lacks the three base arguments.
    """
    def decorator(fn: F) -> F:
        if name in MODELS:
            raise ValueError(f"model name {name!r} is already registered")
        params = inspect.signature(fn).parameters
        if tuple(params)[:3] != _BASE_ARGS:
            raise ValueError(f"builder {fn.__name__} must start with ({', '.join(_BASE_ARGS)})")
        options = {k: p.default for k, p in params.items() if k not in _BASE_ARGS}
        doc = (inspect.getdoc(fn) or "").strip()
        description = doc.splitlines()[0].replace("``", "") if doc else paper
        MODELS.add(name, ModelInfo(name, fn, paper, num_classes, in_channels, image_size, min_image_size, options,
                                   task, description), description=description, options=options, task=task)
        return fn
    return decorator


def list_models(task: str = "classification") -> list[str]:
    """Names of the registered models of ``task`` (``"classification"`` or ``"detection"``), in registration
    order."""
    return MODELS.names(task=task)


def describe_models(task: str = "classification") -> list[tuple[str, str]]:
    """``(name, one-line description)`` of the registered models of ``task``."""
    return MODELS.describe(task=task)


def model_info(name: str) -> ModelInfo:
    """The registry entry for ``name``.

    Raises:
        ValueError: unknown name, listing the allowed ones.
        TypeError: ``name`` is not a string.
    """
    return MODELS.get(name)


def create_model(name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`.
        num_classes: size of the output layer.
        in_channels: input channels C.
        image_size: side of the square input (H = W); sets the flattened size of MLPs and classifier heads.
        **kwargs: the model's own options (see ``docs/models.md``).

    Returns:
        An ``nn.Module`` mapping (B, C, H, W) images to (B, num_classes) logits.

    Raises:
        ValueError: unknown model or option (listing the allowed ones), or an input the model cannot take.
    """
    info = model_info(name)
    unknown = sorted(set(kwargs) - set(info.options))
    if unknown:
        allowed = ", ".join(info.options) if info.options else "(none)"
        raise ValueError(f"model {name!r} has no option(s) {', '.join(map(repr, unknown))}; allowed: {allowed}")
    for arg, value, low in (("num_classes", num_classes, 1), ("in_channels", in_channels, 1),
                            ("image_size", image_size, info.min_image_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"model {name!r} needs an int {arg} >= {low}, got {value!r}")
    return info.builder(num_classes, in_channels, image_size, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (trainable or not), excluding buffers."""
    return sum(p.numel() for p in model.parameters())


#: Rows of the documented table: (model name, overrides of its registered configuration and options).
TABLE_ROWS: list[tuple[str, dict[str, Any]]] = []


def model_table(rows: Sequence[tuple[str, dict[str, Any]]] | None = None) -> str:
    """The Markdown table of ``docs/models.md``; parameter counts are computed on the meta device (no memory).

    Args:
        rows: (name, overrides) pairs; default one row per registered model plus :data:`TABLE_ROWS`.
    """
    if rows is None:
        rows = [(name, {}) for name in list_models()] + TABLE_ROWS
    lines = ["| model | options | source | input (C×H×W) | classes | parameters |",
             "|---|---|---|---|---|---|"]
    for name, overrides in rows:
        info = model_info(name)
        config = {"num_classes": info.num_classes, "in_channels": info.in_channels, "image_size": info.image_size}
        config.update(overrides)
        options = {k: v for k, v in config.items() if k not in _BASE_ARGS}
        with torch.device("meta"):
            count = count_parameters(create_model(name, **config))
        option_text = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "defaults"
        size = config["image_size"]
        lines.append(f"| `{name}` | {option_text} | {info.paper} | {config['in_channels']}×{size}×{size} | "
                     f"{config['num_classes']} | {count:,} |")
    return "\n".join(lines)
