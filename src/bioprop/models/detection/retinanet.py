"""RetinaNet (Lin et al. 2017) in plain PyTorch: a zoo ResNet, an FPN P3–P7, and shared class and box subnets.

``model(images)`` maps padded images (B, 3, H, W) to ``(cls_logits (B, N, K), box_deltas (B, N, 4))`` over all N
anchors of all levels, so the forward pass is an ordinary module call that DDP, ``torch.compile`` and
:func:`bioprop.convert` see as usual. :meth:`RetinaNet.loss` and :meth:`RetinaNet.detect` turn those outputs into
the training loss and into boxes.

Every convolution (backbone, FPN, heads) is an ``nn.Conv2d``, so every per-layer rule converts the whole detector.
The heads' two final convolutions are the model's output layers (:attr:`RetinaNet.output_layers`), which
``convert(..., last_layer="backprop")`` keeps exact, as xiao2018 keeps the last layer of its networks.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..resnet import imagenet_resnet
from .anchors import AnchorGenerator
from .boxes import BoxCoder, batched_nms
from .losses import retinanet_loss

__all__ = ["RetinaNet", "FPN", "Head", "BACKBONES"]

#: backbone name -> (depth, channels of C3, C4, C5 in units of the first-stage width)
BACKBONES = {"resnet18": (18, (2, 4, 8)), "resnet34": (34, (2, 4, 8)), "resnet50": (50, (8, 16, 32))}

DIRECT_FEEDBACK_REFUSAL = (
    "a detector has no single output layer to project the error from (it has class and box outputs at every "
    "anchor of five pyramid levels, shared heads and a top-down FPN); use a per-layer rule (see docs/detection.md)")


class FPN(nn.Module):
    """Feature pyramid: 1×1 laterals on C3–C5, nearest-neighbour top-down sums, 3×3 smoothing to P3–P5; P6 is a
    3×3 stride-2 conv on C5 and P7 the same on ReLU(P6) (Lin et al. 2017, sec. 4)."""

    def __init__(self, in_channels: tuple[int, int, int], channels: int) -> None:
        super().__init__()
        self.lateral3, self.lateral4, self.lateral5 = (nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output3, self.output4, self.output5 = (nn.Conv2d(channels, channels, 3, padding=1) for _ in range(3))
        self.p6 = nn.Conv2d(in_channels[2], channels, 3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.p7 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, c3: Tensor, c4: Tensor, c5: Tensor) -> list[Tensor]:
        """C3 (B, C3, H/8, W/8), C4, C5 -> [P3 … P7], each (B, channels, H/2^l, W/2^l)."""
        m5 = self.lateral5(c5)
        m4 = self.lateral4(c4) + F.interpolate(m5, size=c4.shape[-2:], mode="nearest")
        m3 = self.lateral3(c3) + F.interpolate(m4, size=c3.shape[-2:], mode="nearest")
        p6 = self.p6(c5)
        return [self.output3(m3), self.output4(m4), self.output5(m5), p6, self.p7(self.relu(p6))]


class Head(nn.Module):
    """``convs`` 3×3 conv + ReLU layers, then a 3×3 conv to ``anchors × outputs`` maps; shared by all levels."""

    def __init__(self, channels: int, anchors: int, outputs: int, convs: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(convs):
            layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
        self.tower = nn.Sequential(*layers)
        self.pred = nn.Conv2d(channels, anchors * outputs, 3, padding=1)
        self.outputs = outputs

    def forward(self, features: list[Tensor]) -> Tensor:
        """Levels [(B, C, H_l, W_l)] -> (B, Σ H_l·W_l·A, outputs), flattened level, row, column, anchor."""
        out = []
        for f in features:
            y = self.pred(self.tower(f))  # (B, A·outputs, H_l, W_l)
            b, _, h, w = y.shape
            out.append(y.permute(0, 2, 3, 1).reshape(b, h * w * (y.shape[1] // self.outputs), self.outputs))
        return torch.cat(out, dim=1)


class RetinaNet(nn.Module):
    """RetinaNet with a zoo ResNet backbone (module docstring).

    Args:
        num_classes: K object classes (no background class; sigmoid outputs).
        in_channels: image channels.
        backbone: ``resnet18``, ``resnet34`` or ``resnet50``.
        width: maps of the backbone's first stage (64 standard; 16 gives a small CPU net).
        fpn_channels: maps of the pyramid and the heads (256 standard).
        head_convs: conv layers in each subnet before its output conv (4 standard).
        anchor_size: anchor side over stride (4 standard: 32 px on P3 … 512 on P7).
        prior: initial foreground probability of every class output (0.01): bias = −log((1 − π)/π).
        score_thresh, nms_thresh, detections_per_image, candidates_per_level: inference settings
            (0.05, 0.5, 100, 1000 as in Detectron).
        min_size, max_size: the input resize the data pipeline applies for this model (shorter side 800,
            longer side at most 1333 for COCO); stored, not used by the forward pass.
    """

    #: the heads' final layers, kept exact by ``convert(..., last_layer="backprop")``
    output_layers = ("class_head.pred", "box_head.pred")
    #: why direct feedback rules (DFA, IFA) are refused (read by :func:`bioprop.convert`)
    direct_feedback_refusal = DIRECT_FEEDBACK_REFUSAL

    def __init__(self, num_classes: int, in_channels: int = 3, *, backbone: str = "resnet50", width: int = 64,
                 fpn_channels: int = 256, head_convs: int = 4, anchor_size: float = 4.0, prior: float = 0.01,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_image: int = 100,
                 candidates_per_level: int = 1000, min_size: int = 800, max_size: int = 1333) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; allowed: {', '.join(BACKBONES)}")
        if not 0 < prior < 1:
            raise ValueError(f"prior must be in (0, 1), got {prior!r}")
        depth, units = BACKBONES[backbone]
        net = imagenet_resnet(depth, 1, in_channels, width=width)
        self.body = nn.Sequential(OrderedDict((k, net.get_submodule(k)) for k in
                                              ("conv1", "bn1", "relu", "maxpool", "layer1")))
        self.layer2, self.layer3, self.layer4 = net.layer2, net.layer3, net.layer4
        self.fpn = FPN(tuple(u * width for u in units), fpn_channels)  # type: ignore[arg-type]
        self.anchor_generator = AnchorGenerator(size_factor=anchor_size)
        a = self.anchor_generator.num_anchors
        self.class_head = Head(fpn_channels, a, num_classes, head_convs)
        self.box_head = Head(fpn_channels, a, 4, head_convs)
        self.num_classes = num_classes
        self.coder = BoxCoder()
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_image, self.candidates_per_level = detections_per_image, candidates_per_level
        self.use_torchvision_nms = False
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got min_size={min_size!r}, max_size={max_size!r}")
        self.min_size, self.max_size = min_size, max_size
        for module in [self.fpn, self.class_head, self.box_head]:
            for conv in module.modules():
                if isinstance(conv, nn.Conv2d):
                    nn.init.normal_(conv.weight, std=0.01)
                    nn.init.zeros_(conv.bias)
        for conv in self.fpn.modules():  # the pyramid: Kaiming-uniform with a=1, as in Detectron's FPN
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_uniform_(conv.weight, a=1)
        nn.init.constant_(self.class_head.pred.bias, -math.log((1 - prior) / prior))
        self._anchor_cache: dict[tuple[int, int, str], Tensor] = {}

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, C, H, W) -> class logits (B, N, K) and box deltas (B, N, 4) for the N anchors."""
        c3 = self.layer2(self.body(images))
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        features = self.fpn(c3, c4, c5)
        return self.class_head(features), self.box_head(features)

    def anchors(self, height: int, width: int, device: torch.device) -> Tensor:
        """Anchors (N, 4) for a padded input of (height, width), in the order of the outputs."""
        key = (height, width, str(device))
        if key not in self._anchor_cache:
            self._anchor_cache[key] = self.anchor_generator(height, width, device)
        return self._anchor_cache[key]

    def loss(self, outputs: tuple[Tensor, Tensor], targets: list[dict[str, Tensor]],
             image_shape: tuple[int, int]) -> dict[str, Tensor]:
        """Focal + smooth-L1 loss of ``outputs`` (from ``forward``) against per-image ``targets`` (see
        :func:`~bioprop.models.detection.losses.retinanet_loss`); ``image_shape`` is the padded (H, W)."""
        cls_logits, box_deltas = outputs
        anchors = self.anchors(*image_shape, cls_logits.device)
        return retinanet_loss(cls_logits, box_deltas, anchors, targets, self.coder)

    @torch.no_grad()
    def detect(self, outputs: tuple[Tensor, Tensor], image_shape: tuple[int, int],
               image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Boxes from ``outputs``: per level the top candidates above ``score_thresh``, decoded and clipped to
        each image's own (h, w) in ``image_sizes``, then class-wise NMS and the best ``detections_per_image``.

        Returns:
            Per image ``{"boxes": (D, 4), "scores": (D,), "labels": (D,) int64}``, by decreasing score.
        """
        cls_logits, box_deltas = outputs
        anchors = self.anchors(*image_shape, cls_logits.device)
        a = self.anchor_generator.num_anchors
        counts = [h * w * a for h, w in self.anchor_generator.level_sizes(*image_shape)]
        results = []
        for i, (h, w) in enumerate(image_sizes):
            boxes_all, scores_all, labels_all = [], [], []
            for logits, deltas, anc in zip(cls_logits[i].split(counts), box_deltas[i].split(counts),
                                           anchors.split(counts)):
                scores = torch.sigmoid(logits.float()).flatten()  # (N_l·K,)
                keep = torch.nonzero(scores > self.score_thresh).squeeze(1)
                top = scores[keep].topk(min(self.candidates_per_level, keep.numel()))
                idx = keep[top.indices]
                anchor_idx, labels = idx // self.num_classes, idx % self.num_classes
                boxes = self.coder.decode(deltas[anchor_idx].float(), anc[anchor_idx])
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
                boxes_all.append(boxes), scores_all.append(top.values), labels_all.append(labels)
            boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
            keep = batched_nms(boxes, scores, labels, self.nms_thresh, self.use_torchvision_nms)
            keep = keep[:self.detections_per_image]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results
