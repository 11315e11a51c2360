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
import socket
import time
import warnings
from pathlib import Path

from typing import Any

from .checkpoint import CheckpointError, RunWarning, check_same_run, load_run_checkpoint
from .config import ConfigError, TrainConfig

__all__ = ["RUN_FILES", "LOCK_NAME", "PATH_MAX", "RUN_NAME_ROOM", "run_files", "path_room_left", "check_output_dir", "check_path_text", "make_output_dir",
           "remove_run_files",
           "RunLock", "resume_checkpoint", "divergence_advice", "refuse_existing"]

#: every file a run writes; any of them present means the directory already holds a run
RUN_FILES = ("checkpoint.pt", "checkpoint.prev.pt", "best.pt", "final.json", "metrics.jsonl", "metrics_layers.jsonl",
             "config.json")
LOCK_NAME = "run.lock"

#: the longest path a file may have (Linux's PATH_MAX, in bytes)
PATH_MAX = 4096

#: bytes kept free below a run directory for the names the engine writes there: temporary files
#: (``config.json.<pid>.tmp``) and TensorBoard's ``tensorboard/events.out.tfevents.<time>.<host>.<pid>.<n>``,
#: whose host name alone may take 64
RUN_NAME_ROOM = 160


def run_files(out: Path) -> list[str]:
    """The names of :data:`RUN_FILES` present in ``out``."""
    return [name for name in RUN_FILES if (out / name).exists()]


def refuse_existing(out: Path) -> None:
    """Refuse a run directory that already holds a run.

    Raises:
        ConfigError: naming the run files found and the ways on (``--resume``, ``--overwrite``, another directory).
    """
    found = run_files(out)
    if found:
        raise ConfigError("output_dir", f"{out} already holds a run ({', '.join(found)}); pass --resume "
                                        "to continue it, --overwrite to start over, or another --output-dir")


def check_output_dir(out: Path, writable: bool = True) -> None:
    """Refuse, before anything is built, a run directory that cannot exist or cannot be written.

    Args:
        out: the directory.
        writable: also require that it can be created or written (False for a caller that only reads it).

    Raises:
        ConfigError: ``out`` is a file, lies under a file, is a broken symbolic link, its first existing ancestor
            is not writable, or the path itself is not valid here (a name too long).
    """
    try:
        _check_output_dir(out, writable)
    except OSError as err:
        raise ConfigError("output_dir", f"output_dir {_short(out)} is not a valid path here: "
                                        f"{err.strerror or err}; allowed: a directory path") from None
    if path_room_left(out) < 0:
        raise ConfigError("output_dir", f"output_dir {_short(out)} is too long: the run files in it would pass "
                                        f"{PATH_MAX} bytes; allowed: a path of at most "
                                        f"{len(os.fsencode(out)) + path_room_left(out)} bytes")


def path_room_left(run_dir: Path) -> int:
    """Bytes to spare once the engine's longest file name (:data:`RUN_NAME_ROOM`) is put below ``run_dir``;
    negative: some run file would pass :data:`PATH_MAX`."""
    return PATH_MAX - 1 - len(os.fsencode(run_dir)) - 1 - RUN_NAME_ROOM


def check_path_text(text: str, flag: str = "--output-dir") -> None:
    """Refuse a path given on the command line with a control character or line separator (a line break would
    split a printed command over two lines) or one that is not UTF-8 (run files and reports are).

    Raises:
        ConfigError: naming ``flag`` and what is allowed.
    """
    if any(ord(ch) < 32 or ord(ch) == 127 or ch in "\u2028\u2029" for ch in text):
        raise ConfigError("output_dir", f"{flag} {text!r} holds a control character or line separator; allowed: "
                                        "a path without them")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError("output_dir", f"{flag} {text!r} is not UTF-8; allowed: a UTF-8 path") from None


def _short(path: Path, limit: int = 120) -> str:
    """``path`` for a message, its middle elided beyond ``limit`` characters."""
    text = str(path)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}"


def _check_output_dir(out: Path, writable: bool) -> None:
    if out.is_symlink() and not out.exists():
        raise ConfigError("output_dir", f"output_dir {_short(out)} is a broken symbolic link (to "
                                        f"{os.readlink(out)}); allowed: a directory or a link to one")
    if out.exists() and not out.is_dir():
        raise ConfigError("output_dir", f"output_dir {out} is a file; allowed: a directory (new or existing)")
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor != out and not ancestor.is_dir():
        raise ConfigError("output_dir", f"output_dir {out} lies under {ancestor}, which is a file; allowed: a "
                                        "path whose parents are directories")
    if writable and not os.access(ancestor, os.W_OK | os.X_OK):
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
        raise ConfigError("output_dir", f"output_dir {_short(out)} cannot be created: {err.strerror or err}") from None


def remove_run_files(out: Path) -> None:
    """Delete a previous run's files (``--overwrite``), so none of them is mistaken for the new run's."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def resume_checkpoint(out: Path, config: TrainConfig, fmt: int) -> tuple[dict[str, Any], Path]:
    """The checkpoint ``config`` resumes from (``checkpoint.pt``, else ``checkpoint.prev.pt``) and its path.

    Raises:
        CheckpointError: no usable checkpoint, or one of another format ``fmt``.
        ConfigError: other settings than the checkpoint's, or ``epochs`` below the epochs already done.
    """
    def check(checkpoint: dict[str, Any], path: Path) -> None:
        if checkpoint.get("format") != fmt:
            raise CheckpointError(f"{path} has checkpoint format {checkpoint.get('format')!r}; this version reads "
                                  f"format {fmt}")
        check_same_run(checkpoint["config"], config.to_dict(), path)

    try:
        checkpoint, path = load_run_checkpoint(out, check=check)
    except CheckpointError as err:
        found = run_files(out)
        if "no checkpoint at" in str(err) and found:
            raise CheckpointError(f"{err}: the run in {out} stopped before its first checkpoint (it holds "
                                  f"{', '.join(found)}); start it over with --overwrite") from None
        raise
    done = int(checkpoint["epoch"])
    if config.epochs < done:
        raise ConfigError("epochs", f"the run in {out} is already past epoch {config.epochs}: its checkpoint is at "
                                    f"epoch {done}; pass --epochs N with N > {done} to train it longer")
    return checkpoint, path


def divergence_advice(out: Path, lr: float, epoch: int, good: Path | None, resumed_from: Path | None) -> str:
    """What a divergence leaves and how to go on; a resume allows a lower lr, so that is what it suggests.

    Args:
        out: the run directory.
        lr: the run's lr.
        epoch: the epochs done (0: no checkpoint yet).
        good: the newest checkpoint known to be good (written by this run or read back with its digest).
        resumed_from: the checkpoint the run resumed from, if it did.
    """
    lower = f"{lr / 10:g}"
    if epoch == 0:
        return f"no checkpoint was written yet. Start over with a lower lr: --overwrite --lr {lower}."
    resume = f"continue with a lower lr: --resume --output-dir {out} --lr {lower}"
    if good is not None:
        return f"the last good checkpoint (epoch {epoch}) is kept at {good}; {resume}."
    return (f"the checkpoint this run resumed from (epoch {epoch}, {resumed_from}) is kept, but it has no integrity "
            f"digest, so it may itself be damaged; {resume}, or start over with --overwrite.")


class RunLock:
    """An exclusive ``run.lock`` in a run directory, holding this process's id and host name (``"<pid> <host>"``).

    A lock of this host whose process is gone is stale and taken over; one of another host (a cluster sharing the
    directory) cannot be checked from here, so it is always respected, with the way on if its process is gone.

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
                pid, host = _lock_owner(self.path)
                if pid is not None and host not in ("", _HOST):
                    raise ConfigError("output_dir", f"{self.path.parent} is in use by a bioprop process on host "
                                                    f"{host} (pid {pid}, lock {self.path}); wait for it to end, "
                                                    "delete the lock if that process is gone, or pick another "
                                                    "--output-dir") from None
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
                fh.write(f"{os.getpid()} {_HOST}\n")
            self.held = True
            return self
        raise ConfigError("output_dir", f"cannot take the lock {self.path}: another process keeps creating it")

    def release(self) -> None:
        if self.held:
            self.held = False
            self.path.unlink(missing_ok=True)


#: this machine's name, as locks record it (no spaces: the lock is "<pid> <host>")
_HOST = "".join(socket.gethostname().split()) or "localhost"


def _lock_owner(path: Path, wait_s: float = 0.5) -> tuple[int | None, str]:
    """``(pid, host)`` of a lock (host ``""`` for a lock that names none); ``(None, "")`` for one that is gone or
    unreadable, which counts as stale. An empty lock is given ``wait_s`` for its creator to write it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            words = path.read_text().split()
        except (OSError, UnicodeDecodeError):
            return None, ""
        if words or time.monotonic() >= deadline:
            break
        time.sleep(0.05)  # created (O_EXCL) but not yet written
    try:
        return int(words[0]), (words[1] if len(words) > 1 else "")
    except (IndexError, ValueError):
        return None, ""


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this process already trains there (e.g. a train() inside an on_step callback)
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.EPERM  # exists, owned by another user
    return True
