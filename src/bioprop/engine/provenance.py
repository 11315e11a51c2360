"""Which code produced a run: ``bioprop.__version__`` and, for a git checkout, the commit and whether the
package's source differs from it.

Every run writes this as ``"code"`` into its ``config.json`` (the code it began with) and ``final.json`` (the
code that finished it), and each resume event of its ``metrics.jsonl`` names the code it resumed with, so that a
published number names the code behind it. The git facts are read once per process; they are None when the package is not a
tracked part of a git work tree (an installed wheel) or git is not available.
"""
from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path
from typing import Any

from .. import __version__

__all__ = ["code_version", "started_code", "CODE_KEY"]

#: the key of the code version in ``config.json`` and ``final.json``
CODE_KEY = "code"

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # src/bioprop


def _git(*args: str) -> str | None:
    """The stripped output of ``git -C <package dir> args``, or None when git fails or is missing."""
    try:
        done = subprocess.run(["git", "-C", str(_PACKAGE_DIR), *args], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def _git_state() -> tuple[str | None, bool | None]:
    # Only when the package's own files are tracked: an installed copy inside some other repository is not that
    # repository's code.
    if _git("ls-files", "--error-unmatch", "__init__.py") is None:
        return None, None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--", ".")  # tracked changes and untracked (not ignored) files
    return commit, None if status is None else bool(status)


def code_version() -> dict[str, Any]:
    """``{"version", "commit", "dirty"}``: the package version, the git commit (40 hex digits, or None outside
    a git checkout) and whether the package's source differs from that commit (None outside a checkout)."""
    commit, dirty = _git_state()
    return {"version": __version__, "commit": commit, "dirty": dirty}


def started_code(config_path: Path, current: dict[str, Any]) -> dict[str, Any]:
    """The code a resumed run began with: ``"code"`` of its ``config.json`` at ``config_path``, or ``current``
    (the resuming code, from :func:`code_version`) when that file holds none (written before code was recorded)."""
    try:
        recorded = json.loads(config_path.read_text()).get(CODE_KEY)
    except (OSError, ValueError, AttributeError):
        recorded = None
    return recorded if isinstance(recorded, dict) else current
