"""Alignment and weight statistics (placeholder; the full set lands with the analysis module)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def angle(a: Tensor, b: Tensor) -> float:
    """Angle in degrees between two tensors, flattened."""
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-300)
    return math.degrees(math.acos(float(cos.clamp(-1.0, 1.0))))


@torch.no_grad()
def alignment(model: nn.Module) -> dict[str, float]:
    """``{layer name: angle in degrees between W and the B it uses now}``."""
    return {name: angle(m.weight, m.current_feedback()) for name, m in model.named_modules()
            if hasattr(m, "current_feedback") and hasattr(m, "weight")}
