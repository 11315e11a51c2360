"""What a run writes as it goes: the JSON-lines metrics log, TensorBoard scalars and the progress bar.

Only the main process writes; on the other ranks these objects exist but do nothing, so the loop needs no
``if rank == 0`` at every call.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from ..metrics.training import jsonable
from .checkpoint import RunWarning
from .config import ConfigError

__all__ = ["MetricsLog", "TensorBoardLog", "progress", "read_records", "jsonable", "epoch_line", "LogError"]

T = TypeVar("T")


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """The one-line summary of an "epoch" record printed after each epoch."""
    parts = [f"epoch {record['epoch']:>{len(str(epochs))}}/{epochs}",
             f"train loss {record['train_loss']:.4f} acc {100 * record['train_acc']:.2f}%"]
    if record.get("val_error") is not None:
        parts.append(f"val error {record['val_error']:.2f}%")
    if record["test_error"] is not None:
        parts.append(f"test error {record['test_error']:.2f}% (top-5 {100 * record['test_top5']:.2f}%)")
    seconds = record["epoch_time_s"]
    parts.append(f"{seconds:.1f} s" if seconds >= 1 else f"{1000 * seconds:.0f} ms")
    return " | ".join(parts)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, flushed after every record.

    Args:
        path: the log file.
        enabled: False on non-main ranks (nothing is written).
        resume_at: byte offset recorded in the checkpoint being resumed. The file is cut back to it, so the
            records of work that the checkpoint does not contain disappear and the log reads exactly as an
            uninterrupted run's. A log shorter than that (a host crash, a partial copy) is never padded: it is
            cut back to its last complete record and continued from there, with a ``RunWarning``. None starts
            a new file.
    """

    def __init__(self, path: Path, enabled: bool = True, resume_at: int | None = None) -> None:
        self.path = path
        self.enabled = enabled
        self._fh = None
        if not enabled:
            return
        if resume_at is not None and not path.exists():
            _warn(f"{path} is missing; the resumed run starts a new log (the records before the checkpoint are "
                  "lost)")
        if resume_at is None or not path.exists():
            self._fh = path.open("w", encoding="utf-8")
        else:
            cut = _repair_point(path, resume_at)
            self._fh = path.open("r+", encoding="utf-8")
            self._fh.seek(cut)
            self._fh.truncate()

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to the OS, so a kill loses at most the record being written."""
        if self._fh is None:
            return
        self._fh.write(json.dumps(jsonable(record), separators=(", ", ": ")) + "\n")
        self._fh.flush()

    def tell(self) -> int:
        """The current end of the log in bytes (stored in checkpoints); 0 on non-main ranks."""
        return self._fh.tell() if self._fh is not None else 0

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _warn(message: str) -> None:
    warnings.warn(message, RunWarning, stacklevel=3)


def _repair_point(path: Path, resume_at: int) -> int:
    """Where to cut the log to resume: ``resume_at`` when the log holds that many bytes of whole records, else
    the end of its last whole record before that point (with a warning)."""
    data = path.read_bytes()[:resume_at]
    if len(data) == resume_at and (resume_at == 0 or data.endswith(b"\n")):
        return resume_at
    cut = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n") or not _is_record(line):
            break
        cut += len(line)
    records = data[:cut].count(b"\n")
    _warn(f"{path} holds {len(data)} usable bytes where the checkpoint expects {resume_at} (a crash or a partial "
          f"copy); kept its first {records} complete records and continued after them")
    return cut


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line.decode("utf-8")), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


class LogError(ValueError):
    """A ``metrics.jsonl`` line that is not a JSON record (the message names the file and the line)."""


def read_records(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, optionally only those of one ``kind``.

    A last line without its newline that does not parse (the record being written when a run was killed) is
    left out.

    Raises:
        LogError: any other line that is not a JSON object (a damaged or padded log).
    """
    records = []
    raw = Path(path).read_bytes()
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if number == len(lines):  # unterminated last line: a record cut by a kill
                continue
            raise LogError(f"{path} line {number} is not a JSON record ({type(err).__name__}); the log is "
                           "damaged") from None
        if not isinstance(record, dict):
            raise LogError(f"{path} line {number} is not a JSON record (a {type(record).__name__})")
        if kind is None or record.get("kind") == kind:
            records.append(record)
    return records


class TensorBoardLog:
    """TensorBoard scalars mirroring the metrics log (train loss/acc/lr, epoch metrics, analysis scalars).

    Raises:
        ConfigError: when enabled but the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: Path, enabled: bool, purge_step: int | None = None) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("tensorboard", "tensorboard = true needs the tensorboard package: pip install "
                                             "tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def record(self, record: dict[str, Any]) -> None:
        """Write the numeric fields of a metrics-log record as scalars at its step."""
        if self.writer is None:
            return
        kind, step = record.get("kind"), int(record.get("step", 0))
        fields = record.get("metrics", record) if kind == "analysis" else record
        for key, value in _flatten(fields):
            if key not in ("epoch", "step", "kind") and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                self.writer.add_scalar(f"{kind}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _flatten(values: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + "/")
        else:
            yield name, value


def progress(iterable: Iterable[T], *, enabled: bool, total: int, desc: str) -> Any:
    """A tqdm bar over ``iterable`` shown only when asked for and stderr is a terminal; else a silent wrapper.

    The returned object always has ``set_postfix_str`` and ``close``, so the loop treats both cases alike.
    """
    from tqdm.auto import tqdm
    show = enabled and sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=not show, leave=False, dynamic_ncols=True,
                unit="batch", mininterval=0.5)
