"""``training_metrics``: every analysis metric of a model in one JSON-ready dict, for the training log."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .shadow import LossFn, _grad_angles, _lillicrap_from, _signal_angles, shadow_backward
from .weights import weight_statistics

__all__ = ["training_metrics", "summarize_metrics", "METRIC_KEYS", "jsonable"]

#: the keys of :func:`training_metrics`'s result, always all present
METRIC_KEYS = ("alignment", "grad_angle", "norm_ratio", "kurtosis", "mean_abs_w", "sign_concordance", "lillicrap",
               "hist", "dfa_signal_angle")


def training_metrics(model: nn.Module, x: Tensor | None = None, y: Tensor | None = None,
                     loss_fn: LossFn | None = None, *, bins: int = 30) -> dict[str, dict]:
    """Every analysis metric of ``model``, as a JSON-serialisable nested dict keyed by layer name.

    The weight statistics read W and B only. With a batch ``(x, y)`` and ``loss_fn`` it also runs one shadow
    backward (:func:`bioprop.metrics.shadow_backward`: two forward/backward passes, training state untouched)
    for the gradient-based metrics; without them those entries are empty dicts.

    Args:
        model: the model being trained, in train mode to measure the training update.
        x: an input batch (e.g. the last training batch).
        y: its targets.
        loss_fn: ``loss_fn(model(x), y) -> scalar``, the training loss.
        bins: bins of the ``|W|`` histograms.

    Returns:
        ``{"alignment": {layer: deg}, "grad_angle": {layer: deg}, "norm_ratio": {layer: ratio},
        "kurtosis": {layer: κ}, "mean_abs_w": {layer: mean |W|}, "sign_concordance": {layer: fraction},
        "lillicrap": {layer: {"fraction", "mean"}}, "hist": {layer: {"edges", "counts"}},
        "dfa_signal_angle": {marker: deg}}``. Undefined values (e.g. the angle of an all-zero W) are None.

    Raises:
        ValueError: if only some of ``x``, ``y``, ``loss_fn`` are given.
    """
    given = [v is not None for v in (x, y, loss_fn)]
    if any(given) and not all(given):
        raise ValueError("training_metrics needs x, y and loss_fn together (for the gradient metrics) or none "
                         "of them (weight statistics only)")
    out: dict[str, dict] = {key: {} for key in METRIC_KEYS}
    out.update(weight_statistics(model, bins=bins))
    if all(given):
        result = shadow_backward(model, x, y, loss_fn)  # type: ignore[arg-type]
        out["grad_angle"] = _grad_angles(result)
        out["lillicrap"] = _lillicrap_from(result, model)
        out["dfa_signal_angle"] = _signal_angles(result)
    return jsonable(out)


def summarize_metrics(values: dict[str, Any]) -> dict[str, Any]:
    """One line's worth of :func:`training_metrics`: per metric, the mean, min and max over the layers.

    A per-layer number gives ``{"mean", "min", "max", "layers"}``; a per-layer dict of numbers (``lillicrap``)
    gives those statistics for each of its numeric fields. Lists (the ``hist`` histograms) and empty metrics
    are left out; None values (undefined angles) are skipped.

    Example:
        >>> summarize_metrics({"alignment": {"0": 30.0, "2": 60.0, "4": None}, "hist": {"0": {"counts": [1]}}})
        {'alignment': {'mean': 45.0, 'min': 30.0, 'max': 60.0, 'layers': 2}}
    """
    def stats(numbers: list[float]) -> dict[str, Any]:
        return {"mean": sum(numbers) / len(numbers), "min": min(numbers), "max": max(numbers), "layers": len(numbers)}

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    out: dict[str, Any] = {}
    for key, per_layer in values.items():
        if not isinstance(per_layer, dict):
            continue
        flat = [v for v in per_layer.values() if number(v)]
        if flat:
            out[key] = stats(flat)
            continue
        fields: dict[str, list[float]] = {}
        for entry in per_layer.values():
            if isinstance(entry, dict):
                for name, v in entry.items():
                    if number(v):
                        fields.setdefault(name, []).append(v)
        if fields:
            out[key] = {name: stats(numbers) for name, numbers in fields.items()}
    return out


def jsonable(value: Any) -> Any:
    """``value`` ready for strict JSON: tensors and NumPy arrays and scalars become Python numbers or lists, and
    NaN/inf (which JSON cannot hold) become null. The one such helper: run logs and ``final.json`` use it too."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return jsonable(value.tolist())
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # other array-like scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
