"""Weight constraints as projections applied after each optimizer step (moskovitz2018's "Const." and "E/I").

A constraint is built from a model once, before training, and then called with no arguments right after
``optimizer.step()``. It changes the weights in place under ``torch.no_grad()``; it never re-creates a
``Parameter``, so optimizer references, DDP buckets and hooks stay valid. Its state is keyed by parameter name
(``"features.0.weight"``), so a checkpoint's ``state_dict`` loads into the constraint of a rebuilt model.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..registry import Registry
from ._select import Selector, WEIGHT_LAYER_TYPES, as_selector, check_all_used, matches, weight_layers

__all__ = ["Constraint", "ConstantNorm", "FixedSign", "apply_constraints", "create_constraint", "list_constraints",
           "resolve_constraint_name", "describe_constraints", "CONSTRAINTS"]


class Constraint(ABC):
    """A projection of some forward weights, applied in place after every optimizer step.

    Subclasses set :attr:`order` (lower runs first in :func:`apply_constraints`) and implement ``__call__``,
    ``state_dict`` and ``load_state_dict``. The targets are the ``weight`` of every ``nn.Linear`` and
    ``nn.Conv{1,2,3}d`` (converted or not), narrowed by ``include`` / ``exclude``.

    Args:
        model: the model, converted or not (DDP / ``torch.compile`` wrappers are looked through).
        include: only these layers (names, ``fnmatch`` patterns or module types); default: all of them.
        exclude: leave these layers unconstrained (same kinds of items).

    Attributes:
        params: ``{parameter name: weight Parameter}`` of the constrained layers.

    Raises:
        ValueError: an ``include``/``exclude`` item that matches no linear/conv layer, or no layer left.
    """

    #: position in :func:`apply_constraints`; sign projections (0) run before rescaling (10), which keeps signs
    order: ClassVar[int] = 0
    name: ClassVar[str] = ""

    def __init__(self, model: nn.Module, *, include: Selector | None = None, exclude: Selector = ()) -> None:
        include_items = as_selector(include, "include")
        exclude_items = as_selector(exclude, "exclude")
        layers = list(weight_layers(model))
        check_all_used(include_items, layers, "include", "linear/conv layers")
        check_all_used(exclude_items, layers, "exclude", "linear/conv layers")
        chosen = [(name, layer) for name, layer in layers
                  if (not include_items or matches(name, layer, include_items))
                  and not matches(name, layer, exclude_items)]
        if not chosen:
            raise ValueError(f"{type(self).__name__}: no layer left to constrain; it acts on the weights of "
                             f"{', '.join('nn.' + t.__name__ for t in WEIGHT_LAYER_TYPES)}")
        self.params: dict[str, nn.Parameter] = {_param_name(name): layer.weight for name, layer in chosen}

    @abstractmethod
    def __call__(self) -> None:
        """Project the weights in place (call after ``optimizer.step()``)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The state needed to resume: plain dicts of tensors, loadable with ``torch.load(weights_only=True)``."""

    @abstractmethod
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the state written by :meth:`state_dict` (for the same parameter names)."""

    def _checked_entries(self, state_dict: Mapping[str, Any], key: str) -> dict[str, Tensor]:
        """``state_dict[key]``, checked to hold an entry for exactly this constraint's parameters."""
        if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get(key), Mapping):
            got = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise ValueError(f"{type(self).__name__}.load_state_dict expects the dict written by "
                             f"{type(self).__name__}.state_dict(), with key {key!r}; got {got}")
        entries = state_dict[key]
        missing = sorted(set(self.params) - set(entries))
        unexpected = sorted(set(entries) - set(self.params))
        if missing or unexpected:
            raise ValueError(f"{type(self).__name__}.load_state_dict: parameter names do not match "
                             f"(missing: {missing or 'none'}; unexpected: {unexpected or 'none'}); build the "
                             "constraint with the same include/exclude on the same architecture")
        return {name: entries[name] for name in self.params}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.params)} weights: {', '.join(self.params)})"


class ConstantNorm(Constraint):
    r"""Const. (moskovitz2018): each layer's weight is held at its initial Frobenius norm.

    .. math:: W \leftarrow W \cdot \frac{\lVert W_0 \rVert_F}{\lVert W \rVert_F}

    ``W_0`` is the weight when the constraint is built, so build it right after creating (and converting) the
    model. One norm per layer over the whole tensor (not per output unit), as in BioTorch's
    ``constrain_weights``. A weight whose norm has become exactly 0 is left at 0 (there is no direction to
    rescale). The norms are kept in float64 and applied in the weight's dtype.

    Args:
        model, include, exclude: see :class:`Constraint`.

    Raises:
        ValueError: if a chosen weight starts with norm 0 (it could never move); exclude that layer.

    Examples::

        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> const = ConstantNorm(net)  # after each optimizer.step(): const()
    """

    order: ClassVar[int] = 10
    name: ClassVar[str] = "constant_norm"

    def __init__(self, model: nn.Module, *, include: Selector | None = None, exclude: Selector = ()) -> None:
        super().__init__(model, include=include, exclude=exclude)
        with torch.no_grad():  # on the CPU in float64: every backend has it there
            norms = {name: p.detach().cpu().double().norm() for name, p in self.params.items()}
        zero = [name for name, n in norms.items() if n.item() == 0.0]
        if zero:
            raise ValueError(f"ConstantNorm: weight(s) {', '.join(zero)} start with norm 0 and would stay 0; "
                             "initialise them or pass exclude=[...]")
        self.norms: dict[str, Tensor] = norms
        self._targets: dict[str, Tensor] = {}  # the norms on each weight's device and in its dtype

    def _target(self, name: str, weight: Tensor) -> Tensor:
        target = self._targets.get(name)
        if target is None or target.device != weight.device or target.dtype != weight.dtype:
            target = self._targets[name] = self.norms[name].to(device=weight.device, dtype=weight.dtype)
        return target

    @torch.no_grad()
    def __call__(self) -> None:
        by_dtype: dict[torch.dtype, list[tuple[str, Tensor]]] = {}
        for name, weight in self.params.items():
            by_dtype.setdefault(weight.dtype, []).append((name, weight))
        for dtype, entries in by_dtype.items():  # one group in the usual case: a few fused kernels in all
            weights = [w for _, w in entries]
            norms = torch._foreach_norm(weights)
            finfo = torch.finfo(dtype)
            # An all-zero weight gets a huge but finite factor and so stays exactly 0 (0 · finite = 0).
            torch._foreach_clamp_min_(norms, finfo.tiny)
            factors = torch._foreach_div([self._target(name, w) for name, w in entries], norms)
            torch._foreach_clamp_max_(factors, finfo.max)
            torch._foreach_mul_(weights, factors)

    def state_dict(self) -> dict[str, Any]:
        return {"norms": {name: n.clone() for name, n in self.norms.items()}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        entries = self._checked_entries(state_dict, "norms")
        self.norms = {name: torch.as_tensor(n, dtype=torch.float64).reshape(()).cpu().clone()
                      for name, n in entries.items()}
        self._targets = {}


class FixedSign(Constraint):
    r"""E/I (moskovitz2018): each forward weight keeps the sign it started with.

    After every step an entry whose sign differs from its assigned sign ``s`` is set to 0:

    .. math:: W_{ij} \leftarrow \begin{cases} 0 & s_{ij} W_{ij} < 0 \\ W_{ij} & \text{otherwise} \end{cases}

    so each entry stays in ``{0} ∪ {sign s}``; a clamped entry may grow back on its own side. ``s`` is
    ``sign(W_0)`` when the constraint is built. An entry that starts at exactly 0 has no sign yet: it takes the
    sign of the first nonzero value it reaches after a step, and keeps that sign from then on (so a zero-initialised
    layer, as in nokland2016's FA setup, can still learn, and its E/I pattern is set by its first update).

    The signs are kept in the weight's dtype and device (one extra copy of each constrained weight, like a
    momentum buffer) so that the projection is three in-place multi-tensor ops, ``W ← s · max(s · W, 0)``, which
    is exact (multiplying by ±1 rounds nothing) and costs about what an SGD step does. ``state_dict`` stores them
    as int8.

    Args:
        model, include, exclude: see :class:`Constraint`.

    Examples::

        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> ei = FixedSign(net)  # after each optimizer.step(): ei()
    """

    order: ClassVar[int] = 0
    name: ClassVar[str] = "fixed_sign"

    def __init__(self, model: nn.Module, *, include: Selector | None = None, exclude: Selector = ()) -> None:
        super().__init__(model, include=include, exclude=exclude)
        self._set_signs({name: torch.sign(p.detach()) for name, p in self.params.items()})

    def _set_signs(self, signs: Mapping[str, Tensor]) -> None:
        self.signs: dict[str, Tensor] = {
            name: s.to(device=self.params[name].device, dtype=self.params[name].dtype).clone()
            for name, s in signs.items()}
        # Host-side count, so the common case (every sign assigned) costs no device sync per step.
        self._unassigned = {name: int((s == 0).sum()) for name, s in self.signs.items()}

    @torch.no_grad()
    def __call__(self) -> None:
        weights, signs = list(self.params.values()), []
        for name, weight in self.params.items():
            sign = self.signs[name]
            if sign.device != weight.device or sign.dtype != weight.dtype:  # the model was moved or cast
                sign = self.signs[name] = sign.to(device=weight.device, dtype=weight.dtype)
            if self._unassigned[name]:
                sign.copy_(torch.where(sign == 0, torch.sign(weight), sign))
                self._unassigned[name] = int((sign == 0).sum())
            signs.append(sign)
        # W ← s · max(s · W, 0), in place: entries against their sign become 0, the rest are unchanged (s = ±1);
        # s = 0 is left only where W is 0 already.
        torch._foreach_mul_(weights, signs)
        torch._foreach_clamp_min_(weights, 0.0)
        torch._foreach_mul_(weights, signs)

    def state_dict(self) -> dict[str, Any]:
        return {"signs": {name: s.detach().to(device="cpu", dtype=torch.int8) for name, s in self.signs.items()}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        entries = self._checked_entries(state_dict, "signs")
        for name, s in entries.items():
            if tuple(s.shape) != tuple(self.params[name].shape):
                raise ValueError(f"FixedSign.load_state_dict: signs of {name} have shape {tuple(s.shape)}, the "
                                 f"weight has {tuple(self.params[name].shape)}")
        self._set_signs(entries)


def apply_constraints(constraints: Iterable[Constraint]) -> None:
    """Apply every constraint once, sign projections before rescaling (by :attr:`Constraint.order`).

    Rescaling by a positive factor keeps every sign, so with this order FixedSign and ConstantNorm both hold
    exactly after the call (unless a whole weight was clamped to 0, which no rescaling can undo).
    """
    for constraint in sorted(constraints, key=lambda c: c.order):
        constraint()


#: every constraint by name: ``create_constraint(name, model, include=..., exclude=...)``
CONSTRAINTS: Registry[type[Constraint]] = Registry("constraint", positional=1)
CONSTRAINTS.add("constant_norm", ConstantNorm, aliases=("const",),
                description="Const. (moskovitz2018): each layer's weight keeps its initial Frobenius norm")
CONSTRAINTS.add("fixed_sign", FixedSign, aliases=("ei", "e/i"),
                description="E/I (moskovitz2018): each forward weight keeps the sign it started with")


def list_constraints() -> list[str]:
    """Names accepted by :func:`create_constraint`."""
    return CONSTRAINTS.names()


def describe_constraints() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every constraint."""
    return CONSTRAINTS.describe()


def resolve_constraint_name(name: str) -> str:
    """The canonical name for a constraint name or alias (``"const"``, ``"ei"``, ``"e/i"``), case-insensitive.

    Raises:
        ValueError: for an unknown name, listing the allowed ones.
    """
    if not isinstance(name, str):
        raise ValueError(f"unknown constraint {name!r}; {CONSTRAINTS.allowed_word}: {CONSTRAINTS.allowed()}")
    return CONSTRAINTS.resolve(name)


def create_constraint(name: str, model: nn.Module, **options: Any) -> Constraint:
    """Build a constraint by name (``"constant_norm"`` / ``"const"``, ``"fixed_sign"`` / ``"ei"``).

    Raises:
        ValueError: for an unknown name (listing the allowed ones) or option.
    """
    return CONSTRAINTS.create(resolve_constraint_name(name), model, **options)


def _param_name(layer_name: str) -> str:
    return f"{layer_name}.weight" if layer_name else "weight"
