"""The 8×8 handwritten digits shipped inside scikit-learn: the embedded set that always works, offline.

1797 grayscale images with values 0..16, rescaled to uint8 by ``round(v · 255 / 16)``. There is no official
split, so a fixed one is used: the samples are shuffled with ``numpy.random.RandomState(0).permutation`` (its
stream is frozen by NumPy's compatibility policy) and the last 20 % (359 samples) form the test set, the first
1438 the training set. ``mean``/``std`` are computed on those 1438 training images.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import ArrayDataset, DataSource

__all__ = ["DigitsSource", "DIGITS_TEST_FRACTION", "DIGITS_TRAIN_SIZE"]

DIGITS_TEST_FRACTION = 0.2
_DIGITS_SIZE = 1797
#: the training images of the fixed split (1438), known without loading the set
DIGITS_TRAIN_SIZE = _DIGITS_SIZE - int(round(DIGITS_TEST_FRACTION * _DIGITS_SIZE))
_SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, tuple[float], tuple[float], int]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    labels = bunch.target.astype(np.int64)
    order = np.random.RandomState(_SPLIT_SEED).permutation(len(labels))
    images, labels = images[order], labels[order]
    n_train = len(labels) - int(round(DIGITS_TEST_FRACTION * len(labels)))
    train = images[:n_train].astype(np.float64) / 255.0
    return images, labels, (float(train.mean()),), (float(train.std()),), n_train


class DigitsSource(DataSource):
    name = "digits"
    title = "8x8 digits (scikit-learn)"
    how_to_get = "It ships with scikit-learn (`pip install scikit-learn`)."

    def candidates(self, root: Path) -> list[Path]:
        return [self._data_file()]

    def locate(self, root: Path) -> Path | None:
        path = self._data_file()
        return path if path.is_file() else None

    @staticmethod
    def _data_file() -> Path:
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"

    def read(self, location: Path, part: str, **options: Any) -> ArrayDataset:
        if options:
            raise ValueError(f"{self.name} takes no loading options, got {', '.join(options)}")
        images, labels, mean, std, n_train = _digits_arrays()
        part_slice = slice(0, n_train) if part == "train" else slice(n_train, None)
        return ArrayDataset(torch.from_numpy(images[part_slice].copy()).unsqueeze(1),
                            torch.from_numpy(labels[part_slice].copy()), num_classes=10, mean=mean, std=std,
                            name=self.name, classes=[str(d) for d in range(10)])
