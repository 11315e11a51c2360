"""COCO box AP through pycocotools: AP (IoU .50:.95), AP50, AP75 and AP for small, medium and large objects."""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Any

import torch
from torch import nn

from ..engine import distributed as dist_utils
from .coco import CocoDetection
from .loader import DetectionLoader

__all__ = ["coco_ap", "to_coco_results", "evaluate_detector", "AP_KEYS"]

#: names of COCOeval.stats[0:6], in order
AP_KEYS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")


def _ground_truth(dataset: dict[str, Any]) -> dict[str, Any]:
    """A copy of an instances dict with the keys COCOeval reads filled in (``area`` = w·h, ``iscrowd`` = 0)."""
    gt = copy.deepcopy(dataset)
    for ann in gt["annotations"]:
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    return gt


def coco_ap(ground_truth: dict[str, Any], results: list[dict[str, Any]],
            image_ids: list[Any] | None = None) -> dict[str, float]:
    """Box AP of ``results`` against ``ground_truth``, computed by pycocotools' ``COCOeval``.

    Args:
        ground_truth: a COCO instances dict (``images``, ``annotations``, ``categories``).
        results: COCO results, ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` each.
        image_ids: evaluate only these images (default all of ``ground_truth``).

    Returns:
        ``{"ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"}`` as fractions; pycocotools' −1 (no
        ground truth of that kind) is kept as −1. No results give 0 wherever there is ground truth.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = _ground_truth(ground_truth)
        gt.createIndex()
        if not results:
            stats = [0.0] * 6
            return dict(zip(AP_KEYS, stats))
        dt = gt.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(gt, dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: float(v) for k, v in zip(AP_KEYS, evaluator.stats[:6])}


def to_coco_results(detections: list[dict[str, torch.Tensor]], scales: list[tuple[float, float]],
                    image_ids: list[Any],
                    category_ids: list[int]) -> list[dict[str, Any]]:
    """Detections of one batch (boxes in resized pixels, contiguous labels) as COCO results in the original
    image's pixels and category ids."""
    out = []
    for det, (sx, sy), image_id in zip(detections, scales, image_ids):
        boxes = (det["boxes"].float().cpu() / torch.tensor([sx, sy, sx, sy])).tolist()
        for (x1, y1, x2, y2), score, label in zip(boxes, det["scores"].tolist(), det["labels"].tolist()):
            out.append({"image_id": image_id, "category_id": category_ids[label],
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return out


@torch.no_grad()
def evaluate_detector(model: nn.Module, loader: DetectionLoader, *, amp: bool = False,
                      env: dist_utils.DistEnv = dist_utils.DistEnv()) -> dict[str, float]:
    """AP of ``model`` (a :class:`~bioprop.models.detection.RetinaNet`) on ``loader``'s split.

    Each rank detects on its shard; the results are gathered on rank 0, scored there, and the scores sent to
    every rank, so all ranks return the same values.

    Returns:
        The :func:`coco_ap` values plus ``detections`` (boxes scored) and ``images_detected`` (images with at
        least one box), both over all ranks.
    """
    dist_utils.sync_buffers(model, env)  # every rank scores rank 0's model (its BN statistics included)
    model.eval()
    dataset: CocoDetection = loader.dataset
    results: list[dict[str, Any]] = []
    for batch in loader:
        with torch.autocast(batch.images.device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = model(batch.images)
        detections = model.detect(outputs, tuple(batch.images.shape[-2:]), batch.image_sizes)
        results += to_coco_results(detections, batch.scales, batch.image_ids, dataset.category_ids)
    if env.distributed:
        gathered: list[Any] = [None] * env.world_size
        torch.distributed.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    scores: dict[str, float] | None = None
    if env.is_main:
        scores = coco_ap(dataset.coco, results)
        scores.update(detections=float(len(results)), images_detected=float(len({r["image_id"] for r in results})))
    return dist_utils.broadcast_object(scores, env)  # type: ignore[return-value]
