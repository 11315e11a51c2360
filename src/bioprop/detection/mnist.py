"""``bioprop data make-mnist-detection``: a small real detection set made of MNIST digits.

Each 128×128 grey canvas gets 1–5 real MNIST digits, each resized to a random side of 12–48 pixels and pasted
at a random position (digits may overlap; the brighter pixel wins). The box of a digit is the tight box of its
ink after resizing, and its category is the digit. Train and val digits come from MNIST's training images
(disjoint), test digits from MNIST's test images. Everything is a function of the seed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["make_mnist_detection", "CANVAS", "SPLIT_SIZES"]

CANVAS = 128
SPLIT_SIZES = {"train": 6000, "val": 1000, "test": 1000}


def _paste(canvas: np.ndarray, digit: np.ndarray, side: int, x: int, y: int) -> list[float] | None:
    """Resize ``digit`` (28, 28) uint8 to side×side, paste it at (x, y) by maximum; the tight ink box xywh."""
    small = F.interpolate(torch.from_numpy(digit).float()[None, None], size=(side, side), mode="bilinear",
                          align_corners=False, antialias=True)[0, 0].clamp(0, 255).round().byte().numpy()
    region = canvas[y:y + side, x:x + side]
    np.maximum(region, small, out=region)
    ys, xs = np.nonzero(small > 32)
    if ys.size == 0:
        return None
    return [float(x + xs.min()), float(y + ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _split(images: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator, split: str,
           out: Path) -> None:
    from PIL import Image
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    entries, annotations = [], []
    for i in range(count):
        canvas = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 6))):
            k = int(rng.integers(len(images)))
            side = int(rng.integers(12, 49))
            x, y = int(rng.integers(0, CANVAS - side + 1)), int(rng.integers(0, CANVAS - side + 1))
            box = _paste(canvas, images[k], side, x, y)
            if box is not None:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(labels[k]),
                                    "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
        name = f"{i + 1:06d}.png"
        Image.fromarray(canvas, mode="L").save(image_dir / name)
        entries.append({"id": i + 1, "file_name": name, "height": CANVAS, "width": CANVAS})
    data = {"info": {"description": f"MNIST detection ({split})"}, "licenses": [], "images": entries,
            "annotations": annotations,
            "categories": [{"id": d, "name": str(d), "supercategory": "digit"} for d in range(10)]}
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    tmp = ann_dir / f".instances_{split}.json.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, ann_dir / f"instances_{split}.json")  # the JSON last and atomically: its presence = complete


def make_mnist_detection(out: str | Path, *, seed: int = 0, sizes: dict[str, int] | None = None,
                         mnist_root: str | Path | None = None) -> Path:
    """Write the set to ``out`` (``annotations/instances_{train,val,test}.json`` and ``{train,val,test}/*.png``).

    Args:
        out: the folder to write. seed: seed of every draw. sizes: images per split (default
        :data:`SPLIT_SIZES`). mnist_root: data root holding MNIST (``bioprop data get mnist``).

    Returns:
        ``out``.

    Raises:
        DatasetNotFoundError: MNIST is absent. ValueError: a split size that is not a positive int.
    """
    from ..data import load_dataset
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    for split, n in sizes.items():
        if split not in SPLIT_SIZES or not isinstance(n, int) or n < 1:
            raise ValueError(f"split sizes must be positive ints for train, val, test; got {split}={n!r}")
    out = Path(out)
    train = load_dataset("mnist", split="train", root=mnist_root)
    test = load_dataset("mnist", split="test", root=mnist_root)
    tr_images = train.images[:, 0].numpy().astype(np.uint8) if train.images.dtype == torch.uint8 else None
    if tr_images is None:
        raise ValueError(f"expected uint8 MNIST images, got {train.images.dtype}")
    tr_labels = train.labels.numpy()
    te_images, te_labels = test.images[:, 0].numpy().astype(np.uint8), test.labels.numpy()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(tr_images))
    held = perm[:10_000]  # val digits: 10k training digits never used for the train split
    rest = perm[10_000:]
    pools = {"train": (tr_images[rest], tr_labels[rest]), "val": (tr_images[held], tr_labels[held]),
             "test": (te_images, te_labels)}
    for split in ("train", "val", "test"):
        if split in sizes:
            split_rng = np.random.default_rng([seed, ("train", "val", "test").index(split)])
            _split(*pools[split], sizes[split], split_rng, split, out)
    return out
