"""The engine under DDP: 2 CPU processes (gloo) with a global batch of 64 give the weights and the metrics of one
process with a batch of 64, and only rank 0 writes the run directory."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from bioprop.engine import config_from_dict, load_checkpoint, read_records, train





def _config(out: Path, rule: str) -> dict:
    return dict(dataset="digits", model="mlp", model_args={"depth": 2, "width": 32}, rule=rule, epochs=2,
                batch_size=64, lr=0.05, momentum=0.9, optimizer="sgd", schedule="cosine", output_dir=str(out),
                progress=False, verbose=False, log_every=5, metrics_every=0, device="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, configs: list[dict]) -> None:
    # what torchrun sets for each process
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # One process group for both runs (train() joins an existing group and leaves it open), which saves a
    # start-up of the two processes.
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for config in configs:
            train(config_from_dict(config))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    rules = ("fa", "dfa")
    mp.spawn(_worker, args=(2, _free_port(), [_config(root / f"ddp-{rule}", rule) for rule in rules]), nprocs=2,
             join=True)
    return root


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, ddp_runs, rule):
    single = train(config_from_dict(_config(tmp_path / "single", rule)))

    a = load_checkpoint(tmp_path / "single" / "checkpoint.pt")
    b = load_checkpoint(ddp_runs / f"ddp-{rule}" / "checkpoint.pt")
    assert a["step"] == b["step"] == 44  # 22 global batches per epoch either way
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-4, atol=1e-5, msg=key)
    # evaluation is sharded over the ranks and summed: the same test error to float tolerance
    ea = read_records(tmp_path / "single" / "metrics.jsonl", "epoch")
    eb = read_records(ddp_runs / f"ddp-{rule}" / "metrics.jsonl", "epoch")
    assert len(ea) == len(eb) == 2  # rank 1 wrote nothing
    for ra, rb in zip(ea, eb):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "test_top5"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key
    final_b = (ddp_runs / f"ddp-{rule}" / "final.json").read_text()
    assert '"world_size": 2' in final_b and single["world_size"] == 1


def test_reproduce_under_torchrun_trains_every_cell_in_one_process_group(tmp_path):
    """Several cells in one ``bioprop reproduce`` under torchrun: the runs share one process group. (A fresh group
    per run met the previous group's addresses in torchrun's store and hung on the second cell.)"""
    from test_reproduce import tiny_file
    path = tiny_file(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # its own session, so that a hang is ended with every worker torchrun started, not only torchrun itself
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "-m", "bioprop", "reproduce", str(path), "--scale", "smoke", "--only",
                                 "digits/*", "--output-dir", str(out), "--no-report", "--no-progress"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
    try:
        _, stderr = launcher.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
        pytest.fail("bioprop reproduce under torchrun hung (killed after 240 s)")
    assert launcher.returncode == 0, stderr[-2000:]
    table = json.loads((out / "smoke" / "results.json").read_text())
    status = {c["id"]: c["status"] for c in table["cells"]}
    assert status == {"digits/bp": "done", "digits/fa": "done", "wide/fa": "not run",
                      "digits/future": "method not implemented"}
    for row in ("bp", "fa"):
        final = json.loads((out / "smoke" / "digits" / row / "s0" / "final.json").read_text())
        assert final["world_size"] == 2
