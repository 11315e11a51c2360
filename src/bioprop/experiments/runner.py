"""Running a table: one run directory per cell and seed, resumable at every level.

A run directory is ``<output-dir>/<scale>/<column>/<row>/s<seed>``. What it holds says where the run is:

- ``final.json``: finished (skipped on a re-run; read by the table);
- ``diverged.json``: the loss or the weights became NaN/inf (the message is kept; skipped on a re-run);
- ``checkpoint.pt`` only: interrupted; the next run resumes from it, exactly as if never stopped;
- nothing: not started.

Cells run one after another in this process through :func:`bioprop.engine.train`, so a kill loses at most the
epoch in progress.
"""
from __future__ import annotations

import fnmatch
import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..engine.config import ConfigError, TrainConfig, config_from_dict
from .spec import Cell, Experiment, ExperimentError

__all__ = ["Plan", "RunState", "make_plan", "run_dir", "run_config", "run_state", "data_missing", "steps_per_cell",
           "execute", "print_commands", "TRAIN_SIZES"]

#: official training-set sizes, for the cost estimate without reading the data
TRAIN_SIZES = {"mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000, "cifar100": 50000, "svhn": 73257,
               "imagenet": 1281167}


@dataclass
class Plan:
    """What ``bioprop reproduce`` works on: an experiment at one scale, its selected cells and seeds."""

    experiment: Experiment
    scale: str
    seeds: list[int]
    output_dir: Path
    data_root: str | None
    cells: list[Cell] = field(default_factory=list)
    #: seeds of cells that differ from ``seeds`` (the table's cells outside ``--only``: the seeds on disk)
    cell_seeds: dict[str, list[int]] = field(default_factory=dict)

    def seeds_of(self, cell: Cell) -> list[int]:
        """The seeds of ``cell`` in this plan."""
        return self.cell_seeds.get(cell.id, self.seeds)

    @property
    def scale_dir(self) -> Path:
        """``<output-dir>/<scale>``: the run directories, results.md, results.json and the reports."""
        return self.output_dir / self.scale


def make_plan(experiment: Experiment, scale: str = "quick", seeds: int = 1, only: str | None = None,
              output_dir: str | Path | None = None, data_root: str | None = None) -> Plan:
    """The cells of ``experiment`` at ``scale`` matching ``only``, with seeds ``0 .. seeds-1``.

    Args:
        only: comma-separated shell patterns on cell ids ``"<column>/<row>"`` (``"mnist/*,*/bp"``); None = all.
        output_dir: default ``results/<name>``.

    Raises:
        ExperimentError: ``seeds < 1``, or ``only`` matches no cell.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ExperimentError(f"--seeds must be an integer >= 1, got {seeds!r}")
    cells = experiment.cells(scale)
    if only:
        patterns = [p.strip() for p in only.split(",") if p.strip()]
        cells = [c for c in cells if any(fnmatch.fnmatchcase(c.id, p) for p in patterns)]
        if not cells:
            raise ExperimentError(f"--only {only!r} matches no cell of {experiment.name}; cells: "
                                  f"{', '.join(experiment.cell_ids())}")
    out = Path(output_dir) if output_dir else Path("results") / experiment.name
    return Plan(experiment, scale, list(range(seeds)), out, data_root, cells)


def table_plan(plan: Plan) -> Plan:
    """The plan whose table covers every cell of the experiment, not only those ``--only`` selected: a selected
    cell keeps the requested seeds, any other cell has the seeds whose run directories exist (or the requested
    ones, when it has none), so running part of a table never drops the rest of it from ``results.md``."""
    selected = {cell.id for cell in plan.cells}
    cells = plan.experiment.cells(plan.scale)
    cell_seeds = {}
    for cell in cells:
        if cell.id in selected:
            continue
        folder = plan.scale_dir / cell.column / cell.row
        on_disk = sorted(int(d.name[1:]) for d in folder.glob("s*") if d.name[1:].isdigit()
                         and (d / "config.json").exists()) if folder.is_dir() else []
        if on_disk and on_disk != plan.seeds:
            cell_seeds[cell.id] = on_disk
    return Plan(plan.experiment, plan.scale, plan.seeds, plan.output_dir, plan.data_root, cells, cell_seeds)


def run_dir(plan: Plan, cell: Cell, seed: int) -> Path:
    """``<output-dir>/<scale>/<column>/<row>/s<seed>``."""
    return plan.scale_dir / cell.column / cell.row / f"s{seed}"


def run_config(plan: Plan, cell: Cell, seed: int, **extra: Any) -> TrainConfig:
    """The training config of one cell and seed (the cell must be runnable: ``cell.missing`` empty)."""
    values = dict(cell.values, seed=seed, output_dir=str(run_dir(plan, cell, seed)), **extra)
    if plan.data_root:
        values["data_root"] = plan.data_root
    return config_from_dict(values)


def data_missing(cell: Cell, data_root: str | None) -> str:
    """``""`` when the cell's data set is present, else how to get it (the data package's own message)."""
    from ..data import default_root, get_source
    name, root = cell.values.get("dataset", TrainConfig.dataset), data_root or cell.values.get("data_root") or None
    if cell.values.get("task", TrainConfig.task) == "detection":
        from ..detection.coco import how_to_get_if_missing
        return how_to_get_if_missing(name, root)
    source = get_source(name)
    return "" if source.locate(default_root(root)) is not None else source.how_to_get


@dataclass(frozen=True)
class RunState:
    """Where one (cell, seed) stands: ``"done"``, ``"diverged"``, ``"interrupted"`` (checkpoint, no final) or
    ``"pending"``; ``epoch`` is the last finished epoch of an interrupted run."""

    state: str
    epoch: int = 0


def run_state(path: Path) -> RunState:
    """The state of the run directory ``path`` (see the module docstring)."""
    if (path / "final.json").is_file():
        return RunState("done")
    if (path / "diverged.json").is_file():
        return RunState("diverged")
    if (path / "checkpoint.pt").is_file():
        from ..engine import load_checkpoint
        try:
            return RunState("interrupted", int(load_checkpoint(path / "checkpoint.pt")["epoch"]))
        except Exception:  # an unreadable checkpoint still means "resume"; the engine reports the damage
            return RunState("interrupted")
    return RunState("pending")


def steps_per_cell(cell: Cell) -> int | None:
    """Optimizer steps of one seed of ``cell`` (epochs x steps per epoch), or None when the set's size is not
    known without reading it."""
    values = cell.values
    size = TRAIN_SIZES.get(values.get("dataset", TrainConfig.dataset))
    if size is None:
        return None
    per_epoch = (size - int(values.get("val_size", 0))) // int(values.get("batch_size", TrainConfig.batch_size))
    if values.get("max_steps"):
        per_epoch = min(per_epoch, int(values["max_steps"]))
    return int(values.get("epochs", TrainConfig.epochs)) * per_epoch


def _check_not_stale(plan: Plan, cell: Cell, seed: int, path: Path) -> None:
    """Refuse a finished run directory that was made with other settings than the file now gives."""
    from ..engine.checkpoint import check_same_run
    saved_path = path / "config.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    try:
        check_same_run(saved, run_config(plan, cell, seed).to_dict(), saved_path)
    except ConfigError as err:
        raise ExperimentError(f"cell {cell.id} seed {seed}: {err.reason}; delete {path} or use another "
                              "--output-dir") from None


def execute(plan: Plan, *, verbose: bool = True, on_step: Callable[[Any], None] | None = None,
            log: Callable[[str], None] = print) -> None:
    """Train every pending (cell, seed) of the plan, one after another; finished ones are skipped, interrupted
    ones resumed, cells without their method or data reported and left.

    A run that diverges writes ``diverged.json`` beside its last good checkpoint and the table goes on.

    Raises:
        ExperimentError: a run directory made with other settings than the file's.
        Anything the training raises other than divergence (e.g. KeyboardInterrupt): the checkpoint is kept.
    """
    from ..engine import TrainingDiverged, train
    from ..engine.distributed import detect

    main = detect().is_main
    work = pending_runs(plan, check=True)  # decided once, before any training: every torchrun process agrees
    for i, (cell, seed, state) in enumerate(work, 1):
        config = run_config(plan, cell, seed, resume=state.state == "interrupted", verbose=verbose,
                            progress=verbose)
        if main:
            how = f"resuming after epoch {state.epoch}" if state.state == "interrupted" else "starting"
            log(f"[{i}/{len(work)}] {plan.experiment.name} {cell.id} seed {seed}: {how} in {config.output_dir}")
        try:
            train(config, on_step=on_step)
        except TrainingDiverged as err:
            if main:
                (Path(config.output_dir) / "diverged.json").write_text(json.dumps({"message": str(err)}) + "\n")
                log(f"  {cell.id} seed {seed}: {err}")
        except ConfigError as err:  # e.g. resuming a checkpoint written with other settings
            raise ExperimentError(f"cell {cell.id} seed {seed}: {err.reason}") from None


def pending_runs(plan: Plan, check: bool = False) -> list[tuple[Cell, int, RunState]]:
    """The (cell, seed, state) still to train: runnable cells with data, neither finished nor diverged.

    Args:
        check: also check that every finished or diverged run was made with the cell's current settings.
    """
    work = []
    for cell in plan.cells:
        if cell.missing or data_missing(cell, plan.data_root):
            continue
        for seed in plan.seeds:
            path = run_dir(plan, cell, seed)
            state = run_state(path)
            if state.state in ("done", "diverged"):
                if check:
                    _check_not_stale(plan, cell, seed, path)
                continue
            work.append((cell, seed, state))
    return work


def print_commands(plan: Plan, program: str = "bioprop") -> list[str]:
    """One ``bioprop train`` command per pending (cell, seed), each with its config written beside its run.

    The config goes to ``<run dir>/train.toml``; an interrupted run's command carries ``--resume``. Finished,
    diverged, not implemented and data-less cells get no command. Running the commands in any order, on any
    machines sharing the output directory, then ``bioprop reproduce NAME --collect`` gives the table.
    """
    from ..engine.config import as_toml, load_toml

    commands = []
    for cell, seed, state in pending_runs(plan):
        path = run_dir(plan, cell, seed)
        config = run_config(plan, cell, seed, progress=False).to_dict()
        path.mkdir(parents=True, exist_ok=True)
        toml_path = path / "train.toml"
        toml_path.write_text(as_toml(config))
        if load_toml(toml_path) != config:  # the writer is flat; refuse a config it cannot express
            raise ExperimentError(f"cell {cell.id}: its config cannot be written as a flat TOML file")
        resume = " --resume" if state.state == "interrupted" else ""
        commands.append(f"{program} train --config {shlex.quote(str(toml_path))}{resume}")
    return commands


def format_seconds(seconds: float | None) -> str:
    """``"42 s"``, ``"12.5 min"``, ``"3.2 h"``; ``"-"`` for None."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
