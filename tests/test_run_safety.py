"""Run-directory safety: resume from any spelling of the directory, checkpoint digests with the
checkpoint.prev.pt fallback, short logs repaired instead of padded, the run lock, every run file guarding against
an overwrite, lowering the lr on resume, and constraints applied in their safe order."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from bioprop.engine import (CheckpointError, ConfigError, TrainingDiverged, load_checkpoint, read_records,
                            save_checkpoint, train)
from bioprop.engine.checkpoint import RunWarning
from bioprop.engine.rundir import RUN_FILES
from bioprop.engine.runlog import LogError
from test_engine import small, without_timing


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def damage_tensor_bytes(path: Path, tensor: torch.Tensor) -> None:
    """Overwrite 8 bytes inside ``tensor``'s stored data (the zip stays readable)."""
    raw = bytearray(path.read_bytes())
    needle = tensor.contiguous().numpy().tobytes()[:64]
    at = raw.find(needle)
    assert at > 0
    raw[at + 16:at + 24] = b"\x7f" * 8
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------------------------------- item 1


def test_resume_works_whatever_the_spelling_or_place_of_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(small(tmp_path, epochs=1, output_dir="run"))
    for epochs, spelling in enumerate(["run/", "./run", str(tmp_path / "run")], start=2):
        train(small(tmp_path, epochs=epochs, output_dir=spelling, resume=True))
    shutil.move("run", "moved")
    train(small(tmp_path, epochs=5, output_dir="moved", resume=True))
    shutil.copytree("moved", "copied")
    train(small(tmp_path, epochs=6, output_dir=str(tmp_path / "copied"), resume=True))
    assert [r["epoch"] for r in read_records(tmp_path / "copied" / "metrics.jsonl", "epoch")] == [1, 2, 3, 4, 5, 6]
    train(small(tmp_path, "straight", epochs=6))
    assert same_weights(tmp_path / "straight" / "checkpoint.pt", tmp_path / "copied" / "checkpoint.pt")


# ------------------------------------------------------------------------------------------- item 2


def test_a_damaged_checkpoint_is_refused_with_one_line_naming_the_file(tmp_path):
    path = tmp_path / "c.pt"
    w = torch.arange(1000, dtype=torch.float32)
    save_checkpoint({"w": w, "epoch": 1}, path)
    damage_tensor_bytes(path, w)
    assert not torch.equal(torch.load(path, weights_only=True)["w"], w)  # torch alone does not notice
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == f"checkpoint {path} is damaged: its contents do not match the sha256 digest stored in it"
    for garbage in (b"", b"\x80\x02\x8a\x0aabc", b"PK\x03\x04 truncated zip"):
        path.write_bytes(garbage)
        with pytest.raises(CheckpointError, match=r"truncated or not a bioprop checkpoint \(\w+\)$"):
            load_checkpoint(path)


def test_a_checkpoint_without_digest_loads_with_a_warning(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, path)  # what older versions wrote
    with pytest.warns(RunWarning, match="no integrity digest.*loaded unverified"):
        assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))


def test_a_damaged_checkpoint_falls_back_to_the_previous_one_and_resumes_exactly(tmp_path):
    train(small(tmp_path, "reference", epochs=3))
    out = tmp_path / "run"
    train(small(tmp_path, epochs=2))
    assert load_checkpoint(out / "checkpoint.prev.pt")["epoch"] == 1
    damage_tensor_bytes(out / "checkpoint.pt", weights(out / "checkpoint.pt")["1.weight"])
    with pytest.warns(RunWarning, match=r"checkpoint.pt is damaged.*resuming from the previous checkpoint .*"
                                        r"checkpoint.prev.pt \(epoch 1\)"):
        train(small(tmp_path, epochs=3, resume=True))
    assert same_weights(tmp_path / "reference" / "checkpoint.pt", out / "checkpoint.pt")
    log, reference = read_records(out / "metrics.jsonl"), read_records(tmp_path / "reference" / "metrics.jsonl")
    assert without_timing(log) == without_timing(reference)
    assert load_checkpoint(out / "checkpoint.prev.pt")["epoch"] == 2  # rotation goes on from the good files
    # both damaged: one line, no run
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).write_bytes((out / name).read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*checkpoint.pt: truncated.*; the fallback "
                                              r"checkpoint.prev.pt cannot be used either"):
        train(small(tmp_path, epochs=4, resume=True))


def test_a_checkpoint_of_another_state_layout_is_refused_in_one_line(tmp_path):
    """A kp checkpoint of the layout where B was a parameter (``feedback_weight``, trained by the optimizer)."""
    train(small(tmp_path, rule="kp", epochs=1))
    out = tmp_path / "run"
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        state = load_checkpoint(out / "checkpoint.pt")
        model = state["model"]
        for key in [k for k in model if k.endswith("feedback_offset")]:
            prefix = key[: -len("feedback_offset")]
            model[prefix + "feedback_weight"] = model.pop(key) + model[prefix + "weight"]
            del model[prefix + "feedback_offset_state"]
        save_checkpoint(state, out / name)
    with pytest.raises(CheckpointError) as info:
        train(small(tmp_path, rule="kp", epochs=2, resume=True))
    message = str(info.value)
    assert "\n" not in message and "model state in" in message and "does not fit this run" in message and "checkpoint.pt" in message
    assert "feedback_offset" in message and "another state layout" in message
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1  # nothing was overwritten


def test_a_divergence_after_resuming_an_unverified_checkpoint_never_calls_it_good(tmp_path):
    out = tmp_path / "run"
    train(small(tmp_path, epochs=1))
    old = load_checkpoint(out / "checkpoint.pt")
    del old["digest"]
    torch.save(old, out / "checkpoint.pt")  # a checkpoint from before digests
    (out / "checkpoint.prev.pt").unlink(missing_ok=True)

    def poison(info):
        with torch.no_grad():
            next(info.model.parameters()).fill_(float("nan"))

    with pytest.warns(RunWarning), pytest.raises(TrainingDiverged) as info:
        train(small(tmp_path, epochs=2, resume=True), on_step=poison)
    message = str(info.value)
    assert "good" not in message
    assert "resumed from (epoch 1" in message and "no integrity digest" in message
    assert f"--resume --output-dir {out} --lr 0.005" in message


def test_the_divergence_advice_is_a_resume_that_works(tmp_path):
    def poison(info):
        if info.epoch == 2:
            with torch.no_grad():
                next(info.model.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"last good checkpoint \(epoch 1\) is kept at .*checkpoint.pt; "
                                               r"continue with a lower lr: --resume --output-dir .* --lr 0.005"):
        train(small(tmp_path, epochs=2), on_step=poison)
    train(small(tmp_path, epochs=2, lr=0.005, resume=True))  # what the message says works
    events = read_records(tmp_path / "run" / "metrics.jsonl", "event")
    assert [e["event"] for e in events] == ["resume", "lr_change"]  # the log is cut back to the checkpoint
    assert (events[-1]["from"], events[-1]["to"]) == (0.05, 0.005)
    assert read_records(tmp_path / "run" / "metrics.jsonl", "epoch")[-1]["lr"] == 0.005
    with pytest.raises(ConfigError, match=r"lr: checkpoint 0.005, now 0.05\); resume with the same settings \(a "
                                          r"lower --lr is allowed\)"):
        train(small(tmp_path, epochs=3, resume=True))


# ------------------------------------------------------------------------------------------- item 3


def test_a_short_log_is_repaired_from_its_records_and_never_padded(tmp_path):
    out = tmp_path / "run"
    train(small(tmp_path, epochs=1))
    log = out / "metrics.jsonl"
    full = log.read_bytes()
    log.write_bytes(full[: len(full) // 2])  # a host crash or a partial copy
    kept = [r for r in read_records(log)]
    with pytest.warns(RunWarning, match=rf"usable bytes where the checkpoint expects {len(full)}.*kept its first "
                                        rf"{len(kept)} complete records"):
        train(small(tmp_path, epochs=2, resume=True))
    data = log.read_bytes()
    assert b"\x00" not in data
    records = read_records(log)
    assert records[: len(kept)] == kept
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [2]
    assert records[len(kept)]["event"] == "resume"


def test_read_records_refuses_a_padded_log_and_skips_only_a_cut_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"kind": "train", "step": 1}\n' + b"\x00" * 20 + b'{"kind": "epoch", "epoch": 1}\n')
    with pytest.raises(LogError, match=r"metrics.jsonl line 2 is not a JSON record"):
        read_records(path)
    path.write_bytes(b'{"kind": "train", "step": 1}\n{"kind": "tra')  # killed while writing a record
    assert read_records(path) == [{"kind": "train", "step": 1}]


# ------------------------------------------------------------------------------------------- item 4


@pytest.mark.parametrize("survivor", RUN_FILES)
def test_any_run_file_left_protects_the_run(tmp_path, survivor):
    out = tmp_path / "run"
    train(small(tmp_path, epochs=2, metrics_every=10))  # metrics_every: the layer log too
    for name in RUN_FILES:
        if name != survivor:
            (out / name).unlink()
    before = (out / survivor).read_bytes()
    with pytest.raises(ConfigError, match=rf"already holds a run \({survivor}\); pass --resume"):
        train(small(tmp_path, epochs=1))
    assert (out / survivor).read_bytes() == before


def test_overwrite_clears_the_previous_runs_files(tmp_path):
    out = tmp_path / "run"
    train(small(tmp_path, epochs=2))
    train(small(tmp_path, epochs=1, overwrite=True, val_size=100))  # best.pt now follows val_error
    assert load_checkpoint(out / "best.pt")["epoch"] == 1 and not (out / "checkpoint.prev.pt").exists()


def test_a_second_process_in_a_live_run_is_refused(tmp_path):
    seen = []

    def second_resume(info):
        if info.step == 30 and not seen:  # epoch 1's checkpoint exists; the run is live
            with pytest.raises(ConfigError) as err:
                train(small(tmp_path, epochs=2, resume=True))
            seen.append(str(err.value))

    train(small(tmp_path, epochs=2), on_step=second_resume)
    assert seen and f"in use by another bioprop process (pid {os.getpid()}" in seen[0]
    assert not (tmp_path / "run" / "run.lock").exists()  # released at the end
    assert [r["epoch"] for r in read_records(tmp_path / "run" / "metrics.jsonl", "epoch")] == [1, 2]


def test_a_lock_of_a_live_process_refuses_and_a_stale_one_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "run.lock").write_text(f"{live.pid}\n")
        with pytest.raises(ConfigError, match=rf"in use by another bioprop process \(pid {live.pid}, lock"):
            train(small(tmp_path, epochs=1))
    finally:
        live.kill()
        live.wait()
    (out / "run.lock").write_text(f"{live.pid} another-host\n")  # a cluster sharing the directory: not checkable
    with pytest.raises(ConfigError, match=rf"in use by a bioprop process on host another-host \(pid {live.pid}, "
                                          r"lock .*run.lock\); wait for it to end, delete the lock if that process"):
        train(small(tmp_path, epochs=1))
    (out / "run.lock").write_text(f"{live.pid}\n")  # a lock naming no host is this host's
    held: list[str] = []
    with pytest.warns(RunWarning, match=rf"removing the stale lock .*run.lock \(its process {live.pid} is gone\)"):
        train(small(tmp_path, epochs=1), on_step=lambda info: held.append((out / "run.lock").read_text()))
    assert not (out / "run.lock").exists() and (out / "final.json").is_file()
    assert held[0] == f"{os.getpid()} {socket.gethostname()}\n"  # while it trains: its pid and host


# ------------------------------------------------------------------------------------------- resume rough edges


def test_resuming_to_fewer_epochs_than_done_says_the_run_is_past_them(tmp_path):
    train(small(tmp_path, epochs=2))
    with pytest.raises(ConfigError, match=r"already past epoch 1: its checkpoint is at epoch 2; pass --epochs N "
                                          r"with N > 2"):
        train(small(tmp_path, epochs=1, resume=True))


# ------------------------------------------------------------------------------------------- issue 10


def test_constant_norm_holds_exactly_whatever_the_config_order(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunWarning)
        train(small(tmp_path, epochs=1, lr=0.5, constraints=["constant_norm", "fixed_sign"]))
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    norms = checkpoint["constraints"]["constant_norm"]["norms"]
    signs = checkpoint["constraints"]["fixed_sign"]["signs"]
    clamped = 0
    for name, target in norms.items():
        w = checkpoint["model"][name].double()
        assert w.norm().item() == pytest.approx(target.item(), rel=1e-6), name
        assert (w * signs[name].double() >= 0).all(), name  # and the signs hold
        clamped += int((w == 0).sum())
    assert clamped > 0  # the sign projection did act, so the order matters



def test_constraints_hold_exactly_after_every_engine_step_in_either_config_order(tmp_path):
    """After each optimizer step of the engine (seen through ``on_step``), FixedSign and ConstantNorm both hold
    with the config order that lists the rescaling first; the reference norms and signs are those of the same
    model built independently from the same seed, before any step."""
    import bioprop
    from bioprop.models import create_model
    torch.manual_seed(0)
    reference = bioprop.convert(create_model("mlp", num_classes=10, in_channels=1, image_size=8, depth=2, width=32),
                                "fa", seed=0)
    initial = {n: p.detach().double() for n, p in reference.named_parameters() if n.endswith("weight")}
    assert all((w != 0).all() for w in initial.values())  # every sign is assigned from the start
    clamped, steps = [0], [0]

    def check(info) -> None:
        weights = {n: p.detach().double() for n, p in info.model.named_parameters() if n in initial}
        assert weights.keys() == initial.keys()
        for name, w in weights.items():
            assert w.norm().item() == pytest.approx(initial[name].norm().item(), rel=1e-6), (info.step, name)
            assert (w * initial[name].sign() >= 0).all(), (info.step, name)
            clamped[0] += int((w == 0).sum())
        steps[0] += 1

    train(small(tmp_path, epochs=1, lr=0.5, constraints=["constant_norm", "fixed_sign"]), on_step=check)
    assert steps[0] == 22
    assert clamped[0] > 0  # the sign projection did act, so the order matters


# ------------------------------------------------------------------------------------------- atomic writes


def test_atomic_writes_that_fail_keep_the_previous_file_and_say_why_in_one_line(tmp_path):
    from bioprop.engine.checkpoint import write_text_atomic
    record = tmp_path / "final.json"
    write_text_atomic(record, '{"old": 1}\n')
    (tmp_path / f"final.json.{os.getpid()}.tmp").mkdir()  # something that is not ours sits on the temporary name
    with pytest.raises(CheckpointError, match=r"^cannot write .*final.json: Is a directory \(.*final.json.\d+.tmp "
                                              r"is in the way\); the previous file there is kept \(remove what is "
                                              r"in the way or pick another --output-dir\)$") as info:
        write_text_atomic(record, '{"new": 2}\n')
    assert "\n" not in str(info.value) and record.read_text() == '{"old": 1}\n'
    assert (tmp_path / f"final.json.{os.getpid()}.tmp").is_dir()  # left as it was
    (tmp_path / f"final.json.{os.getpid()}.tmp").rmdir()
    with pytest.raises(CheckpointError, match="File name too long; nothing was written there"):
        write_text_atomic(tmp_path / ("x" * 300), "text")
    assert write_text_atomic(record, '{"new": 2}\n').read_text() == '{"new": 2}\n'
    (tmp_path / "results.md").mkdir()  # a directory on the destination itself: that is what the message names
    with pytest.raises(CheckpointError, match=r"results.md: Is a directory \(\S*/results.md is in the way\); "
                                              r"nothing was written there"):
        write_text_atomic(tmp_path / "results.md", "text")
    assert not list(tmp_path.glob("results.md.*.tmp"))  # the temporary file is gone

    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint({"epoch": 1}, checkpoint)
    (tmp_path / "checkpoint.pt.tmp").mkdir()
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*checkpoint.pt: Is a directory; the "
                                              r"previous checkpoint there is kept"):
        save_checkpoint({"epoch": 2}, checkpoint)
    assert load_checkpoint(checkpoint)["epoch"] == 1
