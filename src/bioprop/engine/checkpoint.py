"""Checkpoints that survive a kill at any moment and load with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and primitive containers only: model, optimizer and constraint state dicts,
the epoch and step counters, the RNG states (as tensors), the config (as a dict of primitives) and the best
metric. It is written to a temporary file in the same directory, flushed to disk, and renamed over the old one
with ``os.replace``, which is atomic on POSIX and Windows: a reader sees either the old file or the new one,
never a half-written one.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "check_same_run", "CheckpointError"]

#: options that may differ between an interrupted run and its resumption; every other one must match
RESUMABLE_CHANGES = frozenset({"resume", "overwrite", "epochs", "progress", "verbose", "tensorboard", "num_workers",
                               "data_root", "device", "eval_every", "log_every", "metrics_every"})


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or from an incompatible run."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, ``os.replace``).

    If anything fails before the rename (a crash, a full disk), the previous file at ``path`` is untouched;
    the partial temporary file is removed when the failure is an exception.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failure only; a successful rename has already consumed it
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True`` (no code is run).

    Raises:
        CheckpointError: the file is missing or cannot be read (truncated, not a checkpoint).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file; all mean the same to the user
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None


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

    Args:
        saved: the config stored in the checkpoint.
        current: the config of the resuming run.
        path: the checkpoint (for the message).

    Raises:
        ConfigError: listing each differing key with both values.
    """
    from .config import ConfigError
    changed = [k for k in current if k not in RESUMABLE_CHANGES and k in saved and saved[k] != current[k]]
    if changed:
        diffs = "; ".join(f"{k}: checkpoint {saved[k]!r}, now {current[k]!r}" for k in changed)
        raise ConfigError("resume", f"{path} was written by a run with other settings ({diffs}); resume with the "
                                    "same settings or start a new --output-dir")
