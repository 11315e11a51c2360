"""The detection task behind ``train(config)`` for ``task = "detection"``: COCO-format data, a RetinaNet, AP.

It follows the classification loop's contract (one process per rank, the lr a pure function of the step,
randomness a function of ``(seed, epoch, rank)``, an atomic ``checkpoint.pt`` after every epoch, ``metrics.jsonl``
records, ``final.json``), with detection's pieces: per-image targets, the model's own loss, and evaluation by
COCO AP gathered from all ranks. ``batch_size`` is the global number of images per step.

The run goes through the engine's named steps (:mod:`bioprop.engine.pipeline`): build data
(:meth:`DetectionTask.build_data`, the loaders once the model gives its input resize), build model, build
optimisation, restore, wrap.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

import torch

from ..data import DatasetError
from ..engine import distributed as dist_utils
from ..engine.build import lr_factor
from ..engine.checkpoint import (CheckpointError, check_same_run, load_checkpoint, rng_state, save_checkpoint,
                                 set_rng_state)
from ..engine.config import ConfigError, TrainConfig
from ..engine.loop import StepInfo, TrainingDiverged
from ..engine.pipeline import (build_model, build_optimisation, epoch_seed, rank_batch, seed_everything,
                               set_lr, wrap_model)
from ..engine.provenance import CODE_KEY, code_version
from ..engine.runlog import MetricsLog, jsonable
from ..engine.tasks import Task, TaskData, register_task
from ..models import list_models
from ..rules import after_step
from .coco import list_datasets, load_detection
from .evaluation import AP_KEYS, evaluate_detector
from .loader import DetectionLoader

__all__ = ["DetectionTask", "DetectionRun", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1


class DetectionRun:
    """One detection training run; :meth:`run` does all of it and returns the summary."""

    def __init__(self, config: TrainConfig, env: dist_utils.DistEnv, device: torch.device,
                 on_step: Callable[[Any], None] | None, task: DetectionTask | None = None) -> None:
        self.config, self.env, self.device, self.on_step = config, env, device, on_step
        self.task = task if task is not None else DetectionTask()
        self.out = config.resolved_output_dir()
        self.main = env.is_main

    def _build(self) -> None:
        """Build data → build model → build optimisation → wrap (restoring follows in :meth:`run`)."""
        config, env = self.config, self.env
        seed_everything(config.seed)
        data = self.task.build_data(config, env, self.device)
        model = self.model = build_model(config, self.device, data.model_kwargs, None, rule_error_prefix=False)
        self.task.add_loaders(data, model, config, env, self.device)
        self.train_loader, self.test_loader = data.train_loader, data.test_loader
        self.steps_per_epoch = len(self.train_loader)
        self.optimisation = build_optimisation(config, model, None)
        self.optimizer = self.optimisation.optimizer
        self.train_model = wrap_model(model, config, env, self.device)
        self.epoch, self.step, self.elapsed = 0, 0, 0.0
        self.history: list[dict[str, Any]] = []

    def _state(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "task": "detection", "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "step": self.step,
                "elapsed_s": self.elapsed, "history": [dict(h) for h in self.history], "rng": rng_state(),
                "config": self.config.to_dict(), "log_bytes": self.log.tell(),
                **({"constraints": {c.name: c.state_dict() for c in self.optimisation.constraints}}
                   if self.optimisation.constraints else {})}

    def run(self) -> dict[str, Any]:
        config, ckpt_path = self.config, self.out / "checkpoint.pt"
        checkpoint = None
        if config.resume:
            checkpoint = load_checkpoint(ckpt_path, map_location="cpu")
            if checkpoint.get("format") != CHECKPOINT_FORMAT or checkpoint.get("task") != "detection":
                raise CheckpointError(f"{ckpt_path} is not a detection checkpoint of format {CHECKPOINT_FORMAT}")
            check_same_run(checkpoint["config"], config.to_dict(), ckpt_path)
        elif self.main and ckpt_path.exists() and not config.overwrite:
            raise ConfigError("output_dir", f"{self.out} already holds a run (checkpoint.pt); pass --resume to "
                                            "continue it, --overwrite to start over, or another --output-dir")
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self._build()
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            for constraint in self.optimisation.constraints:
                constraint.load_state_dict(checkpoint["constraints"][constraint.name])
            self.epoch, self.step = int(checkpoint["epoch"]), int(checkpoint["step"])
            self.elapsed, self.history = float(checkpoint["elapsed_s"]), list(checkpoint["history"])
            set_rng_state(checkpoint["rng"])
        self.log = MetricsLog(self.out / "metrics.jsonl", enabled=self.main,
                              resume_at=None if checkpoint is None else int(checkpoint["log_bytes"]))
        try:
            if self.main:
                (self.out / "config.json").write_text(json.dumps(
                    {**config.to_dict(), CODE_KEY: code_version()}, indent=2) + "\n")
            while self.epoch < config.epochs:
                self._epoch(self.epoch + 1)
            return self._finish()
        finally:
            self.log.close()

    def _epoch(self, epoch: int) -> None:
        config, env = self.config, self.env
        seed_everything(epoch_seed(config.seed, epoch, env.rank))
        self.train_loader.set_epoch(epoch)
        self.train_model.train()
        max_steps = int(getattr(config, "max_steps", 0) or 0)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, loss_cls, loss_box, steps
        start, lr = time.perf_counter(), config.lr
        for i, batch in enumerate(self.train_loader):
            if max_steps and i >= max_steps:
                break
            lr = config.lr * lr_factor(config, self.step, self.steps_per_epoch)
            set_lr(self.optimizer, lr)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=config.amp):
                outputs = self.train_model(batch.images)  # (B, N, K), (B, N, 4)
            losses = self.model.loss(outputs, batch.targets, tuple(batch.images.shape[-2:]))
            self.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            self.optimisation.step()  # optimizer step, then the constraints in their safe order
            after_step(self.model, self.step)  # the rules' per-step work (weight mirrors learn B)
            self.step += 1
            sums += torch.stack([losses[k].detach().double() for k in ("loss", "loss_cls", "loss_box")]
                                + [sums.new_tensor(1.0)])
            if config.log_every and self.step % config.log_every == 0:
                values = {k: float(v.detach()) for k, v in losses.items()}
                loss = values["loss"]
                if not math.isfinite(loss):
                    raise TrainingDiverged(f"training diverged in epoch {epoch}: the loss became {loss} at step "
                                           f"{self.step}; the last good checkpoint is kept. Try a lower --lr.")
                self.log.write({"kind": "train", "epoch": epoch, "step": self.step, "lr": lr,
                                **values})
            if self.on_step is not None:
                self.on_step(StepInfo(epoch, self.step, losses["loss"].detach(), self.model, self.optimizer))
        loss, loss_cls, loss_box, steps = dist_utils.all_reduce_sum(sums, env).tolist()
        if not math.isfinite(loss):
            raise TrainingDiverged(f"training diverged in epoch {epoch}: the loss became {loss}; the last good "
                                   "checkpoint is kept. Try a lower --lr.")
        train_time = time.perf_counter() - start
        record: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "step": self.step,
                                  "train_loss": loss / max(steps, 1), "train_loss_cls": loss_cls / max(steps, 1),
                                  "train_loss_box": loss_box / max(steps, 1)}
        eval_start = time.perf_counter()
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            scores = evaluate_detector(self.model, self.test_loader, amp=config.amp, env=env)
            record.update({f"test_{k}": v for k, v in scores.items()})
        eval_time = time.perf_counter() - eval_start
        record.update(epoch_time_s=train_time, eval_time_s=eval_time, lr=lr)
        self.epoch, self.elapsed = epoch, self.elapsed + train_time + eval_time
        self.history.append({"epoch": epoch, **{k: record.get(f"test_{k}") for k in AP_KEYS}})
        self.log.write(record)
        if self.main and config.verbose:
            ap = "" if "test_ap" not in record else (f"  test AP {100 * record['test_ap']:.1f}  AP50 "
                                                     f"{100 * record['test_ap50']:.1f}")
            print(f"epoch {epoch}/{config.epochs}  loss {record['train_loss']:.4f}{ap}  "
                  f"({train_time:.0f}s + {eval_time:.0f}s eval)", flush=True)
        if self.main:
            save_checkpoint(self._state(), self.out / "checkpoint.pt")

    def _finish(self) -> dict[str, Any]:
        config = self.config
        last = next((h for h in reversed(self.history) if h["ap"] is not None), {})
        summary: dict[str, Any] = {
            "task": "detection", "rule": config.rule, "model": config.model, "dataset": config.dataset,
            "epochs": self.epoch, "steps": self.step,
            **{f"final_{k}": last.get(k) for k in AP_KEYS},
            "best_ap": max((h["ap"] for h in self.history if h["ap"] is not None), default=None),
            "final_test_error": None, "best_test_error": None,
            "wall_time_s": self.elapsed, "world_size": self.env.world_size, "output_dir": str(self.out),
            CODE_KEY: code_version(),
        }
        if self.main:
            (self.out / "final.json").write_text(json.dumps(jsonable(summary), indent=2) + "\n")
        return summary


@register_task("detection", description="COCO-format boxes with a RetinaNet; COCO AP (docs/detection.md)")
class DetectionTask(Task):
    """Boxes and classes of the objects in an image (COCO-format data, a RetinaNet), scored by COCO AP."""

    run_class = DetectionRun

    def dataset_names(self) -> list[str]:
        return list_datasets()

    def model_names(self) -> list[str]:
        return list_models("detection")

    def build_data(self, config: TrainConfig, env: dist_utils.DistEnv, device: torch.device) -> TaskData:
        """The train and test sets (their loaders follow in :meth:`add_loaders`, once the model is built: they
        resize images as the model says)."""
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
    def add_loaders(data: TaskData, model: Any, config: TrainConfig, env: dist_utils.DistEnv,
                    device: torch.device) -> None:
        """The per-rank loaders, resizing as ``model`` (a RetinaNet: ``min_size``, ``max_size``) says.

        Raises:
            ConfigError: a batch larger than the training set.
        """
        batch = config.batch_size // env.world_size
        common = dict(min_size=model.min_size, max_size=model.max_size, seed=config.seed, rank=env.rank,
                      world_size=env.world_size, num_workers=config.num_workers, device=device)
        train_set = data.extra["train_set"]
        data.train_loader = DetectionLoader(train_set, batch, train=True, flip=config.augment != "off", **common)
        data.test_loader = DetectionLoader(data.extra["test_set"], max(batch, 8), train=False, **common)
        if len(data.train_loader) == 0:
            raise ConfigError("batch_size", f"batch {config.batch_size} is larger than the training set "
                                            f"({len(train_set)} images)")
