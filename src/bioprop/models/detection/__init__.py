"""Object detection models: RetinaNet (Lin et al. 2017) with a zoo ResNet backbone, as trained by xiao2018.

Examples::

    >>> import torch
    >>> from bioprop.models import create_model
    >>> det = create_model("retinanet", num_classes=10, in_channels=3, image_size=64, backbone="resnet18",
    ...                    width=8, fpn_channels=16, head_convs=1)
    >>> cls_logits, box_deltas = det(torch.zeros(2, 3, 64, 64))
    >>> cls_logits.shape, box_deltas.shape
    (torch.Size([2, 774, 10]), torch.Size([2, 774, 4]))
"""
from __future__ import annotations

from ..registry import register_model
from .anchors import AnchorGenerator
from .boxes import BoxCoder, batched_nms, box_iou, nms, torchvision_nms_available
from .losses import match_anchors, retinanet_loss, sigmoid_focal_loss, smooth_l1
from .retinanet import BACKBONES, RetinaNet

__all__ = ["RetinaNet", "AnchorGenerator", "BoxCoder", "nms", "batched_nms", "box_iou", "sigmoid_focal_loss",
           "smooth_l1", "match_anchors", "retinanet_loss", "torchvision_nms_available", "BACKBONES"]


@register_model("retinanet", paper="Lin et al. 2017; xiao2018", num_classes=80, in_channels=3, image_size=800,
                min_image_size=32, task="detection")
def retinanet(num_classes: int, in_channels: int, image_size: int, *, backbone: str = "resnet50", width: int = 64,
              fpn_channels: int = 256, head_convs: int = 4, anchor_size: float = 4.0, prior: float = 0.01,
              score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_image: int = 100,
              candidates_per_level: int = 1000, min_size: int = 800, max_size: int = 1333) -> RetinaNet:
    """RetinaNet, ResNet-FPN P3–P7; outputs (class logits (B, N, K), box deltas (B, N, 4)) over N anchors.
    ``backbone`` resnet18/34/50; ``width=16, fpn_channels=64, head_convs=2`` make a small CPU net. Any input side
    of at least 32 works; ``image_size`` is not used (detection images vary in size): ``min_size``/``max_size``
    set the resize of the data (800/1333 for COCO)."""
    return RetinaNet(num_classes, in_channels, backbone=backbone, width=width, fpn_channels=fpn_channels,
                     head_convs=head_convs, anchor_size=anchor_size, prior=prior, score_thresh=score_thresh,
                     nms_thresh=nms_thresh, detections_per_image=detections_per_image,
                     candidates_per_level=candidates_per_level, min_size=min_size, max_size=max_size)
