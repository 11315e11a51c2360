"""The in-memory data set type and the base class every data source implements."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ._files import DatasetNotFoundError
from .transforms import AUGMENTATIONS, affine_normalization, normalize

__all__ = ["ArrayDataset", "DataSource", "SPLITS"]

#: The splits ``load_dataset`` accepts.
SPLITS = ("train", "val", "test")


class ArrayDataset(Dataset):
    r"""A small image data set held in memory as one uint8 tensor.

    ``dataset[i]`` gives ``((x / 255 − mean) / std, label)`` for one sample; :func:`bioprop.data.create_loader`
    reads ``images`` and ``labels`` directly and does the same conversion for a whole batch at once.

    Args:
        images: (N, C, H, W) uint8.
        labels: (N,) int64, each in ``[0, num_classes)``.
        num_classes: number of classes.
        mean: per-channel mean of ``x / 255``, used for normalisation.
        std: per-channel standard deviation of ``x / 255``.
        name: the registry name (``"mnist"`` …).
        train_augmentation: the set's standard training augmentation, one of ``"none"``, ``"crop"``
            (random crop with 4 pixels of zero padding) or ``"crop_flip"`` (crop and horizontal flip).
        classes: optional class names, index = label.

    Attributes:
        images, labels, num_classes, mean, std, name, train_augmentation, classes: as given.

    Raises:
        ValueError: wrong dtypes or shapes, or a label outside ``[0, num_classes)``.
    """

    def __init__(self, images: Tensor, labels: Tensor, *, num_classes: int, mean: Sequence[float],
                 std: Sequence[float], name: str, train_augmentation: str = "none",
                 classes: Sequence[str] | None = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be int64 of shape ({images.shape[0]},), "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"mean/std need one value per channel ({images.shape[1]}), got {len(mean)}/{len(std)}")
        if train_augmentation not in AUGMENTATIONS:
            raise ValueError(f"unknown train_augmentation {train_augmentation!r}; allowed: {', '.join(AUGMENTATIONS)}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"labels of {name} must lie in [0, {num_classes}), "
                             f"got [{int(labels.min())}, {int(labels.max())}]")
        self.images = images
        self.labels = labels
        self.num_classes = int(num_classes)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.name = name
        self.train_augmentation = train_augmentation
        self.classes = list(classes) if classes is not None else None
        self._affine = affine_normalization(self.mean, self.std)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = normalize(self.images[index], self._affine)  # (C, H, W) float32
        return image, int(self.labels[index])

    def subset(self, start: int, stop: int) -> ArrayDataset:
        """Samples ``start:stop`` as a new data set sharing this one's memory (views, no copy)."""
        return ArrayDataset(self.images[start:stop], self.labels[start:stop], num_classes=self.num_classes,
                            mean=self.mean, std=self.std, name=self.name,
                            train_augmentation=self.train_augmentation, classes=self.classes)

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"ArrayDataset(name={self.name!r}, samples={n}, shape=({c}, {h}, {w}), classes={self.num_classes})"


class DataSource:
    """Where one data set lives and how to read it. Subclasses register themselves in :mod:`bioprop.data`.

    A source knows the places it searches under a data root, reads the official files found there, fetches
    them when asked (only :func:`bioprop.data.fetch_dataset` fetches), and tells the user how to get them.
    """

    #: Registry name, e.g. ``"mnist"``.
    name: str = ""
    #: Human name, e.g. ``"MNIST"``.
    title: str = ""
    #: One line on how to obtain the files, shown in every not-found error.
    how_to_get: str = ""
    #: True when ``load_dataset(..., val_size=N)`` may carve a validation split off the training set.
    supports_val_size: bool = True

    def candidates(self, root: Path) -> list[Path]:
        """The places searched under ``root``, in order (shown in errors)."""
        raise NotImplementedError

    def locate(self, root: Path) -> Path | None:
        """The first place under ``root`` holding a complete copy of the data, or None."""
        raise NotImplementedError

    def read(self, location: Path, part: str, **options: Any) -> Dataset:
        """Read the official ``part`` (``"train"`` or ``"test"``) from ``location``."""
        raise NotImplementedError

    def fetch(self, root: Path) -> Path:
        """Make the data present under ``root`` (from local copies, archives or the network); its location."""
        found = self.locate(root)
        if found is None:
            raise self.not_found(root)
        return found

    def load(self, root: Path, split: str, val_size: int, **options: Any) -> Dataset:
        """The data set for ``split``; the last ``val_size`` training samples form ``"val"``."""
        location = self.locate(root)
        if location is None:
            raise self.not_found(root)
        if split == "test":
            return self.read(location, "test", **options)
        if split == "val" and val_size == 0:
            raise ValueError(f"{self.name} has no official validation split; pass val_size=N to hold out the last "
                             f"N training samples (e.g. val_size=10000 for the classic MNIST 50k/10k split)")
        train = self.read(location, "train", **options)
        if val_size == 0:
            return train
        assert isinstance(train, ArrayDataset)
        if val_size >= len(train):
            raise ValueError(f"val_size={val_size} leaves no training data: {self.name} has {len(train)} "
                             f"training samples; allowed: 0 <= val_size < {len(train)}")
        cut = len(train) - val_size
        return train.subset(0, cut) if split == "train" else train.subset(cut, len(train))

    def not_found(self, root: Path) -> DatasetNotFoundError:
        """The one error for missing data: where we looked and how to get it."""
        places = ", ".join(str(p) for p in self.candidates(root))
        return DatasetNotFoundError(f"{self.title} not found; looked in: {places}. {self.how_to_get}")
