"""The table of a reproduction: ours beside the paper's, claim verdicts, ``results.md`` and ``results.json``.

Everything here reads the run directories only (``final.json``, ``diverged.json``, ``checkpoint.pt``), so
``bioprop reproduce NAME`` and ``bioprop reproduce NAME --collect`` write the same table from the same runs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from ..engine.rundir import make_output_dir
from .runner import Plan, data_missing, finished_value, format_seconds, read_record, run_dir, run_state
from .spec import Claim

__all__ = ["build_table", "verdict", "render_markdown", "write_results", "write_reports", "write_claim_figures",
           "mean_std", "CELL_STATUSES"]

#: what a cell's ``status`` may be in results.json
CELL_STATUSES = ("done", "partial", "diverged", "not run", "method not implemented", "data not present")


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (``ddof = 1``; None with fewer than two values)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _number(value: Any) -> float | None:
    """``value`` when it is a finite number (not a bool), else None."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _count(value: Any) -> int | None:
    """``value`` when it is a non-negative integer (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _seed_result(path: Path, metric: str) -> dict[str, Any]:
    state = run_state(path)
    entry: dict[str, Any] = {"state": state.state}
    if state.state == "done":
        final = read_record(path / "final.json")
        entry.update(test_error=finished_value(final, metric, path), epochs=_count(final.get("epochs")),
                     steps=_count(final.get("steps")), wall_time_s=_number(final.get("wall_time_s")))
    elif state.state == "diverged":
        entry["message"] = str(read_record(path / "diverged.json").get("message", ""))
    elif state.state == "interrupted":
        entry["epochs"] = state.epoch
    return entry


def build_table(plan: Plan) -> dict[str, Any]:
    """The whole table of ``plan`` from its run directories (nothing is trained).

    Returns:
        A JSON-ready dict: the experiment's header, one entry per cell (status, per-seed results, mean, std,
        gap to the published value) and one verdict per claim.
    """
    exp = plan.experiment
    cells = []
    for cell in plan.cells:
        entry: dict[str, Any] = {
            "id": cell.id, "column": cell.column, "row": cell.row, "column_label": cell.column_label,
            "row_label": cell.row_label, "published": cell.published, "published_source": cell.source,
            "published_status": cell.status, "note": cell.note, "seeds": list(plan.seeds_of(cell)),
            "same_as": cell.runs_id if cell.same_as else None,
        }
        missing_data = "" if cell.missing else data_missing(cell, plan.data_root)
        runs = [] if cell.missing else [
            dict(seed=seed, run_dir=str(run_dir(plan, cell, seed).relative_to(plan.scale_dir)),
                 **_seed_result(run_dir(plan, cell, seed), exp.metric)) for seed in plan.seeds_of(cell)]
        if missing_data and all(r["state"] in ("pending", "started") for r in runs):
            runs = []  # runs made elsewhere (a cluster sharing the directory) count even where the data is absent
        errors = [r["test_error"] for r in runs if r["state"] == "done" and r.get("test_error") is not None]
        mean, std = mean_std(errors)
        states = [r["state"] for r in runs]
        if cell.missing:
            status, reason = "method not implemented", cell.missing
        elif missing_data and not runs:
            status, reason = "data not present", missing_data
        elif "diverged" in states:
            status = "diverged"
            reason = "; ".join(f"seed {r['seed']}: {r['message']}" for r in runs if r["state"] == "diverged")
        elif states and all(s == "done" for s in states):
            unevaluated = [str(r["seed"]) for r in runs if r.get("test_error") is None]
            status, reason = ("partial", f"seed {', '.join(unevaluated)}: finished without a test value (never "
                                         "evaluated; delete its run directory to run it again)"
                              ) if unevaluated else ("done", "")
        elif "done" in states:
            status, reason = "partial", f"{states.count('done')} of {len(states)} seeds finished"
            if missing_data:
                reason += f"; the others cannot run here: data not present: {missing_data}"
        else:
            status, reason = "not run", ""
        done = [r for r in runs if r["state"] == "done"]
        wall = [r["wall_time_s"] for r in done if r.get("wall_time_s") is not None]
        entry.update(status=status, reason=reason, runs=runs, seeds_done=len(errors), mean=mean, std=std,
                     gap=None if mean is None or cell.published is None else mean - cell.published,
                     epochs=max((r["epochs"] for r in done if r.get("epochs") is not None), default=None),
                     steps=max((r["steps"] for r in done if r.get("steps") is not None), default=None),
                     wall_time_s=sum(wall) if wall else None)
        cells.append(entry)
    by_id = {c["id"]: c for c in cells}
    claims = [dict(id=c.id, text=c.text, kind=c.kind, cells=list(c.cells), **verdict(c, by_id))
              for c in exp.claims]
    return {"experiment": exp.name, "title": exp.title, "paper": exp.paper, "metric": exp.metric,
            "source": exp.source, "notes": exp.notes, "scale": plan.scale,
            "seeds": sorted({seed for cell in plan.cells for seed in plan.seeds_of(cell)}),
            "cells": cells, "claims": claims}


def verdict(claim: Claim, cells: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"verdict": "holds" | "does not hold" | "not testable here", "reason": ...}`` for one claim.

    Args:
        claim: the claim.
        cells: cell id -> table entry with ``status`` and ``mean`` (only cells with every seed finished,
            status ``"done"``, count).
    """
    means = []
    for ident in claim.cells:
        entry = cells.get(ident)
        if entry is None or entry.get("status") != "done" or entry.get("mean") is None:
            status = "not selected" if entry is None else entry.get("status")
            return {"verdict": "not testable here", "reason": f"{ident} is {status}"}
        means.append(float(entry["mean"]))
    shown = ", ".join(f"{i} {m:.2f}" for i, m in zip(claim.cells, means))
    if claim.kind == "order":
        ok = all(a + claim.margin <= b for a, b in zip(means, means[1:]))
        detail = f"{shown} (each + {claim.margin:g} <= the next)"
    elif claim.kind == "within":
        ok = abs(means[0] - means[1]) <= claim.tolerance
        detail = (f"{shown}: difference {abs(means[0] - means[1]):.2f} (tolerance {claim.tolerance:g})")
    elif claim.kind == "best_of":
        best = min(range(len(means) - 1), key=means.__getitem__)
        ok = means[best] + claim.margin <= means[-1]
        detail = f"{shown} (the best of the first, {claim.cells[best]}, + {claim.margin:g} <= the last)"
    else:
        ok = means[0] <= claim.threshold
        detail = f"{shown} (threshold {claim.threshold:g})"
    return {"verdict": "holds" if ok else "does not hold", "reason": detail}


def _value(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def render_markdown(table: dict[str, Any], reports: dict[str, str] | None = None) -> str:
    """``results.md``: the header, the cells beside the published values, the claims, the notes."""
    seeds = table["seeds"]
    metric = {"best_test_error": "top-1 test error in % at the best epoch (at the best validation epoch where a "
                                  "cell holds out a validation split; lower is better)",
              "ap": "COCO box AP in % after the last epoch (higher is better)"}.get(
        table["metric"], "top-1 test error in % after the last epoch (at the best validation epoch where a cell "
                         "holds out a validation split; lower is better)")
    lines = [f"# {table['title']} ({table['scale']} scale)", "",
             f"Paper: {table['paper']}. Metric: {metric}; ours is the mean ± "
             f"sample std over seeds {', '.join(map(str, seeds))}; gap = ours − published. Published values "
             f"from {table['source'] or 'the sources given per cell'}; (recalled) marks a value not checked "
             "against its source.", ""]
    if table["notes"]:
        lines += [table["notes"].strip(), ""]
    lines += ["| column | row | ours | published | gap | seeds | epochs | steps | wall time | status |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for c in table["cells"]:
        published = "-" if c["published"] is None else f"{c['published']:g}"
        if c["published"] is not None and c["published_status"] == "recalled":
            published += " (recalled)"
        gap = "-" if c["gap"] is None else f"{c['gap']:+.2f}"
        seeds = f"{c['seeds_done']}/{len(c['seeds'])}" if c["seeds"] else "-"  # "-": none asked, none on disk
        status = c["status"] + (f": {c['reason']}" if c["reason"] else "")
        if c.get("same_as"):
            status += f" (the runs of {c['same_as']})"
        lines.append(f"| {c['column_label']} | {c['row_label']} | {_value(c['mean'], c['std'])} | {published} | "
                     f"{gap} | {seeds} | {c['epochs'] or '-'} | {c['steps'] or '-'} | "
                     f"{format_seconds(c['wall_time_s'])} | {status.replace('|', '/')} |")
        if c["note"]:
            notes.append(f"- {c['id']}: {c['note']}")
        if c["published"] is not None and c["published_source"] != table["source"]:
            notes.append(f"- {c['id']}: published value from {c['published_source']}")
    if table["claims"]:
        lines += ["", "## Claims", "", "| claim | verdict | evidence |", "|---|---|---|"]
        for claim in table["claims"]:
            lines.append(f"| {claim['text']} (`{claim['id']}`) | {claim['verdict']} | {claim['reason']} |")
    if notes:
        lines += ["", "## Notes", ""] + notes
    if reports:
        lines += ["", "## Analysis reports", ""]
        lines += [f"- {label}: [{path}]({path})" for label, path in reports.items()]
    return "\n".join(lines) + "\n"


def write_results(table: dict[str, Any], folder: Path, reports: dict[str, str] | None = None) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``folder``, each atomically (a kill leaves the old file or
    the new one); returns both paths.

    Raises:
        CheckpointError: a file cannot be written (one line: what is in the way, what was kept).
    """
    from ..engine.checkpoint import write_text_atomic

    make_output_dir(folder)
    json_path, md_path = folder / "results.json", folder / "results.md"
    write_text_atomic(json_path, json.dumps(table, indent=2) + "\n")
    write_text_atomic(md_path, render_markdown(table, reports))
    return md_path, json_path


def claim_points(claim: dict[str, Any], cells: dict[str, dict[str, Any]]
                 ) -> list[tuple[str, float, float, str]] | None:
    """What the figure of an ``order`` claim draws: per cell in the claim's order ``(row label, mean, std, mark)``.

    ``mean`` is NaN for a cell without one to show (diverged, not run, ...), and ``mark`` then names its status;
    a cell with only some seeds finished has its mean and ``mark`` ``"k/n seeds"``; a finished cell has ``""``.
    None where no figure is drawn: not an ``order`` claim, fewer than three cells, a cell not in the table, or
    fewer than two cells with a mean.
    """
    entries = [cells.get(ident) for ident in claim["cells"]]
    if claim["kind"] != "order" or len(entries) < 3 or any(e is None for e in entries):
        return None
    points = []
    for e in entries:
        assert e is not None
        if e["mean"] is None or e["status"] not in ("done", "partial"):
            points.append((e["row_label"], math.nan, 0.0, e["status"]))
        else:
            mark = f"{e['seeds_done']}/{len(e['seeds'])} seeds" if e["status"] == "partial" else ""
            points.append((e["row_label"], float(e["mean"]), float(e["std"] or 0.0), mark))
    return points if sum(not math.isnan(p[1]) for p in points) >= 2 else None


def write_claim_figures(table: dict[str, Any], folder: Path) -> dict[str, str]:
    """One figure per ``order`` claim over three or more cells of which at least two have a mean: each cell's
    mean (± std over seeds) in the claim's order, e.g. liao2016's test error against the fraction of concordant
    signs. A cell with some seeds finished is drawn hollow; one without a mean (diverged, not run, ...) is marked
    with a cross at the top of the axes and its status, so one failed cell does not hide the rest. The figure an
    earlier call drew of a claim that now gets none is removed; other files in ``figures/`` are left alone.

    Returns:
        claim id -> figure path relative to ``folder`` (``figures/<claim id>.png``).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {c["id"]: c for c in table["cells"]}
    unit = "box AP (%)" if table["metric"] == "ap" else "test error (%)"
    figures = {}
    for claim in table["claims"]:
        points = claim_points(claim, cells)
        if points is None:  # an earlier call's figure of this claim would show cells it no longer has
            (folder / claim_figure_path(claim["id"])).unlink(missing_ok=True)
            continue
        means = [m for _, m, _, _ in points]
        xs = range(len(points))
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(points), 3.2))
        ax.errorbar(xs, means, yerr=[s for _, _, s, _ in points], marker="o", capsize=3, color="C0")
        for x, (_, mean, _, mark) in zip(xs, points):
            if not math.isnan(mean) and mark:  # some seeds finished
                ax.plot([x], [mean], marker="o", markersize=9, markerfacecolor="white", color="C0", zorder=3)
                ax.annotate(mark, (x, mean), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=6)
            elif math.isnan(mean):
                ax.plot([x], [0.93], marker="x", color="C3", transform=ax.get_xaxis_transform(), clip_on=False)
                ax.annotate(mark, (x, 0.85), xycoords=ax.get_xaxis_transform(), ha="center", fontsize=6,
                            color="C3")
        ax.set_xticks(list(xs), [label for label, _, _, _ in points], rotation=30, ha="right", fontsize=7)
        ax.set_xlim(-0.5, len(points) - 0.5)
        ax.set_ylabel(unit)
        ax.set_title(f"{claim['id']}: {claim['verdict']}", fontsize=8)
        fig.tight_layout()
        path = folder / claim_figure_path(claim["id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures[claim["id"]] = str(path.relative_to(folder))
    return figures


def write_reports(plan: Plan, table: dict[str, Any]) -> dict[str, str]:
    """One ``bioprop report`` per column over the first finished seed of each row (the figures compare the rows,
    each named by its row label; a row same_as another is left out, its runs being that row's), written to
    ``<scale dir>/report/<column>/report.html``, and the claim figures (:func:`write_claim_figures`). The report
    an earlier call wrote of a column that now has no finished run is removed (:func:`bioprop.report.remove_report`).

    Returns:
        column label -> report path relative to the scale directory, for the columns with a finished run.
    """
    from ..report import remove_report, write_report

    reports = {f"claim {ident}": path for ident, path in write_claim_figures(table, plan.scale_dir).items()}
    columns = _report_columns(table)
    for column, (label, runs) in columns.items():
        path = write_report([plan.scale_dir / run for run, _ in runs], plan.scale_dir / report_path(column).parent,
                            title=f"{table['title']}: {label} ({table['scale']} scale)",
                            labels=[row_label for _, row_label in runs])
        reports[label] = str(path.relative_to(plan.scale_dir))
    for column in {c["column"] for c in table["cells"]} - columns.keys():  # an earlier call's report of runs gone
        remove_report(plan.scale_dir / report_path(column).parent)
    return reports


def _report_columns(table: dict[str, Any]) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """column id -> (column label, [(run directory relative to the scale directory, row label)]): the first
    finished seed of each row with one, leaving out rows same_as another (that row's runs are already there)."""
    columns: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    for c in table["cells"]:
        finished = [r for r in c["runs"] if r["state"] == "done"]
        if finished and not c.get("same_as"):
            columns.setdefault(c["column"], (c["column_label"], []))[1].append((finished[0]["run_dir"],
                                                                               c["row_label"]))
    return columns


def report_path(column: str) -> Path:
    """Where a column's analysis report goes, relative to the scale directory."""
    return Path("report") / column / "report.html"


def claim_figure_path(claim_id: str) -> Path:
    """Where a claim's figure goes, relative to the scale directory (:func:`write_claim_figures`)."""
    return Path("figures") / f"{claim_id}.png"


def existing_reports(plan: Plan, table: dict[str, Any]) -> dict[str, str]:
    """The claim figures and column reports that :func:`write_reports` would draw for ``table`` and an earlier
    call left in the scale directory, for ``results.md`` of a call that does not draw them (``--no-report``):
    links that stay, each marked as not redrawn.

    Returns:
        label -> path relative to the scale directory, in the order :func:`write_reports` gives.
    """
    cells = {c["id"]: c for c in table["cells"]}
    candidates = {f"claim {c['id']}": claim_figure_path(c["id"]) for c in table["claims"]
                  if claim_points(c, cells) is not None}
    candidates.update({label: report_path(column) for column, (label, _) in _report_columns(table).items()})
    return {f"{label} (from an earlier call, not redrawn)": str(path) for label, path in candidates.items()
            if (plan.scale_dir / path).is_file()}
