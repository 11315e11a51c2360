"""COCO-format data, AP through pycocotools, MNIST-detection, and ``bioprop train --task detection``."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bioprop.cli import main
from bioprop.detection import AnnotationError, CocoDetection, DetectionLoader, coco_ap, load_detection
from bioprop.detection.loader import IMAGENET_MEAN, IMAGENET_STD

from detection_data import CATEGORIES, write_tiny_coco

pycocotools = pytest.importorskip("pycocotools")


def test_loader_reads_boxes_labels_crowd_and_empty_images(tmp_path):
    ann = write_tiny_coco(tmp_path)
    raw = json.loads(ann.read_text())
    ds = CocoDetection(ann, tmp_path / "train2017")
    assert len(ds) == 4 and ds.num_classes == 2 and ds.category_ids == [3, 7]
    image, target = ds[0]
    assert image.shape == (3, 48, 64) and 0 <= image.min() and image.max() <= 1
    first = [a for a in raw["annotations"] if a["image_id"] == 1]
    x, y, w, h = first[0]["bbox"]
    assert target["boxes"][0].tolist() == [x, y, x + w, y + h]
    assert target["labels"].tolist() == [0, 1] and target["iscrowd"].tolist() == [0, 1]
    assert torch.allclose(image[:, y:y + h, x:x + w], torch.ones(3, h, w))  # the box holds the bright patch
    _, empty = ds[1]  # image 2 has no annotation
    assert empty["boxes"].shape == (0, 4) and empty["labels"].numel() == 0


def test_resize_flip_normalise_and_pad(tmp_path):
    ann = write_tiny_coco(tmp_path)
    ds = CocoDetection(ann, tmp_path / "train2017")
    loader = DetectionLoader(ds, 2, train=False, min_size=96, max_size=128, size_divisible=32)
    batch = next(iter(loader))
    # image 1 is 48x64: shorter side to 96 gives 96x128 (longer side 128 <= max); image 2 is 64x40: 96 would make
    # the longer side 153.6 > 128, so the longer side is 128: scale 2, 128x80
    assert batch.image_sizes == [(96, 128), (128, 80)] and batch.scales == [(2.0, 2.0), (2.0, 2.0)]
    assert batch.images.shape == (2, 3, 128, 128)
    assert (batch.images[1, :, :, 80:] == 0).all()  # padding
    _, target = ds[0]
    assert torch.allclose(batch.targets[0]["boxes"], target["boxes"] * 2)
    # normalised: a white pixel (inside image 1's first box) reads (1 - mean) / std
    x1, y1 = (target["boxes"][0] * 2).int().tolist()[:2]
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(batch.images[0, :, y1 + 2, x1 + 2], expected, atol=1e-5)
    # a flipped training image carries mirrored boxes
    train = DetectionLoader(ds, 4, train=True, min_size=48, max_size=1000, seed=3)
    for items, b in zip(train.batches(), train):
        for (index, flip), t, (h, w) in zip(items, b.targets, b.image_sizes):
            info = ds.images[index]  # per-axis factors: the resized sides are rounded
            plain = ds.targets[index]["boxes"] * torch.tensor([w / info["width"], h / info["height"]] * 2)
            if flip:
                plain = torch.stack([w - plain[:, 2], plain[:, 1], w - plain[:, 0], plain[:, 3]], 1)
            assert torch.allclose(t["boxes"], plain, atol=1e-4)


def test_shards_over_ranks_cover_every_image_once(tmp_path):
    ds = CocoDetection(write_tiny_coco(tmp_path, n_images=7), tmp_path / "train2017")
    evals = [DetectionLoader(ds, 2, train=False, rank=r, world_size=2).batches() for r in range(2)]
    seen = sorted(i for b in evals for batch in b for i, _ in batch)
    assert seen == list(range(7))
    trains = [DetectionLoader(ds, 1, train=True, rank=r, world_size=2, seed=5) for r in range(2)]
    for t in trains:
        t.set_epoch(2)
    a, b = (t.batches() for t in trains)
    assert len(a) == len(b) == 3 == len(trains[0])  # 7 images, global batch 2: 3 steps, the last image dropped
    assert not {i for x in a for i, _ in x} & {i for x in b for i, _ in x}


def bad_file(tmp_path: Path, mutate) -> Path:  # type: ignore[no-untyped-def]
    ann = write_tiny_coco(tmp_path)
    data = json.loads(ann.read_text())
    mutate(data)
    ann.write_text(json.dumps(data))
    return ann


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.pop("categories"), "lacks key(s) categories"),
    (lambda d: d["annotations"][0].pop("bbox"), "annotations[0] lacks key(s) bbox"),
    (lambda d: d["images"][0].pop("file_name"), "images[0] lacks key(s) file_name"),
    (lambda d: d["annotations"][1].__setitem__("bbox", [1, 2, -3, 4]), "box of negative size"),
    (lambda d: d["annotations"][0].__setitem__("category_id", 99), "unknown category_id 99; declared: [3, 7]"),
    (lambda d: d["annotations"][0].__setitem__("image_id", 99), "names image_id 99"),
    (lambda d: d["annotations"][0].__setitem__("bbox", [1, 2, 3]), "expected [x, y, width, height]"),
])
def test_bad_annotation_files_give_one_line_errors(tmp_path, mutate, needle):
    ann = bad_file(tmp_path, mutate)
    with pytest.raises(AnnotationError) as err:
        CocoDetection(ann, tmp_path / "train2017")
    assert needle in str(err.value) and "\n" not in str(err.value) and str(ann) in str(err.value)


def test_bad_annotation_file_through_the_cli_is_one_line_exit_1(tmp_path, capsys):
    bad_file(tmp_path / "coco", lambda d: d["annotations"][0].__setitem__("category_id", 99))
    write_tiny_coco(tmp_path / "coco", split="val2017")
    code = main(["train", "--task", "detection", "--dataset", "coco", "--data-root", str(tmp_path),
                 "--model", "retinanet", "--output-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "unknown category_id 99" in err


def test_missing_data_and_unknown_names(tmp_path, capsys):
    with pytest.raises(Exception, match="make-mnist-detection"):
        load_detection("mnist_detection", "train", tmp_path)
    code = main(["train", "--task", "detection", "--dataset", "mnist", "--model", "retinanet"])
    assert code == 2 and "unknown detection dataset 'mnist'; allowed: coco, mnist_detection" in capsys.readouterr().err
    code = main(["train", "--task", "detection", "--dataset", "coco", "--model", "mlp"])
    assert code == 2 and "unknown detection model 'mlp'; allowed: retinanet" in capsys.readouterr().err


def test_detection_data_sets_resolve_through_a_registry(tmp_path):
    from bioprop.detection.coco import SOURCES, how_to_get_if_missing, list_datasets
    assert list_datasets() == ["coco", "mnist_detection"]
    assert dict(SOURCES.describe())["coco"].startswith("COCO 2017")
    for call in (lambda: load_detection("nope", "train", tmp_path), lambda: how_to_get_if_missing("nope", tmp_path)):
        with pytest.raises(ValueError, match=r"^unknown detection data set 'nope'; allowed: coco, mnist_detection$"):
            call()
    assert "make-mnist-detection" in how_to_get_if_missing("mnist_detection", tmp_path)


# ------------------------------------------------------------------------------------------- AP


def hand_made_predictions(gt: dict) -> list[dict]:
    """Exact, shifted, wrong-class and spurious boxes with scores, so every AP term is exercised."""
    rng = np.random.default_rng(0)
    out = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        out.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": [x, y, w, h],
                    "score": float(rng.uniform(0.5, 1))})
        out.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                    "bbox": [x + 0.3 * w, y, w, h], "score": float(rng.uniform(0, 1))})
        out.append({"image_id": ann["image_id"], "category_id": 10 - ann["category_id"],
                    "bbox": [x, y, w, h], "score": float(rng.uniform(0, 0.6))})
    out.append({"image_id": 2, "category_id": 3, "bbox": [1, 1, 10, 10], "score": 0.9})
    return out


def test_ap_wrapper_equals_pycocotools_own(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    ann = write_tiny_coco(tmp_path, n_images=6)
    gt = json.loads(ann.read_text())
    preds = hand_made_predictions(gt)
    # pycocotools' own way: from the files (it computes nothing we fill in: area and iscrowd are in the file)
    (tmp_path / "res.json").write_text(json.dumps(preds))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(ann))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(tmp_path / "res.json")), "bbox")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    ours = coco_ap(gt, preds)
    assert list(ours.values()) == pytest.approx(list(evaluator.stats[:6]), abs=1e-12)
    assert 0 < ours["ap"] < ours["ap50"] < 1
    # perfect predictions give AP 1 (crowd boxes aside), none give 0
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"] if not a["iscrowd"]]
    assert coco_ap(gt, perfect)["ap50"] == pytest.approx(1.0)
    assert coco_ap(gt, [])["ap"] == 0.0


# ----------------------------------------------------------------------------------- MNIST detection


def test_make_mnist_detection_is_deterministic_and_in_spec(tmp_path, capsys):
    sizes = ["--train", "6", "--val", "3", "--test", "4"]
    assert main(["data", "make-mnist-detection", "--output-dir", str(tmp_path / "a"), "--seed", "1", *sizes]) == 0
    assert main(["data", "make-mnist-detection", "--output-dir", str(tmp_path / "b"), "--seed", "1", *sizes]) == 0
    assert main(["data", "make-mnist-detection", "--output-dir", str(tmp_path / "c"), "--seed", "2", *sizes]) == 0
    for split, n in (("train", 6), ("val", 3), ("test", 4)):
        a = (tmp_path / "a" / "annotations" / f"instances_{split}.json").read_text()
        assert a == (tmp_path / "b" / "annotations" / f"instances_{split}.json").read_text()
        assert a != (tmp_path / "c" / "annotations" / f"instances_{split}.json").read_text()
        for png in (tmp_path / "a" / split).iterdir():
            assert png.read_bytes() == (tmp_path / "b" / split / png.name).read_bytes()
        ds = load_detection("mnist_detection", split, tmp_path / "a")
        assert len(ds) == n and ds.class_names == [str(d) for d in range(10)]
        for i in range(n):
            image, target = ds[i]
            assert image.shape == (3, 128, 128)
            assert 1 <= len(target["boxes"]) <= 5
            b = target["boxes"]
            assert (b >= 0).all() and (b <= 128).all() and ((b[:, 2:] - b[:, :2]) <= 48).all()
            for x1, y1, x2, y2 in b.int().tolist():  # a box is the tight box of ink
                patch = image[0, y1:y2, x1:x2]
                assert patch.max() > 0.5
    assert main(["data", "make-mnist-detection", "--output-dir", str(tmp_path / "d"), "--train", "0"]) == 2


# ----------------------------------------------------------------------------------- training


TINY_MODEL = {"backbone": "resnet18", "width": 8, "fpn_channels": 16, "head_convs": 1, "anchor_size": 2.0,
              "min_size": 64, "max_size": 96}


def test_train_detection_end_to_end(tmp_path, capsys):
    write_tiny_coco(tmp_path / "coco", "train2017")
    write_tiny_coco(tmp_path / "coco", "val2017", seed=1)
    args = ["train", "--task", "detection", "--dataset", "coco", "--data-root", str(tmp_path / "coco"),
            "--model", "retinanet", "--rule", "usf", "--epochs", "2", "--batch-size", "2", "--lr", "0.01",
            "--output-dir", str(tmp_path / "run"), "--no-progress", "--set", "last_layer=backprop",
            "--set", "log_every=1", "--device", "cpu"]
    args += [f"--set=model_args.{k}={v if not isinstance(v, str) else json.dumps(v)}" for k, v in TINY_MODEL.items()]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "done: test AP" in out
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["task"] == "detection" and final["steps"] == 4 and final["rule"] == "usf"
    assert 0 <= final["final_ap50"] <= 1 and set(final) >= {"final_ap", "final_ap75", "final_ap_small"}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    # resuming the finished run with one more epoch continues from its checkpoint
    assert main(args + ["--resume", "--epochs", "3"]) == 0
    assert json.loads((tmp_path / "run" / "final.json").read_text())["steps"] == 6
    # the figure of predicted boxes reads the finished run back
    from bioprop.report.detection import main as figure_main
    assert figure_main([str(tmp_path / "run"), "--output", str(tmp_path / "boxes.png"), "--images", "3",
                        "--min-score", "0"]) == 0
    assert (tmp_path / "boxes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure_main([str(tmp_path), "--output", str(tmp_path / "x.png")]) == 2
