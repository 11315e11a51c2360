"""Paper tables as experiment files, and the machinery that re-runs them (``bioprop reproduce``).

Examples::

    >>> from bioprop.experiments import list_experiments, load_experiment
    >>> "biotorch" in list_experiments()
    True
    >>> cell = load_experiment("biotorch").cells("quick")[0]
    >>> cell.id, cell.values["dataset"], cell.values["model"]
    ('mnist/bp', 'mnist', 'lenet')
    >>> table = reproduce("akrout2019", scale="quick", seeds=3, only="mnist/*")  # doctest: +SKIP

The file schema, the scales and how to read the output are in ``docs/reproduce.md``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .results import (CELL_STATUSES, build_table, existing_reports, mean_std, render_markdown, verdict, write_reports,
                      write_results)
from .runner import Plan, check_finished, check_output, execute, make_plan, print_commands, run_config, run_dir, run_state, steps_per_cell, \
    table_plan
from .spec import (SCALES, Cell, Claim, Experiment, ExperimentError, list_experiments, load_experiment, merge,
                   resolve_config)

__all__ = ["list_experiments", "load_experiment", "reproduce", "collect", "make_plan", "execute", "build_table",
           "print_commands", "table_plan", "verdict", "mean_std", "render_markdown", "write_results", "write_reports", "run_dir",
           "run_config", "run_state", "steps_per_cell", "Plan", "Experiment", "Cell", "Claim", "ExperimentError",
           "SCALES", "CELL_STATUSES", "merge", "resolve_config"]


def collect(name: str | Path, scale: str = "quick", seeds: int | None = None, only: str | None = None,
            output_dir: str | Path | None = None, data_root: str | None = None, *, report: bool = True,
            plan: Plan | None = None) -> dict[str, Any]:
    """Build the table from the run directories that exist (nothing is trained) and write ``results.md``,
    ``results.json`` and, with ``report``, one analysis report per column, into ``<output-dir>/<scale>``.
    Without ``report``, ``results.md`` still links the figures and reports an earlier call drew, marked as such.

    The table holds every cell of the experiment (:func:`~bioprop.experiments.runner.table_plan`). With
    ``seeds = None`` every cell shows the seeds it has on disk, so cells run with different seed counts each
    keep theirs (``only`` is then moot). With a number, the cells ``only`` selects (or ``plan``'s cells) have
    seeds ``0 .. seeds-1``, a seed not run counting against the cell (status ``partial``), and every other
    cell shows the seeds it has on disk.

    Returns:
        The table (what ``results.json`` holds).

    Raises:
        ExperimentError: a finished run made with other settings than the file gives its cell, or with a
            damaged record (:func:`~bioprop.experiments.runner.check_finished`).
    """
    plan = plan or make_plan(load_experiment(name), scale, 1 if seeds is None else seeds, only, output_dir,
                             data_root)
    plan = table_plan(plan, seeds_on_disk=seeds is None)
    check_output(plan, writing=True)
    check_finished(plan, interrupted=False)  # the table reads finished runs only
    from ..engine.distributed import detect
    table = build_table(plan)
    if detect().is_main:  # under torchrun only rank 0 writes
        reports = write_reports(plan, table) if report else existing_reports(plan, table)
        write_results(table, plan.scale_dir, reports)
    return table


def reproduce(name: str | Path, scale: str = "quick", seeds: int = 1, only: str | None = None,
              output_dir: str | Path | None = None, data_root: str | None = None, *, report: bool = True,
              verbose: bool = True, on_step: Callable[[Any], None] | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every pending cell of a table (seeds ``0 .. seeds-1``), then write the table as :func:`collect` does.

    Resumable: finished runs are skipped, interrupted ones continue from their checkpoint, so re-running the
    same call after a kill finishes the table with the numbers an uninterrupted call gives.

    Args:
        name: a name from :func:`list_experiments` or a path to an experiment file.
        scale: ``"quick"``, ``"full"`` or ``"smoke"``.
        seeds: the number of seeds per cell.
        only: comma-separated patterns on cell ids ``"<column>/<row>"``, e.g. ``"mnist/*"``.
        output_dir: default ``results/<name>``; runs go to ``<output_dir>/<scale>/<column>/<row>/s<seed>``.
        data_root: where the data sets live (default ``$BIOPROP_DATA`` or ``~/.cache/bioprop``).
        report: also write the analysis reports.
        verbose: per-epoch lines and progress bars of each run.
        on_step: passed to :func:`bioprop.engine.train` for every run.
        log: where the one line per run goes.

    Returns:
        The table (what ``results.json`` holds).
    """
    plan = make_plan(load_experiment(name), scale, seeds, only, output_dir, data_root)
    execute(plan, verbose=verbose, on_step=on_step, log=log)
    return collect(name, seeds=seeds, plan=plan, report=report)
