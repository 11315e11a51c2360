"""COCO-format detection data: an ``instances_<split>.json`` file plus a folder of images.

Layout under a data set's folder (``<data root>/coco`` for COCO 2017, ``<data root>/mnist_detection`` for the
set written by ``bioprop data make-mnist-detection``)::

    annotations/instances_<split>.json     # COCO "instances" format: images, annotations, categories
    <split>/<file_name>                    # the images the JSON names

Category ids (any integers) map to contiguous labels 0..K-1 in increasing id order. Boxes are read as COCO's
``[x, y, w, h]`` and kept as ``(x1, y1, x2, y2)``; crowd boxes are kept with ``iscrowd = 1`` (the loss does not
match them) and boxes of zero width or height are dropped. A file that breaks the format gives one line naming
the file, the entry and what is allowed (:class:`AnnotationError`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data._files import DatasetError, DatasetNotFoundError, default_root
from ..registry import Registry

__all__ = ["AnnotationError", "CocoDetection", "DetectionSource", "SOURCES", "list_datasets", "load_detection",
           "read_annotations"]


class AnnotationError(DatasetError, ValueError):
    """An annotation file that breaks the COCO instances format (one-line message)."""


@dataclass(frozen=True)
class DetectionSource:
    """A registered COCO-format data set: its folder under the data root, its split names and whether its
    standard training augmentation flips images left-right (``augment = "auto"``)."""

    name: str
    folder: str
    splits: dict[str, str]  # engine split ("train", "val", "test") -> file split ("train2017", ...)
    how_to_get: str
    flip: bool = True


#: every detection data set by name
SOURCES: Registry[DetectionSource] = Registry("detection data set")
for _source, _description in (
        (DetectionSource("coco", "coco", {"train": "train2017", "test": "val2017"},
                         "download COCO 2017 (train2017, val2017 and annotations_trainval2017) from cocodataset.org "
                         "and unpack it there"), "COCO 2017 instances: train2017 to train, val2017 to test"),
        # digits are not mirror-symmetric: a flipped 2 or 7 is no digit the test set holds
        (DetectionSource("mnist_detection", "mnist_detection", {"train": "train", "val": "val", "test": "test"},
                         "write it with: bioprop data make-mnist-detection", flip=False),
         "MNIST digits on a canvas, written by bioprop data make-mnist-detection")):
    SOURCES.add(_source.name, _source, description=_description, options=False)


def list_datasets() -> list[str]:
    """Names of the detection data sets (``--task detection --dataset NAME``)."""
    return SOURCES.names()


def how_to_get_if_missing(name: str, root: str | Path | None = None) -> str:
    """``""`` when data set ``name``'s training annotations are under ``root``, else how to get them.

    Raises:
        ValueError: unknown name, listing the allowed ones.
    """
    source, base = SOURCES.get(name), default_root(root)
    folder = base if (base / "annotations").is_dir() else base / source.folder
    present = (folder / "annotations" / f"instances_{source.splits['train']}.json").is_file()
    return "" if present else source.how_to_get


def _require(entry: dict[str, Any], keys: tuple[str, ...], where: str, path: Path) -> None:
    if not isinstance(entry, dict):
        raise AnnotationError(f"{path}: {where} must be an object, got {type(entry).__name__}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise AnnotationError(f"{path}: {where} lacks key(s) {', '.join(missing)}; required: {', '.join(keys)}")


def read_annotations(path: Path) -> dict[str, Any]:
    """The checked contents of an instances JSON file.

    Raises:
        DatasetNotFoundError: the file is absent.
        AnnotationError: not JSON, a missing key, a box of negative size, or an annotation whose image or
            category is not declared.
    """
    if not path.is_file():
        raise DatasetNotFoundError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path} is not valid JSON: {err}") from None
    _require(data, ("images", "annotations", "categories"), "the top level", path)
    for i, img in enumerate(data["images"]):
        _require(img, ("id", "file_name", "height", "width"), f"images[{i}]", path)
    for i, cat in enumerate(data["categories"]):
        _require(cat, ("id", "name"), f"categories[{i}]", path)
    image_ids = {img["id"] for img in data["images"]}
    category_ids = {cat["id"] for cat in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        _require(ann, ("id", "image_id", "category_id", "bbox"), f"annotations[{i}]", path)
        box = ann["bbox"]
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
            raise AnnotationError(f"{path}: annotations[{i}] (id {ann['id']}) has bbox {box!r}; expected [x, y, "
                                  "width, height], four finite numbers")
        if box[2] < 0 or box[3] < 0:
            raise AnnotationError(f"{path}: annotations[{i}] (id {ann['id']}) has a box of negative size "
                                  f"{box!r}; width and height must be >= 0")
        if ann["category_id"] not in category_ids:
            raise AnnotationError(f"{path}: annotations[{i}] (id {ann['id']}) has unknown category_id "
                                  f"{ann['category_id']!r}; declared: {sorted(category_ids)}")
        if ann["image_id"] not in image_ids:
            raise AnnotationError(f"{path}: annotations[{i}] (id {ann['id']}) names image_id {ann['image_id']!r}, "
                                  "which is not in images")
    return data


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format split; ``ds[i]`` is ``(image (3, H, W) float in [0, 1], target)``.

    ``target`` holds ``boxes`` (G, 4) float (x1, y1, x2, y2) in pixels of the original image, ``labels`` (G,)
    int64 in [0, K), ``iscrowd`` (G,) int64 and ``image_id`` (int).

    Args:
        annotation_file: the instances JSON. image_dir: folder of the images it names.
        flip: whether the set's standard training augmentation flips images left-right (``train_flip``).
    """

    def __init__(self, annotation_file: str | Path, image_dir: str | Path, *, flip: bool = True) -> None:
        self.annotation_file, self.image_dir = Path(annotation_file), Path(image_dir)
        self.train_flip = flip
        self.coco = read_annotations(self.annotation_file)
        cats = sorted(self.coco["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in cats]  # label -> category id
        self.class_names = [c["name"] for c in cats]
        self.num_classes = len(cats)
        label_of = {cid: i for i, cid in enumerate(self.category_ids)}
        self.images = sorted(self.coco["images"], key=lambda im: im["id"])
        per_image: dict[Any, list[dict[str, Any]]] = {im["id"]: [] for im in self.images}
        for ann in self.coco["annotations"]:
            per_image[ann["image_id"]].append(ann)
        self.targets: list[dict[str, Any]] = []
        for im in self.images:
            anns = [a for a in per_image[im["id"]] if a["bbox"][2] > 0 and a["bbox"][3] > 0]
            xywh = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
            xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            self.targets.append({
                "boxes": torch.from_numpy(xyxy), "image_id": im["id"],
                "labels": torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64),
                "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            })

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        from PIL import Image
        info = self.images[index]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError) as err:
            raise DatasetError(f"cannot read image {path} (image id {info['id']}): {err}") from None
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)  # (3, H, W)
        target = dict(self.targets[index])
        return image, target


def load_detection(name: str, split: str, root: str | Path | None = None) -> CocoDetection:
    """The ``split`` ("train", "val" or "test") of detection data set ``name``.

    ``root`` is the data root (the set lives in ``<root>/<folder>``) or the set's folder itself (one that holds
    ``annotations/``).

    Raises:
        ValueError: unknown name or split. DatasetNotFoundError: files absent (with how to get them).
    """
    source = SOURCES.get(name)
    if split not in source.splits:
        raise ValueError(f"data set {name!r} has no split {split!r}; allowed: {', '.join(source.splits)}")
    base = default_root(root)
    folder = base if (base / "annotations").is_dir() else base / source.folder
    file_split = source.splits[split]
    annotation_file = folder / "annotations" / f"instances_{file_split}.json"
    if not annotation_file.is_file():
        raise DatasetNotFoundError(f"{name}: {annotation_file} not found; {source.how_to_get} (layout: "
                                   f"annotations/instances_{file_split}.json and {file_split}/)")
    return CocoDetection(annotation_file, folder / file_split, flip=source.flip)
