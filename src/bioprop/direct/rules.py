"""The ``dfa``, ``ifa`` and ``dense_fa`` rules: conversion of a model to direct, indirect or dense feedback
alignment."""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
from torch import Tensor, nn

from ..convert import convert
from ..layers import FeedbackLayer
from ..rules import DirectRule, register_rule
from ..selection import ConversionSummary, is_excluded, set_conversion_summary
from .controller import CONTROLLER_ATTR, STASH_ATTR, Controller, config_key, find_controllers
from .marker import FORWARD_TYPES, DirectFeedback, Placement, auto_placements, check_direct_scale, explicit_markers

__all__ = ["DirectFeedbackAlignment", "IndirectFeedbackAlignment", "DenseFeedbackAlignment", "remove_direct_feedback",
           "initialize", "redraw_direct_feedback", "exact_gradients", "markers"]

#: activations whose derivative at 0 is 0: a zero start leaves such a net with no signal at all
_DEAD_AT_ZERO = (nn.ReLU, nn.ReLU6)


@dataclass
class _DirectBase(DirectRule):
    scale: str | float = "nokland2016"
    zero_init: bool = False
    batch_dims: int = 1

    #: where the hidden blocks' signals come from: "direct" (the output error only), "indirect" (ifa: the block
    #: below, forward) or "dense" (the output error and every block above); all but "direct" read each block's
    #: error at its first layer (its entry)
    graph: ClassVar[str] = "direct"

    def __post_init__(self) -> None:
        check_direct_scale(self.scale)
        if not isinstance(self.zero_init, bool):
            raise ValueError(f"zero_init must be True or False, got {self.zero_init!r}")
        if isinstance(self.batch_dims, bool) or not isinstance(self.batch_dims, int) or self.batch_dims < 1:
            raise ValueError(f"batch_dims must be an int >= 1 (the number of leading batch/sequence dimensions of "
                             f"the output), got {self.batch_dims!r}")

    def apply(self, model: nn.Module, *, seed: int, exclude: tuple, last_layer: str | None) -> nn.Module:
        """Place (or find) the markers, install the projection and return ``model`` (see :mod:`bioprop.direct`).

        Raises:
            ValueError: a model that refuses direct feedback (its ``direct_feedback_refusal`` attribute says why);
                ``last_layer`` other than None/``"backprop"``; no marker can be placed; ifa without each block's
                first layer.
        """
        refusal = getattr(model, "direct_feedback_refusal", None)
        if refusal:
            raise ValueError(f"rule {self.name!r} is not defined for {type(model).__name__}: {refusal}")
        if last_layer not in (None, "backprop"):
            raise ValueError(f"{self.name} always trains the output layer with its exact gradient; last_layer may "
                             f"only be None or 'backprop', got {last_layer!r}")
        summary = ConversionSummary(self.name, self.options(), seed)
        placements, output_name = self._placements(model, exclude, summary)  # raises before anything changes
        if any(isinstance(m, FeedbackLayer) for m in model.modules()):
            # inside a block autograd is exact: give the layers back their native op (new objects, so place again)
            model = convert(model, "backprop")
            summary = ConversionSummary(self.name, self.options(), seed)
            placements, output_name = self._placements(model, exclude, summary)
        stash: Controller | None = model.__dict__.pop(STASH_ATTR, None)
        same = stash is not None and stash.config == config_key(self, seed, exclude)
        previous = {name: marker for name, marker in stash.markers} if same else {}  # type: ignore[union-attr]
        markers: list[tuple[str, DirectFeedback]] = []
        auto: list[tuple[nn.Module, DirectFeedback]] = []
        entries: list[nn.Module | None] = []
        for placement in placements:
            if placement.leaf is None:  # written into the model
                marker = model.get_submodule(placement.name)
                if stash is not None and not same:
                    marker.feedback_matrix = None  # converted before with other options: draw again
            else:
                marker = previous.get(placement.name)
                if marker is None:
                    marker = DirectFeedback(entry=placement.entry_name)
                auto.append((placement.leaf, marker))  # type: ignore[arg-type]
            markers.append((placement.name, marker))
            entries.append(placement.entry)
            summary.converted.append((placement.name, "DirectFeedback, block: " + ", ".join(placement.block),
                                      self.name))
        controller = Controller(self, seed, exclude, markers, auto, entries)
        controller.attach(model)
        if self.zero_init and not same:
            _zero_init(model)
        if output_name is not None:
            summary.kept.append((output_name, type(model.get_submodule(output_name)).__name__,
                                 "output layer: exact gradient"))
        set_conversion_summary(model, summary)
        return model

    def remove(self, root: nn.Module) -> nn.Module:
        return remove_direct_feedback(root)

    def reset_state(self, root: nn.Module) -> None:
        controller = root.__dict__.get(CONTROLLER_ATTR)
        if controller is not None:
            controller.redraw()

    def feedback_weights(self, root: nn.Module) -> dict[str, Tensor]:
        controller: Controller | None = root.__dict__.get(CONTROLLER_ATTR)
        return {} if controller is None else controller.feedback_weights()

    def prepare(self, model: nn.Module, example_batch: Any) -> None:
        """Draw every ``D`` not drawn yet by running ``model`` once on ``example_batch`` (:func:`initialize`)."""
        markers = [m for c in find_controllers(model) for _, m in c.markers]
        if any(m.feedback_matrix is None for m in markers):
            initialize(model, *(example_batch if isinstance(example_batch, tuple) else (example_batch,)))

    def _placements(self, model: nn.Module, exclude: tuple, summary: ConversionSummary
                    ) -> tuple[list[Placement], str | None]:
        explicit = explicit_markers(model)
        if explicit:
            placements, output_name = self._explicit(model, explicit, exclude, summary), None
        else:
            placements, output_name = auto_placements(model, exclude)
        for placement in placements:
            if self.graph != "direct" and placement.entry is None:
                raise ValueError(f"{self.name} reads the error at the first layer of each block (its entry), but the "
                                 f"block marked by {placement.name!r} does not start with an nn.Linear/nn.Conv layer"
                                 + ("" if placement.leaf is not None else
                                    "; name it with DirectFeedback(entry='<layer name>')"))
        return placements, output_name

    def _explicit(self, model: nn.Module, explicit: list[tuple[str, DirectFeedback]], exclude: tuple,
                  summary: ConversionSummary) -> list[Placement]:
        placements = []
        for name, marker in explicit:
            if is_excluded(name, marker, exclude):
                summary.kept.append((name, "DirectFeedback", "excluded: passes gradients through"))
                continue
            entry = None
            if marker.entry is not None:
                try:
                    entry = model.get_submodule(marker.entry)
                except AttributeError:
                    raise ValueError(f"marker {name!r} names entry {marker.entry!r}, which is not a module of the "
                                     "model") from None
                if not isinstance(entry, FORWARD_TYPES):
                    raise ValueError(f"marker {name!r} names entry {marker.entry!r}, a {type(entry).__name__}; the "
                                     "entry must be the block's first nn.Linear/nn.Conv layer")
            placements.append(Placement(name, None, name, entry, marker.entry,
                                        [f"{marker.entry} ({type(entry).__name__}) ... {name}" if entry is not None
                                         else f"written in at {name}"]))
        if not placements:
            raise ValueError("every DirectFeedback marker of the model is excluded: nothing to train directly")
        return placements


@register_rule("dfa", aliases=("direct_feedback_alignment",),
               description="direct feedback alignment (nokland2016): each hidden block gets e·D, a fixed random D")
@dataclass
class DirectFeedbackAlignment(_DirectBase):
    r"""Direct feedback alignment (nokland2016): every hidden block gets :math:`\delta h_l = e\,D_l`.

    :math:`e = \partial L/\partial \hat y` is the error at the model output for whatever loss is used; ``D_l``
    is a fixed random ``(n_out, n_units)`` matrix; inside a block autograd is exact, so for a block
    ``Linear → f`` the update is :math:`\delta a_l = (e D_l) \odot f'(a_l)`, :math:`dW_l = \delta a_l^\top
    h_{l-1}`. The output layer gets its exact gradient. The backward costs the blocks' own weight gradients plus
    one ``(N, n_out) × (n_out, Σ n_units)`` matmul: no signal runs through the chain of blocks.

    Args:
        scale: ``"nokland2016"`` (``U(±1/√n_units)``), ``"biotorch"`` (Xavier-uniform) or a positive float s
            (``U(±s)``); ``n_units`` is the size of the marked tensor per position.
        zero_init: set every linear/conv weight and bias to zero at conversion, the output layer included
            (nokland2016's start for tanh/logistic nets; backprop cannot leave it).
        batch_dims: leading dimensions shared by the output and the marked tensors (2 for ``(B, T, C)``
            outputs with per-position errors); ``D`` maps the rest.
    """


@register_rule("ifa", aliases=("indirect_feedback_alignment",),
               description="indirect feedback alignment (nokland2016): e·D to the first block, then forward")
@dataclass
class IndirectFeedbackAlignment(_DirectBase):
    r"""Indirect feedback alignment (nokland2016): the error reaches the first hidden block directly, the blocks
    above get it forward through the forward weights.

    :math:`\delta h_1 = e\,D_1`; for :math:`l \ge 2`, :math:`\delta h_l = W_l\,\delta a_{l-1}` (block ``l``'s
    first layer without its bias applied to the error at block ``l − 1``'s first-layer output), so for a tanh
    MLP :math:`\delta a_l = (\delta a_{l-1} W_l^\top) \odot f'(a_l)`. Every block must keep its size between its
    first layer and its marker (no pooling). Options as for ``dfa``.
    """

    indirect: ClassVar[bool] = True
    graph: ClassVar[str] = "indirect"


@register_rule("dense_fa", aliases=("densefa", "dense_feedback_alignment"),
               description="dense feedback alignment (moskovitz2018): fixed random feedback from every block above")
@dataclass
class DenseFeedbackAlignment(_DirectBase):
    r"""Dense feedback alignment (moskovitz2018 "DenseFA", as bioprop reads it): every hidden block gets fixed
    random feedback from the output error and from the error of every block above it.

    With blocks :math:`1 \dots L` (hidden, in forward order), :math:`e = \partial L/\partial \hat y` and
    :math:`\delta a_k` the error at the output of block ``k``'s first layer (what autograd gives inside block
    ``k`` for its signal :math:`\delta h_k`):

    .. math:: \delta h_l = e\,D_{out 	o l} + \sum_{k > l} \delta a_k\,D_{k 	o l}

    computed from the top block down, each block as one matmul :math:`[e, \delta a_L, \dots, \delta a_{l+1}]\,D_l`
    with the stacked :math:`D_l` of shape ``(n_out + Σ_{k>l} n_a_k, n_units_l)`` (the marker's
    ``feedback_matrix``; rows from the output first, then from block L down to block l + 1). For a tanh MLP
    :math:`\delta a_l = \delta h_l \odot f'(a_l)`. The top block is trained exactly as by ``dfa``; the
    feedback graph is dense, between FA (the adjacent block only) and DFA (the output only). Every block must
    start with an ``nn.Linear``/``nn.Conv`` layer (its entry); its size may change inside the block. Options as
    for ``dfa`` (the ``"biotorch"`` scale takes the stacked row count as its fan). Cost and memory:
    ``docs/direct.md``.
    """

    graph: ClassVar[str] = "dense"


def _zero_init(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, FORWARD_TYPES):
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    dead = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _DEAD_AT_ZERO)})
    if dead:
        warnings.warn(f"zero_init is meant for tanh/logistic nets (nokland2016); this model has {', '.join(dead)}, "
                      "whose derivative at 0 is 0, so its hidden layers receive no signal from a zero start",
                      UserWarning, stacklevel=4)


def remove_direct_feedback(model: nn.Module) -> nn.Module:
    """Return ``model`` to plain backprop: remove the placed markers and hooks; markers written into the model
    become the identity. The feedback state is kept aside, so converting again with the same rule, options and
    seed reuses every ``D`` instead of drawing it again. Returns the model."""
    controller: Controller | None = model.__dict__.get(CONTROLLER_ATTR)
    if controller is not None:
        controller.detach(model)
        model.__dict__[STASH_ATTR] = controller
    return model


def initialize(model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """Draw every ``D`` of ``model`` now by running ``model(*args, **kwargs)`` once with gradients on, in eval
    mode (so BN statistics and dropout are untouched). Useful before saving a checkpoint or wrapping in DDP;
    training draws the same ``D`` on its first step anyway (:func:`bioprop.prepare` calls it). Returns the model.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            model(*args, **kwargs)
    finally:
        model.train(was_training)
    return model


@torch.no_grad()
def redraw_direct_feedback(model: nn.Module) -> nn.Module:
    """Draw every ``D`` of ``model`` that has been drawn again, in place, from the conversion seed and the
    marker's name (the values the first training forward pass drew). Used by :func:`bioprop.reset_feedback`.
    Returns the model."""
    for controller in find_controllers(model):
        controller.redraw()
    return model


@contextlib.contextmanager
def exact_gradients(model: nn.Module) -> Iterator[None]:
    """Within this context the markers of ``model`` pass gradients straight through: plain backprop through the
    whole model (only the markers are affected; per-layer rules keep their B). Markers with ``record`` set keep
    the backprop error at their place in ``last_signal``. A model without markers is left as it is.

    Examples::

        >>> import torch, bioprop
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> net = bioprop.convert(net, "dfa", seed=0)
        >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> with bioprop.direct.exact_gradients(net):
        ...     reference = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x), y), list(net.parameters()))
        >>> len(reference)
        4
    """
    controllers = find_controllers(model)
    saved = [c.exact for c in controllers]
    try:
        for controller in controllers:
            controller.exact = True
        yield
    finally:
        for controller, value in zip(controllers, saved):
            controller.exact = value


def markers(model: nn.Module) -> dict[str, DirectFeedback]:
    """``{name: marker}`` for the active markers of ``model`` (placed or written in), in forward order."""
    found: dict[str, DirectFeedback] = {}
    for controller in find_controllers(model):
        found.update(controller.markers)
    return found
