"""Optimizer defaults and the exploding-loss stop of the training engine, on the 8x8 digits set."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from bioprop.cli import main
from bioprop.engine import (ConfigError, TrainConfig, TrainingDiverged, build_optimizer, config_from_dict,
                            load_checkpoint, read_records, train)

TINY = ["--dataset", "digits", "--model", "mlp", "--batch-size", "64", "--lr", "0.01", "--no-progress",
        "--device", "cpu", "--set", "model_args.width=16", "--set", "metrics_every=0"]


# ------------------------------------------------------------------------------------------- momentum


@pytest.mark.parametrize("optimizer, expected", [("sgd", 0.9), ("bm", 0.9), ("rmsprop", 0.0)])
def test_each_optimizer_has_its_own_momentum_default(optimizer, expected):
    config = config_from_dict({"optimizer": optimizer})
    assert config.momentum == expected
    assert config.to_dict()["momentum"] == expected  # config.json and checkpoints hold the number used
    optimizer_ = build_optimizer(config, torch.nn.Linear(3, 2))
    assert optimizer_.param_groups[0]["momentum"] == expected


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop", "bm"])
def test_an_explicit_momentum_is_kept(optimizer):
    config = config_from_dict({"optimizer": optimizer, "momentum": 0.5})
    assert config.momentum == 0.5
    assert build_optimizer(config, torch.nn.Linear(3, 2)).param_groups[0]["momentum"] == 0.5
    # an unchecked config resolves the default at build time too
    assert build_optimizer(TrainConfig(optimizer="rmsprop"), torch.nn.Linear(3, 2)).param_groups[0]["momentum"] == 0


def test_an_old_rmsprop_run_with_momentum_stored_resumes_with_it(tmp_path, capsys):
    out = tmp_path / "run"
    # runs written before the per-optimizer default stored momentum = 0.9 for rmsprop in config.json
    assert main(["train", *TINY, "--optimizer", "rmsprop", "--set", "momentum=0.9", "--epochs", "1",
                 "--output-dir", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["momentum"] == 0.9
    assert main(["train", "--epochs", "2", "--output-dir", str(out), "--resume", "--no-progress"]) == 0
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["momentum"] == 0.9
    assert checkpoint["optimizer"]["param_groups"][0]["momentum"] == 0.9
    # a new rmsprop run without the key trains plain RMSprop
    fresh = tmp_path / "fresh"
    assert main(["train", *TINY, "--optimizer", "rmsprop", "--epochs", "1", "--output-dir", str(fresh)]) == 0
    assert json.loads((fresh / "config.json").read_text())["momentum"] == 0.0
    assert load_checkpoint(fresh / "checkpoint.pt")["optimizer"]["param_groups"][0]["momentum"] == 0.0


# ------------------------------------------------------------------------------------------- exploding loss


def small(tmp_path: Path, **overrides) -> TrainConfig:
    """A digits run of a few seconds: 2x32 tanh MLP, batch 64 (22 steps per epoch), a train record every 5."""
    values = dict(dataset="digits", model="mlp", model_args={"depth": 2, "width": 32}, rule="fa", epochs=3,
                  batch_size=64, lr=0.05, output_dir=str(tmp_path / "run"), progress=False, verbose=False,
                  log_every=5, metrics_every=0, device="cpu")
    values.update(overrides)
    return config_from_dict(values)


def blow_up(info) -> None:
    """Scale the output layer by 1e6 once, in epoch 2: the loss becomes huge but stays finite."""
    if info.epoch == 2 and info.step == 30:
        with torch.no_grad():
            last = [m for m in info.model.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.weight.mul_(1e6)


def test_an_exploding_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"^training diverged in epoch 2: the training loss rose to \S+ between "
                                               r"steps 31 and 35, more than divergence_factor = 1000 times its first "
                                               r"value \S+; the last good checkpoint \(epoch 1\) is kept at .*"
                                               r"checkpoint.pt; continue with a lower lr: --resume --output-dir \S+ --lr \S+\.$"):
        train(small(tmp_path), on_step=blow_up)
    run = tmp_path / "run"
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    assert checkpoint["epoch"] == 1 and all(torch.isfinite(v).all() for v in checkpoint["model"].values())
    first_loss = read_records(run / "metrics.jsonl", "train")[0]["loss"]
    assert checkpoint["loss_reference"] == pytest.approx(first_loss)  # kept for a resumed run
    event = read_records(run / "metrics.jsonl", "event")[-1]
    assert event["event"] == "diverged" and event["step"] == 35
    last = read_records(run / "metrics.jsonl", "train")[-1]  # the exploding window itself is not logged
    assert last["step"] == 30 and math.isfinite(last["loss"]) and last["loss"] < 10 * first_loss


def test_divergence_action_warn_warns_once_and_factor_zero_never_stops(tmp_path, capsys):
    summary = train(small(tmp_path, divergence_action="warn"), on_step=blow_up)
    assert summary["epochs"] == 3
    events = read_records(tmp_path / "run" / "metrics.jsonl", "event")
    assert [e["event"] for e in events] == ["diverging"] and events[0]["step"] == 35
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bioprop: warning: the loss is exploding in epoch 2: the training "
                                               "loss rose to")
    summary = train(small(tmp_path, divergence_factor=0.0, overwrite=True), on_step=blow_up)
    assert summary["epochs"] == 3 and read_records(tmp_path / "run" / "metrics.jsonl", "event") == []


@pytest.mark.parametrize("values, message", [
    ({"divergence_factor": 0.5}, "divergence_factor must be 0 (never stop) or > 1, got 0.5"),
    ({"divergence_action": "ignore"}, "unknown divergence_action 'ignore'; allowed: stop, warn"),
])
def test_divergence_options_are_checked(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(values)
