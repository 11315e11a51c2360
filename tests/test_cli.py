"""The ``bioprop`` command line end to end on the 8x8 digits set: train, resume, TOML + overrides, one-line
errors with exit codes, list, data, report and the demo."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bioprop.cli import main
from bioprop.engine import read_records

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TINY = ["--dataset", "digits", "--model", "mlp", "--batch-size", "64", "--lr", "0.05", "--no-progress",
        "--device", "cpu", "--set", "model_args.width=16", "--set", "metrics_every=0"]




def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    return lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "usf"
    code = main(["train", *TINY, "--rule", "usf", "--epochs", "2", "--seed", "1", "--output-dir", str(out),
                 "--set", "model_args.depth=1", "--set", "rule_options.scale=biotorch"])
    assert code == 0
    return out


def test_train_end_to_end_writes_the_run_directory(trained_run, capsys):
    config = json.loads((trained_run / "config.json").read_text())
    assert (config["rule"], config["seed"], config["epochs"], config["lr"]) == ("usf", 1, 2, 0.05)
    assert config["model_args"] == {"width": 16, "depth": 1}
    assert config["rule_options"] == {"scale": "biotorch"}
    final = json.loads((trained_run / "final.json").read_text())
    assert final["rule"] == "usf" and final["epochs"] == 2 and 0 <= final["final_test_error"] < 90
    assert sorted(final["alignment"]) == ["1", "3"]  # Flatten, Linear(64,16), Tanh, Linear(16,10)
    state = torch.load(trained_run / "checkpoint.pt", weights_only=True)["model"]
    assert state["1.weight"].shape == (16, 64)


def test_resume_from_the_command_line_continues_the_run(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", *TINY, "--rule", "fa", "--epochs", "1", "--output-dir", out]) == 0
    # only the run directory and what changes need to be given again; the rest comes from its config.json
    assert main(["train", "--epochs", "2", "--output-dir", out, "--resume", "--no-progress"]) == 0
    assert "done: test error" in capsys.readouterr().out
    assert json.loads((Path(out) / "config.json").read_text())["rule"] == "fa"
    assert main(["train", "--epochs", "3", "--output-dir", out, "--resume", "--lr", "0.5"]) == 2
    assert "other settings (lr: checkpoint 0.05, now 0.5)" in error_line(capsys)
    records = read_records(Path(out) / "metrics.jsonl")
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    assert [r["event"] for r in records if r["kind"] == "event"] == ["resume"]
    # without --resume an existing run is refused rather than overwritten
    assert main(["train", *TINY, "--rule", "fa", "--epochs", "2", "--output-dir", out]) == 2
    assert ("already holds a run (checkpoint.pt, checkpoint.prev.pt, best.pt, final.json, metrics.jsonl, "
            "config.json); pass --resume") in error_line(capsys)


def test_toml_config_flags_and_dotted_overrides_layer_in_order(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('rule = "fa"\nepochs = 7\nlr = 0.5\nmilestones = [2, 4]\nschedule = "multistep"\n'
                    '[model_args]\ndepth = 3\nwidth = 100\n[rule_options]\nscale = "unit"\n')
    code = main(["train", "--config", str(path), "--lr", "0.25", "--set", "model_args.width=8",
                 "--set", "rule_options.scale=biotorch", "--set", "amp=true", "--print-config"])
    assert code == 0
    resolved = tomllib.loads(capsys.readouterr().out)
    assert (resolved["rule"], resolved["epochs"], resolved["lr"], resolved["amp"]) == ("fa", 7, 0.25, True)
    assert resolved["milestones"] == [2, 4] and resolved["schedule"] == "multistep"
    assert resolved["model_args"] == {"depth": 3, "width": 8}
    assert resolved["rule_options"] == {"scale": "biotorch"}


@pytest.mark.parametrize("argv, expected", [
    (["--rule", "xx"], r"bioprop: error: --rule: unknown rule 'xx'; allowed rules: backprop, sham, fa, usf"),
    (["--dataset", "mnsit"], "bioprop: error: --dataset: unknown dataset 'mnsit'; allowed: mnist, "),
    (["--optimizer", "lbfgs"], "bioprop: error: --optimizer: unknown optimizer 'lbfgs'; allowed: sgd, adam, "),
    (["--epochs", "ten"], "bioprop: error: argument --epochs: invalid int value: 'ten' (see 'bioprop train --help')"),
    (["--epochs", "0"], "bioprop: error: --epochs: epochs must be > 0, got 0"),
    (["--set", "lr=fast"], "bioprop: error: --set lr=fast: lr must be a number, got 'fast' (str)"),
    (["--set", "colour=red"], "bioprop: error: --set colour=red: unknown config key 'colour'; allowed keys: dataset,"),
    (["--set", "epochs.x=1"], "bioprop: error: --set epochs.x=1: 'epochs' is not a table"),
    (["--set", "model_args"], "bioprop: error: --set: expected key=value"),
    (["--rule", "fa", "--set", "rule_options.sclae=2"],
     "bioprop: error: --set rule_options.sclae=2: rule_options: rule 'fa' has no option(s) 'sclae'; allowed options: "
     "scale"),
    (["--set", "model_args.depht=2"],
     "bioprop: error: --set model_args.depht=2: model_args of 'mlp': model 'mlp' has no option(s) 'depht'"),
    (["--bogus"], "bioprop: error: unrecognized arguments: --bogus (see 'bioprop --help')"),
])
def test_bad_values_give_one_line_and_exit_code_2(tmp_path, capsys, argv, expected):
    code = main(["train", "--output-dir", str(tmp_path / "r"), "--epochs", "1", "--no-progress", *argv])
    assert code == 2
    assert error_line(capsys).startswith(expected)


def test_bad_toml_key_type_and_syntax_name_the_file_and_key(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('epoch = 3\n')
    assert main(["train", "--config", str(path)]) == 2
    line = error_line(capsys)
    assert line.startswith(f"bioprop: error: {path}: unknown config key 'epoch'; allowed keys: dataset, data_root,")
    assert "epochs" in line
    path.write_text('epochs = "ten"\n')
    assert main(["train", "--config", str(path)]) == 2
    assert error_line(capsys) == f"bioprop: error: {path}: epochs must be an integer, got 'ten' (str)"
    path.write_text('model_args = 3\n')
    assert main(["train", "--config", str(path)]) == 2
    assert error_line(capsys) == f"bioprop: error: {path}: model_args must be a table, got 3 (int)"
    path.write_text('epochs = \n')
    assert main(["train", "--config", str(path)]) == 2
    assert f"--config: {path} is not valid TOML" in error_line(capsys)
    assert main(["train", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in error_line(capsys)


def test_run_failures_give_one_line_and_exit_code_1(tmp_path, capsys):
    code = main(["train", *TINY, "--rule", "backprop", "--lr", "1e12", "--set", "momentum=0.0",
                 "--set", "model_args.activation=relu", "--epochs", "1", "--output-dir", str(tmp_path / "nan")])
    assert code == 1
    assert error_line(capsys).startswith("bioprop: error: training diverged in epoch 1: the loss became")
    code = main(["train", "--dataset", "cifar10", "--model", "mlp", "--set", f"data_root={tmp_path}",
                 "--output-dir", str(tmp_path / "c10")])
    assert code == 1
    assert error_line(capsys).startswith("bioprop: error: CIFAR-10 not found; looked in:")
    code = main(["train", *TINY, "--output-dir", str(tmp_path / "none"), "--resume"])
    assert code == 1
    assert error_line(capsys).startswith("bioprop: error: no checkpoint at")


def test_list_commands(capsys):
    import bioprop
    assert main(["list", "rules"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.strip().splitlines()] == bioprop.list_rules()
    assert main(["list", "models"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()] == bioprop.models.list_models()
    assert main(["list", "datasets"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()] == bioprop.data.list_datasets()
    assert main(["list", "constraints"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()] == \
        bioprop.optim.list_constraints()
    from bioprop import engine
    for what, registry in (("optimizers", engine.OPTIMIZERS), ("schedules", engine.SCHEDULES),
                           ("losses", engine.LOSSES), ("tasks", engine.TASKS)):
        assert main(["list", what]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert [line.split()[0] for line in lines] == registry.names(), what
    for what in ("rules", "models", "datasets", "constraints", "optimizers", "schedules", "losses", "tasks"):
        assert main(["list", what]) == 0  # every entry has a one-line description after its name
        assert all(len(line.split()) > 1 for line in capsys.readouterr().out.strip().splitlines()), what
    assert main(["list", "things"]) == 2
    assert "invalid choice: 'things'" in error_line(capsys)


def test_data_commands(tmp_path, capsys):
    assert main(["data", "list", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"data root: {tmp_path}" in out and "digits" in out and "cifar10        missing" in out
    assert main(["data", "get", "digits", "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("digits: ready at ")
    assert main(["data", "get", "nope"]) == 2
    assert error_line(capsys).startswith("bioprop: error: unknown data set 'nope'; allowed: mnist")
    assert main(["data", "get", "Digits", "--root", str(tmp_path)]) == 0  # names resolve as everywhere else
    assert capsys.readouterr().out.startswith("digits: ready at ")


def test_report_command_delegates_to_the_report_module(trained_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(trained_run), "--output-dir", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out / 'report.html'}"
    assert "usf" in (out / "report.html").read_text()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in error_line(capsys)


def test_demo_on_digits_in_process(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--dataset", "digits", "--epochs", "1", "--workers", "0", "--no-progress",
                 "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())
    assert [r["rule"] for r in rows] == ["backprop", "fa", "usf", "dfa"]
    for row in rows:
        final = json.loads((out / "runs" / row["rule"] / "final.json").read_text())
        assert row["test_error"] == final["final_test_error"]
        assert f"{row['test_error']:.2f}%" in printed
    assert rows[0]["alignment_w_b"] == {} and rows[3]["alignment_w_b"] == {}  # no per-layer B
    assert sorted(rows[1]["alignment_w_b"]) == ["1", "3", "5"]
    assert (out / "report.html").is_file() and (out / "fig-learning-curves.png").is_file()
    assert f"Results in {out}/" in printed


def test_python_dash_m_runs_the_same_command_line():
    done = subprocess.run([sys.executable, "-m", "bioprop", "train", "--rule", "nope"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("bioprop: error: --rule: unknown rule 'nope'; allowed rules: backprop")
    assert done.stdout == ""


def test_demo_parallel_workers_follow_the_runs_through_their_logs(tmp_path, capsys):
    from bioprop.demo import run_demo
    out = tmp_path / "demo"
    (out / "runs" / "fa").mkdir(parents=True)  # an earlier demo's run, whose old log must not be read as new
    (out / "runs" / "fa" / "config.json").write_text("{}")
    old_record = '{"kind": "epoch", "epoch": 9, "step": 1, "test_error": 1}\n'
    (out / "runs" / "fa" / "metrics.jsonl").write_text(old_record * 50)
    run_demo("digits", epochs=2, output_dir=out, rules=("backprop", "fa"), workers=2, progress=False)
    printed = capsys.readouterr().out
    assert "  fa        epoch 2/2: test error" in printed and "epoch 9" not in printed
    rows = json.loads((out / "results.json").read_text())
    assert [r["rule"] for r in rows] == ["backprop", "fa"]
    records = read_records(out / "runs" / "fa" / "metrics.jsonl", "epoch")
    assert [r["epoch"] for r in records] == [1, 2]
    assert f"{records[-1]['test_error']:.2f}%" in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_asking_for_a_gpu_on_a_cpu_machine_is_a_one_line_error(tmp_path, capsys):
    assert main(["train", *TINY, "--device", "cuda", "--output-dir", str(tmp_path / "r")]) == 2
    assert error_line(capsys) == ("bioprop: error: --device: device 'cuda' asked for, but torch sees no CUDA GPU; "
                                  "allowed here: auto, cpu")
