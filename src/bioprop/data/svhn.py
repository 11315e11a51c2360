"""SVHN (cropped digits) in the official MATLAB format.

``train_32x32.mat`` and ``test_32x32.mat`` hold ``X`` of shape (32, 32, 3, N) uint8 and ``y`` of shape (N, 1)
with labels 1..10, where 10 stands for the digit 0. They are read with ``scipy.io.loadmat`` and checked
against the published MD5s. Searched: ``<root>/svhn``, ``<root>/SVHN``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import torch

from ._files import DatasetCorruptError, DatasetNotFoundError, download, verify
from .base import ArrayDataset, DataSource

__all__ = ["SvhnSource"]


class SvhnSource(DataSource):
    name = "svhn"
    title = "SVHN"
    base_url = "http://ufldl.stanford.edu/housenumbers/"
    files = {"train": ("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
             "test": ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3")}
    mean = (0.4377, 0.4438, 0.4728)
    std = (0.1980, 0.2010, 0.1970)
    how_to_get = ("Put train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ there, "
                  "or run `bioprop data get svhn` where the network allows.")

    def candidates(self, root: Path) -> list[Path]:
        return [root / "svhn", root / "SVHN"]

    def locate(self, root: Path) -> Path | None:
        for folder in self.candidates(root):
            if all((folder / file_name).is_file() for file_name, _ in self.files.values()):
                return folder
        return None

    def read(self, location: Path, part: str, **options: Any) -> ArrayDataset:
        if options:
            raise ValueError(f"{self.name} takes no loading options, got {', '.join(options)}")
        file_name, md5 = self.files[part]
        path = location / file_name
        verify(path, f"md5:{md5}" if md5 else [], what=str(path), fix="Replace it with the official file.")
        try:
            mat = scipy.io.loadmat(path)
            x, y = mat["X"], mat["y"]
        except (ValueError, KeyError, OSError) as err:
            raise DatasetCorruptError(f"{path} is not an SVHN .mat file with X and y ({err})") from None
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
            raise DatasetCorruptError(f"{path}: X {x.shape} and y {y.shape}; expected (32, 32, 3, N) and (N, 1)")
        images = np.ascontiguousarray(x.transpose(3, 2, 0, 1), dtype=np.uint8)  # (H, W, C, N) -> (N, C, H, W)
        labels = y.reshape(-1).astype(np.int64)
        if labels.size and (labels.min() < 1 or labels.max() > 10):
            raise DatasetCorruptError(f"{path}: labels must be 1..10 (10 = digit 0), got {labels.min()}..{labels.max()}")
        labels %= 10  # the label 10 marks the digit 0
        return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), num_classes=10, mean=self.mean,
                            std=self.std, name=self.name, train_augmentation="crop")

    def fetch(self, root: Path) -> Path:
        found = self.locate(root)
        if found is not None:
            return found
        for file_name, md5 in self.files.values():
            dest = root / "svhn" / file_name
            if dest.is_file():
                continue
            try:
                download(self.base_url + file_name, dest, f"md5:{md5}", timeout=30.0)
            except OSError as err:
                raise DatasetNotFoundError(f"could not download {self.base_url + file_name} ({err}). "
                                           f"{self.how_to_get}") from err
        return root / "svhn"
