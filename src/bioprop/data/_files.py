"""File plumbing shared by the data sources: the data root, checksums, atomic writes, downloads, safe unpickling.

Everything written to the cache goes through :func:`atomic_write` (a temporary file in the same folder, then
``os.replace``), so a killed process never leaves a half-written file under the final name.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DatasetError", "DatasetNotFoundError", "DatasetCorruptError", "default_root", "digest", "verify",
    "atomic_write", "download", "safe_unpickle", "DOWNLOAD_TIMEOUT_S",
]

#: Seconds before a download attempt gives up; machines without a network fail fast.
DOWNLOAD_TIMEOUT_S = 10.0
_CHUNK = 1 << 20


class DatasetError(Exception):
    """Base of the data errors, so a command line can catch them all at once."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The files of a data set are not where we looked. The message lists the places and how to get them."""


class DatasetCorruptError(DatasetError, ValueError):
    """A data file exists but does not have the expected checksum or layout."""


def default_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``root`` if given, else ``$BIOPROP_DATA``, else ``~/.cache/bioprop``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("BIOPROP_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "bioprop"


def digest(source: str | os.PathLike[str] | bytes, algorithm: str = "sha256") -> str:
    """Hex digest of a file (read in chunks) or of bytes in memory."""
    h = hashlib.new(algorithm)
    if isinstance(source, (bytes, bytearray, memoryview)):
        h.update(source)
        return h.hexdigest()
    with open(source, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(source: str | os.PathLike[str] | bytes, expected: str | Sequence[str], *, what: str, fix: str) -> None:
    """Check ``source`` against one or more ``"algorithm:hex"`` digests (any one matching passes).

    Args:
        source: a file path, or the bytes themselves (e.g. decompressed content).
        expected: ``"sha256:…"`` / ``"md5:…"`` strings; an empty sequence checks nothing.
        what: the name shown in the error (usually the file path).
        fix: how to repair it, appended to the error.

    Raises:
        DatasetCorruptError: naming the file, the expected and the actual digest.
    """
    wanted = [expected] if isinstance(expected, str) else list(expected)
    if not wanted:
        return
    actual: dict[str, str] = {}
    for item in wanted:
        algorithm, _, hexdigest = item.partition(":")
        if algorithm not in actual:
            actual[algorithm] = digest(source, algorithm)
        if actual[algorithm] == hexdigest.lower():
            return
    algorithm = wanted[0].partition(":")[0]
    raise DatasetCorruptError(
        f"{what} is corrupt: its {algorithm} is {actual[algorithm]}, expected {wanted[0].partition(':')[2]}. {fix}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; cache files get the usual permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def download(url: str, dest: Path, expected: str | Sequence[str], *, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` atomically and verify its checksum before it gets its final name.

    Raises:
        OSError: the network is unreachable or the server refused (``urllib`` errors are ``OSError``).
        DatasetCorruptError: the downloaded bytes do not match ``expected``.
    """
    with atomic_write(dest) as tmp:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:  # noqa: S310
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                f.write(chunk)
        verify(tmp, expected, what=f"download of {url}", fix="The server sent different bytes; try again later.")
    return dest


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only builds plain containers and NumPy arrays: a data file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"data pickle refers to {module}.{name}, which a data file never needs")
        return super().find_class(module, name)


def safe_unpickle(f: IO[bytes] | bytes) -> Any:
    """Load a pickle that may contain only dicts, lists, tuples, str/bytes, numbers and NumPy arrays.

    Python 2 pickles (CIFAR, the classic ``mnist.pkl.gz``) are read with ``encoding="latin1"``, which keeps
    their byte strings and NumPy buffers intact.
    """
    if isinstance(f, (bytes, bytearray)):
        f = io.BytesIO(f)
    return _ArrayUnpickler(f, encoding="latin1").load()
