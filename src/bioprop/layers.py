"""Feedback layers: ``nn.Linear`` and ``nn.Conv{1,2,3}d`` whose error signal goes through a rule's ``B``.

The layers subclass the native ones, so they hold the same ``weight`` and ``bias`` parameters, pass
``isinstance(layer, nn.Linear)`` checks and load the same checkpoints (plus the rule's ``feedback_*`` state).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import Feedback, feedback_conv, feedback_linear
from .learned import track_learned_feedback
from .rules import LayerRule, create_rule, make_generator

__all__ = ["FeedbackLayer", "FeedbackLinear", "FeedbackConv1d", "FeedbackConv2d", "FeedbackConv3d",
           "init_feedback_state", "layer_feedback"]


@torch.compiler.disable
def _run_eagerly(hook: Any, layer: nn.Module) -> None:
    """Run a rule's per-step state update outside any ``torch.compile`` graph (it reads version counters and
    draws random state, which compiled graphs cannot express)."""
    hook(layer)


class FeedbackLayer:
    """Mixin holding the rule of a feedback layer. The rule's state lives in the layer's ``feedback_*`` entries."""

    rule: LayerRule
    weight: Tensor

    def _setup_rule(self, rule: str | LayerRule, seed: int, name: str, rule_options: dict[str, Any]) -> None:
        if isinstance(rule, str):
            rule = create_rule(rule, **rule_options)  # type: ignore[assignment]
        elif rule_options:
            raise ValueError("pass rule options either inside the rule object or as keywords, not both")
        if not isinstance(rule, LayerRule):
            raise ValueError(f"rule {rule.name!r} is not a per-layer rule; use bioprop.convert(model, "
                             f"{rule.name!r}) for direct feedback")
        init_feedback_state(self, rule, seed, name)  # type: ignore[arg-type]

    def _feedback_for(self, x: Tensor) -> Feedback | None:
        """What the op gets for B in this forward pass (the rule's :meth:`~bioprop.rules.LayerRule.feedback`), or
        None when the native op gives the same result."""
        rule = self.rule
        if self.__dict__.get("_feedback_pending", False) and not self.weight.is_meta:
            raise RuntimeError(f"feedback layer {self.__dict__['_feedback_origin'][1] or '(unnamed)'!r} was converted "
                               "on the meta device and its feedback state was never drawn; call "
                               "bioprop.reset_feedback(model) after to_empty() (once W has its values)")
        if not torch.is_grad_enabled():
            return None
        if not x.requires_grad:  # nobody will read dL/dx; the native op's dW and db are already exact
            return None
        if type(rule).before_forward is not LayerRule.before_forward and not self.weight.is_meta:
            _run_eagerly(rule.before_forward, self)
        return rule.feedback(self)  # type: ignore[arg-type]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[misc]
        state_dict, prefix = args[0], args[1]
        if all(prefix + key in state_dict for key in _feedback_entries(self)):
            self.__dict__["_feedback_pending"] = False  # the rule's whole state was loaded
        self.rule.after_load(self)  # type: ignore[arg-type]

    def _save_to_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.rule.before_save(self)  # type: ignore[arg-type]
        super()._save_to_state_dict(*args, **kwargs)  # type: ignore[misc]

    def __getstate__(self) -> dict[str, Any]:  # deepcopy and pickle
        self.rule.before_save(self)  # type: ignore[arg-type]
        return super().__getstate__()  # type: ignore[misc]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self.rule.after_load(self)  # type: ignore[arg-type]
        track_learned_feedback(self)  # type: ignore[arg-type]

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # .to(), .double(), to_empty(), ...
        self.rule.before_save(self)  # type: ignore[arg-type]
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        if self.weight.is_meta and _feedback_entries(self):  # moved to meta: draw again once real
            self.__dict__["_feedback_pending"] = True
        else:
            self.rule.after_load(self)  # type: ignore[arg-type]
        track_learned_feedback(self)  # type: ignore[arg-type]  # to_empty() makes new Parameter objects
        return result

    def reset_feedback(self) -> None:
        """Draw the rule's state again from the layer's conversion seed and name, as conversion did.

        The state tensors keep their identity (values are copied in), so optimizers and DDP keep their
        references. Rules whose state depends on W (``norm="init"``) read the current W.

        Raises:
            ValueError: if the layer is still on the meta device (call ``to_empty`` first).
        """
        name = self.__dict__.get("_feedback_origin", (0, ""))[1]
        if self.weight.is_meta:
            raise ValueError(f"reset_feedback: layer {name or '(unnamed)'!r} is on the meta device; call "
                             "model.to_empty(device=...) first")
        old = {key: getattr(self, key) for key in _feedback_entries(self)}
        seed = self.__dict__.get("_feedback_origin", (0, ""))[0]
        self.__dict__.pop("_feedback_seen_version", None)
        self.rule.init_state(self, make_generator(seed, name))  # type: ignore[arg-type]
        for key, tensor in old.items():
            new = getattr(self, key, None)
            if isinstance(new, Tensor) and new is not tensor and new.shape == tensor.shape \
                    and new.dtype == tensor.dtype and new.device == tensor.device:
                with torch.no_grad():
                    tensor.copy_(new)
                container = self._parameters if key in self._parameters else self._buffers  # type: ignore[attr-defined]
                container[key] = tensor
        self.__dict__["_feedback_pending"] = False

    def extra_repr(self) -> str:  # type: ignore[override]
        options = ", ".join(f"{k}={v!r}" for k, v in self.rule.options().items())
        return f"{super().extra_repr()}, rule={self.rule.name!r}" + (f", {options}" if options else "")  # type: ignore[misc]


@torch.no_grad()
def layer_feedback(layer: nn.Module) -> Tensor | None:
    """The ``B`` ``layer`` sends its error through now, or None when the layer is exact (``B = W`` through the
    native op: a plain ``nn.Linear``/``nn.Conv*``, or a feedback layer whose rule runs the native op now).

    The one accessor of a layer's current feedback weight; :func:`bioprop.feedback_weights` and
    :mod:`bioprop.metrics` read it. It asks the rule's ``feedback_weight`` without side effects (no redraw).

    Returns:
        ``B`` detached (not a copy), shape of ``layer.weight``; or None.
    """
    if not isinstance(layer, FeedbackLayer):
        return None
    feedback = layer.rule.feedback_weight(layer)  # type: ignore[arg-type]
    return None if feedback is None else feedback.detach()


def _feedback_entries(layer: nn.Module) -> list[str]:
    """Names of the rule's ``feedback_*`` parameters and buffers on ``layer``."""
    return [key for key in (*layer._parameters, *layer._buffers) if key.startswith("feedback_")]


def init_feedback_state(layer: nn.Module, rule: LayerRule, seed: int, name: str) -> None:
    """Give ``layer`` its rule and the rule's state, drawn from ``seed`` and the layer's ``name``.

    The seed and name are kept on the layer, so that :meth:`FeedbackLayer.reset_feedback` can draw the same
    state again. On the meta device nothing is drawn: the layer is marked, and a forward pass on a real device
    refuses to run until ``reset_feedback`` (or a ``load_state_dict`` with the rule's state) has filled it.
    """
    layer.rule = rule  # type: ignore[assignment]
    layer.__dict__["_feedback_origin"] = (int(seed), name)
    rule.init_state(layer, make_generator(seed, name))
    track_learned_feedback(layer)
    layer.__dict__["_feedback_pending"] = bool(layer.weight.is_meta and _feedback_entries(layer))


class FeedbackLinear(FeedbackLayer, nn.Linear):
    r"""Linear layer :math:`y = xW^T + b` whose backward sends :math:`\delta x = \delta y \, B`.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias.
        rule: rule name (see :func:`bioprop.list_rules`) or a rule object.
        seed: seed of the rule's random state; the layer's own draw also depends on ``name``.
        name: the layer's name inside its model (used for seeding only).
        **rule_options: options of the rule, e.g. ``scale="biotorch"``.

    Shape:
        - Input: :math:`(*, H_{in})`.
        - Output: :math:`(*, H_{out})`.

    Attributes:
        weight, bias: as in :class:`torch.nn.Linear`.
        rule: the policy giving B; its state is in the layer's ``feedback_*`` buffers/parameters.

    Examples::

        >>> layer = FeedbackLinear(20, 30, rule="fa", seed=0)
        >>> layer(torch.randn(128, 20)).shape
        torch.Size([128, 30])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rule: str | LayerRule = "fa",
                 seed: int = 0, name: str = "", device: Any = None, dtype: Any = None, **rule_options: Any) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup_rule(rule, seed, name, rule_options)

    def forward(self, input: Tensor) -> Tensor:
        feedback = self._feedback_for(input)
        if feedback is None:
            return F.linear(input, self.weight, self.bias)
        return feedback_linear(input, self.weight, self.bias, feedback)


class _FeedbackConvNd(FeedbackLayer):
    """Shared forward of the feedback convolutions; any padding mode and string padding are supported."""

    padding_mode: str
    padding: Any
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    _reversed_padding_repeated_twice: list[int]

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        feedback = self._feedback_for(input)
        if feedback is None:
            return super()._conv_forward(input, weight, bias)  # type: ignore[misc]
        padding = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):
            # Explicit (possibly asymmetric) padding; F.pad's backward is exact.
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * len(self.stride)
        return feedback_conv(input, weight, bias, feedback, self.stride, padding, self.dilation, self.groups)


def _conv_init(self: Any, base: type, args: tuple, kwargs: dict) -> None:
    rule = kwargs.pop("rule", "fa")
    seed = kwargs.pop("seed", 0)
    name = kwargs.pop("name", "")
    base_keys = {"stride", "padding", "dilation", "groups", "bias", "padding_mode", "device", "dtype"}
    rule_options = {k: kwargs.pop(k) for k in list(kwargs) if k not in base_keys}
    base.__init__(self, *args, **kwargs)
    self._setup_rule(rule, seed, name, rule_options)


class FeedbackConv1d(_FeedbackConvNd, nn.Conv1d):
    """:class:`torch.nn.Conv1d` whose input gradient goes through the rule's B (same keyword ``rule``, ``seed``,
    ``name`` and rule options as :class:`FeedbackLinear`). Shape: ``(B, C_in, L) -> (B, C_out, L_out)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _conv_init(self, nn.Conv1d, args, kwargs)


class FeedbackConv2d(_FeedbackConvNd, nn.Conv2d):
    """:class:`torch.nn.Conv2d` whose input gradient goes through the rule's B.

    Shape: ``(B, C_in, H, W) -> (B, C_out, H_out, W_out)``, identical to ``nn.Conv2d`` in value and in dW, db.

    Examples::

        >>> conv = FeedbackConv2d(3, 16, 3, padding=1, rule="usf")
        >>> conv(torch.randn(8, 3, 32, 32)).shape
        torch.Size([8, 16, 32, 32])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _conv_init(self, nn.Conv2d, args, kwargs)


class FeedbackConv3d(_FeedbackConvNd, nn.Conv3d):
    """:class:`torch.nn.Conv3d` whose input gradient goes through the rule's B.
    Shape: ``(B, C_in, D, H, W) -> (B, C_out, D_out, H_out, W_out)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _conv_init(self, nn.Conv3d, args, kwargs)


#: native layer type -> its feedback counterpart
FEEDBACK_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: FeedbackLinear,
    nn.Conv1d: FeedbackConv1d,
    nn.Conv2d: FeedbackConv2d,
    nn.Conv3d: FeedbackConv3d,
}
