"""The model zoo of the papers, behind one registry (the timm pattern).

Examples::

    >>> import torch
    >>> from bioprop.models import create_model, list_models
    >>> net = create_model("mlp", num_classes=10, in_channels=1, image_size=28, depth=2, width=800)
    >>> net(torch.zeros(4, 1, 28, 28)).shape
    torch.Size([4, 10])

Every model takes images (B, C, H, W) and returns logits (B, num_classes); MLPs flatten first. Builders are
registered with :func:`register_model`, which records the source paper and the documented input, so the table
in ``docs/models.md`` is generated (:func:`model_table`) rather than typed.
"""
from __future__ import annotations

from .registry import (MODELS, TABLE_ROWS, ModelInfo, count_parameters, create_model, describe_models, list_models,
                       model_info, model_table, register_model)

__all__ = [
    "register_model", "list_models", "create_model", "model_info", "ModelInfo", "count_parameters", "model_table",
    "TABLE_ROWS", "MODELS", "describe_models",
]

# Importing the modules registers their models (order = the order of list_models()).
from . import mlp, convnets, resnet, alexnet  # noqa: F401
from . import detection  # noqa: F401  (retinanet)

TABLE_ROWS.extend([
    ("mlp", {"depth": 3, "width": 1000, "in_channels": 3, "image_size": 32}),
    ("lenet", {"variant": "cifar", "in_channels": 3, "image_size": 32}),
    ("nokland_convnet", {"num_classes": 100}),
])
