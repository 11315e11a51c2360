"""Every input of the reliability probe gets one line and the right exit code (2 usage, 1 runtime), never a
traceback; plus the rough edges: default run names, a lost MNIST checksum record, ``norm = "none"`` and a config
error seen by one DDP rank only."""
from __future__ import annotations

import errno
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import bioprop
from bioprop.cli import main
from bioprop.engine import TrainConfig, config_from_dict, load_checkpoint, save_checkpoint
from bioprop.engine import checkpoint as checkpoint_module
from bioprop.engine.checkpoint import RunWarning
from bioprop.engine.config import rule_options_of
from test_cli import TINY, error_line


def run(tmp_path: Path, *argv: str, out: str | Path | None = None) -> int:
    return main(["train", *TINY, "--epochs", "1", "--output-dir", str(out or tmp_path / "r"), *argv])


@pytest.mark.parametrize("argv, expected", [
    (["--rule", "ifa", "--model", "small_convnet", "--set", "model_args={}"],
     "bioprop: error: --rule: rule 'ifa' on model 'small_convnet': ifa needs each block to keep its size"),
    (["--rule", "fa", "--set", "last_layer=dfa"],
     "bioprop: error: --set last_layer=dfa: rule 'fa' on model 'mlp': last_layer must be a per-layer rule"),
    (["--rule", "dfa", "--set", "last_layer=fa"],
     "bioprop: error: --set last_layer=fa: rule 'dfa' on model 'mlp': dfa always trains the output layer"),
    (["--seed", "-1"], "bioprop: error: --seed: seed must be an integer in 0 .. 2**64-1"),
    (["--seed", str(2**64)], "bioprop: error: --seed: seed must be an integer in 0 .. 2**64-1"),
    (["--set", "model_args.depht=2"], "bioprop: error: --set model_args.depht=2: model_args of 'mlp'"),
    (["--rule", "kp", "--set", "constraints=fixed_sign"],
     "bioprop: error: --set constraints=fixed_sign: constraints: rule 'kp' keeps B tied to W's optimizer steps"),
    (["--rule", "kp", "--optimizer", "adam", "--set", "weight_decay=0.001"],
     "bioprop: error: --optimizer: Kolen-Pollack needs B's update to equal W's, which Adam with coupled "
     "weight_decay=0.001 does not give; allowed: SGD"),
])
def test_usage_errors_are_one_line_with_exit_2_and_leave_no_directory(tmp_path, capsys, argv, expected):
    assert run(tmp_path, *argv) == 2
    assert error_line(capsys).startswith(expected)
    assert not (tmp_path / "r").exists()  # checked before the run directory is made


def test_output_dirs_that_cannot_be_used_are_one_line(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert run(tmp_path, out=a_file) == 2
    assert error_line(capsys) == f"bioprop: error: --output-dir: output_dir {a_file} is a file; allowed: a directory " \
                                 "(new or existing)"
    assert run(tmp_path, out=a_file / "sub" / "run") == 2
    assert error_line(capsys).startswith(f"bioprop: error: --output-dir: output_dir {a_file / 'sub' / 'run'} lies "
                                         f"under {a_file}, which is a file")
    assert run(tmp_path, out="/proc/bioprop-run") == 2
    assert error_line(capsys).startswith("bioprop: error: --output-dir: output_dir /proc/bioprop-run cannot be")


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys,
                                                                                        monkeypatch):
    out = tmp_path / "r"
    assert run(tmp_path) == 0
    good = (out / "checkpoint.pt").read_bytes()

    def full(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    capsys.readouterr()
    assert main(["train", "--epochs", "2", "--output-dir", str(out), "--resume", "--no-progress"]) == 1
    line = error_line(capsys)  # best.pt, written first when the epoch improved, or checkpoint.pt
    assert re.fullmatch(rf"bioprop: error: cannot write checkpoint {re.escape(str(out))}/(best|checkpoint)\.pt: no "
                        r"space left on the device; the previous checkpoint there is kept \(free space or pick "
                        r"another --output-dir, then --resume\)", line), line
    assert (out / "checkpoint.pt").read_bytes() == good and not (out / "run.lock").exists()


def test_damaged_incomplete_or_foreign_checkpoints_are_one_line(tmp_path, capsys):
    out = tmp_path / "r"
    assert run(tmp_path) == 0
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    resume = ["train", "--epochs", "2", "--output-dir", str(out), "--resume", "--no-progress"]
    del checkpoint["optimizer"], checkpoint["digest"]
    save_checkpoint(checkpoint, out / "checkpoint.pt")
    capsys.readouterr()
    assert main(resume) == 1
    assert error_line(capsys) == (f"bioprop: error: checkpoint {out / 'checkpoint.pt'} lacks 'optimizer': it is not "
                                  "a complete bioprop run checkpoint")
    for garbage, kind in ((b"", "EOFError"), (b"\x80\x02\x8a\x0a\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf7\xf6", "")):
        (out / "checkpoint.pt").write_bytes(garbage)
        assert main(resume) == 1
        line = error_line(capsys)
        assert line.startswith(f"bioprop: error: cannot read checkpoint {out / 'checkpoint.pt'}: truncated or not a "
                               "bioprop checkpoint (") and kind in line


def test_a_config_json_that_is_not_json_is_one_line(tmp_path, capsys):
    out = tmp_path / "r"
    assert run(tmp_path) == 0
    (out / "config.json").write_text('{"rule": "fa", ')
    capsys.readouterr()
    assert main(["train", "--epochs", "2", "--output-dir", str(out), "--resume"]) == 2
    assert error_line(capsys).startswith(f"bioprop: error: --resume: cannot read the run's settings from "
                                         f"{out / 'config.json'} (Expecting property name")


def test_report_flags_a_log_it_cannot_fully_read(tmp_path, capsys):
    out = tmp_path / "r"
    assert run(tmp_path) == 0
    log = out / "metrics.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(lines[0] + b"\x00" * 40 + b"".join(lines[1:]))  # what the NUL padding used to leave
    capsys.readouterr()
    with pytest.warns(RunWarning) as caught:  # the CLI prints each as one 'bioprop: warning: ...' line
        assert main(["report", str(out), "--output-dir", str(tmp_path / "rep")]) == 0
    assert [str(w.message) for w in caught] == [f"{out}: 1 unreadable line(s) in metrics.jsonl were skipped; its "
                                                "figures may miss records"]


def test_the_default_run_directory_hashes_the_changed_settings():
    base = TrainConfig(dataset="digits", rule="fa", seed=3)
    assert base.resolved_output_dir() == Path("runs/digits-mlp-fa-s3")  # defaults only: the readable name
    names = {TrainConfig(dataset="digits", rule="fa", seed=3, **kw).resolved_output_dir().name
             for kw in ({"lr": 0.1}, {"lr": 0.2}, {"model_args": {"width": 8}}, {"optimizer": "adam"})}
    assert len(names) == 4 and all(n.startswith("digits-mlp-fa-s3-") and len(n) == len("digits-mlp-fa-s3-") + 8
                                   for n in names)
    # what may change on resume does not move the run
    assert TrainConfig(lr=0.1, epochs=50, device="cpu").resolved_output_dir() == \
        TrainConfig(lr=0.1).resolved_output_dir()


def test_norm_none_is_accepted_from_set(tmp_path, capsys):
    config = config_from_dict({"rule": "usf", "rule_options": {"norm": "none"}})
    assert rule_options_of(config) == {"norm": None}
    assert run(tmp_path, "--rule", "usf", "--set", "rule_options.norm=none") == 0
    assert run(tmp_path, "--rule", "usf", out=tmp_path / "default") == 0
    a, b = (load_checkpoint(p / "checkpoint.pt")["model"] for p in (tmp_path / "r", tmp_path / "default"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # none is the default
    assert run(tmp_path, "--rule", "usf", "--set", "rule_options.norm=nonsense", out=tmp_path / "x") == 2
    assert "unknown norm 'nonsense'" in error_line(capsys)


def test_a_lost_mnist_checksum_record_is_named_and_restored(tmp_path, monkeypatch):
    from bioprop.data import DatasetNotFoundError, fetch_dataset, load_dataset
    from bioprop.data.mnist import MnistSource
    from test_data import tiny_mnist, write_idx
    monkeypatch.setattr(MnistSource, "mirrors", ())
    raw = tmp_path / "MNIST" / "raw"
    monkeypatch.setattr(MnistSource, "content_sha256", write_idx(raw, tiny_mnist(), gz=False))
    cache = fetch_dataset("mnist", root=tmp_path)
    for f in raw.iterdir():
        f.unlink()
    sidecar = cache.with_name("mnist.npz.sha256")
    record = sidecar.read_text()
    sidecar.unlink()
    with pytest.raises(DatasetNotFoundError, match=r"mnist.npz is there but its checksum record .*mnist.npz.sha256 "
                                                   r"is missing; run `bioprop data get mnist`"):
        load_dataset("mnist", root=tmp_path)
    assert fetch_dataset("mnist", root=tmp_path) == cache and sidecar.read_text() == record
    np.testing.assert_array_equal(load_dataset("mnist", split="test", root=tmp_path).images[:, 0].numpy(),
                                  tiny_mnist()["t10k-images-idx3-ubyte"])


# ------------------------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, port: int, out: str, results: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    config = dict(dataset="digits", model="mlp", model_args={"width": 8}, rule="fa", epochs=1, output_dir=out,
                  progress=False, verbose=False, device="cpu", metrics_every=0)
    try:
        bioprop.engine.train(config_from_dict(config))
        message = "no error"
    except Exception as err:  # noqa: BLE001
        message = f"{type(err).__name__}: {err}"
    Path(results, f"rank{rank}.txt").write_text(message)


def test_a_config_error_only_rank_0_sees_stops_every_rank_with_the_same_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"a run's")  # only rank 0 looks at the run directory
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_ddp_worker, args=(port, str(out), str(tmp_path)), nprocs=2, join=False,
                                 start_method="spawn")
    try:
        for _ in range(60):  # 2 minutes at most; before the fix rank 1 could wait for rank 0 for ever
            if context.join(timeout=2):
                break
        else:
            pytest.fail("the ranks did not stop")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    lines = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert lines[0] == lines[1]
    assert lines[0].startswith(f"ConfigError: {out} already holds a run (checkpoint.pt)")
    assert (out / "checkpoint.pt").read_bytes() == b"a run's"


def test_report_refuses_a_run_given_twice(tmp_path, capsys):
    out = tmp_path / "r"
    assert run(tmp_path) == 0
    capsys.readouterr()
    assert main(["report", str(out), f"{out}/", "--output-dir", str(tmp_path / "rep")]) == 2
    assert error_line(capsys) == f"bioprop: error: RUN_DIR {out} is given twice; allowed: each run directory once"
    link = tmp_path / "link"
    link.symlink_to(out)
    assert main(["report", str(out), str(link), "--output-dir", str(tmp_path / "rep")]) == 2
    assert f"RUN_DIR {link} is given twice (also as {out})" in error_line(capsys)
    assert not (tmp_path / "rep").exists()  # refused before anything is written
