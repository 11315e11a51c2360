"""``schedule = "halve_on_plateau"`` (nokland2016): the halving rule against a hand-computed sequence, the
engine's lr against a re-computation from its own records, exact resume, and the same decisions under DDP."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from bioprop.engine import ConfigError, config_from_dict, load_checkpoint, read_records, train
from bioprop.engine.plateau import PlateauHalving


def test_halving_rule_follows_a_hand_computed_sequence():
    schedule = PlateauHalving(smoothing=0.75, max_halvings=8, stop_error=0.01)
    # err:      10 (m = 10) | 8 < 10: keep, m = 9.5 | 9.5 not < 9.5: halve, m = 9.5 | 12: halve, m = 10.125
    #           2 < 10.125: keep, m = 0.75 * 10.125 + 0.5 = 8.09375
    errors = [10.0, 8.0, 9.5, 12.0, 2.0]
    halved = [schedule.update(e) for e in errors]
    assert halved == [False, False, True, True, False]
    assert schedule.smoothed == 8.09375 and schedule.halvings == 2 and schedule.factor == 0.25
    assert schedule.stop_reason == ""


def test_stops_after_the_last_halving_or_at_the_error_floor():
    by_halvings = PlateauHalving(smoothing=0.75, max_halvings=2, stop_error=0.01)
    for err in (5.0, 6.0):
        by_halvings.update(err)
    assert by_halvings.stop_reason == ""
    by_halvings.update(7.0)
    assert "halved 2 times" in by_halvings.stop_reason
    by_floor = PlateauHalving(smoothing=0.5, max_halvings=8, stop_error=0.01)
    by_floor.update(0.02)  # m = 0.02
    assert by_floor.stop_reason == ""
    by_floor.update(0.0)  # m = 0.01 <= 0.01
    assert by_floor.smoothed == 0.01 and "plateau_stop_error" in by_floor.stop_reason


def _config(out, **overrides):
    # lr 1 with s = 0 (m is the previous epoch's error) plateaus at epoch 7 on digits: one halving, then a stop
    values = dict(dataset="digits", model="mlp", model_args={"depth": 2, "width": 32}, rule="fa", epochs=10,
                  batch_size=64, lr=1.0, optimizer="sgd", schedule="halve_on_plateau", plateau_smoothing=0.0,
                  plateau_halvings=1, output_dir=str(out), progress=False, verbose=False, log_every=5,
                  metrics_every=0, device="cpu")
    values.update(overrides)
    return values


def _expected(records: list[dict], lr: float, smoothing: float, max_halvings: int) -> tuple[list[float], int]:
    """The lr of every epoch and the epoch of the stop, re-derived from the recorded training accuracies."""
    lrs, m, halvings = [], None, 0
    for record in records:
        lrs.append(lr * 0.5 ** halvings)
        err = 100.0 * (1.0 - record["train_acc"])
        if m is not None and err >= m:
            halvings += 1
        m = err if m is None else smoothing * m + (1 - smoothing) * err
        if halvings >= max_halvings:
            return lrs, record["epoch"]
    return lrs, records[-1]["epoch"]


def test_engine_halves_the_lr_and_stops_as_its_records_say(tmp_path):
    summary = train(config_from_dict(_config(tmp_path / "run")))
    records = read_records(tmp_path / "run" / "metrics.jsonl", "epoch")
    lrs, stop_epoch = _expected(records, 1.0, 0.0, 1)
    assert stop_epoch < 10, "the test run must reach a halving (and so stop) before its last epoch"
    assert [r["lr"] for r in records] == lrs
    assert summary["epochs"] == stop_epoch == len(records) and "halved 1 times" in summary["stop_reason"]
    assert [r["event"] for r in read_records(tmp_path / "run" / "metrics.jsonl", "event")] == ["plateau_stop"]


def test_resume_continues_the_schedule_bit_for_bit(tmp_path):
    options = dict(plateau_halvings=2, epochs=9)
    train(config_from_dict(_config(tmp_path / "whole", **options)))
    train(config_from_dict(_config(tmp_path / "split", **{**options, "epochs": 7})))  # ends at epoch 7, just after the first halving
    train(config_from_dict(_config(tmp_path / "split", **options, resume=True)))
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("whole", "split"))
    assert a["plateau"] == b["plateau"] and a["plateau"]["halvings"] >= 1 and a["epoch"] == b["epoch"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rs]  # noqa: E731
    assert strip(read_records(tmp_path / "split" / "metrics.jsonl", "epoch")) == \
        strip(read_records(tmp_path / "whole" / "metrics.jsonl", "epoch"))


def test_bad_plateau_values_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"plateau_smoothing must be in \[0, 1\)"):
        config_from_dict({"plateau_smoothing": 1.0})
    with pytest.raises(ConfigError, match="plateau_halvings must be > 0"):
        config_from_dict({"plateau_halvings": 0})


def test_two_processes_take_the_decisions_of_one(tmp_path):
    from test_ddp_engine import _free_port, _worker
    config = _config(tmp_path / "ddp")
    mp.spawn(_worker, args=(2, _free_port(), [config]), nprocs=2, join=True)
    single = train(config_from_dict(_config(tmp_path / "single")))
    a = read_records(tmp_path / "single" / "metrics.jsonl", "epoch")
    b = read_records(tmp_path / "ddp" / "metrics.jsonl", "epoch")
    assert [r["lr"] for r in b] == [r["lr"] for r in a] and len(a) == single["epochs"] < 10
    assert [r["train_acc"] for r in b] == pytest.approx([r["train_acc"] for r in a], abs=1e-12)
