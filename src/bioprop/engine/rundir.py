"""The run directory: which files make a run, whether a directory can hold one, and the lock that keeps two
processes out of the same one.

A run directory holds :data:`RUN_FILES`. While a process trains in it, it also holds ``run.lock``, created
with ``O_EXCL`` and holding that process's id: a second process (a second ``--resume`` of a live run, or two
fresh runs started at once) is refused. A lock whose process is gone (a ``kill -9``, a crash) is stale and is
taken over with a warning.
"""
from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

from .checkpoint import RunWarning
from .config import ConfigError

__all__ = ["RUN_FILES", "LOCK_NAME", "run_files", "check_output_dir", "make_output_dir", "remove_run_files",
           "RunLock"]

#: every file a run writes; any of them present means the directory already holds a run
RUN_FILES = ("checkpoint.pt", "checkpoint.prev.pt", "best.pt", "final.json", "metrics.jsonl", "config.json")
LOCK_NAME = "run.lock"


def run_files(out: Path) -> list[str]:
    """The names of :data:`RUN_FILES` present in ``out``."""
    return [name for name in RUN_FILES if (out / name).exists()]


def check_output_dir(out: Path) -> None:
    """Refuse, before anything is built, a run directory that cannot exist or cannot be written.

    Raises:
        ConfigError: ``out`` is a file, lies under a file, or its first existing ancestor is not writable.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError("output_dir", f"output_dir {out} is a file; allowed: a directory (new or existing)")
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor != out and not ancestor.is_dir():
        raise ConfigError("output_dir", f"output_dir {out} lies under {ancestor}, which is a file; allowed: a "
                                        "path whose parents are directories")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError("output_dir", f"output_dir {out} cannot be created or written: {ancestor} is not "
                                        "writable; allowed: a directory this user can write")


def make_output_dir(out: Path) -> None:
    """``mkdir -p out``, with a one-line error.

    Raises:
        ConfigError: the directory cannot be created.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError("output_dir", f"output_dir {out} cannot be created: {err.strerror or err}") from None


def remove_run_files(out: Path) -> None:
    """Delete a previous run's files (``--overwrite``), so none of them is mistaken for the new run's."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


class RunLock:
    """An exclusive ``run.lock`` in a run directory, holding this process's id.

    Args:
        out: the run directory (it must exist).

    Raises:
        ConfigError: (from :meth:`acquire`) another live process holds the lock.
    """

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_NAME
        self.held = False

    def acquire(self) -> "RunLock":
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = _lock_pid(self.path)
                if pid is not None and _alive(pid):
                    raise ConfigError("output_dir", f"{self.path.parent} is in use by another bioprop process (pid "
                                                    f"{pid}, lock {self.path}); wait for it to end, or pick another "
                                                    "--output-dir") from None
                warnings.warn(f"removing the stale lock {self.path} (its process {pid} is gone)", RunWarning,
                              stacklevel=2)
                self.path.unlink(missing_ok=True)
                continue
            except OSError as err:
                raise ConfigError("output_dir", f"cannot create the lock {self.path}: {err.strerror or err}") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()}\n")
            self.held = True
            return self
        raise ConfigError("output_dir", f"cannot take the lock {self.path}: another process keeps creating it")

    def release(self) -> None:
        if self.held:
            self.held = False
            self.path.unlink(missing_ok=True)


def _lock_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None  # unreadable or half-written: treated as stale


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this process already trains there (e.g. a train() inside an on_step callback)
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.EPERM  # exists, owned by another user
    return True
