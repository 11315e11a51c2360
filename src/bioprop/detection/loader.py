"""Batches of detection data: the standard resize, random horizontal flip, normalisation and padding.

Every image is resized so its shorter side is ``min_size`` unless that makes its longer side exceed
``max_size`` (then the longer side is ``max_size``); boxes follow. Training images are flipped left-right with
probability 0.5; the flips and the order are a function of ``(seed, epoch)`` only, the same on every rank.
A batch pads its images at the bottom and right to a common size divisible by ``size_divisible``.

Under DDP each of the N processes takes ``batch_size / N`` images of every global batch of ``batch_size``
images (``images_per_batch`` in Detectron's terms); evaluation splits the images over the ranks without
repeats.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ..seeding import derive_seed
from .coco import CocoDetection

__all__ = ["Batch", "DetectionLoader", "resize", "hflip", "pad_batch", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize(image: Tensor, boxes: Tensor, min_size: int, max_size: int
           ) -> tuple[Tensor, Tensor, tuple[float, float]]:
    """Resize ``image`` (3, H, W) and ``boxes`` (G, 4) as the module docstring says.

    Returns:
        The image, the boxes, and the factors ``(new W / W, new H / H)`` (equal up to the rounding of the sides).
    """
    h, w = image.shape[-2:]
    scale = min_size / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if (new_h, new_w) != (h, w):
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    factors = torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h], dtype=boxes.dtype)
    return image, boxes * factors, (new_w / w, new_h / h)


def hflip(image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Mirror ``image`` (3, H, W) left-right and its boxes (G, 4) with it."""
    w = image.shape[-1]
    return image.flip(-1), torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)


def pad_batch(images: list[Tensor], size_divisible: int) -> Tensor:
    """Images [(3, H_i, W_i)] -> (B, 3, H, W), zero-padded at the bottom and right; H, W divisible."""
    h = max(im.shape[-2] for im in images)
    w = max(im.shape[-1] for im in images)
    h, w = -(-h // size_divisible) * size_divisible, -(-w // size_divisible) * size_divisible
    out = images[0].new_zeros(len(images), images[0].shape[0], h, w)
    for i, im in enumerate(images):
        out[i, :, :im.shape[-2], :im.shape[-1]] = im
    return out


@dataclass
class Batch:
    """One (per-rank) batch.

    Attributes:
        images: (B, 3, H, W) normalised and padded. targets: per image ``boxes`` (G, 4) in resized pixels,
        ``labels`` (G,), ``iscrowd`` (G,). image_sizes: each image's resized (h, w) before padding.
        scales: resize factors (x, y) of each image (divide boxes by them for original pixels).
        image_ids: COCO ids.
    """

    images: Tensor
    targets: list[dict[str, Tensor]]
    image_sizes: list[tuple[int, int]]
    scales: list[tuple[float, float]]
    image_ids: list[Any]

    def to(self, device: torch.device) -> "Batch":
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in self.targets]
        return Batch(self.images.to(device, non_blocking=True), targets, self.image_sizes, self.scales,
                     self.image_ids)


class _Transform:
    """Picklable per-item transform for loader workers: ``(index, flip) -> (image, target, size, scale, id)``."""

    def __init__(self, dataset: CocoDetection, min_size: int, max_size: int) -> None:
        self.dataset, self.min_size, self.max_size = dataset, min_size, max_size
        self.mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        self.std = torch.tensor(IMAGENET_STD)[:, None, None]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, bool]) -> tuple[Tensor, dict[str, Tensor], tuple[int, int], tuple[float, float], Any]:
        index, flip = item
        image, target = self.dataset[index]
        image, boxes, scale = resize(image, target["boxes"], self.min_size, self.max_size)
        if flip:
            image, boxes = hflip(image, boxes)
        image = (image - self.mean) / self.std
        out = {"boxes": boxes, "labels": target["labels"], "iscrowd": target["iscrowd"]}
        return image, out, (image.shape[-2], image.shape[-1]), scale, target["image_id"]


class _Collate:
    def __init__(self, size_divisible: int) -> None:
        self.size_divisible = size_divisible

    def __call__(self, items: list[tuple[Any, ...]]) -> Batch:
        images, targets, sizes, scales, ids = zip(*items)
        return Batch(pad_batch(list(images), self.size_divisible), list(targets), list(sizes), list(scales),
                     list(ids))


class DetectionLoader:
    """Iterates :class:`Batch` es of a :class:`CocoDetection` split for one rank (module docstring).

    Args:
        dataset: the split. batch_size: images per rank and batch. train: shuffle, flip, drop the last
        incomplete global batch. flip: flip training images at random. min_size, max_size: the resize.
        size_divisible: padding multiple. seed, rank, world_size: the shard. num_workers: loader processes.
        device: where batches go.
    """

    def __init__(self, dataset: CocoDetection, batch_size: int, *, train: bool, flip: bool = True,
                 min_size: int = 800, max_size: int = 1333, size_divisible: int = 32, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, device: torch.device | str = "cpu") -> None:
        self.dataset, self.batch_size, self.train, self.flip = dataset, batch_size, train, flip and train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.epoch = 0
        self.transform = _Transform(dataset, min_size, max_size)
        self.collate = _Collate(size_divisible)
        self.num_workers = num_workers

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch whose order and flips the next iteration uses."""
        self.epoch = epoch

    def batches(self) -> list[list[tuple[int, bool]]]:
        """This rank's batches of ``(index, flip)`` for the current epoch."""
        n = len(self.dataset)
        if not self.train:
            mine = list(range(self.rank, n, self.world_size))
            return [[(i, False) for i in mine[j:j + self.batch_size]] for j in range(0, len(mine), self.batch_size)]
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))  # order, then flips
        order = torch.randperm(n, generator=g).tolist()
        flips = (torch.rand(n, generator=g) < 0.5).tolist()
        global_batch = self.batch_size * self.world_size
        out = []
        for j in range(0, n - global_batch + 1, global_batch):
            chunk = order[j + self.rank * self.batch_size: j + (self.rank + 1) * self.batch_size]
            out.append([(i, self.flip and flips[i]) for i in chunk])
        return out

    def __len__(self) -> int:
        n = len(self.dataset)
        if self.train:
            return n // (self.batch_size * self.world_size)
        return -(-len(range(self.rank, n, self.world_size)) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        loader = torch.utils.data.DataLoader(self.transform, batch_sampler=self.batches(), collate_fn=self.collate,
                                             num_workers=self.num_workers)
        for batch in loader:
            yield batch.to(self.device)
