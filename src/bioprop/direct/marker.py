"""The direct-feedback marker: the output of a hidden block that learns from the projected output error.

A marker does nothing to the forward value. While a converted model trains, it cuts the graph: the block above
receives its output detached, so no gradient flows from one block to the block below, and the marker's block
is trained by the signal the output projection sends it instead (``e · D`` for DFA).

Feedback matrix ``D`` (buffer ``feedback_matrix``, shape ``(n_out, n_units)``): ``n_out`` is the size of the
model output per position and ``n_units`` the size of the marked tensor per position (``C·H·W`` for a feature
map), both counted after the leading ``batch_dims`` dimensions. Both are only known once the model has run, so
``D`` is drawn at the first training forward pass (or taken from a loaded ``state_dict``). The draw depends
only on the conversion seed, the marker's name and the shape, so it is identical on every device and DDP rank.

Scale conventions of the draw (option ``scale`` of ``dfa``/``ifa``):

- ``"nokland2016"`` (default): ``U(−1/√n_units, 1/√n_units)``, with ``n_units`` the number of units receiving
  the signal, as nokland2016's reference code draws it.
- ``"biotorch"``: Xavier-uniform, ``U(−√(6/(n_units + n_out)), +√(6/(n_units + n_out)))``, as BioTorch draws
  its DFA matrices.
- a positive float ``s``: ``U(−s, s)``.

Where the markers go: found in the model, or placed automatically in ``nn.Sequential`` models.

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

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..layers import FEEDBACK_TYPES
from ..rules import check_scale, make_generator
from ..selection import is_excluded

if TYPE_CHECKING:  # pragma: no cover
    from .controller import Controller

__all__ = ["DirectFeedback", "DIRECT_SCALES", "check_direct_scale", "direct_scale", "draw_direct_feedback",
           "Placement", "auto_placements", "explicit_markers", "FORWARD_TYPES"]

DIRECT_SCALES = ("nokland2016", "biotorch")


def check_direct_scale(scale: str | float) -> None:
    """Raise ValueError unless ``scale`` is a direct-feedback convention or a finite positive float."""
    check_scale(scale, DIRECT_SCALES)


def direct_scale(n_out: int, n_units: int, scale: str | float) -> float:
    """Half-width of the uniform draw of a ``(n_out, n_units)`` feedback matrix (module docstring)."""
    check_direct_scale(scale)
    if scale == "nokland2016":
        return 1.0 / math.sqrt(n_units)
    if scale == "biotorch":
        return math.sqrt(6.0 / (n_units + n_out))
    return float(scale)


@torch.compiler.disable  # runs once per marker; keeps torch.compile from tracing the seeding
def draw_direct_feedback(n_out: int, n_units: int, scale: str | float, seed: int, name: str) -> Tensor:
    """The ``(n_out, n_units)`` float32 feedback matrix of the marker ``name``, drawn on the CPU."""
    bound = direct_scale(n_out, n_units, scale)
    generator = make_generator(seed, name)
    return torch.empty(n_out, n_units, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


class DirectFeedback(nn.Module):
    r"""Marks the output :math:`h_l` of a hidden block for direct (DFA) or indirect (IFA) feedback alignment.

    Under DFA the block receives :math:`\delta h_l = e\,D_l` with :math:`e = \partial L/\partial \hat y`; plain
    autograd then runs inside the block (activation, BN, pooling, residual sums) and gives the exact weight
    gradients for that signal. Nothing crosses the marker downward.

    ``bioprop.convert(model, "dfa")`` places markers itself in ``nn.Sequential`` models. In other models,
    insert one at the output of each hidden block (after its nonlinearity, and after any BN, pooling or dropout
    that belongs to the block; for a residual block, after the sum) and call it in ``forward``::

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1, self.fc2, self.head = nn.Linear(784, 256), nn.Linear(256, 256), nn.Linear(256, 10)
                self.mark1 = DirectFeedback(entry="fc1")
                self.mark2 = DirectFeedback(entry="fc2")

            def forward(self, x):
                h = self.mark1(torch.tanh(self.fc1(x)))
                h = self.mark2(torch.tanh(self.fc2(h)))
                return self.head(h)

    Until the model is converted (and after ``convert(model, "backprop")``) a marker is the identity.

    Args:
        entry: name (inside the converted model) of the block's first linear/conv layer. Only ``ifa`` needs it,
            to send the signal forward through that layer's weight.

    Shape:
        - Input: any tensor whose leading ``batch_dims`` dimensions match the model output's.
        - Output: the same tensor (detached while training with a direct rule).

    Attributes:
        feedback_matrix: ``D``, ``(n_out, n_units)``; None until drawn.
        record: when True, each backward stores the signal delivered here in ``last_signal``.
        last_signal: the error the block received in the last backward (``record`` only), shaped like the input.
    """

    feedback_matrix: Tensor | None

    def __init__(self, entry: str | None = None) -> None:
        super().__init__()
        if entry is not None and not isinstance(entry, str):
            raise ValueError(f"entry must be the name of a Linear/Conv layer (str) or None, got {entry!r}")
        self.entry = entry
        self.record = False
        self.last_signal: Tensor | None = None
        self.register_buffer("feedback_matrix", None)
        # Plain attributes (not submodules): set by convert(), looked up at run time.
        self.__dict__["_controller"] = None
        self.__dict__["_entry_module"] = None
        self.__dict__["feedback_name"] = ""  # the name the draw is seeded with
        self.__dict__["role"] = "direct"  # "direct": receives e·D; "relay": ifa's signal through the entry weight

    def forward(self, h: Tensor) -> Tensor:
        controller: Controller | None = self.__dict__["_controller"]
        if controller is None or not (h.requires_grad and torch.is_grad_enabled()):
            return h
        return controller.mark(self, h)

    def store_signal(self, signal: Tensor) -> None:
        """Keep ``signal`` (detached) as ``last_signal`` when recording; used by the backward passes."""
        if self.record:
            self.last_signal = signal.detach()

    def _store_hook(self, grad: Tensor) -> None:
        self.store_signal(grad)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        # A D not drawn yet has no shape: take it from the checkpoint, so that loading before the first forward
        # pass works and the loaded D (not a new draw) is used from then on.
        key = prefix + "feedback_matrix"
        if self.feedback_matrix is None and isinstance(state_dict.get(key), Tensor):
            source = state_dict[key]
            self.feedback_matrix = torch.empty(source.shape, dtype=source.dtype, device=source.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        was_meta = self.feedback_matrix is not None and self.feedback_matrix.is_meta
        result = super()._apply(fn, recurse)
        if was_meta and not self.feedback_matrix.is_meta:  # to_empty(): no values; the next forward draws D again
            self.feedback_matrix = None
        return result

    def extra_repr(self) -> str:
        shape = None if self.feedback_matrix is None else tuple(self.feedback_matrix.shape)
        active = self.__dict__["_controller"] is not None
        parts = [f"role={self.__dict__['role']!r}" if active else "inactive"]
        if self.entry is not None:
            parts.append(f"entry={self.entry!r}")
        if shape is not None:
            parts.append(f"D={shape}")
        return ", ".join(parts)


# ----------------------------------------------------------------------------------------------- placement


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
