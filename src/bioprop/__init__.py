"""bioprop: train any PyTorch model with learning rules that avoid weight transport.

Examples::

    >>> import bioprop, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(784, 800), torch.nn.Tanh(), torch.nn.Linear(800, 10))
    >>> net = bioprop.convert(net, "usf", seed=0)
    >>> sorted(bioprop.feedback_weights(net))
    ['0', '2']
"""
from .convert import ConversionSummary, conversion_summary, convert, feedback_weights, reset_feedback
from .functional import feedback_conv, feedback_linear
from .layers import FeedbackConv1d, FeedbackConv2d, FeedbackConv3d, FeedbackLinear
from .rules import create_rule, list_rules, register_rule, rule_options
from . import direct, metrics, mirror, optim  # noqa: F401  (bioprop.direct, bioprop.metrics.alignment, ...)

__version__ = "0.1.0"

__all__ = [
    "convert", "feedback_weights", "reset_feedback", "conversion_summary", "ConversionSummary", "list_rules",
    "register_rule",
    "create_rule", "rule_options", "feedback_linear", "feedback_conv", "FeedbackLinear", "FeedbackConv1d",
    "FeedbackConv2d", "FeedbackConv3d", "metrics", "__version__",
]
