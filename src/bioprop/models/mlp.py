"""The fully connected nets of nokland2016 (N×H with tanh, logistic or ReLU units)."""
from __future__ import annotations

from torch import nn

from .registry import register_model

__all__ = ["mlp", "ACTIVATIONS"]

#: Hidden nonlinearities by name.
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "logistic": nn.Sigmoid, "relu": nn.ReLU}


def activation_module(name: str) -> nn.Module:
    """A fresh module for the nonlinearity ``name``.

    Raises:
        ValueError: unknown name, listing the allowed ones.
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _check_rate(name: str, rate: float) -> float:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {rate!r}")
    return rate


def zero_init_(model: nn.Module) -> nn.Module:
    """Set every linear/conv weight and bias to zero (nokland2016's start for FA/DFA with tanh/logistic units).

    Backprop cannot break the symmetry of a zero start; FA and DFA can, because their feedback is random.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


@register_model("mlp", paper="nokland2016", num_classes=10, in_channels=1, image_size=28)
def mlp(num_classes: int, in_channels: int, image_size: int, *, depth: int = 2, width: int = 800,
        activation: str = "tanh", dropout_input: float = 0.0, dropout_hidden: float = 0.0, zero_init: bool = False,
        batchnorm: bool = False) -> nn.Sequential:
    r"""A ``depth``×``width`` multilayer perceptron on flattened images.

    The layout is a plain ``nn.Sequential``, so that direct feedback alignment can place its markers after
    each hidden nonlinearity: ``Flatten, [Dropout(p_in)], (Linear, [BatchNorm1d], Act, [Dropout(p_h)]) × depth,
    Linear``. nokland2016's dropout runs use ``dropout_input=0.1, dropout_hidden=0.5``.

    Args:
        num_classes: output units.
        in_channels, image_size: the input is C×S×S, flattened to C·S² features.
        depth: number of hidden layers (0 gives a linear classifier).
        width: units per hidden layer.
        activation: ``"tanh"``, ``"logistic"`` or ``"relu"``.
        dropout_input: dropout rate on the input (0 = no layer).
        dropout_hidden: dropout rate after each hidden nonlinearity (0 = no layer).
        zero_init: all weights and biases start at zero (nokland2016's FA/DFA setting for tanh/logistic).
        batchnorm: BatchNorm1d between each hidden Linear and its nonlinearity.

    Shape:
        input (B, C, S, S) -> output (B, num_classes).
    """
    if not isinstance(depth, int) or depth < 0 or not isinstance(width, int) or width < 1:
        raise ValueError(f"mlp needs depth >= 0 and width >= 1 (ints), got depth={depth!r}, width={width!r}")
    activation_module(activation)  # validate the name even when depth is 0
    layers: list[nn.Module] = [nn.Flatten()]
    if _check_rate("dropout_input", dropout_input) > 0:
        layers.append(nn.Dropout(dropout_input))
    features = in_channels * image_size * image_size
    for _ in range(depth):
        layers.append(nn.Linear(features, width, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(activation_module(activation))
        if _check_rate("dropout_hidden", dropout_hidden) > 0:
            layers.append(nn.Dropout(dropout_hidden))
        features = width
    layers.append(nn.Linear(features, num_classes))
    net = nn.Sequential(*layers)
    return zero_init_(net) if zero_init else net
