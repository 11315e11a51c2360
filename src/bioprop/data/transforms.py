"""Image transforms written with torch and PIL only (no torchvision).

Two families:

- **Batched tensor transforms** for the in-memory sets: random crop with zero padding and horizontal flip run
  on a whole uint8 batch at once, on the batch's device; normalisation converts to float in the same pass.
  The random draws are separate from the transform (:func:`draw_crop_flip`) so that the loader can make them a
  function of the sample's position in the global epoch order, independent of the number of processes.
- **PIL transforms** for the file-backed sets (ImageNet, any ImageFolder): random resized crop, flip, resize of
  the shorter side and center crop, with the same geometry as the usual ImageNet recipes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "AUGMENTATIONS", "draw_crop_flip", "crop_flip", "crop_windows", "normalize", "affine_normalization", "random_resized_crop", "resize_shorter",
    "center_crop", "pil_to_tensor",
]

#: Names of the batched augmentations: none, random crop with padding, crop + horizontal flip.
AUGMENTATIONS = ("none", "crop", "crop_flip")


def draw_crop_flip(n: int, *, padding: int, crop: bool, flip: bool, generator: torch.Generator
                   ) -> tuple[Tensor, Tensor]:
    """Random crop offsets and flip decisions for ``n`` samples.

    Returns:
        ``offsets`` (n, 2) int64 with the (top, left) corner of each crop in the padded image, each in
        ``[0, 2·padding]`` (``padding`` everywhere when ``crop`` is False, i.e. the original image), and
        ``flips`` (n,) bool (all False when ``flip`` is False).
    """
    if crop:
        offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    else:
        offsets = torch.full((n, 2), padding, dtype=torch.int64)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return offsets, flips


def crop_flip(images: Tensor, offsets: Tensor, flips: Tensor | None, padding: int) -> Tensor:
    """Batched random crop with zero padding, then horizontal flip.

    Each image is padded by ``padding`` zeros on every side and the (H, W) window at ``offsets[i]`` is kept,
    which is what ``RandomCrop(size, padding)`` does per sample; flipped samples are mirrored left-right.

    Args:
        images: (B, C, H, W) any dtype, on any device.
        offsets: (B, 2) int64 (top, left) in ``[0, 2·padding]``.
        flips: (B,) bool, or None for no flips.
        padding: zeros added on each side.

    Returns:
        (B, C, H, W), same dtype and device as ``images``.
    """
    b, c, h, w = images.shape
    device = images.device
    offsets = offsets.to(device)
    if padding > 0:
        padded = images.new_zeros((b, c, h + 2 * padding, w + 2 * padding))
        padded[:, :, padding:padding + h, padding:padding + w] = images
        rows = offsets[:, 0:1] + torch.arange(h, device=device)  # (B, H)
        cols = offsets[:, 1:2] + torch.arange(w, device=device)  # (B, W)
        # One gather for the whole batch instead of a Python loop over samples.
        batch = torch.arange(b, device=device)[:, None, None, None]
        chan = torch.arange(c, device=device)[None, :, None, None]
        images = padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
    if flips is not None:  # no data-dependent branch: a CUDA batch never waits for the host
        images = torch.where(flips.to(device)[:, None, None, None], images.flip(3), images)
    return images


def crop_windows(images: Tensor, offsets: Tensor, size: int) -> Tensor:
    """The ``size``×``size`` window of each image whose top-left corner is at ``offsets[i]``, in one gather.

    Args:
        images: (B, C, H, W) any dtype, on any device.
        offsets: (B, 2) int64 (top, left), with ``top <= H - size`` and ``left <= W - size``.
        size: side of the windows.

    Returns:
        (B, C, size, size), same dtype and device as ``images``.
    """
    b, c = images.shape[:2]
    device = images.device
    offsets = offsets.to(device)
    window = torch.arange(size, device=device)
    rows = (offsets[:, 0:1] + window)[:, None, :, None]  # (B, 1, size, 1)
    cols = (offsets[:, 1:2] + window)[:, None, None, :]  # (B, 1, 1, size)
    batch = torch.arange(b, device=device)[:, None, None, None]
    chan = torch.arange(c, device=device)[None, :, None, None]
    return images[batch, chan, rows, cols]


def affine_normalization(mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"
                         ) -> tuple[Tensor, Tensor]:
    """``(shift, scale)``, each (1, C, 1, 1) float32, with ``(x / 255 − mean) / std = shift + x · scale``."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
    return -mean_t / std_t, 1.0 / (255.0 * std_t)


def normalize(images: Tensor, affine: tuple[Tensor, Tensor]) -> Tensor:
    """uint8 (B, C, H, W) or (C, H, W) -> float32 ``shift + x · scale`` (see :func:`affine_normalization`).

    One fused multiply-add reads the uint8 values directly (type promotion does the conversion), so a batch
    costs a single pass.
    """
    shift, scale = affine
    if images.dim() == 3:
        shift, scale = shift[0], scale[0]
    return torch.addcmul(shift, images, scale)


# ------------------------------------------------------------------------------------------ PIL transforms


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator | None, low: int, high: int) -> int:
    """Uniform integer in ``[low, high]`` (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def random_resized_crop(img: Image.Image, size: int, *, generator: torch.Generator | None = None,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio`` (log-uniform), resize to size².

    Tries 10 random boxes; if none fits, falls back to the largest center box with the ratio clamped to
    ``ratio`` (the geometry of the standard ImageNet training transform). Bilinear resampling.
    """
    width, height = img.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(generator, 0, height - h)
            left = _randint(generator, 0, width - w)
            break
    else:
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            w, h = int(round(height * ratio[1])), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size``, keeping the aspect ratio (bilinear)."""
    width, height = img.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) == (width, height):
        return img
    return img.resize((new_w, new_h), Image.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """The central size×size window (the image must be at least that large)."""
    width, height = img.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def pil_to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    array = np.asarray(img.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
