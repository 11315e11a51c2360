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
from .rules import after_step, create_rule, describe_rules, list_rules, prepare, register_rule, resolve_rule_name, \
    rule_options
# The built-in rules beyond the layer policies register when their modules load: the direct rules, then the
# backprop controls (this order is the order of list_rules()).
from . import direct, rules_controls  # noqa: F401
from . import metrics, mirror, optim  # noqa: F401  (bioprop.metrics.alignment, ...)

__version__ = "0.1.0"

__all__ = [
    "convert", "feedback_weights", "reset_feedback", "conversion_summary", "ConversionSummary", "list_rules",
    "register_rule", "describe_rules", "resolve_rule_name", "prepare", "after_step",
    "create_rule", "rule_options", "feedback_linear", "feedback_conv", "FeedbackLinear", "FeedbackConv1d",
    "FeedbackConv2d", "FeedbackConv3d", "metrics", "__version__",
]
