"""Figure of predicted boxes: one row per detection run, its detections on the first test images.

    python -m bioprop.report.detection runs/bp runs/usf runs/fa --output boxes.png [--images 6] [--min-score 0.3]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_detector", "predicted_boxes_figure", "main"]


def load_detector(run_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    """``(model in eval mode, test split, config dict)`` of a finished detection run (from its checkpoint)."""
    import bioprop
    from ..detection import load_detection
    from ..engine import load_checkpoint
    from ..models import create_model

    config = json.loads((run_dir / "config.json").read_text())
    test = load_detection(config["dataset"], "test", config["data_root"] or None)
    model_args = dict(config["model_args"])
    model = create_model(config["model"], num_classes=test.num_classes, in_channels=3,
                         image_size=int(model_args.get("min_size", 800)), **model_args)
    model = bioprop.convert(model, config["rule"], seed=config["seed"], last_layer=config["last_layer"] or None,
                            **config["rule_options"])
    model.load_state_dict(load_checkpoint(run_dir / "checkpoint.pt")["model"])
    return model.eval(), test, config


@torch.no_grad()
def predicted_boxes_figure(run_dirs: list[Path], images: int = 6, min_score: float = 0.3) -> Any:
    """A matplotlib figure: row r shows run r's boxes (score ≥ ``min_score``, labelled "class score") in red and
    the ground truth in green dashes on the first ``images`` test images."""
    from ..detection import DetectionLoader
    from .figures import pyplot
    plt = pyplot()
    fig, axes = plt.subplots(len(run_dirs), images, figsize=(2.2 * images, 2.4 * len(run_dirs)), squeeze=False)
    for row, run_dir in zip(axes, run_dirs):
        model, test, config = load_detector(run_dir)
        loader = DetectionLoader(test, images, train=False, min_size=model.min_size, max_size=model.max_size)
        batch = next(iter(loader))
        detections = model.detect(model(batch.images), tuple(batch.images.shape[-2:]), batch.image_sizes)
        for i, ax in enumerate(row):
            ax.set_axis_off()
            if i >= len(detections):
                continue
            image, target = test[i]
            ax.imshow(image.permute(1, 2, 0).numpy(), cmap="gray")
            for x1, y1, x2, y2 in target["boxes"].tolist():
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="lime", ls="--", lw=0.8))
            sx, sy = batch.scales[i]
            det = detections[i]
            for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
                if score < min_score:
                    continue
                x1, y1, x2, y2 = box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="red", lw=1.0))
                ax.text(x1, y1 - 1, f"{test.class_names[label]} {score:.2f}", color="red", fontsize=6)
        row[0].set_title(f"{config['rule']} ({run_dir.name})", fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    """Command line of the figure (module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bioprop.report.detection", description=__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="detection run directories")
    parser.add_argument("--output", type=Path, required=True, help="image file to write (png, pdf, svg)")
    parser.add_argument("--images", type=int, default=6, help="test images per run; default 6")
    parser.add_argument("--min-score", type=float, default=0.3, help="smallest score drawn; default 0.3")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.run_dirs if not (p / "checkpoint.pt").is_file()]
    if missing:
        print(f"error: not a finished run directory (no checkpoint.pt): {', '.join(missing)}", file=sys.stderr)
        return 2
    fig = predicted_boxes_figure(args.run_dirs, args.images, args.min_score)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=130)
    print(f"figure: {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
