"""RetinaNet anchors: on every pyramid level, 3 scales × 3 aspect ratios centred on each feature-map cell."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["AnchorGenerator", "feature_size"]


def feature_size(size: int, stride: int) -> int:
    """Side of a feature map of stride ``stride`` (a power of 2) over an input side ``size``: ceil(size / stride).

    This is what a chain of 3×3 (or 7×7) stride-2 convolutions and poolings with "same" padding gives.
    """
    for _ in range(int(math.log2(stride))):
        size = (size + 1) // 2
    return size


class AnchorGenerator:
    """Anchors for pyramid levels of the given strides.

    On a level of stride ``s`` the anchors have sides ``size_factor·s·2^(i/3)`` (i = 0, 1, 2) and aspect ratios
    h/w in ``aspect_ratios``, centred at ``(s·(j + 0.5), s·(i + 0.5))``; with ``size_factor = 4`` they go from 32
    pixels on P3 to 512 on P7 (Lin et al. 2017).

    Args:
        strides: stride of each level, e.g. (8, 16, 32, 64, 128) for P3–P7.
        size_factor: anchor side over stride at scale 2^0.
        scales: the octave scales.
        aspect_ratios: h/w ratios.
    """

    def __init__(self, strides: Sequence[int] = (8, 16, 32, 64, 128), size_factor: float = 4.0,
                 scales: Sequence[float] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
                 aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> None:
        self.strides = tuple(strides)
        self.size_factor = float(size_factor)
        self.scales = tuple(scales)
        self.aspect_ratios = tuple(aspect_ratios)

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map cell, A."""
        return len(self.scales) * len(self.aspect_ratios)

    def cell_anchors(self, stride: int) -> Tensor:
        """The A anchors (A, 4) of one cell centred at the origin, ratios outer, scales inner."""
        rows = []
        for ratio in self.aspect_ratios:
            for scale in self.scales:
                side = self.size_factor * stride * scale
                w, h = side / math.sqrt(ratio), side * math.sqrt(ratio)  # area side², h / w = ratio
                rows.append([-w / 2, -h / 2, w / 2, h / 2])
        return torch.tensor(rows, dtype=torch.float32)

    def level_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Feature-map (H_l, W_l) of every level for an input of (height, width)."""
        return [(feature_size(height, s), feature_size(width, s)) for s in self.strides]

    def __call__(self, height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
        """All anchors (N, 4) for an input (height, width), level by level, then row, column, anchor —
        the order in which the heads' outputs are flattened."""
        out = []
        for stride, (h, w) in zip(self.strides, self.level_sizes(height, width)):
            ys = (torch.arange(h, dtype=torch.float32) + 0.5) * stride
            xs = (torch.arange(w, dtype=torch.float32) + 0.5) * stride
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)  # (h·w, 1, 4)
            out.append((centres + self.cell_anchors(stride)[None]).reshape(-1, 4))
        return torch.cat(out).to(device)
