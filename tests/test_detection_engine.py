"""Detection on the engine's loop: the run directory's reliability that classification has holds for detection
too (bit-exact resume after a kill, the run lock, verified checkpoints with the checkpoint.prev.pt fallback,
best.pt, NaN stops keeping the last good checkpoint), with detection's own records and final.json."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("pycocotools")

from bioprop.engine import (ConfigError, TrainingDiverged, config_from_dict, load_checkpoint,  # noqa: E402
                            read_records, train)
from bioprop.engine.checkpoint import RunWarning  # noqa: E402

from detection_data import write_tiny_coco  # noqa: E402
from test_detection_data import TINY_MODEL  # noqa: E402
from test_engine import Killed, assert_resumed_equals_uninterrupted, without_timing  # noqa: E402
from test_run_safety import damage_tensor_bytes, same_weights  # noqa: E402


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    write_tiny_coco(root, "train2017")  # 4 images: 2 steps of 2 per epoch
    write_tiny_coco(root, "val2017", seed=1)
    return root


def detection(coco: Path, out: Path, **overrides):  # type: ignore[no-untyped-def]
    """A tiny RetinaNet run of a few seconds: usf with backprop heads, momentum and a cosine schedule."""
    values = dict(task="detection", dataset="coco", data_root=str(coco), model="retinanet",
                  model_args=dict(TINY_MODEL), rule="usf", last_layer="backprop", epochs=3, batch_size=2, lr=0.01,
                  momentum=0.9, schedule="cosine", output_dir=str(out), progress=False, verbose=False, log_every=1,
                  metrics_every=0, device="cpu")
    values.update(overrides)
    return config_from_dict(values)


def test_a_detection_run_resumed_after_a_kill_equals_the_uninterrupted_one(coco, tmp_path):
    reference = train(detection(coco, tmp_path / "uninterrupted"))

    def kill(info):
        if info.step == 3:  # in the middle of epoch 2
            raise Killed

    with pytest.raises(Killed):
        train(detection(coco, tmp_path / "killed"), on_step=kill)
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["epoch"] == 1
    resumed = train(detection(coco, tmp_path / "killed", resume=True))

    log_b = assert_resumed_equals_uninterrupted(tmp_path / "uninterrupted", tmp_path / "killed")
    assert [r["step"] for r in log_b if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    epochs = [r for r in log_b if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert all({"train_loss", "train_loss_cls", "train_loss_box", "test_ap", "test_ap50"} <= set(r) for r in epochs)
    for key in ("final_ap", "final_ap50", "final_ap75", "best_ap", "best_epoch", "steps"):
        assert resumed[key] == reference[key], key
    final = json.loads((tmp_path / "killed" / "final.json").read_text())
    assert final["task"] == "detection" and final["steps"] == 6
    assert final["best_ap"] == max(r["test_ap"] for r in epochs)
    assert load_checkpoint(tmp_path / "killed" / "best.pt")["epoch"] == final["best_epoch"]


def test_the_lock_refuses_a_second_detection_run_in_the_same_directory(coco, tmp_path):
    seen = []

    def second_run(info):
        if info.step == 3 and not seen:  # epoch 1's checkpoint exists; the run is live
            for extra in (dict(resume=True), dict(overwrite=True)):
                with pytest.raises(ConfigError) as err:
                    train(detection(coco, tmp_path / "run", epochs=2, **extra))
                seen.append(str(err.value))

    train(detection(coco, tmp_path / "run", epochs=2), on_step=second_run)
    assert len(seen) == 2
    assert all(f"in use by another bioprop process (pid {os.getpid()}" in message for message in seen)
    assert not (tmp_path / "run" / "run.lock").exists()  # released at the end
    assert [r["epoch"] for r in read_records(tmp_path / "run" / "metrics.jsonl", "epoch")] == [1, 2]


def test_a_damaged_detection_checkpoint_falls_back_to_the_previous_one_and_resumes_exactly(coco, tmp_path):
    # a constant lr: the cosine schedule would depend on the epochs, which the resume raises from 2 to 3
    train(detection(coco, tmp_path / "reference", schedule="none"))
    out = tmp_path / "run"
    train(detection(coco, out, epochs=2, schedule="none"))
    assert load_checkpoint(out / "checkpoint.prev.pt")["epoch"] == 1
    weight = next(v for k, v in load_checkpoint(out / "checkpoint.pt")["model"].items() if k.endswith("weight")
                  and v.numel() >= 64)
    damage_tensor_bytes(out / "checkpoint.pt", weight)
    with pytest.warns(RunWarning, match=r"checkpoint.pt is damaged.*resuming from the previous checkpoint .*"
                                        r"checkpoint.prev.pt \(epoch 1\)"):
        train(detection(coco, out, resume=True, schedule="none"))
    assert same_weights(tmp_path / "reference" / "checkpoint.pt", out / "checkpoint.pt")
    log, reference = read_records(out / "metrics.jsonl"), read_records(tmp_path / "reference" / "metrics.jsonl")
    assert without_timing(log) == without_timing(reference)


def test_a_nan_detection_loss_stops_and_keeps_the_last_good_checkpoint(coco, tmp_path):
    def poison(info):
        if info.step == 3:
            with torch.no_grad():
                for p in info.model.parameters():
                    p.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"training diverged in epoch 2: the loss became nan between steps "
                                               r"\d+ and \d+; the last good checkpoint \(epoch 1\) is kept"):
        train(detection(coco, tmp_path / "run"), on_step=poison)
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    events = read_records(tmp_path / "run" / "metrics.jsonl", "event")
    assert events[-1]["event"] == "nan" and "diverged" in events[-1]["message"]
    assert not (tmp_path / "run" / "run.lock").exists()


def test_detection_analysis_records_the_weight_statistics(coco, tmp_path):
    train(detection(coco, tmp_path / "run", epochs=1, metrics_every=1))
    records = read_records(tmp_path / "run" / "metrics.jsonl", "analysis")
    assert [r["step"] for r in records] == [1, 2]
    assert {"alignment", "sign_concordance", "mean_abs_w"} <= set(records[0]["summary"])
    layers = read_records(tmp_path / "run" / "metrics_layers.jsonl")
    assert layers[0]["metrics"]["grad_angle"] == {}  # the gradient metrics take a classification loss


def test_halve_on_plateau_is_refused_for_detection_with_one_line(coco, tmp_path):
    with pytest.raises(ConfigError, match=r"^schedule 'halve_on_plateau' follows the training accuracy.*allowed for "
                                          r"detection: none, step, multistep, cosine") as err:
        train(detection(coco, tmp_path / "run", schedule="halve_on_plateau"))
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("dataset, augment, flips", [
    ("coco", "auto", True), ("mnist_detection", "auto", False),  # digits are not mirror-symmetric
    ("mnist_detection", "on", True), ("coco", "off", False)])
def test_augment_auto_flips_as_the_data_set_says(tmp_path, dataset, augment, flips):
    from types import SimpleNamespace

    from bioprop.detection.engine import DetectionTask
    from bioprop.engine.distributed import DistEnv
    splits = {"coco": ("train2017", "val2017"), "mnist_detection": ("train", "test")}[dataset]
    for i, split in enumerate(splits):
        write_tiny_coco(tmp_path, split, seed=i)
    config = detection(tmp_path, tmp_path / "run", dataset=dataset, augment=augment)
    data = DetectionTask().build_data(config, DistEnv(), torch.device("cpu"))
    DetectionTask.model_built(data, SimpleNamespace(min_size=64, max_size=96), config, DistEnv(), torch.device("cpu"))
    assert data.train_loader.flip is flips and data.test_loader.flip is False
    # the batches follow: with flips, some training image of the epoch is mirrored; without, none is
    assert any(flip for batch in data.train_loader.batches() for _, flip in batch) is flips
