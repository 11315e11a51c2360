"""Experiment files: one paper table per TOML file, read, checked and expanded into cells.

A table is rows x columns; a cell is one (row, column) pair listed in the file. The config of a cell at a scale is
``[defaults] <- column.config <- row.config <- cell.config <- scale overrides``, the scale overrides themselves
being ``[scales.<s>] <- column.scales.<s> <- row.scales.<s> <- cell.scales.<s>``. Tables (``model_args``,
``rule_options``) merge key by key; lists and scalars replace. The schema is in ``docs/reproduce.md``.

Every problem with a file is an :class:`ExperimentError` whose one-line message names the file and the cell (or
the section) and says what is allowed. A cell whose rule, rule options, constraint or model is not registered in
this installation is an error too (a typo must not pass as a missing method), unless its row, column or cell says
``pending = true``: a method that is planned but not registered yet is kept and marked *not implemented*, so the
table still lists it.

A row that says ``same_as = "<row>"`` states its own config and asserts that it trains bit for bit as that row
(liao2016's partial concordance at p = 1 is frSF): its cells take that row's config and run directories, train
nothing of their own, and show that row's runs under their own label, note and claims.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from ..engine.config import ConfigError, TrainConfig, config_from_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["Experiment", "Cell", "Claim", "ExperimentError", "SCALES", "load_experiment", "list_experiments",
           "experiment_path", "merge", "resolve_config"]

#: the scales every file defines, in the order they are listed
SCALES = ("quick", "full", "smoke")
#: what ``[experiment] status`` and a cell's ``status`` may be
PUBLISHED_STATUSES = ("verified", "recalled")
#: ``test_error``: the last epoch's top-1 test error; ``best_test_error``: the lowest over the epochs (for tables
#: that pick their model on the test set). A run with a validation split (``val_size > 0``) always reports the
#: test error at its best validation epoch.
#: ``ap``: COCO box AP in % (100 × ``final_ap`` of a detection run; higher is better).
METRICS = ("test_error", "best_test_error", "ap")
CLAIM_KINDS = ("order", "within", "below", "best_of")

#: config keys set by ``bioprop reproduce`` itself, never by a file
RUNNER_KEYS = ("seed", "output_dir", "resume", "overwrite", "data_root")

_KEYS = {
    "top": {"experiment", "defaults", "scales", "columns", "rows", "cells", "claims"},
    "experiment": {"name", "title", "paper", "source", "status", "metric", "notes"},
    "axis": {"id", "label", "config", "scales", "note", "pending", "same_as"},
    "cell": {"row", "column", "published", "source", "status", "config", "scales", "note", "pending"},
    "claim": {"id", "text", "kind", "cells", "margin", "tolerance", "threshold"},
}
_ID = re.compile(r"[a-z0-9_]+")

#: a config key whose value names something that must be registered -> the keys that go with it
_IMPLEMENTATION_KEYS = {"rule": ("rule", "rule_options"), "rule_options": ("rule_options",),
                        "last_layer": ("last_layer",), "constraints": ("constraints",),
                        "model": ("model", "model_args")}


class ExperimentError(ConfigError):
    """A bad experiment file, or a run directory that does not fit it; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__("", message)


@dataclass(frozen=True)
class Claim:
    """A claim of the paper, tested on the means of its cells (see :func:`bioprop.experiments.verdict`).

    Attributes:
        id, text: the claim's name and wording.
        kind: ``"order"`` (means increase along ``cells``, each + margin <= next), ``"within"``
            (``|mean(cells[0]) - mean(cells[1])| <= tolerance``), ``"below"`` (``mean(cells[0]) <= threshold``)
            or ``"best_of"`` (the lowest mean of ``cells[:-1]`` + margin <= ``mean(cells[-1])``: at least one of
            the first cells does better than the last).
        cells: cell ids ``"<column>/<row>"``.
    """

    id: str
    text: str
    kind: str
    cells: tuple[str, ...]
    margin: float = 0.0
    tolerance: float = 0.0
    threshold: float = 0.0


@dataclass(frozen=True)
class Cell:
    """One cell of a table at one scale.

    Attributes:
        row, column: ids; ``id`` is ``"<column>/<row>"``.
        row_label, column_label: the names shown in the table.
        published: the paper's value in the experiment's metric, or None where the paper states none.
        source, status: where the published value comes from, and ``"verified"`` or ``"recalled"``.
        note: shown beside the cell.
        values: the merged config values (every key a TrainConfig key, without seed and output_dir).
        missing: why the method cannot run in this installation ("" when it can).
        same_as: the row whose run directories hold this cell's runs, when the cell's row is declared the same
            computation as that row (``""`` otherwise); ``values`` are then that row's cell's.
        stated_values: with ``same_as``, the config the file states for this cell itself (which must train
            exactly as ``values``: ``tests/test_reproduce.py`` checks the shipped files); else None.
    """

    row: str
    column: str
    row_label: str
    column_label: str
    published: float | None
    source: str
    status: str
    note: str
    values: dict[str, Any]
    missing: str = ""
    same_as: str = ""
    stated_values: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        return f"{self.column}/{self.row}"

    @property
    def run_row(self) -> str:
        """The row whose run directories hold this cell's runs: ``same_as`` or the cell's own row."""
        return self.same_as or self.row

    @property
    def runs_id(self) -> str:
        """``"<column>/<run_row>"``: the cell whose runs this cell shows (its own id unless ``same_as``); two
        cells with one ``runs_id`` share their run directories and seeds."""
        return f"{self.column}/{self.run_row}"


@dataclass
class Experiment:
    """A parsed and checked experiment file. :meth:`cells` expands it at one scale."""

    name: str
    title: str
    paper: str
    source: str
    status: str
    metric: str
    notes: str
    path: Path
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    claims: list[Claim] = field(default_factory=list)

    def cells(self, scale: str) -> list[Cell]:
        """Every cell in file order, with its config at ``scale`` merged and checked."""
        if scale not in SCALES:
            raise ExperimentError(f"unknown scale {scale!r}; allowed: {', '.join(SCALES)}")
        return [_expand(self, entry, scale) for entry in self.raw.get("cells", [])]

    def cell_ids(self) -> list[str]:
        return [f"{c['column']}/{c['row']}" for c in self.raw.get("cells", [])]


# ------------------------------------------------------------------------------------------ loading


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def list_experiments() -> list[str]:
    """Names of the experiment files shipped with bioprop (one per paper table)."""
    return sorted(p.stem for p in _package_dir().glob("*.toml"))


def experiment_path(name: str | Path) -> Path:
    """The file of a shipped experiment ``name``, or ``name`` itself when it is a path to a ``.toml`` file.

    Raises:
        ExperimentError: neither a shipped name nor an existing file.
    """
    text = str(name)
    if text.endswith(".toml") or "/" in text:
        path = Path(text)
        if path.is_dir():
            raise ExperimentError(f"{path} is a directory; allowed: an experiment name ({', '.join(list_experiments())}) "
                                  "or a path to a .toml file")
        if not path.is_file():
            raise ExperimentError(f"experiment file not found: {path}; allowed: an experiment name "
                                  f"({', '.join(list_experiments())}) or the path of an existing .toml file")
        return path
    path = _package_dir() / f"{text}.toml"
    if not path.is_file():
        raise ExperimentError(f"unknown experiment {text!r}; allowed: {', '.join(list_experiments())} "
                              "(or a path to a .toml file)")
    return path


def load_experiment(name: str | Path) -> Experiment:
    """Read and check an experiment file: every section, every cell's config at every scale, every claim.

    Args:
        name: a name from :func:`list_experiments` or a path to a ``.toml`` file.

    Raises:
        ExperimentError: the first problem, as ``<file>: <cell or section>: <what is wrong and what is allowed>``.
    """
    path = experiment_path(name)
    where = path.name
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ExperimentError(f"{where}: not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise ExperimentError(f"{where}: not UTF-8 text (byte {err.start}); allowed: a UTF-8 TOML file") from None
    except OSError as err:
        raise ExperimentError(f"{where}: cannot be read: {err.strerror or err}") from None
    _check_keys(raw, "top", where, "the file")
    head = raw.get("experiment")
    if not isinstance(head, dict):
        raise ExperimentError(f"{where}: the file needs an [experiment] table")
    _check_keys(head, "experiment", where, "[experiment]")
    for key in ("name", "title", "paper"):
        if not isinstance(head.get(key), str) or not head[key]:
            raise ExperimentError(f"{where}: [experiment]: {key} must be a non-empty string")
    if head["name"] != path.stem:
        raise ExperimentError(f"{where}: [experiment]: name {head['name']!r} must equal the file name "
                              f"{path.stem!r}")
    status = head.get("status", "verified")
    if status not in PUBLISHED_STATUSES:
        raise ExperimentError(f"{where}: [experiment]: status {status!r}; allowed: {', '.join(PUBLISHED_STATUSES)}")
    metric = head.get("metric", "test_error")
    if metric not in METRICS:
        raise ExperimentError(f"{where}: [experiment]: metric {metric!r}; allowed: {', '.join(METRICS)}")
    experiment = Experiment(name=head["name"], title=head["title"], paper=head["paper"],
                            source=str(head.get("source", "")), status=status, metric=metric,
                            notes=str(head.get("notes", "")), path=path, raw=raw)
    _check_structure(experiment, where)
    for scale in SCALES:
        experiment.cells(scale)  # every cell's config, checked at every scale
    return experiment


def _check_keys(table: Any, kind: str, where: str, what: str) -> None:
    if not isinstance(table, dict):
        raise ExperimentError(f"{where}: {what} must be a table")
    unknown = sorted(set(table) - _KEYS[kind])
    if unknown:
        raise ExperimentError(f"{where}: {what}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(_KEYS[kind]))}")


def _check_config_table(table: Any, where: str, what: str) -> None:
    if not isinstance(table, dict):
        raise ExperimentError(f"{where}: {what} must be a table of config keys")
    taken = sorted(set(table) & set(RUNNER_KEYS))
    if taken:
        raise ExperimentError(f"{where}: {what}: {taken[0]!r} is set by bioprop reproduce (seeds 0..N-1, "
                              "--output-dir, --data-root); remove it from the file")


def _check_scales(table: Any, where: str, what: str, required: bool) -> None:
    if not isinstance(table, dict):
        raise ExperimentError(f"{where}: {what} must be a table of scales")
    unknown = sorted(set(table) - set(SCALES))
    if unknown:
        raise ExperimentError(f"{where}: {what}: unknown scale {unknown[0]!r}; allowed: {', '.join(SCALES)}")
    if required:
        absent = [s for s in SCALES if s not in table]
        if absent:
            raise ExperimentError(f"{where}: {what}: the file needs [scales.{absent[0]}] (every file has the "
                                  f"scales {', '.join(SCALES)})")
    for scale, overrides in table.items():
        _check_config_table(overrides, where, f"{what}.{scale}")


def _check_structure(experiment: Experiment, where: str) -> None:
    raw = experiment.raw
    _check_config_table(raw.get("defaults", {}), where, "[defaults]")
    _check_scales(raw.get("scales", {}), where, "[scales]", required=True)
    axes: dict[str, set[str]] = {}
    for kind in ("columns", "rows"):
        entries = raw.get(kind, [])
        if not isinstance(entries, list) or not entries:
            raise ExperimentError(f"{where}: the file needs at least one [[{kind}]] entry")
        seen: set[str] = set()
        for i, entry in enumerate(entries):
            what = f"[[{kind}]] #{i + 1}"
            _check_keys(entry, "axis", where, what)
            ident = entry.get("id")
            if not isinstance(ident, str) or not _ID.fullmatch(ident):
                raise ExperimentError(f"{where}: {what}: id {ident!r} must match [a-z0-9_]+")
            what = f"{kind[:-1]} {ident!r}"
            if ident in seen:
                raise ExperimentError(f"{where}: {what}: duplicate id")
            seen.add(ident)
            _check_config_table(entry.get("config", {}), where, f"{what}: config")
            _check_scales(entry.get("scales", {}), where, f"{what}: scales", required=False)
        axes[kind] = seen
    aliases = _check_aliases(raw["rows"], raw["columns"], where)
    claims = _check_claims(raw.get("claims", []), where)
    claimed = {c for claim in claims for c in claim.cells}
    cells = raw.get("cells", [])
    if not isinstance(cells, list) or not cells:
        raise ExperimentError(f"{where}: the file needs at least one [[cells]] entry")
    seen = set()
    for i, entry in enumerate(cells):
        if not isinstance(entry, dict):
            raise ExperimentError(f"{where}: [[cells]] #{i + 1} must be a table")
        row, column = entry.get("row"), entry.get("column")
        _check_keys(entry, "cell", where, f"cell {column}/{row}")
        if column not in axes["columns"]:
            raise ExperimentError(f"{where}: cell {column}/{row}: unknown column {column!r}; allowed: "
                                  f"{', '.join(sorted(axes['columns']))}")
        if row not in axes["rows"]:
            raise ExperimentError(f"{where}: cell {column}/{row}: unknown row {row!r}; allowed: "
                                  f"{', '.join(sorted(axes['rows']))}")
        ident = f"{column}/{row}"
        if ident in seen:
            raise ExperimentError(f"{where}: cell {ident}: listed twice")
        seen.add(ident)
        published = entry.get("published")
        if published is None and ident not in claimed:
            raise ExperimentError(f"{where}: cell {ident}: no published value and no claim mentions it; give "
                                  "published = <number> or name the cell in a [[claims]] entry")
        if published is not None and (isinstance(published, bool) or not isinstance(published, (int, float))):
            raise ExperimentError(f"{where}: cell {ident}: published must be a number, got {published!r}")
        if published is not None and not entry.get("source", experiment.source):
            raise ExperimentError(f"{where}: cell {ident}: published value without a source; set source in "
                                  "[experiment] or in the cell")
        if entry.get("status", experiment.status) not in PUBLISHED_STATUSES:
            raise ExperimentError(f"{where}: cell {ident}: status {entry['status']!r}; allowed: "
                                  f"{', '.join(PUBLISHED_STATUSES)}")
        _check_config_table(entry.get("config", {}), where, f"cell {ident}: config")
        _check_scales(entry.get("scales", {}), where, f"cell {ident}: scales", required=False)
        if row in aliases and ("config" in entry or "scales" in entry):
            raise ExperimentError(f"{where}: cell {ident}: row {row!r} is the same as row {aliases[row]!r}, so its "
                                  "cells train that row's cells; remove config and scales from the cell")
    for ident in seen:
        column, row = ident.split("/")
        if row in aliases and f"{column}/{aliases[row]}" not in seen:
            raise ExperimentError(f"{where}: cell {ident}: row {row!r} is the same as row {aliases[row]!r}, but "
                                  f"the file lists no cell {column}/{aliases[row]}; add it to [[cells]]")
    for claim in claims:
        runs: dict[str, str] = {}
        for ident in claim.cells:
            if ident not in seen:
                raise ExperimentError(f"{where}: claim {claim.id!r}: unknown cell {ident!r}; cells are "
                                      "'<column>/<row>' pairs listed in [[cells]]")
            column, row = ident.split("/")
            shared = f"{column}/{aliases.get(row, row)}"
            if shared in runs and runs[shared] != ident:
                raise ExperimentError(f"{where}: claim {claim.id!r}: cells {runs[shared]} and {ident} show the same "
                                      "runs (same_as), so the claim would compare a run with itself; name one")
            runs[shared] = ident
    experiment.claims = claims


def _check_aliases(rows: list[dict[str, Any]], columns: list[dict[str, Any]], where: str) -> dict[str, str]:
    """``{row: the row it is the same as}`` for the rows that say ``same_as``, checked: the target is another row
    without ``same_as`` of its own."""
    for column in columns:
        if "same_as" in column:
            raise ExperimentError(f"{where}: column {column['id']!r}: same_as is a key of rows only")
    ids = {row["id"] for row in rows}
    aliases = {row["id"]: row["same_as"] for row in rows if "same_as" in row}
    for entry in rows:
        if "same_as" not in entry:
            continue
        row, target = entry["id"], entry["same_as"]
        what = f"{where}: row {row!r}: same_as {target!r}"
        if not isinstance(target, str) or target not in ids or target == row:
            raise ExperimentError(f"{what}; allowed: the id of another row ({', '.join(sorted(ids - {row}))})")
        if target in aliases:
            raise ExperimentError(f"{what} is itself the same as {aliases[target]!r}; name {aliases[target]!r}")
        if "scales" in entry:
            raise ExperimentError(f"{what}: its runs are that row's at every scale; remove scales from the row")
    return aliases


def _check_claims(entries: Any, where: str) -> list[Claim]:
    if not isinstance(entries, list):
        raise ExperimentError(f"{where}: claims must be [[claims]] entries")
    claims, seen = [], set()
    for i, entry in enumerate(entries):
        _check_keys(entry, "claim", where, f"[[claims]] #{i + 1}")
        ident = entry.get("id")
        if not isinstance(ident, str) or not _ID.fullmatch(ident) or ident in seen:
            raise ExperimentError(f"{where}: [[claims]] #{i + 1}: id {ident!r} must be unique and match [a-z0-9_]+")
        seen.add(ident)
        what = f"claim {ident!r}"
        kind, cells = entry.get("kind"), entry.get("cells")
        if kind not in CLAIM_KINDS:
            raise ExperimentError(f"{where}: {what}: kind {kind!r}; allowed: {', '.join(CLAIM_KINDS)}")
        if not isinstance(entry.get("text"), str) or not entry["text"]:
            raise ExperimentError(f"{where}: {what}: text must be a non-empty string")
        need = {"order": "at least 2", "within": "exactly 2", "below": "exactly 1", "best_of": "at least 2"}[kind]
        count_ok = isinstance(cells, list) and all(isinstance(c, str) for c in cells) and (
            len(cells) >= 2 if kind in ("order", "best_of") else len(cells) == (2 if kind == "within" else 1))
        if not count_ok:
            raise ExperimentError(f"{where}: {what}: kind {kind!r} needs {need} cell ids, got {cells!r}")
        numbers = {}
        for key, required in (("margin", False), ("tolerance", kind == "within"), ("threshold", kind == "below")):
            value = entry.get(key, None if required else 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ExperimentError(f"{where}: {what}: {key} must be a number"
                                      + (f" (kind {kind!r} needs it)" if required else ""))
            numbers[key] = float(value)
        claims.append(Claim(ident, entry["text"], kind, tuple(cells), **numbers))
    return claims


# ------------------------------------------------------------------------------------------ expansion


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on top: tables merge key by key (recursively), everything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def _axis(raw: dict[str, Any], kind: str, ident: str) -> dict[str, Any]:
    return next(entry for entry in raw[kind] if entry["id"] == ident)


def _expand(experiment: Experiment, entry: dict[str, Any], scale: str) -> Cell:
    raw = experiment.raw
    column, row = _axis(raw, "columns", entry["column"]), _axis(raw, "rows", entry["row"])
    values = dict(raw.get("defaults", {}))
    for layer in (column, row, entry):
        values = merge(values, layer.get("config", {}))
    overrides = dict(raw["scales"][scale])
    for layer in (column, row, entry):
        overrides = merge(overrides, layer.get("scales", {}).get(scale, {}))
    values = merge(values, overrides)
    ident = f"{column['id']}/{row['id']}"
    try:
        _, missing = resolve_config(values)
    except ConfigError as err:
        raise ExperimentError(f"{experiment.path.name}: cell {ident} (scale {scale}): {err.reason}") from None
    if missing and not any(layer.get("pending") is True for layer in (column, row, entry)):
        raise ExperimentError(f"{experiment.path.name}: cell {ident} (scale {scale}): {'; '.join(missing)} (mark "
                              "the row, column or cell `pending = true` if the method is planned)")
    published = entry.get("published")
    cell = Cell(row=row["id"], column=column["id"], row_label=str(row.get("label", row["id"])),
                column_label=str(column.get("label", column["id"])),
                published=None if published is None else float(published),
                source=str(entry.get("source", experiment.source)), status=entry.get("status", experiment.status),
                note=str(entry.get("note", "")), values=values, missing="; ".join(missing))
    if "same_as" not in row:
        return cell
    target = _expand(experiment, next(e for e in raw["cells"]
                                      if e["column"] == column["id"] and e["row"] == row["same_as"]), scale)
    unstated = sorted(k for k in set(values) | set(target.values)
                      if values.get(k) != target.values.get(k) and k not in row.get("config", {}))
    if unstated:
        raise ExperimentError(f"{experiment.path.name}: cell {ident} (scale {scale}): its row is the same as row "
                              f"{target.row!r}, but their cells differ in {', '.join(unstated)}, which the row does "
                              "not set; allowed: differences only in the keys of the row's own config")
    return replace(cell, values=target.values, missing=cell.missing or target.missing, same_as=target.row,
                   stated_values=values)


def resolve_config(values: Mapping[str, Any]) -> tuple[TrainConfig, list[str]]:
    """Check config ``values``, telling a method this installation lacks from a mistake in the file.

    A name that must be registered (the rule and its options, ``last_layer``, a constraint, the model) and is
    not is collected as a reason; the rest of the config is still checked with that name left at its default.

    Returns:
        ``(config, missing)``: the checked config (with unregistered names replaced by defaults, so only
        usable when ``missing`` is empty) and one reason per unregistered name.

    Raises:
        ConfigError: an unknown key, a wrong type, or a bad value of any other key.
    """
    values, missing = dict(values), []
    for _ in range(len(_IMPLEMENTATION_KEYS) + 1):
        try:
            return config_from_dict(values), missing
        except ConfigError as err:
            if err.key not in _IMPLEMENTATION_KEYS or err.key not in values:
                raise
            if err.key in ("rule", "model", "last_layer"):
                missing.append(f"{err.key} {values[err.key]!r} is not registered")
            else:
                missing.append(err.reason)
            for key in _IMPLEMENTATION_KEYS[err.key]:
                values.pop(key, None)
    raise ExperimentError(f"config could not be resolved: {', '.join(missing)}")  # pragma: no cover
