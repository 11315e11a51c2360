"""Reading run directories written by the training engine: config, metrics log, summary."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..engine.loop import LAYERS_LOG

__all__ = ["RunData", "load_run", "label_runs", "analysis_series"]


@dataclass
class RunData:
    """One run directory, read.

    Attributes:
        path: the directory.
        config: ``config.json`` (empty if missing).
        final: ``final.json`` (empty if missing).
        records: the ``metrics.jsonl`` records by kind (``"train"``, ``"epoch"``, ``"analysis"``, ``"event"``);
            analysis records carry their per-layer ``metrics`` from ``metrics_layers.jsonl``.
        notes: what was missing or unreadable.
        label: the name the figures give the run.
    """

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    label: str = ""

    def get(self, key: str, default: Any = None) -> Any:
        """A setting from ``final.json``, else ``config.json``."""
        return self.final.get(key, self.config.get(key, default))

    def damage(self) -> list[str]:
        """The notes that say the run's files are damaged, not merely unfinished (a live run has no final.json
        yet)."""
        return [note for note in self.notes if note != "final.json is missing"]

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return self.records.get(kind, [])

    def epoch_records(self) -> list[dict[str, Any]]:
        """The end-of-epoch records, one per epoch (the last one wins), in epoch order."""
        by_epoch = {r["epoch"]: r for r in self.kind("epoch") if isinstance(r.get("epoch"), (int, float))}
        return [by_epoch[e] for e in sorted(by_epoch)]

    def epoch_of(self, steps: Sequence[float]) -> np.ndarray:
        """Training steps converted to (fractional) epochs, from the steps at which the epochs ended."""
        ends = [(r["step"], r["epoch"]) for r in self.epoch_records() if isinstance(r.get("step"), (int, float))]
        steps_arr = np.asarray(steps, dtype=float)
        if not ends:
            return np.full(steps_arr.shape, np.nan)
        xs = np.array([0.0] + [float(s) for s, _ in ends])
        ys = np.array([0.0] + [float(e) for _, e in ends])
        out = np.interp(steps_arr, xs, ys)
        beyond = steps_arr > xs[-1]
        if beyond.any():  # past the last finished epoch: continue at the run's steps-per-epoch
            per_epoch = xs[-1] / ys[-1] if ys[-1] > 0 else 1.0
            out[beyond] = ys[-1] + (steps_arr[beyond] - xs[-1]) / per_epoch
        return out


def _read_json(path: Path, notes: list[str]) -> dict[str, Any]:
    if not path.is_file():
        notes.append(f"{path.name} is missing")
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        notes.append(f"{path.name} is not valid JSON ({exc})")
        return {}
    if not isinstance(value, dict):
        notes.append(f"{path.name} does not hold a JSON object")
        return {}
    return value


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory written by the training engine.

    Unreadable lines of ``metrics.jsonl`` (e.g. the last line of a killed run) are skipped and counted in
    ``notes``.

    Raises:
        ValueError: if the directory does not exist or holds none of config.json, metrics.jsonl, final.json.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"run directory {str(path)!r} does not exist")
    if not any((path / name).is_file() for name in ("config.json", "metrics.jsonl", "final.json")):
        raise ValueError(f"{str(path)!r} is not a run directory: it holds none of config.json, metrics.jsonl, "
                         "final.json (written by `bioprop train`)")
    run = RunData(path)
    run.config = _read_json(path / "config.json", run.notes)
    run.final = _read_json(path / "final.json", run.notes)
    log = path / "metrics.jsonl"
    if not log.is_file():
        run.notes.append("metrics.jsonl is missing")
        return run
    for record in _read_log(log, run.notes):
        run.records.setdefault(str(record.get("kind", "")), []).append(record)
    _attach_layers(run, path / LAYERS_LOG)
    return run


def _read_log(log: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The JSON-object lines of a log; unreadable ones (a killed run's last line) are counted in ``notes``."""
    records, bad = [], 0
    with log.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # JSONDecodeError, a too-long integer, deep nesting
                bad += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad += 1
    if bad:
        notes.append(f"{bad} unreadable line(s) in {log.name} were skipped")
    return records


def _attach_layers(run: RunData, side: Path) -> None:
    """Give each analysis record its per-layer ``metrics`` from the side file (matched by epoch and step).

    Runs written before the side file existed carry ``metrics`` in ``metrics.jsonl`` itself and are left as
    they are.
    """
    if not side.is_file():
        return
    layers = {(r.get("epoch"), r.get("step")): r["metrics"] for r in _read_log(side, run.notes)
              if isinstance(r.get("metrics"), dict)}
    for record in run.kind("analysis"):
        if "metrics" not in record and (record.get("epoch"), record.get("step")) in layers:
            record["metrics"] = layers[(record.get("epoch"), record.get("step"))]


#: the settings that name a run in a report when they differ between its runs, in this order
LABEL_KEYS = ("model", "dataset", "optimizer", "lr", "rule_options", "constraints", "seed")


def _setting(key: str, value: Any) -> str:
    """One setting for a label: ``seed 1``, ``norm=init``, ``fixed_sign+constant_norm``, ``lr 0.001``."""
    if key == "seed" or key == "lr":
        return f"{key} {value}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "no options"
    if isinstance(value, list):
        return "+".join(map(str, value)) or "no constraints"
    return str(value)


def label_runs(runs: list[RunData], labels: Sequence[str] | None = None) -> None:
    """Name each run, every name distinct: by ``labels`` when given (one per run), else by its rule, adding the
    settings of :data:`LABEL_KEYS` that differ between the runs of that rule (a lone ``bp`` beside three ``usf``
    variants stays ``bp``); names still shared get the shortest end of their directory path that tells them
    apart (``mnist/bp/s0`` against ``cifar/bp/s0``)."""
    def describe(run: RunData) -> str:
        rule = str(run.get("rule", "?"))
        last = run.config.get("last_layer")
        return f"{rule} (last layer {last})" if last else rule

    if labels is not None:
        if len(labels) != len(runs):
            raise ValueError(f"labels: {len(labels)} given for {len(runs)} runs; allowed: one label per run")
        for run, label in zip(runs, labels):
            run.label = str(label)
    else:
        groups: dict[str, list[RunData]] = {}
        for run in runs:
            groups.setdefault(describe(run), []).append(run)
        for name, group in groups.items():
            varying = [key for key in LABEL_KEYS
                       if len({json.dumps(r.get(key), sort_keys=True) for r in group}) > 1]
            for run in group:
                extra = "; ".join(_setting(key, run.get(key)) for key in varying)
                run.label = name + (f" [{extra}]" if extra else "")
    for _ in range(len(runs)):  # a suffix may meet a label another run already had: repeat until distinct
        shared: dict[str, list[RunData]] = {}
        for run in runs:
            shared.setdefault(run.label, []).append(run)
        if all(len(group) == 1 for group in shared.values()):
            return
        for label, group in shared.items():
            if len(group) > 1:
                for run, place in zip(group, _distinct_ends([r.path for r in group])):
                    run.label = f"{label} ({place})"
    for i, run in enumerate(runs):  # still not distinct after every pass: number them
        run.label = f"{run.label} #{i + 1}"


def _distinct_ends(paths: list[Path]) -> list[str]:
    """The shortest ends of ``paths`` (last 1, 2, ... parts) that differ from each other; the full path, then
    a running number, where none does."""
    resolved = [p.resolve() for p in paths]
    for depth in range(1, max(len(p.parts) for p in resolved) + 1):
        ends = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(ends)) == len(ends):
            return ends
    return [f"{p} #{i + 1}" for i, p in enumerate(paths)]  # the same directory given twice


def analysis_series(run: RunData, key: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(epochs, {layer: values})`` of one per-layer metric over the analysis records (None -> NaN)."""
    records = [r for r in run.kind("analysis")
               if isinstance(r.get("metrics"), dict) and isinstance(r["metrics"].get(key), dict) and r["metrics"][key]]
    if not records:
        return np.zeros(0), {}
    steps = [float(r["step"]) if isinstance(r.get("step"), (int, float)) else np.nan for r in records]
    epochs = run.epoch_of(steps)
    missing = np.isnan(epochs)
    if missing.any():  # no epoch records: fall back on the analysis record's own epoch number
        epochs[missing] = [float(r["epoch"]) if isinstance(r.get("epoch"), (int, float)) else np.nan
                           for r, m in zip(records, missing) if m]
    layers: list[str] = []
    for record in records:
        layers += [name for name in record["metrics"][key] if name not in layers]
    series = {}
    for layer in layers:
        values = []
        for record in records:
            value = record["metrics"][key].get(layer)
            if isinstance(value, dict):  # e.g. lillicrap: {"fraction", "mean"}
                value = value.get("fraction")
            values.append(float(value) if isinstance(value, (int, float)) else np.nan)
        series[layer] = np.asarray(values)
    return epochs, series
