"""The detection task behind ``train(config)`` for ``task = "detection"``: COCO-format data, a RetinaNet, AP.

It is trained by the engine's loop (:class:`bioprop.engine.loop.Run`) like classification, with the same run
directory, lock, verified checkpoints (``checkpoint.pt``, ``checkpoint.prev.pt``, ``best.pt``), divergence
checks and logs; this module supplies detection's parts of it (:class:`~bioprop.engine.tasks.Task`):

- data: the train and test sets, whose per-rank loaders follow once the model gives its input resize
  (:meth:`DetectionTask.model_built`); ``batch_size`` is the global number of images per step;
- the loss: the model's own (focal loss + smooth-L1, :meth:`RetinaNet.loss`), ``{"loss", "loss_cls",
  "loss_box"}``, of which the loop back-propagates ``loss``;
- the "train" records: the three losses averaged over the window (:class:`DetectionSums`);
- evaluation: COCO AP of the test split, gathered from all ranks (``test_ap``, ``test_ap50``, ...);
- results: ``best.pt`` is the epoch of the highest test AP; ``final.json`` holds ``task``, ``final_ap``,
  ``final_ap50``, ..., ``best_ap`` and ``best_epoch``;
- analysis: the weight statistics of :func:`bioprop.metrics.training_metrics` (alignment, sign concordance,
  ``|W|``, ...). Its gradient metrics (the shadow backward) take a classification loss ``loss_fn(model(x), y)``
  and are left empty for detection.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from ..data import DatasetError
from ..engine import distributed as dist_utils
from ..engine.build import SCHEDULES
from ..engine.config import ConfigError, TrainConfig
from ..engine.evaluation import record_analysis
from ..engine.pipeline import rank_batch
from ..engine.runlog import MetricsLog, TensorBoardLog
from ..engine.tasks import Task, TaskData, register_task
from ..models import list_models
from .coco import list_datasets, load_detection
from .evaluation import AP_KEYS, evaluate_detector
from .loader import Batch, DetectionLoader

__all__ = ["DetectionTask", "DetectionLoss", "DetectionSums", "LOSS_KEYS"]

#: the parts of the detection loss, as the "train" records hold them (and ``train_<key>`` the "epoch" records)
LOSS_KEYS = ("loss", "loss_cls", "loss_box")


class DetectionLoss:
    """The model's own loss of a batch: ``loss_fn(outputs, batch) -> {"loss", "loss_cls", "loss_box"}`` (scalars).

    Args:
        model: the RetinaNet itself (not its DDP / compile wrapper), whose anchors and box coder the loss uses.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, outputs: tuple[Tensor, Tensor], batch: Batch) -> dict[str, Tensor]:
        """``outputs``: class logits (B/N, A, K) and box deltas (B/N, A, 4) of ``batch.images``."""
        return self.model.loss(outputs, batch.targets, tuple(batch.images.shape[-2:]))  # type: ignore[operator]


class DetectionSums:
    """The three losses summed on the device between two reads, weighted by the images of each step."""

    def __init__(self, device: torch.device, step: int) -> None:
        self.sums = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=device)
        self.count = 0  # images, known on the host
        self.first_step = step + 1
        self.start = time.perf_counter()

    @torch.no_grad()
    def add(self, loss: Tensor, output: dict[str, Tensor], target: Batch) -> None:
        """``output``: the loss dict of the step; ``target``: its batch."""
        n = len(target.targets)
        self.sums += torch.stack([output[k].detach().double() for k in LOSS_KEYS]) * n
        self.count += n

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def read(self, env: dist_utils.DistEnv, step: int) -> dict[str, float]:
        """``{"loss": Σ loss·n, "loss_cls": ..., "loss_box": ..., "n": images}`` over all processes since the
        last read; starts a new window."""
        values = torch.cat([self.sums, self.sums.new_tensor([float(self.count)])])
        *sums, n = dist_utils.all_reduce_sum(values, env).tolist()
        self.sums.zero_()
        self.count, self.first_step, self.start = 0, step + 1, time.perf_counter()
        return {**dict(zip(LOSS_KEYS, sums)), "n": n}


@register_task("detection", description="COCO-format boxes with a RetinaNet; COCO AP (docs/detection.md)")
class DetectionTask(Task):
    """Boxes and classes of the objects in an image (COCO-format data, a RetinaNet), scored by COCO AP."""

    rule_error_prefix = False  # the detector's own refusal (e.g. of a direct rule) already names the model

    def dataset_names(self) -> list[str]:
        return list_datasets()

    def model_names(self) -> list[str]:
        return list_models("detection")

    # ------------------------------------------------------------------------------------------------- data

    def build_data(self, config: TrainConfig, env: dist_utils.DistEnv, device: torch.device) -> TaskData:
        """The train and test sets (their loaders follow in :meth:`model_built`, once the model is built: they
        resize images as the model says).

        Raises:
            ConfigError: ``halve_on_plateau``, which follows a training accuracy detection does not have.
        """
        if config.schedule == "halve_on_plateau":
            allowed = ", ".join(name for name in SCHEDULES.names() if name != "halve_on_plateau")
            raise ConfigError("schedule", "schedule 'halve_on_plateau' follows the training accuracy, which detection "
                                          f"does not have; allowed for detection: {allowed}")
        root = config.data_root or None
        try:
            train_set = load_detection(config.dataset, "train", root)
            test_set = load_detection(config.dataset, "test", root)
        except ValueError as err:
            if isinstance(err, DatasetError):
                raise
            raise ConfigError("dataset", str(err)) from None
        rank_batch(config, env, what=f"batch of {config.batch_size} images")
        model_kwargs = dict(num_classes=train_set.num_classes, in_channels=3,
                            image_size=int(config.model_args.get("min_size", 800)))
        return TaskData(None, None, None, model_kwargs, extra={"train_set": train_set, "test_set": test_set})

    @staticmethod
    def model_built(data: TaskData, model: nn.Module, config: TrainConfig, env: dist_utils.DistEnv,
                    device: torch.device) -> None:
        """The per-rank loaders, resizing as ``model`` (a RetinaNet: ``min_size``, ``max_size``) says.

        Raises:
            ConfigError: a batch larger than the training set.
        """
        batch = config.batch_size // env.world_size
        common = dict(min_size=model.min_size, max_size=model.max_size, seed=config.seed, rank=env.rank,
                      world_size=env.world_size, num_workers=config.num_workers, device=device)
        train_set = data.extra["train_set"]
        flip = {"auto": train_set.train_flip, "on": True, "off": False}[config.augment]  # auto: the set's own
        data.train_loader = DetectionLoader(train_set, batch, train=True, flip=flip, **common)
        data.test_loader = DetectionLoader(data.extra["test_set"], max(batch, 8), train=False, **common)
        if len(data.train_loader) == 0:
            raise ConfigError("batch_size", f"batch {config.batch_size} is larger than the training set "
                                            f"({len(train_set)} images)")

    @staticmethod
    def loss(config: TrainConfig, data: TaskData, model: nn.Module) -> DetectionLoss:
        """The model's own loss."""
        return DetectionLoss(model)

    # ------------------------------------------------------------------------------------------- training step

    @staticmethod
    def forward(model: nn.Module, loss_fn: DetectionLoss, batch: Batch, config: TrainConfig,
                device: torch.device) -> tuple[Tensor, dict[str, Tensor], Tensor, Batch]:
        """``(loss, {"loss", "loss_cls", "loss_box"}, images (B/N, 3, H, W), batch)`` of one training batch."""
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
            outputs = model(batch.images)  # (B/N, A, K), (B/N, A, 4)
        losses = loss_fn(outputs, batch)
        return losses["loss"], losses, batch.images, batch

    @staticmethod
    def new_window(device: torch.device, step: int) -> DetectionSums:
        """The device-side sums of the three losses of the steps after ``step``."""
        return DetectionSums(device, step)

    # ----------------------------------------------------------------------------------------------- evaluation

    @staticmethod
    def evaluate(model: nn.Module, data: TaskData, loss_fn: DetectionLoss, config: TrainConfig,
                 device: torch.device, env: dist_utils.DistEnv) -> dict[str, Any]:
        """``test_ap``, ``test_ap50``, ``test_ap75``, ``test_ap_small``, ``test_ap_medium``, ``test_ap_large``
        (fractions), ``test_detections`` and ``test_images_detected`` over the whole test split."""
        scores = evaluate_detector(model, data.test_loader, amp=config.amp, env=env)
        return {f"test_{k}": v for k, v in scores.items()}

    @staticmethod
    def skipped_evaluation() -> dict[str, Any]:
        """An epoch without evaluation records no test fields."""
        return {}

    # ------------------------------------------------------------------------------------------------- metrics

    @staticmethod
    def analysis(model: nn.Module, x: Tensor, y: Batch, loss_fn: DetectionLoss, head: dict[str, Any],
                 device: torch.device, log: MetricsLog, layer_log: MetricsLog, tb: TensorBoardLog) -> None:
        """The weight statistics of :func:`bioprop.metrics.training_metrics` (the gradient metrics need a
        classification loss and stay empty)."""
        record_analysis(model, head, device, log, layer_log, tb)

    # ------------------------------------------------------------------------------------------------- results

    @staticmethod
    def history_entry(record: dict[str, Any]) -> dict[str, Any]:
        """The epoch's AP values (None where it was not evaluated)."""
        return {"epoch": record["epoch"], **{k: record.get(f"test_{k}") for k in AP_KEYS}}

    @staticmethod
    def new_best() -> dict[str, Any]:
        return {"ap": None, "epoch": 0}

    @staticmethod
    def better(best: dict[str, Any], record: dict[str, Any], data: TaskData) -> dict[str, Any] | None:
        """The epoch with the highest test AP."""
        ap = record.get("test_ap")
        if ap is None or (best["ap"] is not None and not ap > best["ap"]):
            return None
        return {"ap": ap, "epoch": record["epoch"]}

    @staticmethod
    def summary(history: list[dict[str, Any]], best: dict[str, Any], model: nn.Module,
                data: TaskData) -> dict[str, Any]:
        """``task``, the last evaluated epoch's AP values as ``final_<key>``, ``best_ap`` and its epoch; the
        classification error fields are None."""
        last = next((h for h in reversed(history) if h["ap"] is not None), {})
        return {
            "task": "detection",
            **{f"final_{k}": last.get(k) for k in AP_KEYS},
            "best_ap": max((h["ap"] for h in history if h["ap"] is not None), default=None),
            "best_epoch": best["epoch"],
            "final_test_error": None, "best_test_error": None,
        }

    @staticmethod
    def epoch_line(record: dict[str, Any], epochs: int) -> str:
        """``epoch 2/12  loss 0.4321  test AP 31.2  AP50 52.0  (40s + 5s eval)``."""
        ap = "" if record.get("test_ap") is None else (f"  test AP {100 * record['test_ap']:.1f}  AP50 "
                                                       f"{100 * record['test_ap50']:.1f}")
        return (f"epoch {record['epoch']}/{epochs}  loss {record['train_loss']:.4f}{ap}  "
                f"({record['epoch_time_s']:.0f}s + {record['eval_time_s']:.0f}s eval)")
