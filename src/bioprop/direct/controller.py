"""The per-model controller of direct feedback: hooks on the root, the per-forward record, the projection.

A forward pass of a converted model goes like this:

1. a pre-hook on the root opens a record;
2. every marker that runs with gradients on adds ``(marker, h)`` to it and hands the block above ``h`` detached;
3. a hook after the root's forward draws any ``D`` not drawn yet and returns the output passed through the
   projection Function (:mod:`bioprop.direct.projection`) with the recorded ``h``'s as extra inputs.

Without gradients (``torch.no_grad``, evaluation) the markers return their input unchanged, nothing is
recorded, and the output is returned as it is.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..rules import MODEL_RULE_ATTR, DirectRule
from .marker import DirectFeedback, draw_direct_feedback
from .projection import DenseProjection, DirectProjection, IndirectProjection, Plan

__all__ = ["Controller", "CONTROLLER_ATTR", "STASH_ATTR", "config_key", "find_controllers"]

CONTROLLER_ATTR = MODEL_RULE_ATTR  # the root's plain attribute holding its controller
STASH_ATTR = "_bioprop_direct_stash"


@dataclass
class _Record:
    """What the markers (and, for ifa/dense_fa, the blocks' first layers) saw during one forward pass."""

    marked: list[tuple[DirectFeedback, Tensor]] = field(default_factory=list)
    entry_outputs: dict[int, tuple[Tensor, int]] = field(default_factory=dict)  # id(layer): (output, version)


class _RootPreHook:
    def __init__(self, controller: "Controller") -> None:
        self.controller = controller

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.controller.stack.append(_Record())


class _RootPostHook:
    def __init__(self, controller: "Controller") -> None:
        self.controller = controller

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        stack = self.controller.stack
        record = stack.pop() if stack else None
        if record is None or not record.marked or output is None:
            return None
        return self.controller.project(output, record)


class _MarkerHook:
    """Forward hook on the last module of a block: runs the block's marker on that module's output."""

    def __init__(self, marker: DirectFeedback) -> None:
        self.marker = marker

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not isinstance(output, Tensor):
            raise TypeError(f"direct feedback marker {self.marker.feedback_name!r} needs a tensor at the output "
                            f"of {type(module).__name__}, got {type(output).__name__}")
        return self.marker(output)


class _EntryHook:
    """ifa, dense_fa: keeps the output of a block's first layer, where the error passed to other blocks is read."""

    def __init__(self, controller: "Controller") -> None:
        self.controller = controller

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        stack = self.controller.stack
        if stack and isinstance(output, Tensor) and output.requires_grad and not self.controller.exact:
            stack[-1].entry_outputs[id(module)] = (output, output._version)


class _Relay:
    """ifa: block ``l``'s first layer without bias, applied to the error at block ``l − 1``'s first layer."""

    def __init__(self, layer: nn.Module, in_shape: torch.Size) -> None:
        self.layer = layer
        self.in_shape = in_shape

    def __call__(self, delta: Tensor) -> Tensor:
        layer = self.layer
        delta = delta.reshape(self.in_shape)
        weight = layer.weight.detach().to(delta.dtype)
        if isinstance(layer, nn.Linear):
            return F.linear(delta, weight)
        return layer._conv_forward(delta, weight, None)  # type: ignore[operator]


def config_key(rule: DirectRule, seed: int, exclude: tuple) -> tuple:
    """What identifies a conversion: converting again with an equal key keeps every D."""
    return (rule.name, tuple(sorted(rule.options().items())), int(seed), tuple(str(e) for e in exclude))


def _prod(shape: torch.Size) -> int:
    return math.prod(shape)


class Controller:
    """The direct-feedback state of one converted model (kept as a plain attribute of the model's root).

    Args:
        rule: the ``dfa``/``ifa``/``dense_fa`` policy (its options: ``scale``, ``batch_dims``, ``zero_init``).
        seed: conversion seed of the ``D`` draws.
        exclude: the ``exclude`` argument of the conversion (part of the configuration key).
        markers: ``(name, marker)`` of the active markers, in forward order.
        auto: ``(leaf module, marker)`` for markers placed by convert (hooked on the leaf).
        entries: the first layer of each marker's block (None where there is none), in the order of ``markers``.

    The controller alone writes the markers' run-time state (:meth:`attach`, :meth:`detach`): its name, its role,
    its block's first layer and the controller itself. It keeps the handles of every hook it installs and
    removes exactly those.
    """

    def __init__(self, rule: DirectRule, seed: int, exclude: tuple, markers: list[tuple[str, DirectFeedback]],
                 auto: list[tuple[nn.Module, DirectFeedback]], entries: list[nn.Module | None]) -> None:
        self.rule = rule
        self.seed = seed
        self.config = config_key(rule, seed, exclude)
        self.markers = markers
        self.auto = auto
        self.entries = entries
        self._handles: list[RemovableHandle] = []
        self.batch_dims: int = rule.batch_dims  # type: ignore[attr-defined]
        self.graph: str = rule.graph  # type: ignore[attr-defined]
        self.indirect = rule.indirect
        self.exact = False
        self.stack: list[_Record] = []
        self._stacked: tuple[tuple, Tensor] | None = None
        self._warned_outside = False
        self._chain = [marker for _, marker in markers]

    # -------------------------------------------------------------------------------------------- pickling

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["stack"] = []
        state["_stacked"] = None  # a cache: rebuilt from the markers' own buffers
        return state

    # -------------------------------------------------------------------------------------------- attach

    def attach(self, root: nn.Module) -> None:
        """Install the hooks and point the markers at this controller."""
        for index, ((name, marker), entry) in enumerate(zip(self.markers, self.entries)):
            # plain attributes, not submodules: the marker's run-time state, written only here and in detach
            marker.__dict__.update(_controller=self, feedback_name=name, _entry_module=entry,
                                   role="relay" if self.indirect and index > 0 else "direct")
        handles = self._handles
        for leaf, marker in self.auto:
            leaf.add_module(AUTO_CHILD, marker)
            handles.append(leaf.register_forward_hook(_MarkerHook(marker)))
        if self.graph != "direct":  # the error of each block is read at its first layer's output
            handles += [entry.register_forward_hook(_EntryHook(self)) for entry in self.entries]  # type: ignore[union-attr]
        handles.append(root.register_forward_pre_hook(_RootPreHook(self)))
        handles.append(root.register_forward_hook(_RootPostHook(self), always_call=True))
        root.__dict__[CONTROLLER_ATTR] = self

    def detach(self, root: nn.Module) -> None:
        """Remove the hooks and the placed markers; markers written into the model become the identity."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for leaf, marker in self.auto:
            if leaf._modules.get(AUTO_CHILD) is marker:
                del leaf._modules[AUTO_CHILD]
        for _, marker in self.markers:
            marker.__dict__.update(_controller=None, last_signal=None)
        self.stack.clear()
        self._stacked = None
        root.__dict__.pop(CONTROLLER_ATTR, None)

    @torch.no_grad()
    def redraw(self) -> None:
        """Draw every ``D`` drawn so far again, in place, from the conversion seed and the marker's name."""
        self._stacked = None  # a cache of the stacked D's
        for _, marker in self.markers:
            d = marker.feedback_matrix
            if d is None or d.is_meta:
                continue
            d.copy_(draw_direct_feedback(d.shape[0], d.shape[1], self.rule.scale,  # type: ignore[attr-defined]
                                         self.seed, marker.feedback_name))

    @torch.no_grad()
    def feedback_weights(self) -> dict[str, Tensor]:
        """``{marker name: the matrix its block's signal arrives through now}``, detached copies: ``D``
        (``(n_out, n_units)``) for a direct marker; for an IFA relay marker, the weight of its block's first layer.

        Raises:
            RuntimeError: if a ``D`` has not been drawn yet (it is drawn at the first training forward pass, or
                by :func:`bioprop.prepare`).
        """
        out: dict[str, Tensor] = {}
        for (name, marker), entry in zip(self.markers, self.entries):
            if marker.role == "relay":
                out[name] = entry.weight.detach().clone()  # type: ignore[union-attr]
                continue
            if marker.feedback_matrix is None:
                raise RuntimeError(f"the feedback matrix of marker {name!r} is drawn at the first training forward "
                                   "pass (its size depends on the model output); run one, or call "
                                   "bioprop.prepare(model, example_input)")
            out[name] = marker.feedback_matrix.detach().clone()
        return out

    # -------------------------------------------------------------------------------------------- forward

    def mark(self, marker: DirectFeedback, h: Tensor) -> Tensor:
        """Called by a marker with an ``h`` that requires grad, gradients on."""
        if self.exact:
            if marker.record:
                h.register_hook(marker._store_hook)
            return h
        if not self.stack:
            if not self._warned_outside:
                self._warned_outside = True
                warnings.warn(f"direct feedback marker {marker.feedback_name!r} ran outside the forward pass of the "
                              "model it was converted with, so no output error can reach it; it passes gradients "
                              "through unchanged there", UserWarning, stacklevel=3)
            return h
        self.stack[-1].marked.append((marker, h))
        return h.detach()

    def project(self, output: Any, record: _Record) -> Tensor:
        """The output passed through the projection Function that delivers the error to the recorded blocks."""
        if not isinstance(output, Tensor):
            raise TypeError("a model converted to a direct rule must return a single tensor (the output whose "
                            f"error e = dL/dy is projected), got {type(output).__name__}; return the logits and "
                            "compute everything else outside the model")
        bd = self.batch_dims
        if output.dim() <= bd:
            raise ValueError(f"the model output has shape {tuple(output.shape)}, but batch_dims={bd}: it needs at "
                             "least one dimension after the batch dims")
        batch_shape = output.shape[:bd]
        n_out = _prod(output.shape[bd:])
        markers = [marker for marker, _ in record.marked]
        hidden = [h for _, h in record.marked]
        sizes = []
        for marker, h in record.marked:
            if h.shape[:bd] != batch_shape:
                raise ValueError(f"marker {marker.feedback_name!r} sees a tensor of shape {tuple(h.shape)} but the "
                                 f"output has shape {tuple(output.shape)}; their first batch_dims={bd} dimensions "
                                 "must agree (set batch_dims to the number of leading batch/sequence dims)")
            sizes.append(_prod(h.shape[bd:]))
        if self.graph == "direct":
            feedback = self._stacked_feedback(markers, n_out, sizes, hidden)
            return DirectProjection.apply(output, feedback, Plan(markers, sizes), *hidden)
        plan = self._indirect_plan(record, markers, hidden, sizes)
        if self.graph == "dense":
            # D_l takes [e, δa_L, ..., δa_{l+1}]: n_out rows, then the first-layer outputs of the blocks above
            rows, feedbacks = n_out, []
            for marker, h, n_units, pre in reversed(list(zip(markers, hidden, sizes, plan.pre_activations))):
                feedbacks.append(self._feedback_of(marker, rows, n_units, h))
                rows += _prod(pre.shape[bd:])
            plan.feedback = feedbacks[::-1]
            return DenseProjection.apply(output, plan.feedback[-1], plan, *hidden)
        feedback = self._feedback_of(markers[0], n_out, sizes[0], hidden[0])
        return IndirectProjection.apply(output, feedback, plan, *hidden)

    def _feedback_of(self, marker: DirectFeedback, n_out: int, n_units: int, like: Tensor) -> Tensor:
        """The marker's D, drawn now if it has none; checked against the sizes this forward pass needs."""
        feedback = marker.feedback_matrix
        if feedback is None:
            dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
            feedback = draw_direct_feedback(n_out, n_units, self.rule.scale, self.seed,  # type: ignore[attr-defined]
                                            marker.feedback_name).to(device=like.device, dtype=dtype)
            marker.feedback_matrix = feedback
        elif feedback.shape != (n_out, n_units):
            raise ValueError(f"marker {marker.feedback_name!r} holds D of shape {tuple(feedback.shape)}, but this "
                             f"forward pass needs ({n_out}, {n_units}) (sizes of the error sources, marked size per "
                             "position): "
                             "D is fixed once drawn, so the sizes after the batch dims must not change")
        elif feedback.device != like.device:
            feedback = marker.feedback_matrix = feedback.to(like.device)
        return feedback

    def _stacked_feedback(self, markers: list[DirectFeedback], n_out: int, sizes: list[int],
                          hidden: list[Tensor]) -> Tensor:
        """``[D_1 … D_L]`` side by side, ``(n_out, Σ n_units)``; cached until a D or the marker set changes."""
        parts = [self._feedback_of(m, n_out, n, h) for m, n, h in zip(markers, sizes, hidden)]
        if len(parts) == 1:
            return parts[0]
        key = tuple((id(m), p.data_ptr(), p._version, p.dtype) for m, p in zip(markers, parts))
        if self._stacked is None or self._stacked[0] != key:
            dtype = parts[0].dtype
            self._stacked = (key, torch.cat([p.to(dtype) for p in parts], dim=1))
        return self._stacked[1]

    def _indirect_plan(self, record: _Record, markers: list[DirectFeedback], hidden: list[Tensor],
                       sizes: list[int]) -> Plan:
        if markers != self._chain[:len(markers)] or len(set(map(id, markers))) != len(markers):
            raise ValueError(f"{self.rule.name} passes the error between blocks in the order of the markers, so each "
                             "marker must run once per forward pass, in registration order; got "
                             + " -> ".join(repr(m.feedback_name) for m in markers))
        bd = self.batch_dims
        pre_activations: list[Tensor] = []
        relays: list[_Relay | None] = [None]
        for index, (marker, h) in enumerate(zip(markers, hidden)):
            entry = self.entries[index]
            captured = record.entry_outputs.get(id(entry))
            if captured is None:
                raise ValueError(f"{self.rule.name}: the first layer of the block marked by {marker.feedback_name!r} "
                                 "did not run with gradients in this forward pass")
            pre, version = captured
            if pre._version != version:
                raise ValueError(f"{self.rule.name} reads the output of each block's first layer, but the block marked "
                                 f"by {marker.feedback_name!r} modifies it in place (e.g. ReLU(inplace=True)); use the "
                                 "out-of-place op")
            if pre.shape[:bd] != h.shape[:bd] or (self.indirect and _prod(pre.shape[bd:]) != sizes[index]):
                kept = ("its size from its first layer to its marker (only elementwise ops, normalisation, dropout "
                        "or reshapes in between, no pooling)") if self.indirect else \
                    f"its first batch_dims={bd} dimensions from its first layer to its marker"
                raise ValueError(f"{self.rule.name} needs each block to keep {kept}; the "
                                 f"block marked by {marker.feedback_name!r} goes from {tuple(pre.shape)} to "
                                 f"{tuple(h.shape)}")
            pre_activations.append(pre)
            if index > 0 and self.indirect:
                relays.append(_Relay(entry, hidden[index - 1].shape))
        return Plan(markers, sizes, pre_activations, relays if self.indirect else None)  # type: ignore[arg-type]


#: name of the child module a placed marker takes inside the last module of its block
AUTO_CHILD = "direct_feedback"


def find_controllers(model: nn.Module) -> list[Controller]:
    """Every controller inside ``model`` (the model itself, or a submodule converted on its own, or under DDP)."""
    found = []
    for module in model.modules():
        controller = module.__dict__.get(CONTROLLER_ATTR)
        if controller is not None:
            found.append(controller)
    return found
