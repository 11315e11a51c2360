"""Running a table: one run directory per cell and seed, resumable at every level.

A run directory is ``<output-dir>/<scale>/<column>/<row>/s<seed>``. What it holds says where the run is:

- ``final.json``: finished (skipped on a re-run; read by the table);
- ``diverged.json``: the loss or the weights became NaN/inf (the message is kept; skipped on a re-run);
- ``checkpoint.pt`` (or only ``checkpoint.prev.pt``): interrupted; the next run resumes from it, exactly as if
  never stopped;
- other run files but no checkpoint: stopped in its first epoch; the next run starts it over (nothing it wrote
  can be resumed);
- nothing: not started.

Cells run one after another in this process through :func:`bioprop.engine.train`, so a kill loses at most the
epoch in progress.
"""
from __future__ import annotations

import fnmatch
import gc
import json
import math
import os
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..data.digits import DIGITS_TRAIN_SIZE
from ..engine.config import RESUMABLE_CHANGES, ConfigError, TrainConfig, config_from_dict
from ..engine.rundir import PATH_MAX, check_output_dir, check_path_text, make_output_dir, path_room_left, run_files
from .spec import Cell, Experiment, ExperimentError

__all__ = ["Plan", "RunState", "make_plan", "run_dir", "run_config", "run_state", "data_missing", "steps_per_cell",
           "execute", "print_commands", "holds_runs", "read_record", "stale_reason", "check_finished", "check_output",
           "finished_value", "table_plan", "unclaimed_runs", "unclaimed_line", "TRAIN_SIZES", "MAX_SEEDS",
           "NOT_RESULT_KEYS"]

#: the most seeds per cell one call may ask for
MAX_SEEDS = 100

#: settings a finished run may differ in from its cell and still be the cell's run: where it lives, where its data
#: came from, what it printed and how fast it ran, not what it trained or how often it was evaluated
NOT_RESULT_KEYS = (RESUMABLE_CHANGES - {"epochs", "eval_every"}) | {"compile", "channels_last"}

#: official training-set sizes (the digits: its fixed split), for the cost estimate without reading the data
TRAIN_SIZES = {"mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000, "cifar100": 50000, "svhn": 73257,
               "imagenet": 1281167, "digits": DIGITS_TRAIN_SIZE}


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
        ExperimentError: ``seeds`` outside 1..:data:`MAX_SEEDS`, an empty ``output_dir``, or a pattern of
            ``only`` that is empty or matches no cell.
        ConfigError: ``output_dir`` with a control character or not UTF-8.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= MAX_SEEDS:
        raise ExperimentError(f"--seeds must be an integer from 1 to {MAX_SEEDS}, got {seeds!r}")
    cells = experiment.cells(scale)
    if only is not None:
        cells = _select(experiment, cells, only)
    if output_dir is not None and not str(output_dir).strip():
        raise ExperimentError(f"--output-dir is empty; allowed: a directory path (default results/{experiment.name})")
    if output_dir is not None:
        check_path_text(str(output_dir))
    out = Path(output_dir) if output_dir is not None else Path("results") / experiment.name
    return Plan(experiment, scale, list(range(seeds)), out, data_root, cells)


def check_output(plan: Plan, *, writing: bool) -> None:
    """Refuse an output directory that cannot hold the plan's runs: a file, under a file, a broken link, run
    files whose paths would be too long, and, with ``writing``, one this user cannot create or write.

    Raises:
        ConfigError: naming the directory and what is allowed.
    """
    check_output_dir(plan.output_dir, writable=writing)
    runs = [run_dir(plan, cell, seed) for cell in plan.cells for seed in plan.seeds_of(cell)]
    longest = max(runs, key=lambda path: len(os.fsencode(path)), default=None)
    if longest is not None and path_room_left(longest) < 0:
        raise ConfigError("output_dir", f"--output-dir is too long: the run files of "
                                        f"{longest.relative_to(plan.output_dir)} would pass {PATH_MAX} bytes; "
                                        f"allowed: a path {-path_room_left(longest)} bytes shorter or more")


def _select(experiment: Experiment, cells: list[Cell], only: str) -> list[Cell]:
    """The cells matching any pattern of ``only``; every pattern must match at least one cell."""
    patterns = [p.strip() for p in only.split(",")]
    if len(cells) <= 24:
        ids = f"the cells {', '.join(c.id for c in cells)}"
    else:
        ids = (f"cells COLUMN/ROW of the columns {', '.join(dict.fromkeys(c.column for c in cells))} and the rows "
               f"{', '.join(dict.fromkeys(c.row for c in cells))} (not every pair is a cell: --list shows them)")
    allowed = f"allowed: comma-separated shell patterns on {ids}, e.g. '{cells[0].column}/*'"
    if not all(patterns):
        raise ExperimentError(f"--only {only!r} holds an empty pattern; {allowed}")
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(c.id, p) for c in cells)]
    if unmatched:
        verb = "matches" if len(unmatched) == 1 else "match"
        raise ExperimentError(f"--only: {', '.join(map(repr, unmatched))} {verb} no cell of {experiment.name}; "
                              f"{allowed}")
    return [c for c in cells if any(fnmatch.fnmatchcase(c.id, p) for p in patterns)]


def table_plan(plan: Plan, *, seeds_on_disk: bool = False) -> Plan:
    """The plan whose table covers every cell of the experiment, not only those ``--only`` selected: a selected
    cell keeps its seeds in ``plan``, any other cell has the seeds whose run directories exist (or the requested
    ones, when it has none), so running part of a table never drops the rest of it from ``results.md``.

    With ``seeds_on_disk`` every cell, selected or not, has the seeds on disk (none where it has none): the
    table of runs made with different seed counts per cell (``bioprop reproduce NAME --collect`` without
    ``--seeds``)."""
    # selected by its runs: a row same_as another shares its runs, so the two cells count the same seeds
    selected = {} if seeds_on_disk else {cell.runs_id: cell for cell in plan.cells}
    cells = plan.experiment.cells(plan.scale)
    cell_seeds = {}
    for cell in cells:
        chosen = selected.get(cell.runs_id)
        if chosen is not None:
            if chosen.id in plan.cell_seeds:
                cell_seeds[cell.id] = plan.cell_seeds[chosen.id]
            continue
        on_disk = _seeds_on_disk(run_dir(plan, cell, 0).parent)
        if (on_disk or seeds_on_disk) and on_disk != plan.seeds:
            cell_seeds[cell.id] = on_disk  # with seeds_on_disk, a cell with none on disk counts none
    return Plan(plan.experiment, plan.scale, plan.seeds, plan.output_dir, plan.data_root, cells, cell_seeds)


def _seeds_on_disk(folder: Path) -> list[int]:
    """The seeds of the run directories ``folder/s<seed>`` that hold any run file (:data:`RUN_FILES`, e.g. a
    ``config.json``), sorted (none when ``folder`` is absent). A finished run that lost its ``config.json`` still
    counts, so the table refuses it with a reason instead of leaving it out."""
    if not folder.is_dir():
        return []
    return sorted(int(d.name[1:]) for d in folder.glob("s*") if d.name[1:].isascii() and d.name[1:].isdigit()
                  and run_files(d))


def holds_runs(scale_dir: Path) -> bool:
    """Whether any ``<column>/<row>`` folder under ``scale_dir`` holds a run directory (as :func:`table_plan`
    counts them)."""
    return any(_seeds_on_disk(folder) for folder in scale_dir.glob("*/*"))


def unclaimed_runs(plan: Plan) -> dict[str, int]:
    """The ``"<column>/<row>"`` folders under :attr:`Plan.scale_dir` that hold run directories (as
    :func:`table_plan` counts them: ``s<seed>`` holding a run file) but are the runs of no cell of the experiment at this
    scale, with how many runs each holds: a row renamed, removed or made ``same_as`` another since they ran. The
    table ignores them; callers say so."""
    if not plan.scale_dir.is_dir():
        return {}
    claimed = {cell.runs_id for cell in plan.experiment.cells(plan.scale)}
    found: dict[str, int] = {}
    for folder in sorted(plan.scale_dir.glob("*/*")):
        key = f"{folder.parent.name}/{folder.name}"
        runs = len(_seeds_on_disk(folder)) if key not in claimed else 0
        if runs:
            found[key] = runs
    return found


def unclaimed_line(plan: Plan) -> str:
    """One line naming :func:`unclaimed_runs` (``""`` when there are none)."""
    found = unclaimed_runs(plan)
    if not found:
        return ""
    shown = ", ".join(f"{key} ({n} run{'s' if n != 1 else ''})" for key, n in list(found.items())[:8])
    more = f" and {len(found) - 8} more" if len(found) > 8 else ""
    return (f"note: {plan.scale_dir} holds runs that are no cell of {plan.experiment.name} at scale {plan.scale}, "
            f"left out of the table: {shown}{more}")


def run_dir(plan: Plan, cell: Cell, seed: int) -> Path:
    """``<output-dir>/<scale>/<column>/<row>/s<seed>``, with the row whose runs the cell shows
    (:attr:`Cell.run_row`: a row declared ``same_as`` another has that row's directories)."""
    return plan.scale_dir / cell.column / cell.run_row / f"s{seed}"


def run_config(plan: Plan, cell: Cell, seed: int, **extra: Any) -> TrainConfig:
    """The training config of one cell and seed (the cell must be runnable: ``cell.missing`` empty)."""
    values = dict(cell.values, seed=seed, output_dir=str(run_dir(plan, cell, seed)), **extra)
    if plan.data_root:
        values["data_root"] = plan.data_root
    return config_from_dict(values)


def data_missing(cell: Cell, data_root: str | None) -> str:
    """``""`` when the cell's data set is present, else how to get it (the data package's own message), after the
    data root searched where ``data_root`` (``--data-root``) names one."""
    from ..data import default_root, get_source
    name, root = cell.values.get("dataset", TrainConfig.dataset), data_root or cell.values.get("data_root") or None
    if cell.values.get("task", TrainConfig.task) == "detection":
        from ..detection.coco import how_to_get_if_missing
        missing = how_to_get_if_missing(name, root)
    else:
        source = get_source(name)
        missing = "" if source.locate(default_root(root)) is not None else source.how_to_get
    return f"not found under the data root {data_root}. {missing}" if missing and data_root else missing


@dataclass(frozen=True)
class RunState:
    """Where one (cell, seed) stands: ``"done"``, ``"diverged"``, ``"interrupted"`` (checkpoint, no final),
    ``"started"`` (run files but no checkpoint: stopped before its first one) or ``"pending"``; ``epoch`` is the
    last finished epoch of an interrupted run, ``config`` the settings its checkpoint was written with,
    ``unreadable`` why that checkpoint could not be read here (the run itself then falls back to the previous one
    or says so)."""

    state: str
    epoch: int = 0
    unreadable: str = ""
    config: dict[str, Any] | None = None


def run_state(path: Path) -> RunState:
    """The state of the run directory ``path`` (see the module docstring)."""
    if (path / "final.json").is_file():
        return RunState("done")
    if (path / "diverged.json").is_file():
        return RunState("diverged")
    if (path / "checkpoint.pt").is_file():
        from ..engine import load_checkpoint
        try:
            checkpoint = load_checkpoint(path / "checkpoint.pt")
            config = checkpoint.get("config")
            return RunState("interrupted", int(checkpoint["epoch"]),
                            config=config if isinstance(config, dict) else None)
        except Exception as err:  # an unreadable checkpoint still means "resume"; the engine reports the damage
            return RunState("interrupted", unreadable=" ".join(str(err).split()) or type(err).__name__)
    if (path / "checkpoint.prev.pt").is_file():  # the engine resumes from it when checkpoint.pt is gone
        return RunState("interrupted", unreadable="checkpoint.pt is missing")
    if run_files(path):
        return RunState("started")
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


def read_record(path: Path) -> dict[str, Any]:
    """One of a run's JSON records (``config.json``, ``final.json``, ``diverged.json``) as a dict.

    Raises:
        ExperimentError: the file cannot be read, is not JSON, or holds no JSON object; the message names the
            file and the way on (delete the run directory to run it again).
    """
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        reason = err.strerror or str(err)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # json.JSONDecodeError is a ValueError
        reason = f"not valid JSON: {err}"
    else:
        if isinstance(value, dict):
            return value
        reason = f"a JSON {type(value).__name__}, not an object"
    raise ExperimentError(f"{path} is damaged ({reason}); delete {path.parent} to run it again")


def stale_reason(plan: Plan, cell: Cell, seed: int, path: Path, state: RunState | None = None) -> str:
    """``""`` when the run in ``path`` was made with the settings the file now gives its cell, else the differing
    settings, ``"lr: run 0.001, file 0.0003"``.

    A finished or diverged run is judged by its ``config.json``; an interrupted one by the settings of its
    checkpoint (its ``config.json`` where the checkpoint cannot be read), since resuming it under other settings
    would finish a run that is half one cell and half another. Every setting counts except
    :data:`NOT_RESULT_KEYS`; and since both records hold the settings of the run's latest session, a run whose
    log shows an ``lr_change`` (resumed by hand at a lower lr, which the engine allows) is not the cell's run
    either, whatever the file now says.

    Args:
        state: ``run_state(path)``, when the caller has it already.

    Raises:
        ExperimentError: its ``config.json`` (or the record saying how it ended) is damaged.
    """
    state = state or run_state(path)
    if state.state in ("pending", "started"):  # nothing to keep: the run starts (over) with the file's settings
        return ""
    current = run_config(plan, cell, seed).to_dict()
    changed = _lr_changes(path)
    if state.state == "interrupted":
        saved = state.config
        if saved is None and (path / "config.json").is_file():
            saved = read_record(path / "config.json")
        return "; ".join(filter(None, [_differences(saved or {}, current), changed]))
    record = read_record(path / ("final.json" if state.state == "done" else "diverged.json"))
    if state.state == "done":
        finished_value(record, plan.experiment.metric, path)
    if not (path / "config.json").is_file():
        raise ExperimentError(f"cell {cell.id} seed {seed}: {path} holds a "
                              f"{'finished' if state.state == 'done' else 'diverged'} run without config.json, so "
                              "its settings cannot be checked; delete it to run the cell again")
    return "; ".join(filter(None, [_differences(read_record(path / "config.json"), current), changed]))


def _lr_changes(path: Path) -> str:
    """``"lr changed during the run: 0.05 -> 0.01 at epoch 3"`` from the ``lr_change`` events of the run's
    ``metrics.jsonl``, or ``""``."""
    try:
        text = (path / "metrics.jsonl").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    steps = []
    for line in text.splitlines():
        if '"lr_change"' not in line:  # one read; only the few event lines are parsed
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a damaged line: the engine repairs the log on resume
        if isinstance(record, dict) and record.get("event") == "lr_change":
            steps.append(f"{record.get('from')!r} -> {record.get('to')!r} at epoch {record.get('epoch')}")
    return f"lr changed during the run: {', '.join(steps)}" if steps else ""


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """The result-bearing settings (all but :data:`NOT_RESULT_KEYS`) that differ, ``"lr: run 0.01, file 0.001"``."""
    return "; ".join(f"{key}: run {saved[key]!r}, file {current[key]!r}" for key in current
                     if key not in NOT_RESULT_KEYS and key in saved and saved[key] != current[key])


def finished_value(final: dict[str, Any], metric: str, path: Path) -> float | None:
    """The table's value of one finished run from its ``final.json``: test error in %, or box AP in % for
    ``metric == "ap"``; selected at the best validation epoch where the run held out a validation split.

    Returns:
        The value, or None when the run never evaluated (e.g. ``eval_every`` beyond its epochs).

    Raises:
        ExperimentError: the value is there but not a finite number (a damaged ``final.json``).
    """
    key = ("final_ap" if metric == "ap" else "test_error_at_best" if final.get("selected_by") == "val_error"
           else "best_test_error" if metric == "best_test_error" else "final_test_error")
    value = final.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ExperimentError(f"{path / 'final.json'} is damaged ({key} is {value!r}, not a finite number); "
                              f"delete {path} to run it again")
    return 100.0 * value if metric == "ap" else float(value)


def _check_not_stale(plan: Plan, cell: Cell, seed: int, path: Path, state: RunState) -> None:
    """Refuse a finished, diverged or interrupted run directory made with other settings than the file gives."""
    differences = stale_reason(plan, cell, seed, path, state)
    if differences:
        what = ("holds an interrupted run (resuming it would mix two settings in one run) made"
                if state.state == "interrupted" else "was made")
        raise ExperimentError(f"cell {cell.id} seed {seed}: {path} {what} with other settings than "
                              f"{plan.experiment.path.name} gives ({differences}); delete it to run the cell "
                              "again, or use another --output-dir"
                              + ("; or put back the file's setting the run was made with to finish it"
                                 if state.state == "interrupted" else ""))


def check_finished(plan: Plan, *, interrupted: bool = True) -> None:
    """Check every finished, diverged and (with ``interrupted``) interrupted run of ``plan`` (each cell's
    :meth:`Plan.seeds_of`) against its cell, so that nothing trains while any run of the table is another cell's.

    Args:
        interrupted: also check the interrupted runs (False for a caller that only reads the finished ones).

    Raises:
        ExperimentError: the first run made with other settings, or with a damaged record.
    """
    for cell in plan.cells:
        if cell.missing:
            continue
        for seed in plan.seeds_of(cell):
            path = run_dir(plan, cell, seed)
            state = run_state(path)
            if state.state in ("done", "diverged") or (interrupted and state.state == "interrupted"):
                _check_not_stale(plan, cell, seed, path, state)


def execute(plan: Plan, *, verbose: bool = True, on_step: Callable[[Any], None] | None = None,
            log: Callable[[str], None] = print) -> None:
    """Train every pending (cell, seed) of the plan, one after another; finished ones are skipped, interrupted
    ones resumed, cells without their method or data reported and left.

    A run that diverges writes ``diverged.json`` beside its last good checkpoint and the table goes on.

    Raises:
        ExperimentError: a finished run directory made with other settings than the file's.
        ConfigError: the output directory cannot hold the runs.
        Anything the training raises other than divergence (e.g. KeyboardInterrupt): the checkpoint is kept.
    """
    from ..engine import distributed as dist_utils

    env = dist_utils.detect()
    check_output(plan, writing=True)
    check_finished(table_plan(plan))  # the whole table, before any training: a refusal costs nothing yet
    work = pending_runs(plan)  # decided once, before any training: every torchrun process agrees
    if not work:
        if env.is_main:
            log(f"{plan.experiment.name}: nothing to train in {plan.scale_dir}: every selected run is finished or "
                "diverged, or its method or data is missing")
        return
    # Under torchrun one process group serves every run (train() joins a group it finds and leaves it open):
    # joining a fresh group for each run would meet the previous group's stale addresses. So the runs share a
    # device setting, the one the group's backend is chosen for.
    devices: dict[str, list[str]] = {}
    for cell, seed, _ in work:
        devices.setdefault(dist_utils.device_kind(run_config(plan, cell, seed).device), []).append(cell.id)
    if env.distributed and len(devices) > 1:
        spread = "; ".join(f"{name}: {', '.join(dict.fromkeys(ids))}" for name, ids in devices.items())
        raise ExperimentError(f"under torchrun every run of one call shares a process group, but the selected "
                              f"cells ask for different devices ({spread}); run them in separate calls with --only")
    first = work[0][0]
    try:
        device = dist_utils.choose_device(run_config(plan, first, work[0][1]).device, env)
    except ConfigError as err:
        raise ExperimentError(f"cell {first.id}: {err.reason}") from None
    owns_group = dist_utils.setup(env, device)
    try:
        _train_each(plan, work, env.is_main, verbose, on_step, log)
        dist_utils.barrier(env)  # every rank sees rank 0's final.json before it reads the table
    finally:
        if owns_group:
            gc.collect()  # free each run's DDP reducer before its group goes (see engine.train)
            dist_utils.teardown(env)


def _train_each(plan: Plan, work: list[tuple[Cell, int, RunState]], main: bool, verbose: bool,
                on_step: Callable[[Any], None] | None, log: Callable[[str], None]) -> None:
    """Train the (cell, seed) pairs of ``work`` one after another (see :func:`execute`)."""
    from ..engine import TrainingDiverged, train
    from ..engine.checkpoint import write_text_atomic

    for i, (cell, seed, state) in enumerate(work, 1):
        config = run_config(plan, cell, seed, resume=state.state == "interrupted",
                            overwrite=state.state == "started", verbose=verbose, progress=verbose)
        if state.unreadable:
            _check_resumable(cell, seed, Path(config.output_dir))
        if main:
            shared = f" (the runs of {cell.runs_id})" if cell.same_as else ""
            log(f"[{i}/{len(work)}] {plan.experiment.name} {cell.id}{shared} seed {seed}: "
                f"{_how_it_starts(state, Path(config.output_dir))} in {config.output_dir}")
        try:
            train(config, on_step=on_step)
        except TrainingDiverged as err:
            if main:
                path = Path(config.output_dir)
                kept = ("the run and its last good checkpoint are kept" if (path / "checkpoint.pt").is_file()
                        else "the run's logs are kept (it diverged before its first checkpoint)")
                message = (f"{err.cause}; {kept} in {path}. To run the cell again, lower its lr in "
                           f"{plan.experiment.path.name} and delete that directory")
                write_text_atomic(path / "diverged.json", json.dumps({"message": message}) + "\n")
                log(f"  {cell.id} seed {seed}: {message}")
        except ConfigError as err:  # e.g. resuming a checkpoint written with other settings
            raise ExperimentError(f"cell {cell.id} seed {seed}: {err.reason}") from None


def _check_resumable(cell: Cell, seed: int, path: Path) -> None:
    """Refuse, with the way on, an interrupted run whose ``checkpoint.pt`` cannot be read and that has no usable
    ``checkpoint.prev.pt`` either (``bioprop reproduce`` has no ``--overwrite``: deleting the run is the way)."""
    from ..engine.checkpoint import CheckpointError, load_run_checkpoint

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a fallback to checkpoint.prev.pt is the engine's to report
            load_run_checkpoint(path)
    except CheckpointError as err:
        raise ExperimentError(f"cell {cell.id} seed {seed}: {' '.join(str(err).split())}; delete {path} to run "
                              "it again from the start") from None


def _how_it_starts(state: RunState, path: Path) -> str:
    """``"starting"``, ``"starting over ..."``, ``"resuming after epoch 3"``, or what a resume with an unreadable
    checkpoint falls back on."""
    if state.state == "started":
        return "starting over (it stopped before its first checkpoint)"
    if state.state != "interrupted":
        return "starting"
    if not state.unreadable:
        return f"resuming after epoch {state.epoch}"
    fallback = ("the engine falls back to checkpoint.prev.pt" if (path / "checkpoint.prev.pt").is_file()
                else "the engine says what is left")
    return f"resuming (its checkpoint.pt cannot be read here; {fallback})"


def pending_runs(plan: Plan) -> list[tuple[Cell, int, RunState]]:
    """The (cell, seed, state) still to train: runnable cells with data, neither finished nor diverged (those are
    checked against their cells by :func:`check_finished`), each run directory once (a cell whose row is
    ``same_as`` another shares that row's runs, so whichever of the two is selected first trains them)."""
    work, taken = [], set()
    for cell in plan.cells:
        if cell.missing or data_missing(cell, plan.data_root):
            continue
        for seed in plan.seeds:
            path = run_dir(plan, cell, seed)
            state = run_state(path)
            if state.state not in ("done", "diverged") and path not in taken:
                taken.add(path)
                work.append((cell, seed, state))
    return work


def print_commands(plan: Plan, program: str = "bioprop") -> list[str]:
    """One ``bioprop train`` command per pending (cell, seed), each with its config written beside its run.

    The config goes to ``<run dir>/train.toml``; an interrupted run's command carries ``--resume``, one stopped
    before its first checkpoint ``--overwrite``. Finished,
    diverged, not implemented and data-less cells get no command. Running the commands in any order, on any
    machines sharing the output directory, then ``bioprop reproduce NAME --collect`` gives the table.
    """
    from ..engine.config import as_toml, load_toml

    check_output(plan, writing=True)
    check_finished(table_plan(plan))
    commands = []
    for cell, seed, state in pending_runs(plan):
        path = run_dir(plan, cell, seed)
        config = run_config(plan, cell, seed, progress=False).to_dict()
        make_output_dir(path)
        toml_path = path / "train.toml"
        toml_path.write_text(as_toml(config))
        if load_toml(toml_path) != config:  # the writer is flat; refuse a config it cannot express
            raise ExperimentError(f"cell {cell.id}: its config cannot be written as a flat TOML file")
        flag = {"interrupted": " --resume", "started": " --overwrite"}.get(state.state, "")
        commands.append(f"{program} train --config {shlex.quote(str(toml_path))}{flag}")
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
