"""``train(config)``: data → model → convert → loss → step, with evaluation, checkpoints and logs.

One epoch, per process::

    reseed(seed, epoch, rank); loader.set_epoch(epoch)         # order and randomness depend on (seed, epoch)
    for x, y in loader:                                         # x (B/N, C, H, W) on device, y (B/N,)
        lr = config.lr * lr_factor(step)                        # pure function of the step
        loss = loss_fn(model(x), y); loss.backward(); optimizer.step(); constraints()
    evaluate → "epoch" record → best.pt → checkpoint.pt (atomic)

Because everything random is a function of ``(seed, epoch, rank)`` and every other piece of state is in the
checkpoint, resuming from an end-of-epoch checkpoint gives bit-for-bit the run that was never stopped.
"""
from __future__ import annotations

import gc
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed as dist_utils
from .build import build_loss, build_optimizer, lr_factor
from .checkpoint import rng_state, save_checkpoint, set_rng_state
from .config import ConfigError, TrainConfig, check_values, rule_options_of
from .evaluation import RunningSums, evaluate
from .plateau import PlateauHalving
from .rundir import (RunLock, check_output_dir, divergence_advice, make_output_dir, remove_run_files,
                     resume_checkpoint, run_files)
from .runlog import MetricsLog, TensorBoardLog, epoch_line, jsonable, progress

__all__ = ["train", "evaluate", "TrainingDiverged", "StepInfo", "CHECKPOINT_FORMAT", "LAYERS_LOG"]

#: the side file of ``metrics.jsonl`` holding the per-layer values of each analysis record
LAYERS_LOG = "metrics_layers.jsonl"

#: bumped when the checkpoint layout changes incompatibly
CHECKPOINT_FORMAT = 1


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class StepInfo:
    """What an ``on_step`` callback sees after each optimizer step."""

    epoch: int  # 1-based epoch the step belongs to
    step: int  # optimizer steps done so far in the run
    loss: Tensor  # this step's loss (scalar, on the device; reading it synchronises)
    model: nn.Module  # the model itself (not the DDP/compile wrapper)
    optimizer: torch.optim.Optimizer


def train(config: TrainConfig, *, on_step: Callable[[StepInfo], None] | None = None) -> dict[str, Any]:
    """Train as ``config`` says and return the run's summary (also written to ``<output_dir>/final.json``).

    Under ``torchrun`` each process calls this; the rank comes from the environment.

    Args:
        config: the run (see :class:`TrainConfig`); it is checked first.
        on_step: optional callback after every optimizer step (e.g. custom logging).

    Returns:
        The summary: rule, model, dataset, epochs, steps, best and final test error (%), final per-layer
        alignment angles (degrees), wall time, output directory.

    Raises:
        ConfigError: a bad config value.
        TrainingDiverged: the loss or the weights became NaN/inf (the last good checkpoint is kept).
        CheckpointError: ``resume`` without a readable checkpoint.
    """
    check_values(config)
    env = dist_utils.detect()
    device = dist_utils.choose_device(config.device, env)
    owns_group = env.distributed and not torch.distributed.is_initialized()
    dist_utils.setup(env, device)
    run: Any = None
    try:
        run = _Run(config, env, device, on_step) if config.task == "classification" else \
            task_run(config.task)(config, env, device, on_step)
        return run.run()
    finally:
        del run
        # Free the DDP reducer while its process group still exists: destroying the group first makes the
        # reducer tear the group down itself later, which can deadlock with gloo's worker threads.
        if env.distributed:
            gc.collect()
        if owns_group:
            dist_utils.teardown(env)


def task_run(task: str) -> Any:
    """The run class of a non-classification ``task`` (same constructor and ``run()`` as the classification
    run); the hook through which ``train`` reaches :mod:`bioprop.detection`."""
    if task == "detection":
        from ..detection.engine import DetectionRun
        return DetectionRun
    raise ConfigError("task", f"unknown task {task!r}; allowed: classification, detection")


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), NumPy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A well-mixed seed for one epoch of one process, a function of ``(seed, epoch, rank)`` only."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


class _Run:
    """The state of one training run; :meth:`run` is the whole of it."""

    def __init__(self, config: TrainConfig, env: dist_utils.DistEnv, device: torch.device,
                 on_step: Callable[[StepInfo], None] | None) -> None:
        self.config, self.env, self.device, self.on_step = config, env, device, on_step
        self.out = config.resolved_output_dir()
        self.main = env.is_main
        self.lock = RunLock(self.out)
        # the newest checkpoint known to be good (written here, or read back with a matching digest), if any
        self.good_checkpoint: Path | None = None
        self.keep_previous = True  # whether checkpoint.pt may become checkpoint.prev.pt at the next save

    # ------------------------------------------------------------------------------------------ set-up

    def _set_up(self) -> dict[str, Any] | None:
        """Everything before the first collective: checks, the run directory and its lock, the build."""
        config = self.config
        if self.main:
            check_output_dir(self.out)
            if self.out.is_dir():  # lock before reading anything in it
                self.lock.acquire()
        checkpoint = self._prepare_output()
        self._build(checkpoint)  # validates the model, rule and data before the directory is created
        if self.main:
            make_output_dir(self.out)
            if not self.lock.held:
                self.lock.acquire()
                if not config.overwrite:
                    self._refuse_existing()  # another run may have started here while this one was built
            if config.overwrite:
                remove_run_files(self.out)
        return checkpoint

    def _refuse_existing(self) -> None:
        found = run_files(self.out)
        if found:
            raise ConfigError("output_dir", f"{self.out} already holds a run ({', '.join(found)}); pass --resume "
                                            "to continue it, --overwrite to start over, or another --output-dir")

    def _prepare_output(self) -> dict[str, Any] | None:
        """Check the run directory and load the checkpoint to resume; None for a fresh run."""
        config = self.config
        if config.resume:
            checkpoint, path = resume_checkpoint(self.out, config, CHECKPOINT_FORMAT)
            self.resumed_from = path
            self.keep_previous = path.name == "checkpoint.pt"  # never let a damaged checkpoint.pt become prev
            self.good_checkpoint = path if "digest" in checkpoint else None
            return checkpoint
        if self.main and not config.overwrite:
            self._refuse_existing()
        return None

    def _build(self, checkpoint: dict[str, Any] | None) -> None:
        import bioprop
        from ..data import DatasetError, create_loader, load_dataset
        from ..models import create_model
        from ..optim import create_constraint

        config, env, device = self.config, self.env, self.device
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        seed_everything(config.seed)

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
        num_classes, in_channels, image_size = _dataset_shape(split_train)
        self.num_classes = num_classes

        if config.batch_size % env.world_size:
            raise ConfigError("batch_size", f"the global batch {config.batch_size} must divide evenly over "
                                            f"{env.world_size} processes")
        self.rank_batch = config.batch_size // env.world_size
        augment = {"auto": None, "on": True, "off": False}[config.augment]
        common = dict(device=device, seed=config.seed, rank=env.rank, world_size=env.world_size,
                      num_workers=config.num_workers)
        self.train_loader = create_loader(split_train, self.rank_batch, train=True, augment=augment, **common)
        eval_batch = max(self.rank_batch, 256)
        self.test_loader = create_loader(split_test, eval_batch, train=False, **common)
        self.val_loader = (create_loader(split_val, eval_batch, train=False, **common)
                           if split_val is not None else None)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ConfigError("batch_size", f"batch {config.batch_size} is larger than the training set")
        if config.max_steps:  # the schedule and the step counter see the capped epoch as a whole epoch
            self.steps_per_epoch = min(self.steps_per_epoch, config.max_steps)

        try:
            model = create_model(config.model, num_classes=num_classes, in_channels=in_channels,
                                 image_size=image_size, **config.model_args)
        except (TypeError, ValueError) as err:  # an unknown or bad keyword in model_args
            raise ConfigError("model_args", f"model_args of {config.model!r}: {err}") from None
        try:
            model = bioprop.convert(model, config.rule, seed=config.seed, last_layer=config.last_layer or None,
                                    **rule_options_of(config))
            model.to(device)
            if config.channels_last:
                model.to(memory_format=torch.channels_last)
            # State that depends on the model's output (direct feedback's D matrices) is drawn now, before a
            # checkpoint is loaded and before DDP registers the buffers; a no-op for most rules.
            bioprop.prepare(model, torch.zeros(2, in_channels, image_size, image_size, device=device))
        except ValueError as err:  # a rule that cannot apply to this model or this last_layer
            key = "last_layer" if config.last_layer and "last_layer" in str(err) else "rule"
            raise ConfigError(key, f"rule {config.rule!r} on model {config.model!r}: {err}") from None
        self.model = model
        try:
            self.constraints = [create_constraint(name, model) for name in config.constraints]
        except ValueError as err:  # e.g. constant_norm on zero-initialised weights
            raise ConfigError("constraints", f"constraints: {err}") from None
        self.optimizer = build_optimizer(config, model)
        self.loss_fn = build_loss(config.loss, num_classes)
        self.after_step = bioprop.after_step

        self.epoch, self.step, self.elapsed = 0, 0, 0.0
        self.loss_reference: float | None = None  # the first logged training loss (divergence_factor)
        self.divergence_warned = False
        self.analysed_step = -1  # the step of the last analysis record
        self.best: dict[str, Any] = {"error": math.inf, "epoch": 0, "test_error": math.inf}
        self.history: list[dict[str, Any]] = []
        self.plateau = (PlateauHalving(config.plateau_smoothing, config.plateau_halvings, config.plateau_stop_error)
                        if config.schedule == "halve_on_plateau" else None)
        if checkpoint is not None:
            self._restore(checkpoint)

    def _wrap(self) -> None:
        """DDP and ``torch.compile`` around the model (after every rank has passed its checks)."""
        config, env, device, model = self.config, self.env, self.device, self.model
        wrapped: nn.Module = model
        if env.distributed:
            wrapped = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if config.compile:
            wrapped = torch.compile(wrapped)
        self.train_model = wrapped

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        for constraint in self.constraints:
            constraint.load_state_dict(checkpoint["constraints"][constraint.name])
        self.epoch, self.step = int(checkpoint["epoch"]), int(checkpoint["step"])
        self.elapsed = float(checkpoint["elapsed_s"])
        self.best = dict(checkpoint["best"])
        self.history = [dict(h) for h in checkpoint["history"]]
        set_rng_state(checkpoint["rng"])
        if self.plateau is not None:
            self.plateau.load_state_dict(checkpoint["plateau"])
        self.loss_reference = checkpoint.get("loss_reference")  # absent in older checkpoints: set it again

    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"name": self.config.schedule, "step": self.step, "steps_per_epoch": self.steps_per_epoch},
            "constraints": {c.name: c.state_dict() for c in self.constraints},
            "epoch": self.epoch,
            "step": self.step,
            "elapsed_s": self.elapsed,
            "best": dict(self.best),
            "history": [dict(h) for h in self.history],
            "rng": rng_state(),
            "config": self.config.to_dict(),
            "log_bytes": self.log.tell(),
            **({"plateau": self.plateau.state_dict()} if self.plateau is not None else {}),
            "loss_reference": self.loss_reference,
            "layer_log_bytes": self.layer_log.tell(),
        }

    # ------------------------------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        config = self.config
        try:
            error: Exception | None = None
            try:
                checkpoint = self._set_up()
            except Exception as err:  # noqa: BLE001 - handed to every rank, then raised
                error = err
            # An error only one rank saw (rank 0 checks the run directory) stops every rank with the same line.
            error = dist_utils.first_error(error, self.env)  # type: ignore[assignment]
            if error is not None:
                raise error
            self._wrap()
            self.log = MetricsLog(self.out / "metrics.jsonl", enabled=self.main,
                                  resume_at=None if checkpoint is None else int(checkpoint["log_bytes"]))
            # the per-layer arrays of the analysis records: metrics.jsonl keeps one summary line per record
            self.layer_log = MetricsLog(self.out / LAYERS_LOG, enabled=self.main and config.metrics_every > 0,
                                        resume_at=None if checkpoint is None
                                        else int(checkpoint.get("layer_log_bytes", 0)))
            self.tb = TensorBoardLog(self.out / "tensorboard", enabled=self.main and config.tensorboard,
                                     purge_step=self.step if checkpoint is not None else None)
            try:
                if self.main:
                    (self.out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
                if checkpoint is not None:
                    self._write({"kind": "event", "event": "resume", "epoch": self.epoch, "step": self.step,
                                 "checkpoint": str(self.resumed_from)})
                    if config.lr != checkpoint["config"].get("lr", config.lr):
                        self._write({"kind": "event", "event": "lr_change", "epoch": self.epoch, "step": self.step,
                                     "from": checkpoint["config"]["lr"], "to": config.lr})
                while self.epoch < config.epochs and not (self.plateau is not None and self.plateau.stop_reason):
                    self._train_epoch(self.epoch + 1)
                return self._finish()
            finally:
                self.log.close()
                self.layer_log.close()
                self.tb.close()
        finally:
            self.lock.release()

    def _write(self, record: dict[str, Any]) -> None:
        self.log.write(record)
        self.tb.record(record)

    def _train_epoch(self, epoch: int) -> None:
        from ..optim import apply_constraints
        config, env, device = self.config, self.env, self.device
        # Dropout, augmentation and shuffling draw from here: a function of (seed, epoch, rank) only, so a
        # resumed epoch repeats the interrupted one exactly.
        seed_everything(epoch_seed(config.seed, epoch, env.rank))
        self.train_loader.set_epoch(epoch)
        self.train_model.train()
        read_every = config.log_every or 50  # also how often NaN/inf is looked for
        totals = [0.0, 0.0, 0.0]  # loss·n, correct, n over the epoch, all processes
        window = RunningSums(device, self.step)
        bar = progress(self.train_loader, enabled=config.progress and self.main, total=self.steps_per_epoch,
                       desc=f"epoch {epoch}/{config.epochs}")
        start = time.perf_counter()
        lr = config.lr
        for batch_index, (x, y) in enumerate(bar):
            # x: (B/N, C, H, W) normalised on device; y: (B/N,) int64
            lr = config.lr * lr_factor(config, self.step, self.steps_per_epoch)
            if self.plateau is not None:
                lr *= self.plateau.factor
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if config.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
                logits = self.train_model(x)  # (B/N, K)
            loss = self.loss_fn(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            apply_constraints(self.constraints)  # sign projections before rescaling, so both hold exactly
            self.after_step(self.model, self.step)  # the rules' per-step work (weight mirrors learn B)
            self.step += 1
            window.add(loss, logits, y)
            if self.step % read_every == 0:
                self._read_window(window, totals, epoch, lr, bar)
            if config.metrics_every and self.step % config.metrics_every == 0 and self.main:
                self._analysis(epoch, x, y)
            if self.on_step is not None:
                self.on_step(StepInfo(epoch, self.step, loss.detach(), self.model, self.optimizer))
            if batch_index + 1 >= self.steps_per_epoch:  # max_steps: every process stops at the same batch
                break
        bar.close()
        if config.metrics_every and self.main and self.analysed_step != self.step:
            self._analysis(epoch, x, y)  # every epoch ends with a record, so short runs still show their course
        if window.count or env.distributed:  # every process reads, so the reduction always pairs up
            self._read_window(window, totals, epoch, lr, None, write=False)
        train_time = time.perf_counter() - start
        self._end_epoch(epoch, totals, train_time)

    def _read_window(self, window: RunningSums, totals: list[float], epoch: int, lr: float, bar: Any,
                     write: bool = True) -> None:
        """Reduce the window's sums over processes, stop on NaN/inf, write a "train" record."""
        first_step, seconds = window.first_step, window.seconds()
        loss_sum, correct, n = window.read(self.env, self.step)
        for i, value in enumerate((loss_sum, correct, n)):
            totals[i] += value
        if not math.isfinite(loss_sum):
            self._diverged(epoch, f"the loss became {loss_sum} between steps {first_step} and {self.step}")
        if n == 0:
            return
        self._check_explosion(epoch, loss_sum / n, first_step)
        record = {"kind": "train", "epoch": epoch, "step": self.step, "loss": loss_sum / n, "acc": correct / n,
                  "lr": lr, "samples_per_s": n / max(seconds, 1e-9)}
        if write and self.config.log_every:
            self._write(record)
        if bar is not None:
            bar.set_postfix_str(f"loss {record['loss']:.4f}  acc {100 * record['acc']:.2f}%  "
                                f"{record['samples_per_s']:.0f} samples/s", refresh=False)

    def _diverged(self, epoch: int, what: str, event: str = "nan") -> None:
        advice = divergence_advice(self.out, self.config.lr, self.epoch, self.good_checkpoint,
                                   getattr(self, "resumed_from", None))
        message = f"training diverged in epoch {epoch}: {what}; {advice}"
        self._write({"kind": "event", "event": event, "epoch": epoch, "step": self.step, "message": message})
        raise TrainingDiverged(message)

    def _check_explosion(self, epoch: int, loss: float, first_step: int) -> None:
        """Stop (or warn once) when a finite window loss exceeds ``divergence_factor`` × the run's first one.

        Every process sees the same reduced loss, so under DDP all of them stop at the same window.
        """
        factor, reference = self.config.divergence_factor, self.loss_reference
        if not factor:
            return
        if reference is None:
            self.loss_reference = loss
            return
        if not loss > factor * reference or reference <= 0:
            return
        what = (f"the training loss rose to {loss:.3g} between steps {first_step} and {self.step}, more than "
                f"divergence_factor = {factor:g} times its first value {reference:.3g}")
        if self.config.divergence_action == "stop":
            self._diverged(epoch, what, event="diverged")
        if not self.divergence_warned:
            self.divergence_warned = True
            message = f"the loss is exploding in epoch {epoch}: {what}; training goes on (divergence_action = 'warn')"
            self._write({"kind": "event", "event": "diverging", "epoch": epoch, "step": self.step,
                         "message": message})
            if self.main:
                print(f"bioprop: warning: {message}", file=sys.stderr, flush=True)

    def _analysis(self, epoch: int, x: Tensor, y: Tensor) -> None:
        """Record ``bioprop.metrics.training_metrics`` on the current batch, with the time it took: the per-layer
        values go to ``metrics_layers.jsonl``, their summary (mean/min/max over layers) to ``metrics.jsonl``."""
        from .. import metrics
        fn = getattr(metrics, "training_metrics", None)
        if fn is None:
            return
        self.analysed_step = self.step
        start = time.perf_counter()
        values = fn(self.model, x, y, self.loss_fn)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        values = jsonable(values)
        head = {"kind": "analysis", "epoch": epoch, "step": self.step}
        self.layer_log.write({**head, "metrics": values})
        self.log.write({**head, "time_s": seconds, "summary": metrics.summarize_metrics(values)})
        self.tb.record({**head, "metrics": values})

    def _end_epoch(self, epoch: int, totals: list[float], train_time: float) -> None:
        config = self.config
        loss_sum, correct, n = totals
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            self._diverged(epoch, "the weights became NaN or infinite")
        record: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "step": self.step,
                                  "train_loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1)}
        eval_start = time.perf_counter()
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            kwargs = dict(device=self.device, amp=config.amp, channels_last=config.channels_last, env=self.env)
            test = evaluate(self.model, self.test_loader, self.loss_fn, **kwargs)
            record.update(test_loss=test["loss"], test_acc=test["acc"], test_top5=test["top5"],
                          test_error=test["error"])
            if self.val_loader is not None:
                val = evaluate(self.model, self.val_loader, self.loss_fn, **kwargs)
                record.update(val_loss=val["loss"], val_acc=val["acc"], val_top5=val["top5"],
                              val_error=val["error"])
        else:
            record.update(test_loss=None, test_acc=None, test_top5=None, test_error=None)
        eval_time = time.perf_counter() - eval_start
        record.update(epoch_time_s=train_time, eval_time_s=eval_time,
                      lr=self.optimizer.param_groups[0]["lr"])
        if self.plateau is not None:  # decides the next epoch's lr from this one's (all-process) train error
            self.plateau.update(100.0 * (1.0 - record["train_acc"]))
            record.update(smoothed_train_error=self.plateau.smoothed, lr_halvings=self.plateau.halvings)
        self.epoch = epoch
        self.elapsed += train_time + eval_time
        self.history.append({"epoch": epoch, "test_error": record["test_error"],
                             "val_error": record.get("val_error")})
        self._write(record)
        if self.main and config.verbose:
            print(epoch_line(record, config.epochs), flush=True)
        if self.plateau is not None and self.plateau.stop_reason:
            self._write({"kind": "event", "event": "plateau_stop", "epoch": epoch, "step": self.step,
                         "message": f"stopped after epoch {epoch}: {self.plateau.stop_reason}"})

        selected = record.get("val_error") if self.val_loader is not None else record["test_error"]
        improved = selected is not None and selected < self.best["error"]
        if improved:
            self.best = {"error": selected, "epoch": epoch, "test_error": record["test_error"]}
        if self.main:
            state = self._checkpoint_state()
            # best.pt first: a kill between the two files resumes from the previous epoch and rewrites both.
            if improved:
                save_checkpoint(state, self.out / "best.pt")
            save_checkpoint(state, self.out / "checkpoint.pt",
                            previous=self.out / "checkpoint.prev.pt" if self.keep_previous else None)
            self.keep_previous, self.good_checkpoint = True, self.out / "checkpoint.pt"

    def _finish(self) -> dict[str, Any]:
        from .. import metrics
        config = self.config
        errors = [h["test_error"] for h in self.history if h["test_error"] is not None]
        summary: dict[str, Any] = {
            "rule": config.rule, "model": config.model, "dataset": config.dataset, "epochs": self.epoch,
            "steps": self.step,
            "final_test_error": errors[-1] if errors else None,
            "best_test_error": min(errors) if errors else None,
            "best_epoch": self.best["epoch"],
            "selected_by": "val_error" if self.val_loader is not None else "test_error",
            "test_error_at_best": self.best["test_error"],
            "alignment": metrics.alignment(self.model),
            "wall_time_s": self.elapsed,
            "world_size": self.env.world_size,
            "output_dir": str(self.out),
        }
        if self.plateau is not None:
            summary["stop_reason"] = self.plateau.stop_reason or f"reached epochs = {config.epochs}"
        if self.main:
            (self.out / "final.json").write_text(json.dumps(jsonable(summary), indent=2) + "\n")
        return summary


# ---------------------------------------------------------------------------------------------- internals


def _dataset_shape(dataset: Any) -> tuple[int, int, int]:
    """``(num_classes, in_channels, image_size)`` of a data set (an in-memory set or a torch Dataset)."""
    num_classes = int(dataset.num_classes)
    images = getattr(dataset, "images", None)
    if images is not None:  # (N, C, H, W)
        return num_classes, int(images.shape[1]), int(images.shape[-1])
    x = dataset[0][0]  # (C, H, W)
    return num_classes, int(x.shape[0]), int(x.shape[-1])
