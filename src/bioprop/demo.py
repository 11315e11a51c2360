"""``bioprop demo``: backprop, feedback alignment, sign symmetry and DFA side by side, in a few minutes.

It trains the 2x800 tanh MLP of nokland2016 on MNIST (or on the built-in 8x8 digits) once per rule, with the
same optimizer and schedule for every rule, prints a results table (test error, the gap to backprop and the
per-layer alignment angles), and writes the figures and an HTML report into a results folder.

The four runs go in parallel processes, one thread each on a small machine: on 2 cores this is about twice as
fast as running them one after the other with two threads each, and it does not slow down when other programs
share the cores. Each run is an ordinary ``bioprop train`` run directory under ``<output_dir>/runs/<rule>``.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
import textwrap
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["run_demo", "DEMO_RULES", "DemoSetting", "SETTINGS"]

DEMO_RULES = ("backprop", "fa", "usf", "dfa")
DATASET_TITLES = {"mnist": "MNIST", "digits": "the 8x8 digits"}
RULE_TITLES = {"backprop": "backprop (BP)", "fa": "feedback alignment (FA)", "usf": "sign symmetry (uSF)",
               "dfa": "direct FA (DFA)"}


@dataclass(frozen=True)
class DemoSetting:
    """The training recipe of the demo on one data set (the same for every rule)."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    schedule: str
    metrics_every: int  # optimizer steps between analysis records (alignment over training)


#: Measured on 2 CPU cores: MNIST 2.3 minutes in all on an otherwise idle machine, digits under a minute. With
#: these recipes FA, uSF and DFA end within 0.2 points of backprop's test error (docs/usage.md has the numbers).
SETTINGS = {
    "mnist": DemoSetting(epochs=6, batch_size=64, lr=1e-3, optimizer="adam", schedule="cosine", metrics_every=200),
    "digits": DemoSetting(epochs=15, batch_size=32, lr=1e-3, optimizer="adam", schedule="cosine", metrics_every=20),
}


def _run_config(dataset: str, rule: str, setting: DemoSetting, epochs: int, out: Path,
                data_root: str | None) -> dict[str, Any]:
    return dict(dataset=dataset, data_root=data_root or "", model="mlp",
                model_args={"depth": 2, "width": 800, "activation": "tanh"}, rule=rule, epochs=epochs,
                batch_size=setting.batch_size, lr=setting.lr, optimizer=setting.optimizer, schedule=setting.schedule,
                metrics_every=setting.metrics_every, log_every=50, seed=0, output_dir=str(out / "runs" / rule),
                overwrite=True, progress=False, verbose=False, device="cpu")


def _train_worker(config: dict[str, Any], threads: int) -> dict[str, Any]:
    """One demo run in its own process (top-level so that the ``spawn`` start method can import it)."""
    import torch
    torch.set_num_threads(threads)
    from .engine import config_from_dict, train
    return train(config_from_dict(config))


def run_demo(dataset: str = "mnist", epochs: int | None = None, output_dir: str | Path = "results/demo", *,
             data_root: str | None = None, progress: bool = True, rules: tuple[str, ...] = DEMO_RULES,
             workers: int | None = None) -> Path:
    """Train the demo runs, print the results table and write the report; returns the results folder.

    Args:
        dataset: ``"mnist"`` (fetched from the pinned archive if it is not present) or ``"digits"``.
        epochs: epochs per rule (default: the recipe's, see :data:`SETTINGS`).
        output_dir: the results folder: ``runs/<rule>/``, ``report.html``, the figures, ``results.md``.
        data_root: data root (default ``$BIOPROP_DATA`` or ``~/.cache/bioprop``).
        progress: live progress bars on a terminal (a line per finished epoch otherwise).
        rules: the rules to compare (backprop first, as the reference of the gap column).
        workers: parallel training processes (default: one per rule); 0 trains the runs one after the other in
            this process.

    Raises:
        ValueError: an unknown data set.
        bioprop.data.DatasetError: MNIST missing and it cannot be fetched (the message says how to get it).
    """
    from . import data
    if dataset not in SETTINGS:
        raise ValueError(f"the demo runs on {' or '.join(SETTINGS)}, got {dataset!r}")
    setting = SETTINGS[dataset]
    epochs = epochs or setting.epochs
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dataset != "digits" and data.list_present(data_root)[dataset] is None:
        print(f"Fetching {dataset} (pinned archive, checksummed) ...", flush=True)
    data.fetch_dataset(dataset, root=data_root)
    n_train = len(data.load_dataset(dataset, split="train", root=data_root))
    n_test = len(data.load_dataset(dataset, split="test", root=data_root))
    steps_total = epochs * (n_train // setting.batch_size)

    print(f"bioprop demo: 2x800 tanh MLP on {DATASET_TITLES[dataset]} ({n_train} train / {n_test} test images), "
          f"{epochs} epochs per rule, {setting.optimizer} lr {setting.lr:g} ({setting.schedule} schedule), "
          f"batch {setting.batch_size}", flush=True)
    print("rules: " + ", ".join(RULE_TITLES.get(r, r) for r in rules), flush=True)

    start = time.perf_counter()
    configs = {rule: _run_config(dataset, rule, setting, epochs, out, data_root) for rule in rules}
    for config in configs.values():
        _clear_old_run(Path(config["output_dir"]))
    if workers == 0:  # one after the other in this process, with the epoch lines of `bioprop train`
        from .engine import config_from_dict, train
        summaries = {}
        for rule in rules:
            print(f"{rule}:", flush=True)
            summaries[rule] = train(config_from_dict({**configs[rule], "verbose": True, "progress": progress}))
    else:
        workers = workers or len(rules)
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")  # no fork of a process that may hold OpenMP threads
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {rule: pool.submit(_train_worker, configs[rule], threads) for rule in rules}
            _watch(futures, {rule: Path(configs[rule]["output_dir"]) for rule in rules}, steps_total, epochs,
                   progress)
            summaries = {rule: future.result() for rule, future in futures.items()}
    wall = time.perf_counter() - start

    run_dirs = [Path(configs[rule]["output_dir"]) for rule in rules]
    rows = [_result_row(rule, summaries[rule], run_dir) for rule, run_dir in zip(rules, run_dirs)]
    table = _format_table(rows)
    print()
    print(table)
    print(f"\n{len(rules)} runs in {wall / 60:.1f} min.")

    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "results.md").write_text(_markdown(rows, dataset, epochs, setting, wall))
    from .report import write_report
    title = f"bioprop demo: {', '.join(rules)} on {DATASET_TITLES[dataset]}"
    report = write_report(run_dirs, out, title=title)
    print(f"\nResults in {out}/")
    print("  results.md        the table above")
    print(f"  {report.name:<17} figures: learning curves, alignment angles, weight statistics")
    for png in sorted(out.glob("fig-*.png")):
        print(f"  {png.name}")
    print(f"  runs/<rule>/      metrics.jsonl, checkpoints; 'bioprop report {out}/runs/*' redraws the report")
    return out


# ---------------------------------------------------------------------------------------------- progress


def _watch(futures: dict[str, Future], run_dirs: dict[str, Path], steps_total: int, epochs: int,
           progress: bool) -> None:
    """Follow the runs through their metrics logs until all are done (bars on a terminal, else epoch lines)."""
    from tqdm.auto import tqdm
    live = progress and sys.stderr.isatty()
    width = max(len(r) for r in futures)
    bars = {rule: tqdm(total=steps_total, desc=f"{rule:<{width}}", position=i, leave=True, disable=not live,
                       unit="step", dynamic_ncols=True, bar_format="{desc} {bar} {percentage:3.0f}% "
                       "[{elapsed}<{remaining}] {postfix}")
            for i, rule in enumerate(futures)}
    offsets = {rule: 0 for rule in futures}
    every = math.ceil(epochs / 5)  # at most about five lines per run in a log file
    while True:
        done = all(f.done() for f in futures.values())
        for rule, run_dir in run_dirs.items():
            for record in _new_records(run_dir / "metrics.jsonl", offsets, rule):
                if record.get("kind") in ("train", "epoch"):
                    bars[rule].n = min(int(record["step"]), steps_total)
                if record.get("kind") == "epoch" and record.get("test_error") is not None:
                    text = f"epoch {record['epoch']}/{epochs}: test error {record['test_error']:.2f}%"
                    bars[rule].set_postfix_str(text, refresh=False)
                    if not live and (record["epoch"] % every == 0 or record["epoch"] == epochs):
                        print(f"  {rule:<{width}}  {text}", flush=True)
            bars[rule].refresh()
        if done:
            break
        time.sleep(1.0)
    for bar in bars.values():
        bar.close()


def _clear_old_run(run_dir: Path) -> None:
    """Remove the demo's own run directory from an earlier demo, so that its log is not read as this run's."""
    if (run_dir / "config.json").is_file():
        from .engine.rundir import remove_run_files
        remove_run_files(run_dir)


def _new_records(path: Path, offsets: dict[str, int], key: str) -> list[dict[str, Any]]:
    """Complete lines appended to ``path`` since the last call (a line being written is left for later)."""
    if not path.exists():
        return []
    with path.open("rb") as fh:
        if fh.seek(0, 2) < offsets[key]:  # the file was started again: read it from the top
            offsets[key] = 0
        fh.seek(offsets[key])
        chunk = fh.read()
    end = chunk.rfind(b"\n") + 1
    offsets[key] += end
    return [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- results


def _last_analysis(run_dir: Path) -> dict[str, Any]:
    from .report.runs import load_run
    records = [r for r in load_run(run_dir).kind("analysis") if isinstance(r.get("metrics"), dict)]
    return records[-1]["metrics"] if records else {}


def _result_row(rule: str, summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One line of the results table: errors and the per-layer angles, in the order of the layers."""
    from .rules import LayerRule, create_rule
    analysis = _last_analysis(run_dir)
    # W-vs-B angles belong to rules that give each layer its own B (fa, usf, ...). Exact layers (backprop, and
    # the layers DFA trains directly) report W-vs-sign(W) in final.json, which is no alignment of the rule.
    policy = create_rule(rule)
    own_feedback = isinstance(policy, LayerRule) and not policy.is_exact()
    return {"rule": rule, "test_error": summary["final_test_error"], "best_test_error": summary["best_test_error"],
            "alignment_w_b": summary["alignment"] if own_feedback else {},
            "update_vs_backprop": analysis.get("grad_angle", {}),
            "dfa_signal_vs_backprop": analysis.get("dfa_signal_angle", {}), "wall_time_s": summary["wall_time_s"]}


def _angles(values: dict[str, Any]) -> str:
    numbers = [v for v in values.values() if isinstance(v, (int, float)) and math.isfinite(v)]
    return " / ".join(f"{v:.0f}" for v in numbers) if numbers else "-"


def _format_table(rows: list[dict[str, Any]]) -> str:
    reference = rows[0]["test_error"] if rows and rows[0]["rule"] == "backprop" else None
    header = ("rule", "test error", "vs BP", "angle W,B (deg)", "angle update,BP grad (deg)")
    lines = []
    for row in rows:
        gap = "" if reference is None or row["rule"] == "backprop" else f"{row['test_error'] - reference:+.2f}"
        lines.append((row["rule"], f"{row['test_error']:.2f}%", gap, _angles(row["alignment_w_b"]),
                      _angles(row["update_vs_backprop"])))
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*line).rstrip() for line in [header, tuple("-" * w for w in widths), *lines]]
    note = ("Angles per layer, input side first (90 = unrelated). W,B: forward weight against the feedback "
            "weight the layer sends its error through (the first layer's B is never used, so it stays near 90). "
            "update,BP grad: the rule's weight update against the backprop gradient on the same batch "
            "(0 = backprop; below 90 the update still descends the loss).")
    out += ["", textwrap.fill(note, width=100)]
    return "\n".join(out)


def _markdown(rows: list[dict[str, Any]], dataset: str, epochs: int, setting: DemoSetting, wall: float) -> str:
    reference = rows[0]["test_error"] if rows and rows[0]["rule"] == "backprop" else None
    lines = [f"# bioprop demo: 2x800 tanh MLP on {DATASET_TITLES[dataset]}", "",
             f"{epochs} epochs per rule, {setting.optimizer} lr {setting.lr:g} ({setting.schedule}), batch "
             f"{setting.batch_size}, seed 0; {wall / 60:.1f} min for all runs.", "",
             "| rule | test error (%) | vs BP (pp) | angle W,B per layer (deg) | angle update, BP gradient per layer "
             "(deg) |", "|---|---|---|---|---|"]
    for row in rows:
        gap = "" if reference is None or row["rule"] == "backprop" else f"{row['test_error'] - reference:+.2f}"
        lines.append(f"| {RULE_TITLES.get(row['rule'], row['rule'])} | {row['test_error']:.2f} | {gap} | "
                     f"{_angles(row['alignment_w_b'])} | {_angles(row['update_vs_backprop'])} |")
    return "\n".join(lines) + "\n"
