"""Box arithmetic for detection: IoU, the RetinaNet box coding, and (batched) non-maximum suppression.

Boxes are ``(x1, y1, x2, y2)`` in pixels, float, with ``x2 >= x1`` and ``y2 >= y1``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["box_area", "box_iou", "BoxCoder", "nms", "batched_nms", "torchvision_nms_available"]

#: largest log-scale change a decoded box may take (as in Detectron: log(1000 / 16))
_MAX_LOG_SCALE = math.log(1000.0 / 16)


def box_area(boxes: Tensor) -> Tensor:
    """Areas (N,) of boxes (N, 4)."""
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union (N, M) of boxes a (N, 4) and b (M, 4); 0 where the union is empty."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)  # (N, M)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


class BoxCoder:
    """The R-CNN box parametrisation: centre offsets in units of the anchor size, log size ratios.

    ``encode(boxes, anchors)`` gives deltas ``(dx, dy, dw, dh)`` with ``dx = wx·(x - xa)/wa``,
    ``dw = ww·log(w / wa)``; ``decode`` inverts it exactly (up to the clamp of ``dw, dh`` at log(1000/16)).

    Args:
        weights: ``(wx, wy, ww, wh)``; RetinaNet uses ``(1, 1, 1, 1)``.
    """

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)) -> None:
        self.weights = weights

    @staticmethod
    def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        w = boxes[..., 2] - boxes[..., 0]
        h = boxes[..., 3] - boxes[..., 1]
        return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """Deltas (..., 4) taking ``anchors`` (..., 4) to ``boxes`` (..., 4); sizes must be positive."""
        wx, wy, ww, wh = self.weights
        ax, ay, aw, ah = self._centre_size(anchors)
        bx, by, bw, bh = self._centre_size(boxes)
        return torch.stack([wx * (bx - ax) / aw, wy * (by - ay) / ah,
                            ww * torch.log(bw / aw), wh * torch.log(bh / ah)], dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Boxes (..., 4) from ``deltas`` (..., 4) applied to ``anchors`` (..., 4)."""
        wx, wy, ww, wh = self.weights
        ax, ay, aw, ah = self._centre_size(anchors)
        dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=_MAX_LOG_SCALE)
        dh = (deltas[..., 3] / wh).clamp(max=_MAX_LOG_SCALE)
        cx, cy = ax + dx * aw, ay + dy * ah
        w, h = aw * torch.exp(dw), ah * torch.exp(dh)
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression, in plain torch.

    Boxes are visited by decreasing score (equal scores: lower index first); a box is kept unless its IoU with
    an already kept box is above ``iou_threshold``.

    Args:
        boxes: (N, 4). scores: (N,). iou_threshold: IoU above which the lower-scored box is dropped.

    Returns:
        Indices (K,) int64 of the kept boxes, by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices  # (N,) visiting order
    # On the host, in NumPy: each pass keeps the best remaining box and drops the remaining ones that overlap it
    # (O(kept · N) work, no N×N matrix). The IoU is computed as in box_iou, in the boxes' own precision.
    b = boxes.detach()[order].cpu().numpy()
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    area = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    remaining = np.arange(b.shape[0])
    keep = []
    while remaining.size:
        i, rest = remaining[0], remaining[1:]
        keep.append(i)
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        union = area[i] + area[rest] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0)
        remaining = rest[iou <= iou_threshold]
    return order[torch.as_tensor(np.array(keep, dtype=np.int64), device=order.device)]


def torchvision_nms_available() -> bool:
    """Whether torchvision's compiled NMS can be imported (then :func:`batched_nms` may use it)."""
    try:
        import torchvision.ops  # noqa: F401
    except Exception:  # ImportError, or a torchvision built for another torch
        return False
    return True


def batched_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float,
                use_torchvision: bool = False) -> Tensor:
    """NMS done separately per class, in one pass: each class's boxes are shifted so no two classes overlap.

    Args:
        boxes: (N, 4). scores: (N,). classes: (N,) int64. iou_threshold: as in :func:`nms`.
        use_torchvision: use ``torchvision.ops.nms`` for the suppression (same result; faster on GPU).

    Returns:
        Indices (K,) int64 of the kept boxes, by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    offsets = classes.to(boxes.dtype) * (boxes.max() - boxes.min() + 1)
    shifted = boxes + offsets[:, None]
    if use_torchvision:
        import torchvision.ops
        return torchvision.ops.nms(shifted, scores, iou_threshold)
    return nms(shifted, scores, iou_threshold)
