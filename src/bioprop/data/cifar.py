"""CIFAR-10 and CIFAR-100 in the official "python version" format.

Each batch file is a pickled dict with ``data`` (N, 3072) uint8, rows laid out as 1024 red, 1024 green, 1024
blue values in row-major order, and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100). Files are read with a
restricted unpickler (:func:`bioprop.data._files.safe_unpickle`) and checked against the published MD5s.

Searched: ``<root>/cifar-10-batches-py``, ``<root>/cifar10/cifar-10-batches-py`` (CIFAR-100: ``cifar-100-python``).
``fetch_dataset`` extracts the official ``.tar.gz`` if it lies in ``<root>`` (or ``<root>/cifar10``), else
downloads it where the network allows.
"""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._files import DatasetCorruptError, DatasetNotFoundError, atomic_write, download, safe_unpickle, verify
from .base import ArrayDataset, DataSource

__all__ = ["Cifar10Source", "Cifar100Source"]


class _CifarSource(DataSource):
    folder: str = ""
    archive: str = ""
    url: str = ""
    archive_md5: str = ""
    #: file name -> published MD5, for the train files then the test files.
    train_files: dict[str, str] = {}
    test_files: dict[str, str] = {}
    label_key: str = ""
    num_classes: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def candidates(self, root: Path) -> list[Path]:
        return [root / self.folder, root / self.name / self.folder]

    def locate(self, root: Path) -> Path | None:
        for folder in self.candidates(root):
            if all((folder / f).is_file() for f in (*self.train_files, *self.test_files)):
                return folder
        return None

    def read(self, location: Path, part: str, **options: Any) -> ArrayDataset:
        if options:
            raise ValueError(f"{self.name} takes no loading options, got {', '.join(options)}")
        files = self.train_files if part == "train" else self.test_files
        images, labels = [], []
        for file_name, md5 in files.items():
            path = location / file_name
            verify(path, f"md5:{md5}" if md5 else [], what=str(path),
                   fix=f"Delete {location} and extract the official archive again ({self.how_to_get})")
            with open(path, "rb") as f:
                batch = safe_unpickle(f)
            try:
                data, batch_labels = np.asarray(batch["data"], dtype=np.uint8), batch[self.label_key]
            except (KeyError, TypeError):
                raise DatasetCorruptError(f"{path} is not a {self.title} batch (needs 'data' and "
                                          f"'{self.label_key}')") from None
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch_labels) != data.shape[0]:
                raise DatasetCorruptError(f"{path}: data {data.shape} and {len(batch_labels)} labels; "
                                          f"expected (N, 3072) and N labels")
            images.append(data.reshape(-1, 3, 32, 32))  # channel planes, row-major: already (C, H, W)
            labels.append(np.asarray(batch_labels, dtype=np.int64))
        return ArrayDataset(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)),
                            num_classes=self.num_classes, mean=self.mean, std=self.std, name=self.name,
                            train_augmentation="crop_flip")

    def fetch(self, root: Path) -> Path:
        found = self.locate(root)
        if found is not None:
            return found
        archive = next((p for p in (root / self.archive, root / self.name / self.archive) if p.is_file()), None)
        if archive is None:
            archive = root / self.name / self.archive
            try:
                download(self.url, archive, f"md5:{self.archive_md5}")
            except OSError as err:
                raise DatasetNotFoundError(f"could not download {self.url} ({err}). {self.how_to_get}") from err
        verify(archive, f"md5:{self.archive_md5}", what=str(archive), fix="Delete it and download it again.")
        self._extract(archive, archive.parent)
        found = self.locate(root)
        if found is None:
            raise DatasetCorruptError(f"{archive} did not contain {self.folder}/ with the expected files")
        return found

    def _extract(self, archive: Path, dest: Path) -> None:
        """Extract only the expected member files, each atomically (no paths outside ``dest/folder``)."""
        wanted = {f"{self.folder}/{name}" for name in (*self.train_files, *self.test_files)}
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                if member.name in wanted and member.isfile():
                    source = tar.extractfile(member)
                    assert source is not None
                    with atomic_write(dest / member.name) as tmp:
                        tmp.write_bytes(source.read())


class Cifar10Source(_CifarSource):
    name = "cifar10"
    title = "CIFAR-10"
    folder = "cifar-10-batches-py"
    archive = "cifar-10-python.tar.gz"
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    archive_md5 = "c58f30108f718f92721af3b95e74349a"
    train_files = {
        "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    }
    test_files = {"test_batch": "40351d587109b95175f43aff81a1287e"}
    label_key = "labels"
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    how_to_get = ("Put the official cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) in the data "
                  "root and run `bioprop data get cifar10`, or extract it there yourself.")


class Cifar100Source(_CifarSource):
    name = "cifar100"
    title = "CIFAR-100"
    folder = "cifar-100-python"
    archive = "cifar-100-python.tar.gz"
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    archive_md5 = "eb9058c3a382ffc7106e4002c42a8d85"
    train_files = {"train": "16019d7e3df5f24257cddd939b257f8d"}
    test_files = {"test": "f0ef6b0ae62326f3e7ffdfab6717acfc"}
    label_key = "fine_labels"
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    how_to_get = ("Put the official cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) in the "
                  "data root and run `bioprop data get cifar100`, or extract it there yourself.")
