"""Where the markers go: found in the model, or placed automatically in ``nn.Sequential`` models.

Automatic placement reads the model as a chain: the root ``nn.Sequential`` with nested ``nn.Sequential``
containers flattened (a subclass with its own ``forward`` counts as one module). In that chain:

- a *forward layer* is an ``nn.Linear``/``nn.Conv{1,2,3}d``, or any other module that contains one (such as a
  residual block);
- a *block* starts at a forward layer and runs up to the next forward layer; it takes with it the normalisation,
  nonlinearity, pooling, dropout and reshapes that follow the layer;
- a marker goes at the end of every block except the last one (the output block, which keeps its exact
  gradient), i.e. after the module just before the next forward layer;
- a block that is a bare ``nn.Linear``/``nn.Conv`` with nothing after it is a linear map that merges with the
  block above (no marker between them), and so does a block whose forward layer is excluded;
- modules before the first forward layer (a Flatten, input dropout) belong to no block.

The marker is kept as the child ``direct_feedback`` of the block's last module and runs from a forward hook on
that module, so the model's own parameter and buffer names do not change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from torch import nn

from ..layers import FEEDBACK_TYPES
from ..selection import is_excluded
from .marker import DirectFeedback

__all__ = ["Placement", "auto_placements", "explicit_markers", "FORWARD_TYPES", "is_excluded"]  # is_excluded: re-export

#: the layer types whose weights a block's input goes through
FORWARD_TYPES: tuple[type[nn.Module], ...] = tuple(FEEDBACK_TYPES)


@dataclass
class Placement:
    """One marker to place.

    Attributes:
        name: the marker's name in the model (``"<leaf>.direct_feedback"`` when placed automatically).
        leaf: the module whose output is marked (None for a marker already inside the model).
        leaf_name: its name.
        entry: the block's first layer (its forward layer).
        entry_name: its name.
        block: the modules in the block as ``"name (Type)"``, first layer first.
    """

    name: str
    leaf: nn.Module | None
    leaf_name: str
    entry: nn.Module | None
    entry_name: str | None
    block: list[str]


def _chain(module: nn.Sequential, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    for key, child in module._modules.items():
        if child is None:
            continue
        name = f"{prefix}{key}"
        if isinstance(child, nn.Sequential) and type(child).forward is nn.Sequential.forward:
            yield from _chain(child, name + ".")
        else:
            yield name, child


def _is_forward_layer(module: nn.Module) -> bool:
    return any(isinstance(m, FORWARD_TYPES) for m in module.modules())


def auto_placements(model: nn.Module, exclude: Sequence[str | type]) -> tuple[list[Placement], str]:
    """Markers for a ``nn.Sequential`` model (rules in the module docstring).

    Returns:
        The placements in forward order, and the name of the output layer.

    Raises:
        ValueError: the model is not an ``nn.Sequential``, has no hidden block, or a module that would carry a
            marker is used at two places of the chain.
    """
    if not (isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward):
        raise ValueError(f"bioprop.convert places direct-feedback markers automatically only in nn.Sequential models; "
                         f"{type(model).__name__} has its own forward, so insert bioprop.direct.DirectFeedback() at "
                         "the output of each hidden block and call it there (see docs/direct.md)")
    chain = list(_chain(model, ""))
    starts = [i for i, (_, module) in enumerate(chain) if _is_forward_layer(module)]
    if not starts:
        raise ValueError("found no nn.Linear or nn.Conv layer in the model, so it has no block to train")
    names = [item for item in exclude if isinstance(item, str)]
    placements: list[Placement] = []
    for start, stop in zip(starts[:-1], starts[1:]):
        entry_name, entry = chain[start]
        block = chain[start:stop]
        linear_only = len(block) == 1 and isinstance(entry, FORWARD_TYPES)
        leaf_name, leaf = block[-1]
        if linear_only or is_excluded(entry_name, entry, exclude) or is_excluded(leaf_name, leaf, names) \
                or is_excluded(f"{leaf_name}.direct_feedback", leaf, names):
            continue
        if any(other is leaf for i, (_, other) in enumerate(chain) if i != stop - 1):
            raise ValueError(f"module {leaf_name!r} ({type(leaf).__name__}) appears more than once in the model, so "
                             "a marker on its output would fire at every use; give each block its own module")
        placements.append(Placement(f"{leaf_name}.direct_feedback", leaf, leaf_name,
                                    entry if isinstance(entry, FORWARD_TYPES) else None,
                                    entry_name if isinstance(entry, FORWARD_TYPES) else None,
                                    [f"{name} ({type(module).__name__})" for name, module in block]))
    if not placements:
        raise ValueError("found no hidden block to mark: the model needs a Linear/Conv layer followed by a "
                         "nonlinearity before its output layer (or every hidden block was excluded)")
    return placements, chain[starts[-1]][0]


def explicit_markers(model: nn.Module) -> list[tuple[str, DirectFeedback]]:
    """``(name, marker)`` of the DirectFeedback modules written into the model, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DirectFeedback)]
