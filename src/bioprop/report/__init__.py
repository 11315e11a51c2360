"""The report: figures and a results table comparing training runs, as one self-contained HTML file.

``write_report([run_dir, ...], out_dir)`` reads what the training engine wrote in each run directory
(``config.json``, ``metrics.jsonl``, ``final.json``) and draws:

- learning curves (test error and training loss per epoch);
- the per-layer angle between W and B over training (xiao2018 Fig. 3a);
- the kurtosis of W over training (xiao2018 Fig. 3b);
- the distribution of |W| at the end of training, sign symmetry against backprop (xiao2018 Fig. 3c);
- the angle between each rule's weight update and the backprop gradient (lillicrap2016);
- Lillicrap's condition at the topmost feedback layer, and the DFA signal angle at each marker;
- optionally, a t-SNE of the last hidden layer of a 3x400 tanh net trained with BP and with DFA
  (nokland2016 Fig. 3);
- a results table.

Each figure is also saved as a PNG next to ``report.html``. A figure without data is replaced by a note that
says what is missing. The metric definitions are in ``docs/analysis.md``.
"""
from __future__ import annotations

import base64
import html
import io
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..engine.checkpoint import RunWarning
from ..engine.rundir import check_output_dir, make_output_dir
from .figures import learning_curves, lillicrap, per_layer, pyplot, results_table, weight_magnitudes
from .runs import RunData, label_runs, load_run
from .tsne import TsneFeatures, hidden_features, train_tsne_features, tsne_figure

__all__ = ["RunData", "load_run", "write_report", "remove_report", "TsneFeatures", "train_tsne_features",
           "hidden_features", "tsne_figure", "FIGURE_IDS"]

#: id of every figure of the report, in order (each is a ``<figure id="fig-...">`` and a ``fig-....png``)
FIGURE_IDS = ("learning-curves", "alignment", "kurtosis", "weight-magnitudes", "grad-agreement", "lillicrap",
              "dfa-signal", "tsne")


_CAPTIONS = {
    "learning-curves": "Top-1 test error and training loss at the end of each epoch.",
    "alignment": "Angle between each layer's forward weight W and the feedback weight B it uses, over training. "
                 "For layers with exact backprop the angle between W and sign(W) is shown (xiao2018 Fig. 3a). "
                 "90° means unrelated.",
    "kurtosis": "Kurtosis of each layer's weights over training (Pearson's definition; 3 for a Gaussian; "
                "xiao2018 Fig. 3b).",
    "weight-magnitudes": "Distribution of |W| per layer at the last analysis step, one line per run "
                         "(xiao2018 Fig. 3c compares sign symmetry with backprop).",
    "grad-agreement": "Angle between the weight gradient each rule computes and the true backprop gradient on "
                      "the same batch (lillicrap2016). Below 90° the rule's update still descends the loss.",
    "lillicrap": "Share of samples with eᵀ W Bᵀ e > 0 at the topmost layer whose feedback differs from W: there "
                 "the rule's signal to the layer below is within 90° of backprop's (lillicrap2016).",
    "dfa-signal": "Angle between the error DFA/IFA delivers to each hidden block and the backprop error at the "
                  "same place, over training.",
    "tsne": "t-SNE of the last hidden layer on held-out data for nets trained with each rule (nokland2016 Fig. 3).",
}

_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3}figure{margin:2em 0}figure img{max-width:100%}figcaption{color:#555;font-size:.9em}
.note{background:#fff6e0;border-left:4px solid #e0a800;padding:.5em 1em}"""


def _png(fig: Any) -> bytes:
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_report(run_dirs: Iterable[str | Path], out_dir: str | Path, *,
                 tsne: bool | Mapping[str, TsneFeatures] = False, tsne_dataset: str = "digits",
                 tsne_rules: Sequence[str] = ("backprop", "dfa"), title: str = "bioprop report",
                 labels: Sequence[str] | None = None) -> Path:
    """Write ``report.html`` (figures embedded as base64 PNG) and one PNG per figure into ``out_dir``.

    Args:
        run_dirs: run directories written by the training engine.
        out_dir: where the report goes (created if needed).
        tsne: False for no t-SNE figure; True to train small 3x400 tanh nets with ``tsne_rules`` on
            ``tsne_dataset`` for it (a few seconds on ``"digits"``); or ``{rule: TsneFeatures}`` to plot given
            features.
        tsne_dataset: data set of the t-SNE nets.
        tsne_rules: rules of the t-SNE nets.
        title: the page title.
        labels: one name per run for the figures (default: the rule, plus the settings that differ between the
            runs of that rule); names that repeat get the end of their run directory added.

    Returns:
        The path of ``report.html``.

    Raises:
        ValueError: if no run directory is given, or one does not exist or is not a run directory, or ``labels``
            does not give one label per run.
        ConfigError: ``out_dir`` cannot be a directory here (a file in the way, no permission).
    """
    runs = [load_run(path) for path in run_dirs]
    if not runs:
        raise ValueError("write_report needs at least one run directory")
    label_runs(runs, labels)
    for run in runs:  # the page notes them too; a warning reaches the user of any caller, reproduce included
        for note in run.damage():
            warnings.warn(f"{run.path}: {note}; its figures may miss records", RunWarning, stacklevel=2)
    out = Path(out_dir)
    check_output_dir(out)  # one line naming what is in the way, not an OSError
    make_output_dir(out)
    plt = pyplot()
    palette = plt.get_cmap("tab10")
    colors = {run.label: palette(i % 10) for i, run in enumerate(runs)}

    no_analysis = "no run has analysis records (train with metrics_every > 0)"
    figures: dict[str, tuple[Any, str]] = {
        "learning-curves": learning_curves(runs, colors),
        "alignment": per_layer(runs, "alignment", title="Angle between W and B (xiao2018 Fig. 3a)",
                               ylabel="angle (degrees)", missing=no_analysis, reference=(90.0, "90°"),
                               ylim=(0.0, 95.0)),
        "kurtosis": per_layer(runs, "kurtosis", title="Kurtosis of W (xiao2018 Fig. 3b)", ylabel="kurtosis",
                              missing=no_analysis, reference=(3.0, "Gaussian (3)")),
        "weight-magnitudes": weight_magnitudes(runs, colors),
        "grad-agreement": per_layer(runs, "grad_angle", title="Angle between the rule's update and the backprop "
                                    "gradient", ylabel="angle (degrees)", reference=(90.0, "90°"),
                                    missing=no_analysis + " with gradient metrics", ylim=(0.0, 95.0)),
        "lillicrap": lillicrap(runs, colors),
        "dfa-signal": per_layer(runs, "dfa_signal_angle", title="Angle between the DFA signal and the backprop "
                                "error at each block", ylabel="angle (degrees)", reference=(90.0, "90°"),
                                missing="no run uses direct feedback (dfa, ifa) with analysis records",
                                ylim=(0.0, 95.0)),
    }
    tsne_seconds = 0.0
    if tsne is False:
        figures["tsne"] = (None, "not requested (pass tsne=True to bioprop.report.write_report)")
    else:
        start = time.perf_counter()
        try:
            fig = (tsne_figure(dataset=tsne_dataset, rules=tuple(tsne_rules)) if tsne is True
                   else tsne_figure(tsne))
            figures["tsne"] = (fig, "")
        except (ImportError, ValueError, RuntimeError, OSError) as exc:  # missing data set, rule or package
            figures["tsne"] = (None, f"the t-SNE figure could not be made: {exc}")
        tsne_seconds = time.perf_counter() - start

    sections = []
    for fig_id in FIGURE_IDS:
        fig, note = figures[fig_id]
        caption = html.escape(_CAPTIONS[fig_id])
        if fig_id == "tsne" and fig is not None:
            caption += f" ({tsne_seconds:.0f} s to train and embed.)"
        if fig is None:
            (out / f"fig-{fig_id}.png").unlink(missing_ok=True)  # no stale figure from an earlier report
            body = f'<p class="note">No figure: {html.escape(note)}.</p>'
        else:
            png = _png(fig)
            (out / f"fig-{fig_id}.png").write_bytes(png)
            encoded = base64.b64encode(png).decode("ascii")
            body = f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(fig_id)}">'
        sections.append(f'<figure id="fig-{fig_id}">{body}<figcaption>{caption}</figcaption></figure>')

    notes = [f"{run.label}: {note}" for run in runs for note in run.notes]
    notes_html = ("<h2>Notes on the data</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes)
                  + "</ul>") if notes else ""
    sources = "".join(f"<li>{html.escape(run.label)}: <code>{html.escape(str(run.path))}</code></li>" for run in runs)
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>Generated {time.strftime('%Y-%m-%d %H:%M')} from {len(runs)} run(s):</p><ul>{sources}</ul>"
            f"<h2>Results</h2>{results_table(runs)}"
            "<p>Errors are top-1 test errors in %. The mean alignment averages the final angle between W and B "
            "over layers (W versus sign(W) for exact layers). The analysis time is the share of training time "
            "spent computing the logged metrics.</p>"
            f"<h2>Figures</h2>{''.join(sections)}{notes_html}</body></html>")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def remove_report(out_dir: str | Path) -> bool:
    """Remove what :func:`write_report` writes into ``out_dir`` (``report.html`` and the ``fig-<id>.png`` of
    :data:`FIGURE_IDS`), and the folder itself once nothing else is in it; other files are left alone.

    Returns:
        True if a ``report.html`` was there.
    """
    out = Path(out_dir)
    page = out / "report.html"
    found = page.is_file()
    page.unlink(missing_ok=True)
    for fig_id in FIGURE_IDS:
        (out / f"fig-{fig_id}.png").unlink(missing_ok=True)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    return found
