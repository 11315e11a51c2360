"""Weight statistics: the angle between W and B, norms, kurtosis, magnitudes and sign concordance.

The tensor functions at the top are pure (no model, no state) and work on any shape: a weight is read
flattened. The model-level functions below them walk the model's linear and conv layers.

Which ``B`` a layer "uses now":

- a feedback layer (``bioprop.layers.FeedbackLinear`` / ``FeedbackConv*``) sends its error through its rule's
  ``feedback_weight(layer)``, as :func:`bioprop.layers.layer_feedback` reads it (re-exported here);
- an exact layer (a plain ``nn.Linear`` / ``nn.Conv*``, or a feedback layer whose rule is ``backprop``) sends it
  through ``W`` itself. Its angle to its B would be 0 by construction, so :func:`alignment` reports instead the
  angle between ``W`` and ``sign(W)``, the baseline xiao2018 (Fig. 3a) draws for backprop: how far W is from
  the B that sign symmetry would use. Every other statistic takes ``B = W`` for exact layers.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor, nn

from ..layers import layer_feedback
from ..optim._select import unwrap_model, weight_layers

__all__ = ["angle", "norm_ratio", "kurtosis", "mean_abs", "sign_concordance", "magnitude_histogram",
           "alignment", "weight_statistics", "layer_feedback", "model_weight_layers", "EXACT_MODES"]

#: what :func:`alignment` reports for exact layers
EXACT_MODES = ("sign", "skip")


def _flat64(t: Tensor) -> Tensor:
    # float64 so that sums over millions of entries (ResNet convs) keep their digits
    return t.detach().reshape(-1).double()


def angle(a: Tensor, b: Tensor) -> float:
    r"""Angle in degrees between two tensors read as flat vectors.

    :math:`\theta = \arccos\big(\langle a, b\rangle / (\lVert a\rVert \lVert b\rVert)\big)`, in [0, 180].

    Returns:
        The angle, or NaN when either tensor is all zeros (the angle is undefined; e.g. a zero-initialised W).

    Raises:
        ValueError: if the tensors hold different numbers of elements.
    """
    if a.numel() != b.numel():
        raise ValueError(f"angle needs tensors with the same number of elements, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    a64, b64 = _flat64(a), _flat64(b)
    denom = math.sqrt(float(torch.dot(a64, a64)) * float(torch.dot(b64, b64)))
    if denom == 0.0 or not math.isfinite(denom):
        return math.nan
    cos = float(torch.dot(a64, b64)) / denom
    return math.degrees(math.acos(min(1.0, max(-1.0, cos))))


def norm_ratio(weight: Tensor, feedback: Tensor) -> float:
    r""":math:`\lVert B\rVert_F / \lVert W\rVert_F` (NaN when W is all zeros)."""
    w = float(_flat64(weight).norm())
    return float(_flat64(feedback).norm()) / w if w > 0 else math.nan


def kurtosis(weight: Tensor) -> float:
    r"""Kurtosis of the entries of W, Pearson's (non-excess) definition: 3 for a Gaussian.

    :math:`\kappa = m_4 / m_2^2` with central moments :math:`m_k = \frac1n \sum_i (w_i - \bar w)^k`
    (population moments, no bias correction; equal to ``scipy.stats.kurtosis(w, fisher=False)``). Subtract 3
    for the excess kurtosis.

    Returns:
        κ, or NaN when all entries are equal (m_2 = 0).
    """
    w = _flat64(weight)
    squared = (w - w.mean()).square_()
    m2 = float(squared.mean())
    if m2 == 0.0:
        return math.nan
    return float(torch.dot(squared, squared)) / squared.numel() / (m2 * m2)  # m4 = mean of squares squared


def mean_abs(weight: Tensor) -> float:
    r"""Mean magnitude :math:`\frac1n \sum_i |w_i|`."""
    return float(weight.detach().abs().sum(dtype=torch.float64)) / max(1, weight.numel())


def sign_concordance(weight: Tensor, feedback: Tensor) -> float:
    r"""Fraction of entries whose signs agree: :math:`\frac1n \sum_i [\operatorname{sign} w_i = \operatorname{sign}
    b_i]` (0 counts as its own sign, so a zero entry agrees only with a zero entry).

    Raises:
        ValueError: if the shapes differ.
    """
    if weight.shape != feedback.shape:
        raise ValueError(f"sign_concordance needs W and B of one shape, got {tuple(weight.shape)} and "
                         f"{tuple(feedback.shape)}")
    agree = (torch.sign(weight.detach()) == torch.sign(feedback.detach())).sum()
    return int(agree) / max(1, weight.numel())


def magnitude_histogram(weight: Tensor, bins: int = 30) -> dict[str, list]:
    """Histogram of ``|W|`` over ``bins`` equal bins from 0 to ``max |W|`` (the last bin includes its right
    edge, as in ``numpy.histogram``). An all-zero W puts every entry in the first bin of ``[0, 1]``.

    Returns:
        ``{"edges": [bins + 1 floats], "counts": [bins ints]}``.

    Raises:
        ValueError: if ``bins`` is not a positive int.
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    magnitudes = weight.detach().reshape(-1).abs()
    if not magnitudes.is_floating_point():
        magnitudes = magnitudes.double()
    top = float(magnitudes.max()) if magnitudes.numel() else 0.0
    top = top if top > 0 else 1.0
    counts = torch.histc(magnitudes, bins=bins, min=0.0, max=top)  # in W's dtype: the histogram needs no more
    edges = torch.linspace(0.0, top, bins + 1, dtype=torch.float64)
    return {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]}


# ----------------------------------------------------------------------------------------------- per model


def model_weight_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for every linear/conv layer with a weight, in registration order; names are those of
    the model inside any DDP / ``torch.compile`` wrapper."""
    return weight_layers(unwrap_model(model))


def alignment(model: nn.Module, *, exact: str = "sign") -> dict[str, float]:
    """``{layer name: angle in degrees between W and the B the layer uses now}`` for every linear/conv layer.

    Args:
        model: any model, converted or not (DDP / compile wrappers are looked through).
        exact: what exact layers (B = W) report: ``"sign"``, the angle between W and sign(W) (xiao2018's
            baseline for backprop), or ``"skip"`` to leave them out.

    Returns:
        Degrees in [0, 180]; NaN where W (or B) is all zeros.

    Raises:
        ValueError: for an unknown ``exact`` mode.

    Examples::

        >>> import bioprop
        >>> net = bioprop.convert(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)), "fa",
        ...                       last_layer="backprop")
        >>> sorted(alignment(net)), sorted(alignment(net, exact="skip"))
        (['0', '2'], ['0'])
    """
    if exact not in EXACT_MODES:
        raise ValueError(f"unknown exact mode {exact!r}; allowed: {', '.join(EXACT_MODES)}")
    out: dict[str, float] = {}
    for name, layer in model_weight_layers(model):
        feedback = layer_feedback(layer)
        if feedback is None:
            if exact == "skip":
                continue
            feedback = torch.sign(layer.weight.detach())
        out[name] = angle(layer.weight, feedback)
    return out


@torch.no_grad()
def weight_statistics(model: nn.Module, *, bins: int = 30) -> dict[str, dict]:
    """All weight statistics of every linear/conv layer, computed in one pass over the model.

    Args:
        model: any model, converted or not.
        bins: number of bins of the ``|W|`` histogram.

    Returns:
        ``{"alignment": {layer: deg}, "norm_ratio": {layer: ‖B‖/‖W‖}, "kurtosis": {layer: κ},
        "mean_abs_w": {layer: mean |W|}, "sign_concordance": {layer: fraction}, "hist": {layer: {"edges",
        "counts"}}}``. Exact layers take B = W, except in ``alignment`` (see :func:`alignment`).
    """
    keys = ("alignment", "norm_ratio", "kurtosis", "mean_abs_w", "sign_concordance", "hist")
    out: dict[str, dict] = {key: {} for key in keys}
    for name, layer in model_weight_layers(model):
        weight = layer.weight.detach()
        weight64 = _flat64(weight)  # converted once, shared by the float64 reductions below
        feedback = layer_feedback(layer)
        if feedback is None:  # exact: B = W, and sign(W) for the alignment baseline
            out["alignment"][name] = angle(weight64, torch.sign(weight64))
            out["norm_ratio"][name] = 1.0 if float(weight64.norm()) > 0 else math.nan
            out["sign_concordance"][name] = 1.0
        else:
            feedback64 = _flat64(feedback)
            out["alignment"][name] = angle(weight64, feedback64)
            out["norm_ratio"][name] = norm_ratio(weight64, feedback64)
            out["sign_concordance"][name] = sign_concordance(weight, feedback)
        out["kurtosis"][name] = kurtosis(weight64)
        out["mean_abs_w"][name] = mean_abs(weight)
        out["hist"][name] = magnitude_histogram(weight, bins)
    return out
