"""The shadow backward: the rule's gradient and the true backprop gradient on the same batch.

:func:`shadow_backward` runs two forward/backward passes through the model's own ops with
``torch.autograd.grad``: one with each layer's rule (what training uses) and one with exact feedback (every
feedback layer's rule temporarily replaced by ``sham``, B = W through the same op; direct-feedback markers
under ``bioprop.direct.exact_gradients``). Both passes see the same batch, the same dropout masks (the RNG
is rewound between them) and the same feedback draw.

Nothing the training loop owns is changed: parameters are only read; gradients are returned, never
accumulated into ``.grad``; the optimizer is never touched; the global RNG (CPU and every CUDA device the
model or the batch lives on) is restored after the passes; every buffer outside the feedback layers (BN
running statistics) and the markers' recorded signals are saved and restored; and the feedback layers'
per-step state is frozen during the passes (``before_forward`` is not called, so brsf does not draw new
magnitudes: the passes use the draw of the last training step).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..direct import exact_gradients, markers
from ..functional import Feedback
from ..layers import FeedbackLayer
from ..rules import LayerRule, create_rule
from .weights import angle, layer_feedback, model_weight_layers, unwrap_model

__all__ = ["ShadowResult", "shadow_backward", "gradient_agreement", "lillicrap_values", "lillicrap_condition",
           "dfa_signal_angle", "direct_markers", "topmost_feedback_layer"]

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class ShadowResult:
    """What one shadow backward measured (all tensors detached).

    Attributes:
        rule_grads: ``{layer: dL/dW}`` as the rule computes it, for every linear/conv weight with requires_grad
            (None where the loss does not reach the weight).
        exact_grads: the same with exact backprop.
        rule_signals: ``{marker: the error delivered at the marker}``, ``(N, *h_shape)``, for direct rules.
        exact_signals: the backprop error at each marker.
        top_layer: name of the topmost layer whose feedback differs from W (None if there is none).
        top_input: the input x of that layer, ``(N, *in_shape)``, one entry per call of the layer.
        top_error: ``e = dL/dy`` at that layer's output, ``(N, *out_shape)``, one entry per call.
        loss: the loss value of the rule pass.
    """

    rule_grads: dict[str, Tensor | None] = field(default_factory=dict)
    exact_grads: dict[str, Tensor | None] = field(default_factory=dict)
    rule_signals: dict[str, Tensor] = field(default_factory=dict)
    exact_signals: dict[str, Tensor] = field(default_factory=dict)
    top_layer: str | None = None
    top_input: list[Tensor] = field(default_factory=list)
    top_error: list[Tensor] = field(default_factory=list)
    loss: float = float("nan")


# ----------------------------------------------------------------------------------------------- helpers


def direct_markers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, marker)`` for every active direct-feedback marker of ``model`` (dfa/ifa), in forward order."""
    return list(markers(unwrap_model(model)).items())


def _is_exact(layer: nn.Module) -> bool:
    """Whether ``layer`` sends its error through W itself (a native layer, or a rule that declares it exact)."""
    return not isinstance(layer, FeedbackLayer) or layer.rule.is_exact()


def topmost_feedback_layer(model: nn.Module) -> str | None:
    """Name of the last layer (registration order) whose feedback is not W, or None. Every layer above it is
    exact, so the error reaching its output is the true backprop error."""
    for name, layer in reversed(list(model_weight_layers(model))):  # from the top: usually the first one
        if not _is_exact(layer):
            return name
    return None


class _FrozenRule(LayerRule):
    """A rule's feedback without its per-step update: ``before_forward`` does nothing."""

    def __init__(self, base: LayerRule) -> None:
        self.base = base
        self.name = base.name  # type: ignore[misc]
        self.learns_feedback = base.learns_feedback  # type: ignore[misc]

    def is_exact(self) -> bool:
        return self.base.is_exact()

    def feedback_weight(self, layer: nn.Module) -> Tensor | None:
        return self.base.feedback_weight(layer)

    def feedback(self, layer: nn.Module) -> Feedback | None:
        return self.base.feedback(layer)

    def options(self) -> dict[str, Any]:
        return self.base.options()


@contextlib.contextmanager
def _rules_replaced(layers: list[nn.Module], make: Callable[[LayerRule], LayerRule]) -> Iterator[None]:
    saved = [layer.rule for layer in layers]
    try:
        for layer, rule in zip(layers, saved):
            layer.rule = make(rule)
        yield
    finally:
        for layer, rule in zip(layers, saved):
            layer.rule = rule


def _cuda_devices(model: nn.Module, *tensors: Tensor) -> list[int]:
    devices = {t.device for t in (*model.parameters(), *model.buffers(), *tensors) if t.device.type == "cuda"}
    return sorted(d.index if d.index is not None else torch.cuda.current_device() for d in devices)


class _RngState:
    """The global CPU RNG and the CUDA RNGs of the given devices, captured so they can be rewound."""

    def __init__(self, cuda_devices: list[int]) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in cuda_devices}

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)


class _BufferState:
    """Copies of every buffer outside the feedback layers (BN running stats, counters, marker state)."""

    def __init__(self, model: nn.Module) -> None:
        self.saved: list[tuple[Tensor, Tensor]] = []
        seen: set[int] = set()
        for module in model.modules():
            if isinstance(module, FeedbackLayer):
                continue  # their state only changes in before_forward, which is frozen during the passes
            for buffer in module.buffers(recurse=False):
                if buffer is not None and id(buffer) not in seen:
                    seen.add(id(buffer))
                    self.saved.append((buffer, buffer.detach().clone()))

    @torch.no_grad()
    def restore(self) -> None:
        for buffer, copy in self.saved:
            buffer.copy_(copy)


class _MarkerState:
    """What the passes may change on direct-feedback markers: the recorded ``last_signal``, and a ``D`` that was
    not drawn yet (drawn by the first forward pass; restored to "not drawn" so training draws it itself)."""

    def __init__(self, markers: list[tuple[str, nn.Module]]) -> None:
        self.saved = [(m, m.__dict__.get("last_signal"), m.feedback_matrix is None) for _, m in markers]

    def restore(self) -> None:
        for marker, signal, undrawn in self.saved:
            marker.last_signal = signal
            if undrawn:
                marker.feedback_matrix = None


def _one_pass(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, weights: dict[str, Tensor],
              markers: list[tuple[str, nn.Module]], top: nn.Module | None
              ) -> tuple[dict[str, Tensor | None], dict[str, Tensor], list[Tensor], list[Tensor], float]:
    """One forward + ``autograd.grad``: weight gradients, marker signals, and (x, e) at the top layer."""
    marker_inputs: dict[str, list[Tensor]] = {name: [] for name, _ in markers}
    top_inputs: list[Tensor] = []
    top_outputs: list[Tensor] = []
    handles = []

    def keep_marker_input(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if args and isinstance(args[0], Tensor) and args[0].requires_grad:
                marker_inputs[name].append(args[0])
        return hook

    def keep_top(module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, Tensor) and output.requires_grad:
            top_inputs.append(args[0].detach())
            top_outputs.append(output)

    try:
        for name, marker in markers:
            handles.append(marker.register_forward_hook(keep_marker_input(name)))
        if top is not None:
            handles.append(top.register_forward_hook(keep_top))
        with torch.enable_grad():
            loss = loss_fn(model(x), y)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn(output, y) must return a scalar tensor, got "
                                 + (f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__))
            signal_inputs = [t for name, _ in markers for t in marker_inputs[name]]
            inputs = [*weights.values(), *signal_inputs, *top_outputs]
            grads = torch.autograd.grad(loss, inputs, allow_unused=True) if inputs else ()
    finally:
        for handle in handles:
            handle.remove()
    n_w, n_s = len(weights), len(signal_inputs)
    weight_grads = dict(zip(weights, grads[:n_w]))
    signals: dict[str, Tensor] = {}
    it = iter(grads[n_w:n_w + n_s])
    for name, _ in markers:
        parts = [next(it) for _ in marker_inputs[name]]
        parts = [g.reshape(g.shape[0], -1) if g.dim() else g.reshape(1, 1) for g in parts if g is not None]
        if parts:
            signals[name] = torch.cat(parts, dim=1)
    top_errors = [g if g is not None else torch.zeros_like(o) for g, o in zip(grads[n_w + n_s:], top_outputs)]
    return weight_grads, signals, top_inputs, top_errors, float(loss.detach())


def shadow_backward(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> ShadowResult:
    """Gradients under the model's rule and under exact backprop on one batch, leaving training state as it was.

    Args:
        model: a converted (or plain) model, in the mode the measurement should see (train mode to measure the
            training update). DDP / ``torch.compile`` wrappers are looked through.
        x: the input batch, as the model takes it.
        y: the targets, as ``loss_fn`` takes them.
        loss_fn: ``loss_fn(model(x), y) -> scalar``.

    Returns:
        A :class:`ShadowResult`.

    Raises:
        ValueError: if ``loss_fn`` does not return a scalar.
    """
    model = unwrap_model(model)
    layers = list(model_weight_layers(model))
    weights = {name: layer.weight for name, layer in layers if layer.weight.requires_grad}
    feedback_layers = [layer for _, layer in layers if isinstance(layer, FeedbackLayer)]
    markers = direct_markers(model)
    top_name = topmost_feedback_layer(model)
    top = model.get_submodule(top_name) if top_name is not None else None

    rng = _RngState(_cuda_devices(model, x))
    buffers = _BufferState(model)
    marker_state = _MarkerState(markers)
    result = ShadowResult(top_layer=top_name)
    try:
        with _rules_replaced(feedback_layers, _FrozenRule):
            result.rule_grads, result.rule_signals, result.top_input, result.top_error, result.loss = _one_pass(
                model, x, y, loss_fn, weights, markers, top)
        buffers.restore()
        rng.restore()  # the exact pass draws the same dropout masks
        exact_direct = exact_gradients(model) if markers else contextlib.nullcontext()
        with _rules_replaced(feedback_layers, lambda rule: create_rule("sham")), exact_direct:
            result.exact_grads, result.exact_signals, _, _, _ = _one_pass(model, x, y, loss_fn, weights, markers,
                                                                          None)
    finally:
        buffers.restore()
        marker_state.restore()
        rng.restore()
    return result


# ----------------------------------------------------------------------------------------------- metrics


def gradient_agreement(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> dict[str, float]:
    """``{layer: angle in degrees between the rule's dL/dW and the true backprop dL/dW}`` on one batch.

    The rule's update is the gradient its feedback produces (before any optimizer transformation such as Batch
    Manhattan's sign). 0 for every layer under exact backprop; the output layer is always 0 (its dW does not
    depend on any B). NaN where either gradient is all zeros or the loss does not reach the weight. Training
    state is left as it was (see :func:`shadow_backward`).
    """
    return _grad_angles(shadow_backward(model, x, y, loss_fn))


def _grad_angles(result: ShadowResult) -> dict[str, float]:
    out = {}
    for name, rule_grad in result.rule_grads.items():
        exact_grad = result.exact_grads.get(name)
        out[name] = float("nan") if rule_grad is None or exact_grad is None else angle(rule_grad, exact_grad)
    return out


def lillicrap_values(error: Tensor, weight: Tensor, feedback: Tensor) -> Tensor:
    r"""Per-sample Lillicrap product for a linear layer: :math:`e_n^\top W B^\top e_n`.

    With W and B of shape ``(out, in)`` and the error ``e = dL/dy`` at the layer's output, backprop sends
    ``e W`` to the layer below and the rule sends ``e B``; the product is their inner product
    :math:`\langle e W, e B\rangle = e W B^\top e^\top`, positive when the rule's signal is within 90° of
    backprop's (lillicrap2016's condition :math:`e^\top W B e > 0`, with their B being our ``Bᵀ``).

    Args:
        error: ``(N, *, out)``; any middle dims are summed over per sample.
        weight: W, ``(out, in)``.
        feedback: B, ``(out, in)``.

    Returns:
        ``(N,)``.
    """
    through_w = error.matmul(weight)  # (N, *, in)
    through_b = error.matmul(feedback)
    return (through_w * through_b).reshape(error.shape[0], -1).sum(1)


def _input_gradient(layer: nn.Module, x: Tensor, error: Tensor, weight: Tensor) -> Tensor:
    """The signal a layer sends down for output error ``error`` when its feedback weight is ``weight``."""
    if isinstance(layer, nn.Linear):
        return error.matmul(weight)
    native = next(t for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(layer, t))
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        # the native forward (padding modes included); its input gradient goes through `weight`
        out = native._conv_forward(layer, x, weight.detach(), None)  # type: ignore[attr-defined]
        return torch.autograd.grad(out, x, error)[0]


def _lillicrap_from(result: ShadowResult, model: nn.Module) -> dict[str, dict[str, float]]:
    if result.top_layer is None or not result.top_error:
        return {}
    layer = unwrap_model(model).get_submodule(result.top_layer)
    feedback = layer_feedback(layer)
    weight = layer.weight.detach()
    with torch.no_grad():
        values = []
        for x, error in zip(result.top_input, result.top_error):
            if isinstance(layer, nn.Linear):
                values.append(lillicrap_values(error, weight, feedback))
            else:
                through_w = _input_gradient(layer, x, error, weight)
                through_b = _input_gradient(layer, x, error, feedback)
                values.append((through_w * through_b).reshape(error.shape[0], -1).sum(1))
        v = torch.cat(values).double()
    return {result.top_layer: {"fraction": float((v > 0).double().mean()), "mean": float(v.mean())}}


def lillicrap_condition(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> dict[str, dict[str, float]]:
    r"""Lillicrap's condition :math:`e^\top W B^\top e > 0` at the topmost feedback layer.

    The layer is the last one (registration order) whose B differs from W: the output layer for a fully
    converted model, the one below it when the output layer is kept exact. Everything above it is exact, so
    ``e = dL/dy`` at its output is the true error, and :func:`lillicrap_values` gives, per sample, the inner
    product of the signals that W (backprop) and B (the rule) send down.

    Returns:
        ``{layer: {"fraction": share of samples with a positive product, "mean": its batch mean}}``, or ``{}``
        when every layer is exact (the condition then holds trivially) or the model uses direct feedback.
    """
    return _lillicrap_from(shadow_backward(model, x, y, loss_fn), model)


def dfa_signal_angle(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> dict[str, float]:
    """``{marker: angle in degrees between the error the direct rule delivers at the marker and the backprop
    error at the same place}``, each flattened over the whole batch. ``{}`` for models without markers."""
    return _signal_angles(shadow_backward(model, x, y, loss_fn))


def _signal_angles(result: ShadowResult) -> dict[str, float]:
    return {name: angle(signal, result.exact_signals[name]) for name, signal in result.rule_signals.items()
            if name in result.exact_signals}
