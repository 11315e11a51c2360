"""The report's figures: learning curves and the per-layer analysis metrics over training.

Each function returns ``(figure, "")``, or ``(None, note)`` saying what data is missing.
"""
from __future__ import annotations

import html
import math
from typing import Any

import numpy as np

from .runs import RunData, analysis_series

__all__ = ["pyplot", "grid", "learning_curves", "per_layer", "weight_magnitudes", "lillicrap", "results_table"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: the package itself never needs it)."""
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def grid(plt: Any, n: int, width: float = 4.4, height: float = 3.3, max_cols: int = 3) -> tuple[Any, list]:
    """A figure with ``n`` panels of ``width`` × ``height`` inches, at most ``max_cols`` per row."""
    cols = min(max_cols, n)
    rows = math.ceil(n / cols)
    # at least 7.5 in wide, so that a one-panel figure still has room for its title
    fig, axes = plt.subplots(rows, cols, figsize=(max(7.5, width * cols + 0.6), height * rows + 0.7), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def learning_curves(runs: list[RunData], colors: dict[str, Any]) -> tuple[Any, str]:
    """Test error (%) and training loss per epoch, one line per run."""
    plt = pyplot()
    curves = [(run, run.epoch_records()) for run in runs]
    if not any(records for _, records in curves):
        return None, "no run has end-of-epoch records in its metrics.jsonl"
    fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(11, 3.8))
    for run, records in curves:
        err = [(r["epoch"], r["test_error"]) for r in records if isinstance(r.get("test_error"), (int, float))]
        loss = [(r["epoch"], r["train_loss"]) for r in records if isinstance(r.get("train_loss"), (int, float))]
        style = dict(color=colors[run.label], label=run.label, marker="o" if len(records) <= 15 else None, ms=3)
        if err:
            ax_err.plot(*zip(*err), **style)
        if loss:
            ax_loss.plot(*zip(*loss), **style)
    ax_err.set(xlabel="epoch", ylabel="test error (%)", title="Test error")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    losses = [np.asarray(line.get_ydata(), float) for line in ax_loss.get_lines()]
    if losses and min(y.min() for y in losses) > 0 and max(y.max() for y in losses) > 10 * min(y.min() for y in losses):
        ax_loss.set_yscale("log")  # only when the loss spans more than a decade
    for ax in (ax_err, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_err.legend(fontsize=8)
    fig.tight_layout()
    return fig, ""


def per_layer(runs: list[RunData], key: str, *, title: str, ylabel: str, missing: str,
              reference: tuple[float, str] | None = None, ylim: tuple[float, float] | None = None
              ) -> tuple[Any, str]:
    """One panel per run with one line per layer (coloured from input to output) of an analysis metric."""
    plt = pyplot()
    data = [(run, *analysis_series(run, key)) for run in runs]
    data = [d for d in data if d[2]]
    if not data:
        return None, missing
    fig, axes = grid(plt, len(data))
    for ax, (run, epochs, series) in zip(axes, data):
        colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(series)))
        for color, (layer, values) in zip(colors, series.items()):
            ax.plot(epochs, values, color=color, label=layer, marker="o" if len(epochs) <= 20 else None, ms=3)
        reference_line = None if reference is None else \
            ax.axhline(reference[0], color="gray", ls=":", lw=1, label=reference[1])
        ax.set(title=run.label, xlabel="epoch", ylabel=ylabel)
        if ylim is not None:
            top = np.nanmax([np.nanmax(v) if np.isfinite(v).any() else 0.0 for v in series.values()])
            ax.set_ylim(ylim[0], max(ylim[1], 1.05 * float(top)))
        ax.grid(alpha=0.3)
        if len(series) <= 8:
            ax.legend(fontsize=7, title="layer", title_fontsize=7)
        else:  # too many layers for a legend: a discrete colour bar of exactly the layers drawn
            from matplotlib.colors import ListedColormap
            mappable = plt.cm.ScalarMappable(cmap=ListedColormap(colors),
                                             norm=plt.Normalize(-0.5, len(series) - 0.5))
            fig.colorbar(mappable, ax=ax, label="layer index (input → output)")
            if reference_line is not None:
                ax.legend(handles=[reference_line], fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig, ""


def weight_magnitudes(runs: list[RunData], colors: dict[str, Any]) -> tuple[Any, str]:
    """Density of |W| from each run's last histogram, runs overlaid, for up to 4 layers (xiao2018 Fig. 3c)."""
    plt = pyplot()
    last: list[tuple[RunData, dict]] = []
    for run in runs:
        hists = [r["metrics"]["hist"] for r in run.kind("analysis")
                 if isinstance(r.get("metrics"), dict) and isinstance(r["metrics"].get("hist"), dict)
                 and r["metrics"]["hist"]]
        if hists:
            last.append((run, hists[-1]))
    if not last:
        return None, "no run has analysis records with weight histograms (train with metrics_every > 0)"
    layers: list[str] = []
    for _, hist in last:
        layers += [name for name in hist if name not in layers]
    if len(layers) > 4:  # first, last and two evenly spaced between
        layers = [layers[i] for i in sorted({round(j) for j in np.linspace(0, len(layers) - 1, 4)})]
    fig, axes = grid(plt, len(layers), width=3.6, height=3.1, max_cols=4)
    for ax, layer in zip(axes, layers):
        for run, hist in last:
            entry = hist.get(layer)
            if not isinstance(entry, dict) or not entry.get("counts"):
                continue
            edges, counts = np.asarray(entry["edges"], float), np.asarray(entry["counts"], float)
            density = counts / max(counts.sum(), 1.0) / np.diff(edges)
            ax.stairs(np.where(density > 0, density, np.nan), edges, color=colors[run.label], label=run.label, lw=1.4)
        ax.set(title=f"layer {layer}", xlabel="|W|", ylabel="probability density (log scale)", yscale="log")
        ax.yaxis.set_minor_formatter(plt.NullFormatter())
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Distribution of |W| at the last analysis step (sign symmetry vs backprop: xiao2018 Fig. 3c)")
    fig.tight_layout()
    return fig, ""


def lillicrap(runs: list[RunData], colors: dict[str, Any]) -> tuple[Any, str]:
    """Share of samples satisfying Lillicrap's condition over training, one line per run."""
    plt = pyplot()
    data = [(run, *analysis_series(run, "lillicrap")) for run in runs]
    data = [d for d in data if d[2]]
    if not data:
        return None, ("no run has Lillicrap records (they exist for runs with per-layer feedback that differs "
                      "from W, logged with metrics_every > 0)")
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for run, epochs, series in data:
        for layer, values in series.items():
            ax.plot(epochs, 100 * values, color=colors[run.label], label=f"{run.label}: layer {layer}",
                    marker="o" if len(epochs) <= 20 else None, ms=3)
    ax.axhline(50, color="gray", ls=":", lw=1, label="chance (random B)")
    ax.set(xlabel="epoch", ylabel="samples with eᵀ W Bᵀ e > 0 (%)", ylim=(-2, 102),
           title="Lillicrap's condition at the topmost feedback layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, ""


def results_table(runs: list[RunData]) -> str:
    """The HTML results table: one row per run; "–" where a value is missing."""
    head = ["run", "rule", "model", "dataset", "epochs", "final test error (%)", "best test error (%)",
            "final mean alignment (°)", "analysis time (% of training)"]
    rows = []
    for run in runs:
        errors = [r["test_error"] for r in run.epoch_records() if isinstance(r.get("test_error"), (int, float))]
        final_err = run.final.get("final_test_error", errors[-1] if errors else None)
        best_err = run.final.get("best_test_error", min(errors) if errors else None)
        alignment = run.final.get("alignment")
        if not isinstance(alignment, dict):  # fall back on the last analysis record
            records = [r for r in run.kind("analysis") if isinstance(r.get("metrics"), dict)]
            alignment = records[-1]["metrics"].get("alignment") if records else None
        angles = [v for v in (alignment or {}).values() if isinstance(v, (int, float)) and math.isfinite(v)]
        train_time = sum(r.get("epoch_time_s") or 0.0 for r in run.epoch_records())
        analysis_time = sum(r.get("time_s") or 0.0 for r in run.kind("analysis"))
        epochs = run.final.get("epochs", len(run.epoch_records()) or run.config.get("epochs"))
        rows.append([run.label, run.get("rule", "?"), run.get("model", "?"), run.get("dataset", "?"), epochs,
                     _fmt(final_err), _fmt(best_err), _fmt(float(np.mean(angles)) if angles else None, 1),
                     _fmt(100 * analysis_time / train_time if train_time > 0 and analysis_time else None, 1)])
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="results"><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>'


def _fmt(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "–"
