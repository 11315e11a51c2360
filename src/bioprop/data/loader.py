"""Batch loaders: an in-memory tensor loader for the small sets, a sharded DataLoader for the file-backed ones.

Both follow the same sampling rules, so a run can switch between them or between process counts:

- **Order.** With ``train=True`` the epoch order is ``randperm(N)`` from a generator seeded by a hash of
  ``(seed, epoch)``; :meth:`set_epoch` selects the epoch, so a resumed run sees the same order. Without
  ``set_epoch`` the epoch advances by one after each complete pass. ``train=False`` keeps the file order.
- **Sharding** (``world_size > 1``), as ``torch.utils.data.DistributedSampler``: rank ``r`` takes the global
  order's positions ``r, r + W, r + 2W, …``. For training, the order is first cut to a multiple of W
  (``drop_last``) or padded with its own first samples; evaluation is never padded, so summing a metric over
  the ranks counts each sample exactly once. ``batch_size`` is **per rank**: global batch ``k`` is the union of
  the ranks' batch ``k``, i.e. global positions ``[k·B·W, (k+1)·B·W)``, the same samples a single process
  with batch ``B·W`` gets.
- **Augmentation** draws are made per *position in the global epoch order* from a second generator seeded by
  ``(seed, epoch)``; a sample therefore gets the same crop and flip whatever the number of processes.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..seeding import derive_seed
from .base import ArrayDataset
from .imagefolder import ImageFolderDataset, SampleKey
from .transforms import AUGMENTATIONS, affine_normalization, crop_flip, draw_crop_flip, normalize

__all__ = ["create_loader", "TensorLoader", "FileLoader", "epoch_plan", "CROP_PADDING"]

#: Zero padding of the random crop (the CIFAR/SVHN recipe).
CROP_PADDING = 4
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    # derive_seed mixes the three integers, so (seed, epoch) pairs never collide the way seed + epoch does.
    return torch.Generator().manual_seed(derive_seed(seed, epoch, stream))


def epoch_plan(n: int, *, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int, drop_last: bool,
               pad: bool) -> tuple[Tensor, Tensor, int]:
    """The sample indices one rank visits in one epoch, and their positions in the global order.

    Args:
        n: data set size.
        shuffle: permute (training) or keep the file order.
        seed, epoch: the permutation is a function of these two only.
        rank, world_size: this process and the number of processes.
        drop_last: cut the global order to a multiple of ``world_size`` instead of padding it.
        pad: whether padding is allowed at all (False for evaluation: shards may differ in size by one).

    Returns:
        ``indices`` (M,) int64 sample indices, ``positions`` (M,) int64 positions in the global order, and the
        length of the global order (N, or N rounded to a multiple of ``world_size``).
    """
    order = torch.randperm(n, generator=_generator(seed, epoch, _ORDER_STREAM)) if shuffle else torch.arange(n)
    if drop_last:
        total = (n // world_size) * world_size
    elif pad:
        total = math.ceil(n / world_size) * world_size
    else:
        total = n
    if total > n:  # repeat the order's head, as DistributedSampler does
        order = order.repeat(math.ceil(total / n))
    order = order[:total]
    positions = torch.arange(rank, total, world_size)
    return order[positions], positions, total


def _check_args(batch_size: int, seed: int, rank: int, world_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")


class _EpochLoader:
    """What both loaders share: the epoch counter and the per-rank plan."""

    def __init__(self, n: int, batch_size: int, *, train: bool, seed: int, drop_last: bool, rank: int,
                 world_size: int) -> None:
        self.num_items = n
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order (and augmentation) the next pass uses."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    def _plan(self) -> tuple[Tensor, Tensor, int]:
        return epoch_plan(self.num_items, shuffle=self.train, seed=self.seed, epoch=self.epoch, rank=self.rank,
                          world_size=self.world_size, drop_last=self.drop_last, pad=self.train)

    @property
    def num_samples(self) -> int:
        """Samples this rank visits per epoch (before dropping a last partial batch)."""
        if self.drop_last:
            return self.num_items // self.world_size
        if self.train:
            return math.ceil(self.num_items / self.world_size)
        return len(range(self.rank, self.num_items, self.world_size))

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def _batches(self, count: int) -> Iterator[slice]:
        for b in range(len(self)):
            yield slice(b * self.batch_size, min((b + 1) * self.batch_size, count))


class TensorLoader(_EpochLoader):
    """Batches of an :class:`ArrayDataset` cut straight from its uint8 tensor on ``device``.

    Each batch is one gather, an optional batched crop/flip on the same device, and one fused conversion to
    normalised float32, instead of B per-sample ``__getitem__`` calls and a collate.

    Yields:
        ``x`` (B, C, H, W) float32 normalised and ``y`` (B,) int64, both on ``device``.
    """

    def __init__(self, dataset: ArrayDataset, batch_size: int, *, train: bool, device: torch.device, seed: int,
                 augmentation: str, drop_last: bool, rank: int, world_size: int) -> None:
        super().__init__(len(dataset), batch_size, train=train, seed=seed, drop_last=drop_last, rank=rank,
                         world_size=world_size)
        self.dataset = dataset
        self.device = device
        self.augmentation = augmentation
        self.images = dataset.images.to(device)  # (N, C, H, W) uint8, moved once
        self.labels = dataset.labels.to(device)
        self._affine = affine_normalization(dataset.mean, dataset.std, device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        indices, positions, total = self._plan()
        indices = indices.to(self.device)
        if self.augmentation != "none":
            offsets, flips = draw_crop_flip(total, padding=CROP_PADDING, crop=True,
                                            flip=self.augmentation == "crop_flip",
                                            generator=_generator(self.seed, self.epoch, _AUGMENT_STREAM))
            offsets, flips = offsets[positions].to(self.device), flips[positions].to(self.device)
        for part in self._batches(len(indices)):
            batch = indices[part]
            x = self.images[batch]  # (B, C, H, W) uint8
            if self.augmentation != "none":
                x = crop_flip(x, offsets[part], flips[part] if self.augmentation == "crop_flip" else None,
                              CROP_PADDING)
            yield normalize(x, self._affine), self.labels[batch]
        self.epoch += 1


class _ShardBatchSampler(Sampler[list[SampleKey]]):
    """Batches of ``(index, sample seed)`` keys for one rank of one epoch (see the module docstring)."""

    def __init__(self, loader: FileLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        loader = self.loader
        indices, positions, total = loader._plan()
        seeds = torch.randint(0, 2**62, (total,), generator=_generator(loader.seed, loader.epoch, _AUGMENT_STREAM))
        seeds = seeds[positions]
        for part in loader._batches(len(indices)):
            yield list(zip(indices[part].tolist(), seeds[part].tolist()))


class _Uint8View(Dataset):
    """Makes the DataLoader workers return uint8 images; normalisation then runs batched on the device."""

    def __init__(self, dataset: Dataset, augment: bool | None) -> None:
        self.dataset = dataset
        self.augment = augment

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        if isinstance(self.dataset, ImageFolderDataset):
            return self.dataset.load_uint8(key, self.augment)
        return self.dataset[key[0]]


class FileLoader(_EpochLoader):
    """``torch.utils.data.DataLoader`` over a file-backed data set with the sharded, seeded batch sampler.

    Workers decode and transform images to uint8; the batch is moved to ``device`` and normalised there.
    For another map-style data set returning ``(tensor, label)``, batches are passed through unchanged.

    Yields:
        ``x`` (B, C, H, W) float32 and ``y`` (B,) int64, both on ``device``.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, train: bool, device: torch.device, seed: int,
                 augment: bool | None, drop_last: bool, rank: int, world_size: int, num_workers: int) -> None:
        super().__init__(len(dataset), batch_size, train=train, seed=seed, drop_last=drop_last,  # type: ignore
                         rank=rank, world_size=world_size)
        self.dataset = dataset
        self.device = device
        self._affine = (affine_normalization(dataset.mean, dataset.std, device)  # type: ignore[attr-defined]
                        if isinstance(dataset, ImageFolderDataset) else None)
        self._loader = DataLoader(_Uint8View(dataset, augment), batch_sampler=_ShardBatchSampler(self),
                                  num_workers=num_workers, pin_memory=device.type == "cuda")

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self._loader:
            x = x.to(self.device, non_blocking=True)
            if self._affine is not None:
                x = normalize(x, self._affine)
            yield x, torch.as_tensor(y, dtype=torch.int64).to(self.device, non_blocking=True)
        self.epoch += 1


def _resolve_augmentation(dataset: Dataset, train: bool, augment: bool | str | None) -> str:
    standard = getattr(dataset, "train_augmentation", "none")
    if augment is None:
        return standard if train else "none"
    if augment is False:
        return "none"
    if augment is True:
        if standard == "none":
            name = getattr(dataset, "name", type(dataset).__name__)
            raise ValueError(f"augment=True, but {name} has no standard augmentation; pass augment='crop' or "
                             f"'crop_flip' to choose one (allowed: None, False, True, {', '.join(AUGMENTATIONS)})")
        return standard
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {augment!r}; allowed: None, False, True, {', '.join(AUGMENTATIONS)}")
    return augment


def create_loader(dataset: Dataset, batch_size: int, *, train: bool, device: str | torch.device = "cpu",
                  seed: int = 0, augment: bool | str | None = None, drop_last: bool | None = None, rank: int = 0,
                  world_size: int = 1, num_workers: int = 0) -> TensorLoader | FileLoader:
    """A loader yielding normalised ``(x, y)`` batches on ``device`` (rules in the module docstring).

    Args:
        dataset: an :class:`ArrayDataset` (in-memory loader), an :class:`ImageFolderDataset` or any map-style
            data set returning ``(tensor, label)`` (DataLoader with the same sampler).
        batch_size: samples per batch **per rank**.
        train: shuffle each epoch and augment by default; False keeps the order and never augments.
        device: where batches (and, for in-memory sets, the whole uint8 data set) live.
        seed: order and augmentation are functions of ``(seed, epoch)``.
        augment: None = the data set's standard training augmentation when ``train`` (none for MNIST,
            Fashion-MNIST and digits, crop + flip for CIFAR, crop for SVHN, random resized crop + flip for
            ImageFolder); False = none; True = the standard one (an error if there is none); or a name from
            ``AUGMENTATIONS`` for in-memory sets.
        drop_last: drop the last partial batch; default ``train`` (every training step sees a full batch).
        rank, world_size: this process and the number of processes (DDP).
        num_workers: DataLoader worker processes for file-backed sets (in-memory sets need none).

    Returns:
        An iterable with ``len()`` (batches per epoch for this rank) and ``set_epoch(epoch)``.

    Raises:
        ValueError: a bad argument, naming it and what is allowed.
    """
    _check_args(batch_size, seed, rank, world_size)
    device = torch.device(device)
    drop_last = train if drop_last is None else bool(drop_last)
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
    if isinstance(dataset, ArrayDataset):
        augmentation = _resolve_augmentation(dataset, train, augment)
        return TensorLoader(dataset, batch_size, train=train, device=device, seed=seed, augmentation=augmentation,
                            drop_last=drop_last, rank=rank, world_size=world_size)
    if isinstance(dataset, ImageFolderDataset):
        if isinstance(augment, str):
            raise ValueError(f"augment={augment!r} applies to in-memory sets; for {dataset.name} pass None, True "
                             f"or False (random resized crop + flip)")
        file_augment = (train and dataset.train) if augment is None else (train and bool(augment))
    else:
        if augment:
            raise ValueError(f"augment={augment!r} is not available for {type(dataset).__name__}; "
                             f"augmentation is built into ArrayDataset and ImageFolderDataset")
        file_augment = None
    return FileLoader(dataset, batch_size, train=train, device=device, seed=seed, augment=file_augment,
                      drop_last=drop_last, rank=rank, world_size=world_size, num_workers=num_workers)
