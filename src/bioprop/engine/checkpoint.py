"""Checkpoints that survive a kill at any moment and load with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and primitive containers only: model, optimizer and constraint state dicts,
the epoch and step counters, the RNG states (as tensors), the config (as a dict of primitives) and the best
metric. It is written to a temporary file in the same directory, flushed to disk, and renamed over the old one
with ``os.replace``, which is atomic on POSIX and Windows: a reader sees either the old file or the new one,
never a half-written one.

Every checkpoint also carries ``digest``, a sha256 over its tensors' bytes and its other values, checked on
load, so a file damaged on disk or in a copy is refused instead of resumed from. :func:`load_run_checkpoint`
then falls back to ``checkpoint.prev.pt``, the previous epoch's checkpoint that the engine keeps next to it.
"""
from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import RESUMABLE_CHANGES, ConfigError

__all__ = ["save_checkpoint", "load_checkpoint", "load_run_checkpoint", "rng_state", "set_rng_state",
           "check_same_run", "CheckpointError", "RunWarning", "state_digest", "write_text_atomic"]

#: the keys every engine checkpoint holds (checked on resume)
RUN_KEYS = ("format", "model", "optimizer", "constraints", "epoch", "step", "elapsed_s", "best", "history", "rng",
            "config", "log_bytes")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or from an incompatible run."""


class RunWarning(UserWarning):
    """Something about a run directory the user should know, that does not stop the run (the CLI prints it
    as one ``bioprop: warning: ...`` line)."""


def state_digest(state: Any) -> str:
    """sha256 (hex) over the values of a checkpoint: each tensor's dtype, shape and bytes, and the ``repr`` of
    every other value, in the order of the (nested) containers. A top-level ``"digest"`` key is left out."""
    h = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(value.shape)}:".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(value, dict):
            h.update(f"D{len(value)}:".encode())
            for k, v in value.items():
                h.update(repr(k).encode())
                feed(v)
        elif isinstance(value, (list, tuple)):
            h.update(f"L{len(value)}:".encode())
            for v in value:
                feed(v)
        else:
            h.update(f"V{type(value).__name__}{value!r};".encode())

    feed({k: v for k, v in state.items() if k != "digest"} if isinstance(state, dict) else state)
    return h.hexdigest()


def save_checkpoint(state: dict[str, Any], path: str | Path, previous: str | Path | None = None) -> Path:
    """Write ``state`` plus its ``digest`` to ``path`` atomically (temporary file, fsync, ``os.replace``).

    If anything fails before the rename (a crash, a full disk), the previous file at ``path`` is untouched;
    the partial temporary file is removed when the failure is an exception.

    Args:
        state: a dict of tensors and primitive containers (``state`` itself is not modified).
        path: where the checkpoint goes.
        previous: if given and ``path`` exists, the file at ``path`` is kept there (hard link, else a copy)
            once the new one is fully written, just before it replaces ``path``.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        CheckpointError: the disk is full ("no space left") or the file cannot be written; ``path`` keeps the
            previous checkpoint.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as fh:
            torch.save({**state, "digest": state_digest(state)}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if previous is not None and path.is_file():
            _keep_copy(path, Path(previous))
        os.replace(tmp, path)
    except OSError as err:
        if err.errno is None:
            raise
        raise CheckpointError(f"cannot write checkpoint {path}: {_why(err)}; the previous checkpoint there is kept "
                              "(free space or pick another --output-dir, then --resume)") from None
    finally:
        _discard(tmp)  # after a failure only; a successful rename has already consumed it
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file, fsync and ``os.replace``: a reader, another
    process included, sees the old file or the new one, never a part, and a crash right after leaves the new one.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        CheckpointError: the file cannot be written (a full disk, a name too long, no permission); the previous
            file at ``path`` is kept.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno is None:
            raise
        blocked = err.filename2 or err.filename  # os.replace names the destination second
        where = f" ({blocked} is in the way)" if err.errno == errno.EISDIR and blocked else ""
        advice = "free space or pick another --output-dir" if err.errno == errno.ENOSPC else \
            "remove what is in the way or pick another --output-dir"
        kept = "the previous file there is kept" if _is_file(path) else "nothing was written there"
        raise CheckpointError(f"cannot write {path}: {_why(err)}{where}; {kept} ({advice})") from None
    finally:
        _discard(tmp)  # after a failure only
    return path


def _why(err: OSError) -> str:
    """An OS error in a few words: ``"no space left on the device"``, ``"File name too long"``."""
    return "no space left on the device" if err.errno == errno.ENOSPC else (err.strerror or str(err))


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False where the path itself is not valid (a name too long)."""
    try:
        return path.is_file()
    except OSError:
        return False


def _discard(tmp: Path) -> None:
    """Remove a temporary file a failed write left; anything else by that name (a directory) is not ours."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def _keep_copy(path: Path, dest: Path) -> None:
    """``dest`` becomes a copy of ``path`` atomically (a hard link where the file system allows one)."""
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, dest)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True`` (no code is run), and
    check its ``digest``.

    A checkpoint without a digest (written before digests existed) is loaded with a :class:`RunWarning`;
    callers can tell it was not verified by ``"digest" not in checkpoint``.

    Raises:
        CheckpointError: the file is missing, cannot be read (truncated, not a checkpoint) or fails its digest.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file (EOFError, UnicodeDecodeError, ...)
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or not a bioprop checkpoint "
                              f"({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or not a bioprop checkpoint (it holds a "
                              f"{type(state).__name__}, not a dict)")
    if "digest" not in state:
        warnings.warn(f"{path} has no integrity digest (written by an older bioprop); it is loaded unverified",
                      RunWarning, stacklevel=2)
    elif state["digest"] != state_digest(state):
        raise CheckpointError(f"checkpoint {path} is damaged: its contents do not match the sha256 digest stored "
                              "in it")
    return state


def load_run_checkpoint(run_dir: Path, check: Any = None) -> tuple[dict[str, Any], Path]:
    """The checkpoint to resume the run in ``run_dir`` from: ``checkpoint.pt``, or, when that one is missing,
    damaged or incomplete, ``checkpoint.prev.pt`` (with a :class:`RunWarning`).

    Args:
        run_dir: the run directory.
        check: optional ``check(checkpoint, path)`` that raises :class:`CheckpointError` for a checkpoint this
            version cannot resume (e.g. another format); a failure falls back like a damaged file.

    Returns:
        ``(checkpoint, path it was read from)``.

    Raises:
        CheckpointError: neither file can be used (the message is the newest file's error).
    """
    newest, previous = run_dir / "checkpoint.pt", run_dir / "checkpoint.prev.pt"
    try:
        return _complete(load_checkpoint(newest), newest, check), newest
    except CheckpointError as err:
        if not previous.is_file():
            raise
        first = err
    try:
        checkpoint = _complete(load_checkpoint(previous), previous, check)
    except CheckpointError as err:
        raise CheckpointError(f"{first}; the fallback {previous.name} cannot be used either: {err}") from None
    warnings.warn(f"{first}; resuming from the previous checkpoint {previous} (epoch {checkpoint['epoch']}) "
                  "instead", RunWarning, stacklevel=2)
    return checkpoint, previous


def _complete(checkpoint: dict[str, Any], path: Path, check: Any) -> dict[str, Any]:
    missing = [key for key in RUN_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(map(repr, missing))}: it is not a complete "
                              "bioprop run checkpoint")
    if check is not None:
        check(checkpoint, path)
    return checkpoint


def rng_state() -> dict[str, Any]:
    """The states of torch (CPU and every CUDA device), NumPy and Python's ``random``, as tensors and ints."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))


def check_same_run(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint under other settings, which would silently mix two different runs.

    The settings in :data:`RESUMABLE_CHANGES` may change, and so may ``lr``, downwards only (the usual cure
    for a divergence; the engine logs it as an ``lr_change`` event).

    Args:
        saved: the config stored in the checkpoint.
        current: the config of the resuming run.
        path: the checkpoint (for the message).

    Raises:
        ConfigError: listing each differing key with both values.
    """
    changed = [k for k in current if k not in RESUMABLE_CHANGES and k in saved and saved[k] != current[k]
               and not (k == "lr" and current[k] < saved[k])]
    if changed:
        diffs = "; ".join(f"{k}: checkpoint {saved[k]!r}, now {current[k]!r}" for k in changed)
        raise ConfigError("resume", f"{path} was written by a run with other settings ({diffs}); resume with the "
                                    "same settings (a lower --lr is allowed) or start a new --output-dir")
