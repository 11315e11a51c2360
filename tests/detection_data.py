"""Tiny COCO-format files for the detection tests: written here in the exact instances layout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: non-contiguous category ids, as in COCO (1..90 with gaps)
CATEGORIES = [{"id": 3, "name": "car"}, {"id": 7, "name": "train"}]


def write_tiny_coco(root: Path, split: str = "train2017", n_images: int = 4, seed: int = 0) -> Path:
    """Write ``root/annotations/instances_<split>.json`` and ``root/<split>/*.png``; image 2 has no annotation
    and image 1 has a crowd box. Boxes are bright rectangles on a dark image. Returns the JSON's path."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(1, n_images + 1):
        h, w = (48, 64) if i % 2 else (64, 40)
        canvas = np.zeros((h, w, 3), dtype=np.uint8)
        if i != 2:
            for j in range(2):
                bw, bh = int(rng.integers(8, 20)), int(rng.integers(8, 20))
                x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                canvas[y:y + bh, x:x + bw] = 255 if j == 0 else 128
                annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": CATEGORIES[j]["id"],
                                    "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": int(i == 1 and j == 1)})
        Image.fromarray(canvas).save(root / split / f"{i:04d}.png")
        images.append({"id": i, "file_name": f"{i:04d}.png", "height": h, "width": w})
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path
