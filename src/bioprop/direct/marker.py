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
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..rules import check_scale, make_generator

if TYPE_CHECKING:  # pragma: no cover
    from .controller import Controller

__all__ = ["DirectFeedback", "DIRECT_SCALES", "check_direct_scale", "direct_scale", "draw_direct_feedback"]

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

    @torch.no_grad()
    def current_feedback(self) -> Tensor:
        """The matrix this block's signal arrives through, detached: ``D`` (``(n_out, n_units)``) for a
        direct marker; for an IFA relay marker, the weight of its block's first layer.

        Raises:
            RuntimeError: if ``D`` has not been drawn yet (it is drawn at the first training forward pass, or
                by :func:`bioprop.direct.initialize`).
        """
        if self.__dict__["role"] == "relay":
            return self.__dict__["_entry_module"].weight.detach().clone()
        if self.feedback_matrix is None:
            raise RuntimeError(f"the feedback matrix of marker {self.__dict__['feedback_name'] or '(unnamed)'!r} "
                               "is drawn at the first training forward pass (its size depends on the model output); "
                               "run one, or call bioprop.direct.initialize(model, example_input)")
        return self.feedback_matrix.detach().clone()

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
