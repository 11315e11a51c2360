"""The analysis log: one summary line per record in metrics.jsonl, per-layer values in metrics_layers.jsonl
(cut back on resume like the main log), a record at the end of every epoch, and the report reading both."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bioprop.engine import config_from_dict, load_checkpoint, read_records, train
from bioprop.metrics import summarize_metrics
from bioprop.report import FIGURE_IDS, load_run, write_report
from bioprop.report.runs import analysis_series

TIMING = ("samples_per_s", "epoch_time_s", "eval_time_s", "time_s")


def small(tmp_path: Path, name: str, **overrides):
    """A digits run of a few seconds: 2x32 tanh MLP, batch 64 (22 steps per epoch)."""
    values = dict(dataset="digits", model="mlp", model_args={"depth": 2, "width": 32}, rule="fa", epochs=2,
                  batch_size=64, lr=0.05, output_dir=str(tmp_path / name), progress=False, verbose=False,
                  log_every=5, metrics_every=10, device="cpu")
    values.update(overrides)
    return config_from_dict(values)


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records if r["kind"] != "event"]


def test_summary_is_the_mean_min_max_over_layers():
    values = {"alignment": {"0": 10.0, "2": 50.0, "4": None}, "lillicrap": {"4": {"fraction": 0.75, "mean": 2.0}},
              "hist": {"0": {"edges": [0, 1], "counts": [3]}}, "grad_angle": {}}
    assert summarize_metrics(values) == {
        "alignment": {"mean": 30.0, "min": 10.0, "max": 50.0, "layers": 2},
        "lillicrap": {"fraction": {"mean": 0.75, "min": 0.75, "max": 0.75, "layers": 1},
                      "mean": {"mean": 2.0, "min": 2.0, "max": 2.0, "layers": 1}}}


class Killed(Exception):
    pass


def test_the_side_file_is_cut_back_on_resume_like_the_main_log(tmp_path):
    train(small(tmp_path, "whole"))

    def kill(info):
        if info.step == 35:  # after epoch 2's analysis at step 30, before its end
            raise Killed

    with pytest.raises(Killed):
        train(small(tmp_path, "killed"), on_step=kill)
    assert [r["step"] for r in read_records(tmp_path / "killed" / "metrics_layers.jsonl")] == [10, 20, 22, 30]
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["epoch"] == 1
    train(small(tmp_path, "killed", resume=True))
    for name in ("metrics.jsonl", "metrics_layers.jsonl"):
        whole = read_records(tmp_path / "whole" / name)
        assert untimed(whole) == untimed(read_records(tmp_path / "killed" / name)), name
    layers = read_records(tmp_path / "whole" / "metrics_layers.jsonl")
    summaries = read_records(tmp_path / "whole" / "metrics.jsonl", "analysis")
    assert [r["step"] for r in layers] == [10, 20, 22, 30, 40, 44]
    for layer_record, summary_record in zip(layers, summaries):
        angles = [v for v in layer_record["metrics"]["alignment"].values() if v is not None]
        assert summary_record["summary"]["alignment"]["mean"] == pytest.approx(np.mean(angles))
        assert summary_record["summary"]["alignment"]["max"] == max(angles)
        assert "hist" in layer_record["metrics"] and "hist" not in summary_record["summary"]


def test_a_one_epoch_run_yields_the_alignment_figures(tmp_path):
    # metrics_every beyond the run: only the end-of-epoch records exist
    for rule in ("backprop", "usf"):
        train(small(tmp_path, rule, rule=rule, epochs=1, metrics_every=1000))
    run = load_run(tmp_path / "usf")
    assert [r["step"] for r in run.kind("analysis")] == [22]
    epochs, series = analysis_series(run, "alignment")
    assert list(epochs) == [1.0] and set(series) == {"1", "3", "5"}  # Flatten, then Linear at 1, 3 and 5
    _, grad = analysis_series(run, "grad_angle")
    assert all(np.isfinite(v).all() for v in grad.values())
    # backprop's "alignment" is the angle between W and sign(W) (xiao2018 Fig. 3a's reference line)
    _, exact = analysis_series(load_run(tmp_path / "backprop"), "alignment")
    assert set(exact) == {"1", "3", "5"} and all(0 < v[0] < 90 for v in exact.values())
    out = tmp_path / "report"
    write_report([tmp_path / "backprop", tmp_path / "usf"], out)
    for fig_id in ("alignment", "kurtosis", "weight-magnitudes", "grad-agreement", "lillicrap"):
        assert (out / f"fig-{fig_id}.png").is_file(), fig_id
    assert set(FIGURE_IDS) >= {"alignment", "kurtosis", "weight-magnitudes", "grad-agreement"}
