"""Why each rule learns: alignment of W and B, gradient agreement with backprop, weight statistics.

Definitions and formulas: ``docs/analysis.md``. Every function reads the model and leaves its training state
as it was; the weight statistics are cheap, the gradient metrics cost one shadow backward (two
forward/backward passes).

Examples::

    >>> import bioprop, torch
    >>> from torch import nn
    >>> net = bioprop.convert(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)), "fa")
    >>> x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    >>> sorted(bioprop.metrics.alignment(net))
    ['0', '2']
    >>> angles = bioprop.metrics.gradient_agreement(net, x, y, torch.nn.functional.cross_entropy)
    >>> angles['2']  # the output layer's dW never depends on B
    0.0
"""
from .cost import MetricsCost, measure_cost
from .shadow import (ShadowResult, dfa_signal_angle, direct_markers, gradient_agreement, lillicrap_condition,
                     lillicrap_values, shadow_backward, topmost_feedback_layer)
from .training import METRIC_KEYS, jsonable, summarize_metrics, training_metrics
from .weights import (EXACT_MODES, alignment, angle, kurtosis, layer_feedback, magnitude_histogram, mean_abs,
                      model_weight_layers, norm_ratio, sign_concordance, weight_statistics)

__all__ = [
    "angle", "norm_ratio", "kurtosis", "mean_abs", "sign_concordance", "magnitude_histogram", "lillicrap_values",
    "alignment", "weight_statistics", "layer_feedback", "model_weight_layers", "EXACT_MODES",
    "ShadowResult", "shadow_backward", "gradient_agreement", "lillicrap_condition", "dfa_signal_angle",
    "direct_markers", "topmost_feedback_layer", "training_metrics", "summarize_metrics", "METRIC_KEYS", "jsonable",
    "MetricsCost", "measure_cost",
]
