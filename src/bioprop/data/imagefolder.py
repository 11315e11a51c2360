"""ImageNet and any class-per-folder image tree, decoded with PIL.

Layout: ``<folder>/<split>/<class name>/<image>``, where ``<split>`` is ``train``, ``val`` and optionally
``test``. Class indices follow the sorted class folder names of ``train/`` (so ``val/`` may miss classes).
ImageNet is expected in ``<root>/imagenet`` with the validation images already sorted into class folders
(the usual preparation of ILSVRC-2012). ``"imagefolder"`` uses ``<root>/imagefolder`` or ``<root>`` itself.

Transforms (PIL + torch, :mod:`bioprop.data.transforms`):

- train: random resized crop to ``image_size`` (area 8–100 %, aspect 3/4–4/3), horizontal flip with p = 0.5;
- val/test: resize the shorter side to ``round(image_size · 256 / 224)``, center crop ``image_size``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ._files import DatasetCorruptError, DatasetNotFoundError
from .base import DataSource
from .transforms import (affine_normalization, center_crop, normalize, pil_to_tensor, random_resized_crop,
                         resize_shorter)

__all__ = ["ImageFolderDataset", "ImageFolderSource", "ImageNetSource", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: A sample key: an index, or (index, seed) to make the random transform a function of the seed.
SampleKey = Union[int, tuple[int, int]]


class ImageFolderDataset(Dataset):
    r"""Images in class folders, read with PIL and transformed for training or evaluation.

    ``dataset[i]`` returns ``(x, label)`` with ``x`` the normalised float image (3, S, S), S = ``image_size``.
    ``dataset[(i, seed)]`` draws the random training transform from a generator seeded with ``seed``, which is
    how :func:`bioprop.data.create_loader` makes augmentation reproducible across workers and processes.

    Args:
        folder: the split folder, holding one sub-folder per class.
        classes: class names in label order (the train split's folder names).
        train: random resized crop + flip when True, resize + center crop when False.
        image_size: output side length S.
        mean, std: per-channel statistics of ``x / 255``.
        name: the registry name.

    Attributes:
        samples: list of (path, label); classes, num_classes, mean, std, name, train, image_size.
    """

    def __init__(self, folder: Path, classes: Sequence[str], *, train: bool, image_size: int = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 name: str = "imagefolder") -> None:
        self.folder = Path(folder)
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.train = train
        self.image_size = int(image_size)
        self.resize_size = int(round(self.image_size * 256 / 224))
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.name = name
        self._affine = affine_normalization(self.mean, self.std)
        self.samples: list[tuple[Path, int]] = []
        for label, class_name in enumerate(self.classes):
            class_dir = self.folder / class_name
            if class_dir.is_dir():
                self.samples += [(p, label) for p in sorted(class_dir.iterdir())
                                 if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        if not self.samples:
            raise DatasetNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {folder}")

    def __len__(self) -> int:
        return len(self.samples)

    def load_uint8(self, key: SampleKey, augment: bool | None = None) -> tuple[Tensor, int]:
        """The transformed image as uint8 (3, S, S) and its label; ``augment`` overrides the split's default."""
        index, seed = key if isinstance(key, tuple) else (int(key), None)
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except OSError as err:
            raise DatasetCorruptError(f"cannot decode image {path}: {err}") from None
        if self.train if augment is None else augment:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            img = random_resized_crop(img, self.image_size, generator=generator)
            if float(torch.rand((), generator=generator)) < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            img = center_crop(resize_shorter(img, self.resize_size), self.image_size)
        return pil_to_tensor(img), label

    def __getitem__(self, key: SampleKey) -> tuple[Tensor, int]:
        image, label = self.load_uint8(key)
        return normalize(image, self._affine), label

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(name={self.name!r}, folder={str(self.folder)!r}, samples={len(self)}, "
                f"classes={self.num_classes}, train={self.train}, image_size={self.image_size})")


class ImageFolderSource(DataSource):
    name = "imagefolder"
    title = "ImageFolder tree"
    how_to_get = ("Pass root=<folder> holding train/<class>/<images> and val/<class>/<images> "
                  "(or put them in <data root>/imagefolder).")
    supports_val_size = False
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def candidates(self, root: Path) -> list[Path]:
        return [root / self.name, root]

    def locate(self, root: Path) -> Path | None:
        for folder in self.candidates(root):
            if (folder / "train").is_dir():
                return folder
        return None

    def load(self, root: Path, split: str, val_size: int, **options: Any) -> ImageFolderDataset:
        if val_size:
            raise ValueError(f"val_size is not supported for {self.name}; it reads the val/ folder for split='val'")
        location = self.locate(root)
        if location is None:
            raise self.not_found(root)
        return self.read(location, split, **options)

    def read(self, location: Path, part: str, **options: Any) -> ImageFolderDataset:
        unknown = set(options) - {"image_size"}
        if unknown:
            raise ValueError(f"{self.name} has no loading option(s) {', '.join(sorted(unknown))}; allowed: image_size")
        image_size = options.get("image_size") or 224
        classes = sorted(p.name for p in (location / "train").iterdir() if p.is_dir())
        folder = location / part
        if part == "test" and not folder.is_dir():
            folder = location / "val"  # ImageNet's test labels are not public: its val set is the test set
        if not folder.is_dir():
            raise DatasetNotFoundError(f"{self.title}: no {part}/ folder in {location}. {self.how_to_get}")
        return ImageFolderDataset(folder, classes, train=part == "train", image_size=image_size,
                                  mean=self.mean, std=self.std, name=self.name)


class ImageNetSource(ImageFolderSource):
    name = "imagenet"
    title = "ImageNet (ILSVRC-2012)"
    how_to_get = ("ImageNet cannot be downloaded automatically: after accepting its terms at https://image-net.org, "
                  "extract train/ and val/ (val sorted into class folders) into <data root>/imagenet.")

    def candidates(self, root: Path) -> list[Path]:
        return [root / self.name]
