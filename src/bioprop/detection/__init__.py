"""Object detection: COCO-format data, COCO AP through pycocotools, and the detection task of the engine.

``bioprop train --task detection --dataset coco --data-root DIR --model retinanet`` trains a RetinaNet
(:mod:`bioprop.models.detection`) with any per-layer rule; see ``docs/detection.md``. Importing this package
(:mod:`bioprop.engine` does) registers the ``"detection"`` task of the engine.
"""
from __future__ import annotations

from .coco import AnnotationError, CocoDetection, list_datasets, load_detection, read_annotations
from .evaluation import AP_KEYS, coco_ap, evaluate_detector, to_coco_results
from .loader import Batch, DetectionLoader
from .mnist import make_mnist_detection
from .engine import DetectionTask  # registers the "detection" task

__all__ = ["AnnotationError", "CocoDetection", "list_datasets", "load_detection", "read_annotations", "AP_KEYS",
           "coco_ap", "evaluate_detector", "to_coco_results", "Batch", "DetectionLoader", "make_mnist_detection",
           "DetectionTask"]
