"""The classification task: images ``(B, C, H, W)`` to logits ``(B, K)``, a config-named loss, top-1/top-5 error.

Its parts of a run (:class:`~bioprop.engine.tasks.Task`): the data set's splits and loaders, the loss, the
forward pass of a training step with its running sums, the evaluation record of an epoch, and the analysis
records of :func:`bioprop.metrics.training_metrics`, and the results: best.pt's epoch (lowest validation error,
else lowest test error), ``final.json``'s error fields and the epoch line.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import metrics
from ..data import DatasetError, create_loader, list_datasets, load_dataset
from ..models import list_models
from .build import LossFn, build_loss
from .config import ConfigError, TrainConfig
from .distributed import DistEnv
from .evaluation import RunningSums, evaluate, record_analysis
from .pipeline import rank_batch
from .runlog import MetricsLog, TensorBoardLog, epoch_line
from .tasks import Task, TaskData, register_task

__all__ = ["ClassificationTask", "dataset_shape"]


@register_task("classification", description="images to class logits; top-1/top-5 error (the papers' tables)")
class ClassificationTask(Task):
    """Images to class logits, trained with a config-named loss and scored by top-1 and top-5 error."""

    def dataset_names(self) -> list[str]:
        return list_datasets()

    def model_names(self) -> list[str]:
        return list_models("classification")

    # ------------------------------------------------------------------------------------------------- data

    def build_data(self, config: TrainConfig, env: DistEnv, device: torch.device) -> TaskData:
        """The train, test (and with ``val_size`` validation) splits and their per-rank loaders.

        Raises:
            ConfigError: a bad data option, a batch that does not divide over the processes or exceeds the set.
            DatasetError: missing or corrupt data files.
        """
        root = config.data_root or None
        try:
            split_train = load_dataset(config.dataset, split="train", root=root, val_size=config.val_size)
            split_test = load_dataset(config.dataset, split="test", root=root, val_size=config.val_size)
            split_val = (load_dataset(config.dataset, split="val", root=root, val_size=config.val_size)
                         if config.val_size > 0 else None)
        except DatasetError:
            raise
        except ValueError as err:  # a bad data option (val_size too large ...), not missing data
            raise ConfigError("val_size" if "val_size" in str(err) else "dataset", str(err)) from None
        num_classes, in_channels, image_size = dataset_shape(split_train)
        batch = rank_batch(config, env)
        augment = {"auto": None, "on": True, "off": False}[config.augment]
        common = dict(device=device, seed=config.seed, rank=env.rank, world_size=env.world_size,
                      num_workers=config.num_workers)
        train_loader = create_loader(split_train, batch, train=True, augment=augment, **common)
        eval_batch = max(batch, 256)
        test_loader = create_loader(split_test, eval_batch, train=False, **common)
        val_loader = create_loader(split_val, eval_batch, train=False, **common) if split_val is not None else None
        if len(train_loader) == 0:
            raise ConfigError("batch_size", f"batch {config.batch_size} is larger than the training set")
        return TaskData(train_loader, test_loader, val_loader,
                        dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size),
                        torch.zeros(2, in_channels, image_size, image_size, device=device))

    def loss(self, config: TrainConfig, data: TaskData, model: nn.Module) -> LossFn:
        """The config's loss for the data's classes."""
        return build_loss(config.loss, data.num_classes)

    # ------------------------------------------------------------------------------------------- training step

    @staticmethod
    def forward(model: nn.Module, loss_fn: LossFn, batch: tuple[Tensor, Tensor], config: TrainConfig,
                device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(loss, logits (B/N, K), x, y)`` of one training batch (``x`` in the memory format the model sees)."""
        x, y = batch  # x: (B/N, C, H, W) normalised on device; y: (B/N,) int64
        if config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
            logits = model(x)  # (B/N, K)
        return loss_fn(logits, y), logits, x, y

    @staticmethod
    def new_window(device: torch.device, step: int) -> RunningSums:
        """The device-side loss and accuracy sums of the steps after ``step``."""
        return RunningSums(device, step)

    # ----------------------------------------------------------------------------------------------- evaluation

    @staticmethod
    def evaluate(model: nn.Module, data: TaskData, loss_fn: LossFn, config: TrainConfig, device: torch.device,
                 env: DistEnv) -> dict[str, Any]:
        """The test (and validation) fields of an "epoch" record: loss, top-1 and top-5 accuracy, error (%)."""
        kwargs = dict(device=device, amp=config.amp, channels_last=config.channels_last, env=env)
        test = evaluate(model, data.test_loader, loss_fn, **kwargs)
        fields: dict[str, Any] = dict(test_loss=test["loss"], test_acc=test["acc"], test_top5=test["top5"],
                                      test_error=test["error"])
        if data.val_loader is not None:
            val = evaluate(model, data.val_loader, loss_fn, **kwargs)
            fields.update(val_loss=val["loss"], val_acc=val["acc"], val_top5=val["top5"], val_error=val["error"])
        return fields

    @staticmethod
    def skipped_evaluation() -> dict[str, Any]:
        """The test fields of an "epoch" record in an epoch without evaluation."""
        return dict(test_loss=None, test_acc=None, test_top5=None, test_error=None)

    # ------------------------------------------------------------------------------------------------- metrics

    @staticmethod
    def analysis(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, head: dict[str, Any],
                 device: torch.device, log: MetricsLog, layer_log: MetricsLog, tb: TensorBoardLog) -> None:
        """Record :func:`bioprop.metrics.training_metrics` on a batch, with the time it took: the per-layer values
        go to ``layer_log`` (``metrics_layers.jsonl``), their summary (mean/min/max over layers) to ``log``."""
        record_analysis(model, head, device, log, layer_log, tb, x, y, loss_fn)

    # ------------------------------------------------------------------------------------------------- results

    @staticmethod
    def history_entry(record: dict[str, Any]) -> dict[str, Any]:
        """The epoch's test (and validation) error."""
        return {"epoch": record["epoch"], "test_error": record["test_error"], "val_error": record.get("val_error")}

    @staticmethod
    def new_best() -> dict[str, Any]:
        """``error`` selects (lower is better); ``test_error`` is the test error of that epoch."""
        return {"error": math.inf, "epoch": 0, "test_error": math.inf}

    @staticmethod
    def better(best: dict[str, Any], record: dict[str, Any], data: TaskData) -> dict[str, Any] | None:
        """The epoch with the lowest validation error (with a validation split), else the lowest test error."""
        selected = record.get("val_error") if data.val_loader is not None else record["test_error"]
        if selected is None or not selected < best["error"]:
            return None
        return {"error": selected, "epoch": record["epoch"], "test_error": record["test_error"]}

    @staticmethod
    def summary(history: list[dict[str, Any]], best: dict[str, Any], model: nn.Module,
                data: TaskData) -> dict[str, Any]:
        """Final and best test error (%), best.pt's epoch and what selected it, the per-layer alignment angles
        (degrees)."""
        errors = [h["test_error"] for h in history if h["test_error"] is not None]
        return {
            "final_test_error": errors[-1] if errors else None,
            "best_test_error": min(errors) if errors else None,
            "best_epoch": best["epoch"],
            "selected_by": "val_error" if data.val_loader is not None else "test_error",
            "test_error_at_best": best["test_error"],
            "alignment": metrics.alignment(model),
        }

    @staticmethod
    def epoch_line(record: dict[str, Any], epochs: int) -> str:
        """Train loss and accuracy, validation and test error, the epoch's time."""
        return epoch_line(record, epochs)


def dataset_shape(dataset: Any) -> tuple[int, int, int]:
    """``(num_classes, in_channels, image_size)`` of a data set (an in-memory set or a torch Dataset)."""
    num_classes = int(dataset.num_classes)
    images = getattr(dataset, "images", None)
    if images is not None:  # (N, C, H, W)
        return num_classes, int(images.shape[1]), int(images.shape[-1])
    x = dataset[0][0]  # (C, H, W)
    return num_classes, int(x.shape[0]), int(x.shape[-1])
