"""Optimizer defaults and the exploding-loss stop of the training engine, on the 8x8 digits set."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bioprop.cli import main
from bioprop.engine import TrainConfig, build_optimizer, config_from_dict, load_checkpoint

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
