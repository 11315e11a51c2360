"""RetinaNet's training targets and losses: anchor matching, sigmoid focal loss, smooth-L1 box loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .boxes import BoxCoder, box_iou

__all__ = ["sigmoid_focal_loss", "smooth_l1", "match_anchors", "retinanet_loss"]


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    r"""Element-wise focal loss (Lin et al. 2017), not reduced.

    With :math:`p = \sigma(x)`, :math:`p_t = p` for a target of 1 and :math:`1 - p` for 0, and
    :math:`\alpha_t = \alpha` or :math:`1 - \alpha`: :math:`FL = -\alpha_t (1 - p_t)^\gamma \log p_t`.

    Args:
        logits: any shape. targets: same shape, 0 or 1. alpha: weight of the positives (< 0: no weighting).
        gamma: focusing exponent.
    """
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # -log p_t, stable
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def smooth_l1(x: Tensor, beta: float) -> Tensor:
    """Element-wise smooth L1: 0.5·x²/β for |x| < β, else |x| − 0.5·β (plain L1 for β = 0)."""
    ax = x.abs()
    if beta <= 0:
        return ax
    return torch.where(ax < beta, 0.5 * ax ** 2 / beta, ax - 0.5 * beta)


def match_anchors(anchors: Tensor, gt_boxes: Tensor, fg_iou: float = 0.5, bg_iou: float = 0.4,
                  low_quality: bool = True) -> Tensor:
    """Index of the ground-truth box each anchor is assigned to, -1 background, -2 ignored.

    An anchor with IoU ≥ ``fg_iou`` to some box takes the best one; below ``bg_iou`` it is background; in
    between it is ignored. With ``low_quality``, every box also takes the anchors of its highest IoU (so small
    boxes are never left without an anchor), as in Detectron's RetinaNet.

    Args:
        anchors: (N, 4). gt_boxes: (G, 4).

    Returns:
        (N,) int64.
    """
    n = anchors.shape[0]
    if gt_boxes.numel() == 0:
        return torch.full((n,), -1, dtype=torch.int64, device=anchors.device)
    iou = box_iou(gt_boxes, anchors)  # (G, N)
    best, idx = iou.max(dim=0)  # (N,)
    matches = idx.clone()
    matches[best < fg_iou] = -2
    matches[best < bg_iou] = -1
    if low_quality:
        top = iou.max(dim=1, keepdim=True).values  # (G, 1)
        gt_i, anchor_i = torch.nonzero((iou == top) & (top > 0), as_tuple=True)
        matches[anchor_i] = idx[anchor_i]
    return matches


def retinanet_loss(cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor, targets: list[dict[str, Tensor]],
                   coder: BoxCoder, alpha: float = 0.25, gamma: float = 2.0, beta: float = 1.0 / 9,
                   ) -> dict[str, Tensor]:
    """Focal loss over all non-ignored anchors and smooth-L1 over the foreground ones, both divided by the number
    of foreground anchors in the batch (at least 1).

    Args:
        cls_logits: (B, N, K). box_deltas: (B, N, 4). anchors: (N, 4).
        targets: per image ``{"boxes": (G, 4) float, "labels": (G,) int64 in [0, K), "iscrowd": (G,) optional}``;
            crowd boxes are not matched (anchors on them are background or ignored by IoU, not positives).
        coder: the box coding of the heads.

    Returns:
        ``{"loss", "loss_cls", "loss_box"}`` scalars (float32).
    """
    cls_logits, box_deltas = cls_logits.float(), box_deltas.float()
    num_classes = cls_logits.shape[-1]
    cls_targets, valid, fg, box_targets = [], [], [], []
    for t in targets:
        boxes, labels = t["boxes"], t["labels"]
        crowd = t.get("iscrowd")
        if crowd is not None and crowd.numel():
            keep = crowd == 0
            crowd_boxes, boxes, labels = boxes[~keep], boxes[keep], labels[keep]
        else:
            crowd_boxes = boxes[:0]
        matches = match_anchors(anchors, boxes)  # (N,)
        if crowd_boxes.numel():  # background anchors mostly inside a crowd region are ignored
            inside = box_iou(crowd_boxes, anchors).max(dim=0).values >= 0.5
            matches[(matches == -1) & inside] = -2
        is_fg = matches >= 0
        onehot = torch.zeros(anchors.shape[0], num_classes, device=anchors.device)
        onehot[is_fg, labels[matches[is_fg]]] = 1.0
        cls_targets.append(onehot)
        valid.append(matches != -2)
        fg.append(is_fg)
        matched = boxes[matches.clamp(min=0)] if boxes.numel() else anchors
        box_targets.append(coder.encode(matched, anchors))
    cls_t, valid_t, fg_t = torch.stack(cls_targets), torch.stack(valid), torch.stack(fg)  # (B, N, K), (B, N)
    box_t = torch.stack(box_targets)  # (B, N, 4)
    num_fg = fg_t.sum().clamp(min=1).float()
    loss_cls = sigmoid_focal_loss(cls_logits[valid_t], cls_t[valid_t], alpha, gamma).sum() / num_fg
    loss_box = smooth_l1(box_deltas[fg_t] - box_t[fg_t], beta).sum() / num_fg
    return {"loss": loss_cls + loss_box, "loss_cls": loss_cls, "loss_box": loss_box}
