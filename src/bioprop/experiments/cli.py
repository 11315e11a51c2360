"""``bioprop reproduce``: the command behind the parser entry in :mod:`bioprop.cli`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..engine.config import TrainConfig
from .runner import (MAX_SEEDS, Plan, RunState, check_output, data_missing, holds_runs, make_plan, print_commands,
                     run_dir, run_state, stale_reason, steps_per_cell, table_plan, unclaimed_line)
from .spec import SCALES, Cell, ExperimentError, load_experiment

__all__ = ["add_parser", "run_command", "describe", "list_lines"]


def _seed_count(text: str) -> int:
    """``--seeds``: a whole number (its range is checked with the plan)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; allowed: 1..{MAX_SEEDS}") from None


def add_parser(sub: Any) -> None:
    """Add the ``reproduce`` sub-command to the ``bioprop`` parser's sub-parsers."""
    p = sub.add_parser("reproduce", help="re-run a paper's table and write it beside the published numbers",
                       description="Run every cell of an experiment file (see 'bioprop list experiments'), one "
                                   "run directory per cell and seed, resumable; then write results.md, "
                                   "results.json and the analysis reports into OUTPUT_DIR/SCALE.")
    p.add_argument("name", metavar="NAME", help="experiment name or path to an experiment .toml file")
    p.add_argument("--scale", choices=SCALES, default="quick",
                   help="quick (fewer epochs, sized for a CPU), full (the paper's schedule) or smoke (a few "
                        "steps); default quick")
    p.add_argument("--seeds", type=_seed_count, default=None,
                   help="seeds per cell, 0..N-1; default 1 (with --collect: each cell's seeds on disk)")
    p.add_argument("--only", metavar="PATTERN", default=None,
                   help="comma-separated patterns on cell ids COLUMN/ROW, e.g. 'mnist/*' or '*/bp,*/fa'")
    p.add_argument("--output-dir", default=None, help="default results/NAME; runs go to "
                                                       "OUTPUT_DIR/SCALE/COLUMN/ROW/sSEED")
    p.add_argument("--data-root", default=None, help="data root (default $BIOPROP_DATA or ~/.cache/bioprop)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="show the cells, the config of each and the steps "
                                                          "per cell, then exit")
    mode.add_argument("--dry-run", action="store_true", help="show what a run would do with each cell and seed "
                                                             "in OUTPUT_DIR (skip, resume, start), then exit")
    mode.add_argument("--print-commands", action="store_true",
                      help="print one 'bioprop train' command per pending cell and seed (for a job array), "
                           "writing each run's train.toml; then exit")
    mode.add_argument("--collect", action="store_true", help="build the table from the run directories that "
                                                             "exist, without training")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="do not draw the analysis reports or claim figures (results.md and results.json "
                        "only; results.md keeps links to those an earlier call drew)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no per-epoch lines or progress bars from the runs")


def run_command(args: argparse.Namespace) -> int:
    """Run ``bioprop reproduce`` with parsed arguments; returns the exit code."""
    from . import collect, reproduce

    experiment = load_experiment(args.name)
    seeds = 1 if args.seeds is None else args.seeds
    plan = make_plan(experiment, args.scale, seeds, args.only, args.output_dir, args.data_root)
    check_output(plan, writing=not (args.list or args.dry_run))
    if args.list or args.dry_run:
        print("\n".join(describe(plan, dry_run=args.dry_run)))
        return 0
    if args.print_commands:
        for line in print_commands(plan):
            print(line)
        return 0
    if args.collect:
        if not holds_runs(plan.scale_dir):
            raise ExperimentError(f"nothing to collect: {plan.scale_dir} holds no run directory; run 'bioprop "
                                  f"reproduce {experiment.name} --scale {args.scale}' first, or pass the "
                                  "--output-dir the runs went to")
        table = collect(experiment.path, seeds=args.seeds, plan=plan, report=args.report)
    else:
        table = reproduce(experiment.path, args.scale, seeds, args.only, args.output_dir, args.data_root,
                          report=args.report, verbose=args.progress)
    from ..engine.distributed import detect
    if detect().is_main:
        counts: dict[str, int] = {}
        for cell in table["cells"]:
            counts[cell["status"]] = counts.get(cell["status"], 0) + 1
        summary = ", ".join(f"{n} {status}" for status, n in counts.items())
        print(f"{experiment.name} ({args.scale}): {summary}; table in {plan.scale_dir / 'results.md'}")
        note = unclaimed_line(plan)
        if note:
            print(note)
    return 0


def _config_line(values: dict[str, Any]) -> str:
    """The cell's merged config as the file gives it (every other key keeps its TrainConfig default)."""
    return " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in values.items())


def list_lines() -> list[str]:
    """``bioprop list experiments``: one line per shipped file, name, paper and title."""
    from .spec import list_experiments
    lines = []
    for name in list_experiments():
        exp = load_experiment(name)
        lines.append(f"{name:<16} {exp.paper:<14} {len(exp.cell_ids()):>3} cells  {exp.title}")
    return lines


def _action(plan: Plan, cell: Cell, seed: int, path: Path, state: RunState) -> str:
    """What a run would do with one (cell, seed): skip, resume, start, or refuse a stale or damaged run, or a run
    directory that cannot be one (the engine's own check, in its words)."""
    from ..engine.config import ConfigError
    from ..engine.rundir import check_output_dir
    try:
        check_output_dir(path, writable=False)  # a file in the way, not permissions: --dry-run only reads
    except ConfigError as err:
        return f"refuse ({err.reason})"
    if state.state == "pending":
        return "start"
    if state.state == "started":
        return "start over (stopped before its first checkpoint)"
    try:
        differences = stale_reason(plan, cell, seed, path, state)
    except ExperimentError as err:
        return f"refuse ({err})"
    if differences:
        return f"refuse (made with other settings: {differences})"
    if state.state in ("done", "diverged"):
        return "skip (finished)" if state.state == "done" else "skip (diverged)"
    return (f"resume (checkpoint unreadable: {state.unreadable})" if state.unreadable
            else f"resume after epoch {state.epoch}")


def _others_refused(plan: Plan) -> list[str]:
    """Lines for the runs of the table's cells outside ``--only`` that a run would refuse (it checks the whole
    table before training)."""
    selected = {cell.runs_id for cell in plan.cells}  # by runs: same_as rows share them
    whole = table_plan(plan)
    lines, seen = [], set()
    for cell in whole.cells:
        if cell.runs_id in selected or cell.missing:
            continue
        for seed in whole.seeds_of(cell):
            path = run_dir(whole, cell, seed)
            if path in seen:
                continue
            seen.add(path)
            state = run_state(path)
            action = _action(whole, cell, seed, path, state)
            if action.startswith("refuse"):
                lines.append(f"{cell.id} s{seed} (outside --only, in the table): {action} -> {path}")
    return lines


def describe(plan: Plan, dry_run: bool = False) -> list[str]:
    """The lines of ``--list`` (cells, config, steps per cell) or ``--dry-run`` (plus each seed's next action)."""
    exp = plan.experiment
    seeds = f"seeds 0..{plan.seeds[-1]}" if len(plan.seeds) > 1 else "seed 0"
    lines = [f"{exp.name}: {exp.title} ({exp.paper}); scale {plan.scale}, {seeds}, {len(plan.cells)} cells"]
    total, counted = 0, {}  # counted: run directory -> the cell that showed it first
    for cell in plan.cells:
        steps = steps_per_cell(cell)
        published = "-" if cell.published is None else f"{cell.published:g}"
        if cell.missing:
            status = f"method not implemented: {cell.missing}"
        else:
            missing = data_missing(cell, plan.data_root)
            status = f"data not present: {missing}" if missing else "ready"
        if cell.same_as:
            status += f" (the runs of {cell.runs_id})"
        lines.append(f"{cell.id:<28} published {published:<7} steps/seed {steps if steps is not None else '?':<9} "
                     f"{status}")
        lines.append(f"    {_config_line(cell.values)}")
        if not status.startswith("ready"):
            continue
        for seed in plan.seeds:
            path = run_dir(plan, cell, seed)
            state = run_state(path)
            remaining = steps  # --list counts every run; --dry-run what is left of each
            if dry_run and state.state == "interrupted" and steps is not None:
                epochs = int(cell.values.get("epochs", TrainConfig.epochs))
                remaining = steps - steps * state.epoch // max(epochs, 1)
            elif dry_run and state.state in ("done", "diverged"):
                remaining = 0
            shared = counted.get(path)  # a row same_as another shares its runs: count and act on them once
            if shared is None:
                counted[path] = cell.id
                total += remaining or 0
            if dry_run:
                action = f"shared with {shared}" if shared else _action(plan, cell, seed, path, state)
                lines.append(f"    s{seed}: {action} -> {path}")
    if dry_run:
        lines += _others_refused(plan)
        note = unclaimed_line(plan)
        lines += [note] if note else []
    what = "steps left to run" if dry_run else "steps in all (runnable cells, every seed, nothing done yet counted)"
    lines.append(f"{total} {what}; results in {plan.scale_dir}")
    return lines
