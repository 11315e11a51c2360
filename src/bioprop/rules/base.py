"""The rule registry and the two rule bases: a rule declares its whole life cycle as flags and hooks.

A rule is a small policy object (a dataclass whose fields are its options). Its flags tell the rest of bioprop
what it is, so that no other module ever compares a rule's name:

- ``exact``: its weight updates equal backprop's (``backprop``, ``sham``);
- ``native``: it runs the plain native op, with no custom autograd at all (``backprop``: conversion gives the
  native layer types back);
- ``learns_feedback`` (layer rules): ``B`` changes with every optimizer step of ``W`` (Kolen-Pollack), through
  :meth:`LayerRule.after_optimizer_step`; ``W`` must then change only through the optimizer;
- ``indirect`` (direct rules): the error reaches the blocks above the first one through the forward weights.

Its hooks are the whole life cycle, called by bioprop at fixed points:

============================  ===========================================================================
``apply(model, ...)``         the one entry :func:`bioprop.convert` dispatches to, for layer and direct rules
``init_state(layer, gen)``    layer rules: register the layer's ``feedback_*`` state (at conversion)
``before_forward(layer)``     layer rules: per-update state before a forward pass that needs ``B``
``feedback_weight(layer)``    layer rules: the ``B`` the layer uses now (no side effects)
``feedback(layer)``           layer rules: what the op gets for ``B``: the matrix, or a recipe built from ``W``
``feedback_weights(root)``    direct rules: each marker's matrix now (no side effects)
``before_save`` / ``after_load``  layer rules: state that only this process knows, around copies and loads
``prepare(model, batch)``     once before training (direct rules draw their ``D`` matrices here)
``after_step(module, step)``  after every ``optimizer.step()`` (weight mirrors learn ``B`` here)
``after_optimizer_step``      layer rules with ``learns_feedback``: after each step of an optimizer that holds
                              the layer's ``W`` (Kolen-Pollack follows that step here)
============================  ===========================================================================

:func:`bioprop.after_step` and :func:`bioprop.prepare` (:mod:`bioprop.rules.lifecycle`) call the last two for
every rule a model holds; a training loop needs nothing else (:mod:`bioprop.learned` calls
``after_optimizer_step`` from global optimizer hooks).
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Callable, ClassVar, Iterator, Mapping, TypeVar

import torch
from torch import Tensor, nn

from ..functional import Feedback, built_feedback
from ..registry import Registry

__all__ = ["Rule", "LayerRule", "DirectRule", "RULES", "register_rule", "list_rules", "create_rule", "rule_options",
           "resolve_rule_name", "describe_rules", "register_layer_conversion", "MODEL_RULE_ATTR"]

#: the registry of every rule, built-in ones first (registered when :mod:`bioprop` is imported)
RULES: Registry[type["Rule"]] = Registry("rule", allowed="allowed rules")

#: name of the plain attribute of a model's root that holds a model-level rule's run-time object (an object with
#: a ``rule`` attribute, such as direct feedback's controller)
MODEL_RULE_ATTR = "_bioprop_direct"

R = TypeVar("R", bound=type)


class Rule:
    """Base of every policy. Subclasses are dataclasses whose fields are the rule's options."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "layer"
    #: its weight updates equal backprop's
    exact: ClassVar[bool] = False
    #: it runs the plain native op (no custom autograd): converting to it restores the native layer types
    native: ClassVar[bool] = False

    def options(self) -> dict[str, Any]:
        """The rule's options as a plain dict (for summaries, configs and checkpoints)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    def is_exact(self) -> bool:
        """Whether this instance, with its options, gives backprop's updates (``exact``, or an option such as
        ``bp_noise``'s ``noise=0`` that makes it so)."""
        return type(self).exact

    def apply(self, model: nn.Module, *, seed: int, exclude: tuple, last_layer: str | None) -> nn.Module:
        """Convert ``model`` to this rule (in place where possible) and return it; :func:`bioprop.convert`'s
        one entry."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, example_batch: Any) -> None:
        """Once before training, with an example input of the model (see :func:`bioprop.prepare`)."""

    def after_step(self, module: nn.Module, step: int | None) -> None:
        """After each ``optimizer.step()``: ``module`` is the layer (layer rules) or the converted root (model
        rules); ``step`` is the index of the step just taken, or None for the rule's own counter."""


class LayerRule(Rule):
    """A rule that gives each linear/conv layer its own feedback weight ``B`` (shape of ``W``)."""

    kind: ClassVar[str] = "layer"
    #: True when ``B`` changes with every optimizer step of ``W`` (:meth:`after_optimizer_step` is then called)
    learns_feedback: ClassVar[bool] = False

    def apply(self, model: nn.Module, *, seed: int, exclude: tuple, last_layer: str | None) -> nn.Module:
        """Swap every convertible linear/conv layer of ``model`` for a feedback layer with this rule."""
        if _layer_conversion is None:
            raise RuntimeError("the layer conversion is not registered; import bioprop")
        return _layer_conversion(model, self, seed=seed, exclude=exclude, last_layer=last_layer)

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        """Register the buffers/parameters this rule needs on ``layer``; called once at conversion."""

    def before_forward(self, layer: nn.Module) -> None:
        """Update per-step state before a forward pass that will need ``B`` (e.g. brsf's redraw)."""

    def after_load(self, layer: nn.Module) -> None:
        """Called after the rule's state arrived in this process: ``load_state_dict``, a deep copy or unpickling,
        ``.to()``/``to_empty()``."""

    def before_save(self, layer: nn.Module) -> None:
        """Called before the rule's state leaves this process's view (``state_dict``, deep copy, pickling,
        ``.to()``): write what only this process knows (e.g. version counters) into the saved buffers."""

    def after_optimizer_step(self, layer: nn.Module, optimizer: torch.optim.Optimizer, group: dict,
                             first: bool) -> None:
        """Rules with ``learns_feedback``: right after ``optimizer`` stepped the param group ``group`` that holds
        ``layer.weight`` (which had a gradient); ``first``: the optimizer held no momentum buffer for ``W`` before
        this step (see :func:`bioprop.learned.shared_update_decay`)."""

    def feedback_weight(self, layer: nn.Module) -> Tensor | None:
        """The ``B`` for this layer now, or None for the exact native op. Must not change any state.

        By default, what :meth:`feedback` stands for, built from the current W: a rule whose ``feedback`` gives a
        recipe defines only that."""
        if type(self).feedback is LayerRule.feedback:
            raise NotImplementedError(f"rule {self.name!r} defines neither feedback_weight nor feedback")
        return built_feedback(self.feedback(layer), layer.weight)

    def feedback(self, layer: nn.Module) -> Feedback | None:
        """What the feedback op receives for this forward pass: ``B`` itself (the default,
        :meth:`feedback_weight`), a :class:`~bioprop.functional.SignFeedback` that the op builds ``B`` from in the
        backward (so no ``B`` is held between forward and backward), or None for the native op. It must stand
        for the same ``B`` as :meth:`feedback_weight` and must not change any state."""
        return self.feedback_weight(layer)


class DirectRule(Rule):
    """A rule that delivers the output error directly to hidden blocks (DFA, IFA) instead of per-layer B.

    Its run-time object lives on the converted root under :data:`MODEL_RULE_ATTR`.
    """

    kind: ClassVar[str] = "direct"
    #: the error reaches the blocks above the first one through the forward weights (ifa)
    indirect: ClassVar[bool] = False

    def remove(self, root: nn.Module) -> nn.Module:
        """Take this rule off ``root`` (back to plain backprop) and return it."""
        raise NotImplementedError

    def reset_state(self, root: nn.Module) -> None:
        """Draw the rule's state on ``root`` again from its conversion seed (:func:`bioprop.reset_feedback`)."""

    def feedback_weights(self, root: nn.Module) -> dict[str, Tensor]:
        """``{marker name inside root: the matrix that block's signal arrives through now}``, detached copies
        (:func:`bioprop.feedback_weights`); no side effects."""
        raise NotImplementedError


#: the layer swap of :meth:`LayerRule.apply`; it lives in :mod:`bioprop.convert`, above the layers it swaps
_layer_conversion: Callable[..., nn.Module] | None = None


def register_layer_conversion(conversion: Callable[..., nn.Module]) -> None:
    """Set the function :meth:`LayerRule.apply` runs: ``conversion(model, rule, *, seed, exclude, last_layer)``.

    :mod:`bioprop.convert` registers its layer swap when it is imported; the rules stay below the layers.
    """
    global _layer_conversion
    _layer_conversion = conversion


# ----------------------------------------------------------------------------------------------- registry


def register_rule(name: str, *, aliases: tuple[str, ...] = (), description: str = "") -> Callable[[R], R]:
    """Class decorator registering a rule under ``name`` (and optional aliases) with a one-line description
    (default: the first line of its docstring).

    Raises:
        ValueError: if the name or an alias is already taken.
    """
    def decorator(cls: R) -> R:
        cls.name = name  # type: ignore[attr-defined]
        RULES.add(name, cls, aliases=aliases, description=description)  # type: ignore[arg-type]
        return cls
    return decorator


def list_rules() -> list[str]:
    """Names of all registered rules, in registration order (aliases not included)."""
    return RULES.names()


def describe_rules() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every rule, for ``bioprop list``."""
    return RULES.describe()


def resolve_rule_name(name: str) -> str:
    """The canonical name for ``name`` or one of its aliases.

    Raises:
        ValueError: naming the unknown rule and listing the allowed names.
    """
    return RULES.resolve(name)


def rule_options(name: str) -> dict[str, Any]:
    """Option names of a rule with their defaults."""
    return RULES.options(name)


def create_rule(name: str, **options: Any) -> Rule:
    """Build the policy for rule ``name`` with validated options.

    Raises:
        ValueError: unknown rule, unknown option (listing the allowed ones) or bad option value.
    """
    return RULES.create(name, **options)


class _RuleClasses(Mapping[str, type[Rule]]):
    """``{name: rule class}``, read from :data:`RULES` (kept for code that reads the former ``_RULES`` dict)."""

    def __getitem__(self, name: str) -> type[Rule]:
        if name not in RULES.names():
            raise KeyError(name)
        return RULES.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(RULES.names())

    def __len__(self) -> int:
        return len(RULES)


_RULES: Mapping[str, type[Rule]] = _RuleClasses()
