"""Detection under DDP: 2 gloo processes train on their shards and gather their detections, so the AP the run
reports is the AP of the whole test split (checked against one process scoring the saved weights)."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("pycocotools")

from bioprop.engine import config_from_dict, load_checkpoint, train  # noqa: E402

from detection_data import write_tiny_coco  # noqa: E402
from test_detection_data import TINY_MODEL  # noqa: E402


def _config(root, out) -> dict:  # type: ignore[no-untyped-def]
    # score_thresh 0: every image gets boxes, so a shard left out of the gathering shows in images_detected
    return dict(task="detection", dataset="coco", data_root=str(root), model="retinanet",
                model_args={**TINY_MODEL, "score_thresh": 0.0},
                rule="fa", epochs=1, batch_size=2, lr=0.01, output_dir=str(out), progress=False, verbose=False,
                log_every=1, device="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, config: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        summary = train(config_from_dict(config))
        torch.save(summary, os.path.join(config["output_dir"], f"summary{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_report_the_ap_of_the_whole_split(tmp_path):
    import bioprop
    from bioprop.detection import DetectionLoader, load_detection
    from bioprop.detection.evaluation import coco_ap, to_coco_results
    from bioprop.models import create_model

    write_tiny_coco(tmp_path / "coco", "train2017", n_images=4)
    write_tiny_coco(tmp_path / "coco", "val2017", n_images=5, seed=1)  # odd: the ranks hold 3 and 2 images
    config = _config(tmp_path / "coco", tmp_path / "ddp")
    (tmp_path / "ddp").mkdir()
    mp.spawn(_worker, args=(2, _free_port(), config), nprocs=2, join=True)
    summaries = [torch.load(tmp_path / "ddp" / f"summary{r}.pt", weights_only=False) for r in range(2)]
    for s in summaries:
        s.pop("wall_time_s")
    assert summaries[0] == summaries[1] and summaries[0]["world_size"] == 2 and summaries[0]["steps"] == 2

    model = create_model("retinanet", num_classes=2, in_channels=3, image_size=64, **config["model_args"])
    model = bioprop.convert(model, "fa")
    model.load_state_dict(load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["model"])
    test = load_detection("coco", "test", tmp_path / "coco")
    # The reference: each rank's shard detected in this one process, batched as the engine batches it (8 per
    # rank; the images differ in size, so the padding of a batch changes the features), scored together.
    model.eval()
    results: list = []
    for rank in range(2):
        shard = DetectionLoader(test, 8, train=False, min_size=64, max_size=96, rank=rank, world_size=2)
        for batch in shard:
            with torch.no_grad():
                found = model.detect(model(batch.images), tuple(batch.images.shape[-2:]), batch.image_sizes)
            results += to_coco_results(found, batch.scales, batch.image_ids, test.category_ids)
    scores = coco_ap(test.coco, results)
    scores.update(detections=len(results), images_detected=len({r["image_id"] for r in results}))
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    reported = next(r for r in records if r["kind"] == "epoch")
    assert reported["test_images_detected"] == scores["images_detected"] == 5  # rank 0 holds 3, rank 1 holds 2
    assert reported["test_detections"] == scores["detections"] > 5
    assert scores["ap"] == pytest.approx(summaries[0]["final_ap"], abs=1e-9)
    assert scores["ap50"] == pytest.approx(summaries[0]["final_ap50"], abs=1e-9)
