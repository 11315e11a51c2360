"""RetinaNet pieces against independent references: NMS vs a NumPy brute force, the box coding round trip,
anchors in closed form, the focal loss and its gradient in closed form, and the detector under every rule."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import bioprop
from bioprop.models import create_model
from bioprop.models.detection import (AnchorGenerator, BoxCoder, batched_nms, box_iou, match_anchors, nms,
                                      sigmoid_focal_loss, torchvision_nms_available)
from bioprop.rules import LayerRule, create_rule


def numpy_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Brute force: visit by decreasing score (ties: lower index first), keep unless IoU > threshold with a kept."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    for i in order:
        ok = True
        for j in kept:
            x1, y1 = max(boxes[i, 0], boxes[j, 0]), max(boxes[i, 1], boxes[j, 1])
            x2, y2 = min(boxes[i, 2], boxes[j, 2]), min(boxes[i, 3], boxes[j, 3])
            inter = max(x2 - x1, 0) * max(y2 - y1, 0)
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            union = area(boxes[i]) + area(boxes[j]) - inter
            if union > 0 and inter / union > threshold:
                ok = False
                break
        if ok:
            kept.append(i)
    return kept


def random_boxes(n: int, seed: int, tie_scores: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 50
    wh = torch.rand(n, 2, generator=g) * 30 + 1
    scores = torch.randint(0, 4, (n,), generator=g).double() / 4 if tie_scores else torch.rand(n, generator=g).double()
    return torch.cat([xy, xy + wh], 1).double(), scores


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_numpy_brute_force(seed, ties, threshold):
    boxes, scores = random_boxes(40, seed, ties)
    assert nms(boxes, scores, threshold).tolist() == numpy_nms(boxes.numpy(), scores.numpy(), threshold)


def test_nms_identical_boxes_with_equal_scores_keep_the_first_and_empty_input():
    boxes = torch.tensor([[0.0, 0, 10, 10]] * 3 + [[20.0, 20, 30, 30]])
    assert nms(boxes, torch.tensor([0.5, 0.5, 0.5, 0.1]), 0.5).tolist() == [0, 3]
    empty = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert empty.dtype == torch.int64 and empty.numel() == 0
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).numel() == 0


def test_batched_nms_is_nms_within_each_class():
    boxes, scores = random_boxes(60, 7)
    classes = torch.arange(60) % 3
    kept = set(batched_nms(boxes, scores, classes, 0.5).tolist())
    expected = set()
    for c in range(3):
        idx = torch.nonzero(classes == c).squeeze(1)
        expected |= {int(idx[i]) for i in numpy_nms(boxes[idx].numpy(), scores[idx].numpy(), 0.5)}
    assert kept == expected


@pytest.mark.skipif(not torchvision_nms_available(), reason="torchvision is not installed")
def test_torchvision_path_equals_ours():
    boxes, scores = random_boxes(200, 3)
    classes = torch.arange(200) % 5
    ours = batched_nms(boxes.float(), scores.float(), classes, 0.5)
    theirs = batched_nms(boxes.float(), scores.float(), classes, 0.5, use_torchvision=True)
    assert ours.tolist() == theirs.tolist()


def test_box_iou_closed_form():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 5, 15, 15], [20.0, 20, 30, 30], [0.0, 0, 10, 10]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[25 / 175, 0.0, 1.0]]))


def test_box_coding_round_trip_and_known_deltas():
    coder = BoxCoder()
    anchors = AnchorGenerator()(64, 96)
    g = torch.Generator().manual_seed(0)
    boxes = anchors + torch.randn(anchors.shape, generator=g) * 3
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:] - 1), torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)], 1)
    deltas = coder.encode(boxes.double(), anchors.double())
    assert torch.allclose(coder.decode(deltas, anchors.double()), boxes.double(), atol=1e-9)
    # a box twice the anchor's width, shifted by half a width: dx = 0.5, dw = log 2
    d = coder.encode(torch.tensor([[5.0, 0, 25, 10]]), torch.tensor([[0.0, 0, 10, 10]]))
    assert torch.allclose(d, torch.tensor([[1.0, 0.0, math.log(2), 0.0]]))


def test_anchors_closed_form():
    gen = AnchorGenerator(strides=(8, 16), size_factor=4.0)
    anchors = gen(40, 24)  # level sizes: ceil(40/8)=5 x 3, ceil(40/16)=3 x 2
    assert gen.level_sizes(40, 24) == [(5, 3), (3, 2)]
    assert anchors.shape == ((5 * 3 + 3 * 2) * 9, 4)
    first = anchors[:9]  # cell (0, 0) of P3, centred at (4, 4)
    centres = (first[:, :2] + first[:, 2:]) / 2
    assert torch.allclose(centres, torch.full((9, 2), 4.0))
    w, h = first[:, 2] - first[:, 0], first[:, 3] - first[:, 1]
    sides = torch.tensor([32 * 2 ** (i / 3) for i in range(3)] * 3)
    assert torch.allclose(w * h, sides ** 2, rtol=1e-5)
    assert torch.allclose(h / w, torch.tensor([0.5] * 3 + [1.0] * 3 + [2.0] * 3), rtol=1e-5)
    # second cell of P3 (row 0, column 1) is centred at (12, 4); first anchor of P4 at (8, 8) with side 64
    assert torch.allclose((anchors[9, :2] + anchors[9, 2:]) / 2, torch.tensor([12.0, 4.0]))
    p4 = anchors[15 * 9 + 3]  # ratio 1, scale 1
    assert torch.allclose(p4, torch.tensor([8 - 32.0, 8 - 32, 8 + 32, 8 + 32]))


def test_matching_thresholds_and_low_quality_matches():
    anchors = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 9], [0.0, 0, 10, 4.5], [50.0, 50, 60, 60],
                            [100.0, 100, 110, 110]])
    gt = torch.tensor([[0.0, 0, 10, 10], [52.0, 52, 72, 72]])  # second box: best IoU 64/436 < 0.4
    m = match_anchors(anchors, gt)
    # IoU with gt 0: 1, 0.9, 0.45 (ignored); anchor 3 is gt 1's best anchor (low-quality match); anchor 4 bg
    assert m.tolist() == [0, 0, -2, 1, -1]
    assert match_anchors(anchors, gt, low_quality=False).tolist() == [0, 0, -2, -1, -1]
    assert match_anchors(anchors, torch.zeros(0, 4)).tolist() == [-1] * 5


def focal_closed_form(x: np.ndarray, y: np.ndarray, alpha: float, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """FL and dFL/dx from the formulas: y=1: -α(1-p)^γ log p; y=0: -(1-α) p^γ log(1-p)."""
    p = 1 / (1 + np.exp(-x))
    loss = np.where(y == 1, -alpha * (1 - p) ** gamma * np.log(p), -(1 - alpha) * p ** gamma * np.log(1 - p))
    grad_pos = alpha * (gamma * p * (1 - p) ** gamma * np.log(p) - (1 - p) ** (gamma + 1))
    grad_neg = -(1 - alpha) * (gamma * p ** gamma * (1 - p) * np.log(1 - p) - p ** (gamma + 1))
    return loss, np.where(y == 1, grad_pos, grad_neg)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 0.0), (0.75, 1.5)])
def test_focal_loss_and_gradient_match_closed_form(alpha, gamma):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(200, generator=g, dtype=torch.float64) * 4).requires_grad_()
    y = (torch.rand(200, generator=g) < 0.3).double()
    loss = sigmoid_focal_loss(x, y, alpha, gamma)
    loss.sum().backward()
    ref_loss, ref_grad = focal_closed_form(x.detach().numpy(), y.numpy(), alpha, gamma)
    np.testing.assert_allclose(loss.detach().numpy(), ref_loss, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), ref_grad, rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------------------- the detector


def tiny_detector() -> nn.Module:
    torch.manual_seed(0)
    return create_model("retinanet", num_classes=3, in_channels=3, image_size=64, backbone="resnet18", width=8,
                        fpn_channels=16, head_convs=1, anchor_size=2.0)


def tiny_batch() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=g)
    targets = [{"boxes": torch.tensor([[4.0, 6, 20, 26], [30, 30, 60, 50]]), "labels": torch.tensor([0, 2]),
                "iscrowd": torch.tensor([0, 0])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "iscrowd": torch.zeros(0, dtype=torch.int64)}]
    return images, targets


def step_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    images, targets = tiny_batch()
    model.train()
    loss = model.loss(model(images), targets, (64, 64))["loss"]
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


LAYER_RULES = [r for r in bioprop.list_rules() if isinstance(create_rule(r), LayerRule)]


def test_prior_probability_bias_init():
    det = tiny_detector()
    assert torch.allclose(det.class_head.pred.bias, torch.full_like(det.class_head.pred.bias, -math.log(99)))
    cls, box = det(torch.zeros(1, 3, 64, 64))
    assert cls.shape[-1] == 3 and box.shape[-1] == 4 and cls.shape[1] == det.anchors(64, 64, "cpu").shape[0]


@pytest.mark.parametrize("rule", LAYER_RULES)
def test_one_detector_step_per_rule_gives_finite_gradients(rule):
    det = bioprop.convert(tiny_detector(), rule)
    summary = bioprop.conversion_summary(det)
    assert len(summary.converted) == sum(isinstance(m, nn.Conv2d) for m in tiny_detector().modules())
    grads = step_grads(det)
    weights = [n for n, p in det.named_parameters() if not n.startswith("feedback")]
    assert set(weights) <= set(grads) or rule == "kp"
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "layer2" in n)  # the error reaches the backbone


def test_sham_equals_backprop_on_the_detector():
    plain = step_grads(tiny_detector())
    sham = step_grads(bioprop.convert(tiny_detector(), "sham"))
    assert plain.keys() == sham.keys()
    for name in plain:
        torch.testing.assert_close(sham[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_last_layer_backprop_keeps_both_heads_exact():
    det = bioprop.convert(tiny_detector(), "usf", last_layer="backprop")
    assert type(det.class_head.pred) is nn.Conv2d and type(det.box_head.pred) is nn.Conv2d
    assert type(det.class_head.tower[0]) is not nn.Conv2d  # the rest is converted
    rules = {name: rule for name, _, rule in bioprop.conversion_summary(det).converted}
    assert rules["class_head.pred"] == rules["box_head.pred"] == "backprop" and rules["fpn.p7"] == "usf"


@pytest.mark.parametrize("rule", [r for r in bioprop.list_rules() if r not in LAYER_RULES])
def test_direct_rules_are_refused_with_one_line(rule):
    with pytest.raises(ValueError) as err:
        bioprop.convert(tiny_detector(), rule)
    assert "\n" not in str(err.value) and "RetinaNet" in str(err.value) and "per-layer rule" in str(err.value)


def test_detect_returns_clipped_boxes_after_nms():
    det = tiny_detector().eval()
    det.score_thresh = 0.0
    with torch.no_grad():
        out = det(torch.randn(2, 3, 64, 64))
    results = det.detect(out, (64, 64), [(64, 64), (40, 50)])
    assert len(results) == 2
    for r, (h, w) in zip(results, [(64, 64), (40, 50)]):
        assert 0 < r["boxes"].shape[0] <= det.detections_per_image
        assert (r["boxes"][:, 0::2] <= w).all() and (r["boxes"][:, 1::2] <= h).all() and (r["boxes"] >= 0).all()
        assert (r["scores"][:-1] >= r["scores"][1:]).all()
        keep = batched_nms(r["boxes"], r["scores"], r["labels"], det.nms_thresh)
        assert keep.tolist() == list(range(len(keep)))  # already suppressed: nothing more to remove
