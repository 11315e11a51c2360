"""``train(config)``: the run's pipeline (:mod:`~bioprop.engine.pipeline`: build data → build model → build
optimisation → restore → wrap), then the loop, with evaluation, checkpoints and logs. One epoch, per process::

    reseed(seed, epoch, rank); loader.set_epoch(epoch)         # order and randomness depend on (seed, epoch)
    for batch in loader:                                        # e.g. x (B/N, C, H, W) on device, y (B/N,)
        lr = config.lr * lr_factor(step)                        # pure function of the step
        loss = task.forward(model, batch); loss.backward(); optimizer.step(); constraints(); rules' after-step
    task.evaluate → "epoch" record → best.pt (task.better) → checkpoint.pt (atomic)

The task (:class:`~bioprop.engine.tasks.Task`) supplies every part that differs between tasks, down to the keys
of ``final.json``; the loop names none.

Because everything random is a function of ``(seed, epoch, rank)`` and every other piece of state is in the
checkpoint, resuming from an end-of-epoch checkpoint gives bit-for-bit the run that was never stopped.
"""
from __future__ import annotations

import gc
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..rules import after_step
from . import distributed as dist_utils
from .build import lr_factor
from .checkpoint import write_text_atomic
from .config import TrainConfig, check_values
from .evaluation import evaluate
from .pipeline import (build_model, build_optimisation, epoch_seed, seed_everything, set_lr,
                       wrap_model)
from .plateau import PlateauHalving
from .provenance import CODE_KEY, code_version, started_code
from .rundir import (RunLock, check_output_dir, divergence_advice, make_output_dir, refuse_existing,
                     remove_run_files, resume_checkpoint)
from .runlog import MetricsLog, TensorBoardLog, jsonable, progress
from .state import CHECKPOINT_FORMAT, restore_run, save_run
from .tasks import StepWindow, Task, create_task

__all__ = ["train", "evaluate", "TrainingDiverged", "StepInfo", "CHECKPOINT_FORMAT", "LAYERS_LOG", "Run",
           "seed_everything", "epoch_seed"]

#: the side file of ``metrics.jsonl`` holding the per-layer values of each analysis record
LAYERS_LOG = "metrics_layers.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite (or the loss exploded); the last good checkpoint is kept.

    Args:
        message: what happened and how to go on with ``bioprop train``.
        cause: what happened alone (``"training diverged in epoch 3: ..."``), for callers that give their own
            way on; defaults to ``message``.
    """

    def __init__(self, message: str, cause: str = "") -> None:
        super().__init__(message)
        self.cause = cause or message


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
        The summary: rule, model, dataset, epochs, steps, the task's results (:meth:`Task.summary`; for
        classification best and final test error (%), final per-layer alignment angles (degrees)), wall time,
        output directory.

    Raises:
        ConfigError: a bad config value.
        TrainingDiverged: the loss or the weights became NaN/inf (the last good checkpoint is kept).
        CheckpointError: ``resume`` without a readable checkpoint.
    """
    check_values(config)
    env = dist_utils.detect()
    device = dist_utils.choose_device(config.device, env)
    owns_group = dist_utils.setup(env, device)
    run: Any = None
    try:
        task = create_task(config.task)
        run = (task.run_class or Run)(config, env, device, on_step, task)
        return run.run()
    finally:
        del run
        # Free the DDP reducer while its process group still exists: destroying the group first makes the
        # reducer tear the group down itself later, which can deadlock with gloo's worker threads.
        if env.distributed:
            gc.collect()
        if owns_group:
            dist_utils.teardown(env)


class Run:
    """The state of one training run; :meth:`run` is the whole of it.

    The set-up is a short pipeline of named steps (:meth:`_build`): build data (the task's), build model,
    build optimisation, restore; :meth:`_wrap` follows once every rank has passed its checks. The task
    (:class:`~bioprop.engine.tasks.Task`, e.g. the classification task) supplies the data, the loss, the
    forward pass of a step, the evaluation, the analysis records and the results (best epoch, summary).
    """

    def __init__(self, config: TrainConfig, env: dist_utils.DistEnv, device: torch.device,
                 on_step: Callable[[StepInfo], None] | None, task: Task) -> None:
        self.config, self.env, self.device, self.on_step = config, env, device, on_step
        self.task = task  # its loop parts (Task.LOOP_PARTS) are what this class calls
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
                    refuse_existing(self.out)  # another run may have started here while this one was built
            if config.overwrite:
                remove_run_files(self.out)
        return checkpoint

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
            refuse_existing(self.out)
        return None

    def _build(self, checkpoint: dict[str, Any] | None) -> None:
        """Build data → build model → build optimisation → restore (the checkpoint, when resuming)."""
        config = self.config
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        seed_everything(config.seed)
        task, data = self.task, self.task.build_data(config, self.env, self.device)
        self.data = data
        self.model = build_model(config, self.device, data.model_kwargs, data.example_input,
                                 rule_error_prefix=task.rule_error_prefix)
        task.model_built(data, self.model, config, self.env, self.device)
        self.train_loader, self.test_loader, self.val_loader = data.train_loader, data.test_loader, data.val_loader
        self.steps_per_epoch = len(self.train_loader)
        if config.max_steps:  # the schedule and the step counter see the capped epoch as a whole epoch
            self.steps_per_epoch = min(self.steps_per_epoch, config.max_steps)
        self.optimisation = build_optimisation(config, self.model, task.loss(config, data, self.model))
        self.constraints, self.optimizer = self.optimisation.constraints, self.optimisation.optimizer
        self.loss_fn = self.optimisation.loss_fn
        self._init_progress()
        if checkpoint is not None:
            restore_run(self, checkpoint)

    def _init_progress(self) -> None:
        """The counters and records of a fresh run (a checkpoint then overwrites them)."""
        config = self.config
        self.epoch, self.step, self.elapsed = 0, 0, 0.0
        self.loss_reference: float | None = None  # the first logged training loss (divergence_factor)
        self.divergence_warned = False
        self.analysed_step = -1  # the step of the last analysis record
        self.best: dict[str, Any] = self.task.new_best()
        self.history: list[dict[str, Any]] = []
        self.plateau = (PlateauHalving(config.plateau_smoothing, config.plateau_halvings, config.plateau_stop_error)
                        if config.schedule == "halve_on_plateau" else None)

    def _wrap(self) -> None:
        """DDP and ``torch.compile`` around the model (after every rank has passed its checks)."""
        self.train_model = wrap_model(self.model, self.config, self.env, self.device)

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
            code = code_version()
            try:
                if self.main:
                    started = code if checkpoint is None else started_code(self.out / "config.json", code)
                    write_text_atomic(self.out / "config.json", json.dumps(
                        {**config.to_dict(), CODE_KEY: started}, indent=2) + "\n")
                if checkpoint is not None:
                    self._write({"kind": "event", "event": "resume", "epoch": self.epoch, "step": self.step,
                                 "checkpoint": str(self.resumed_from), CODE_KEY: code})
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
        config, env, device = self.config, self.env, self.device
        # Dropout, augmentation and shuffling draw from here: a function of (seed, epoch, rank) only, so a
        # resumed epoch repeats the interrupted one exactly.
        seed_everything(epoch_seed(config.seed, epoch, env.rank))
        self.train_loader.set_epoch(epoch)
        self.train_model.train()
        read_every = config.log_every or 50  # also how often NaN/inf is looked for
        totals: dict[str, float] = {}  # the window's sums over the epoch, all processes
        window = self.task.new_window(device, self.step)
        bar = progress(self.train_loader, enabled=config.progress and self.main, total=self.steps_per_epoch,
                       desc=f"epoch {epoch}/{config.epochs}")
        start = time.perf_counter()
        lr = config.lr
        for batch_index, batch in enumerate(bar):
            lr = config.lr * lr_factor(config, self.step, self.steps_per_epoch)
            if self.plateau is not None:
                lr *= self.plateau.factor
            set_lr(self.optimizer, lr)
            loss, output, x, y = self.task.forward(self.train_model, self.loss_fn, batch, config, device)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimisation.step()  # optimizer step, then the constraints in their safe order
            after_step(self.model, self.step)  # the rules' per-step work (weight mirrors learn B)
            self.step += 1
            window.add(loss, output, y)
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

    def _read_window(self, window: StepWindow, totals: dict[str, float], epoch: int, lr: float, bar: Any,
                     write: bool = True) -> None:
        """Reduce the window's sums over processes, stop on NaN/inf, write a "train" record."""
        first_step, seconds = window.first_step, window.seconds()
        sums = window.read(self.env, self.step)
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + value
        loss_sum, n = sums["loss"], sums["n"]
        if not math.isfinite(loss_sum):
            self._diverged(epoch, f"the loss became {loss_sum} between steps {first_step} and {self.step}")
        if n == 0:
            return
        self._check_explosion(epoch, loss_sum / n, first_step)
        means = {key: value / n for key, value in sums.items() if key != "n"}
        record = {"kind": "train", "epoch": epoch, "step": self.step, **means, "lr": lr,
                  "samples_per_s": n / max(seconds, 1e-9)}
        if write and self.config.log_every:
            self._write(record)
        if bar is not None:
            shown = [f"{key} {100 * value:.2f}%" if key == "acc" else f"{key} {value:.4f}"
                     for key, value in means.items()]
            bar.set_postfix_str("  ".join([*shown, f"{record['samples_per_s']:.0f} samples/s"]), refresh=False)

    def _diverged(self, epoch: int, what: str, event: str = "nan") -> None:
        advice = divergence_advice(self.out, self.config.lr, self.epoch, self.good_checkpoint,
                                   getattr(self, "resumed_from", None))
        cause = f"training diverged in epoch {epoch}: {what}"
        message = f"{cause}; {advice}"
        self._write({"kind": "event", "event": event, "epoch": epoch, "step": self.step, "message": message})
        raise TrainingDiverged(message, cause)

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
        """The task's analysis record of the current batch."""
        self.analysed_step = self.step
        self.task.analysis(self.model, x, y, self.loss_fn, {"kind": "analysis", "epoch": epoch, "step": self.step},
                           self.device, self.log, self.layer_log, self.tb)

    def _end_epoch(self, epoch: int, totals: dict[str, float], train_time: float) -> None:
        config, task = self.config, self.task
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            self._diverged(epoch, "the weights became NaN or infinite")
        n = max(totals.get("n", 0.0), 1.0)
        record: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "step": self.step,
                                  **{f"train_{key}": value / n for key, value in totals.items() if key != "n"}}
        eval_start = time.perf_counter()
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            record.update(task.evaluate(self.model, self.data, self.loss_fn, config, self.device, self.env))
        else:
            record.update(task.skipped_evaluation())
        eval_time = time.perf_counter() - eval_start
        record.update(epoch_time_s=train_time, eval_time_s=eval_time,
                      lr=self.optimizer.param_groups[0]["lr"])
        if self.plateau is not None:  # decides the next epoch's lr from this one's (all-process) train error
            self.plateau.update(100.0 * (1.0 - record["train_acc"]))
            record.update(smoothed_train_error=self.plateau.smoothed, lr_halvings=self.plateau.halvings)
        self.epoch = epoch
        self.elapsed += train_time + eval_time
        self.history.append(task.history_entry(record))
        self._write(record)
        if self.main and config.verbose:
            print(task.epoch_line(record, config.epochs), flush=True)
        if self.plateau is not None and self.plateau.stop_reason:
            self._write({"kind": "event", "event": "plateau_stop", "epoch": epoch, "step": self.step,
                         "message": f"stopped after epoch {epoch}: {self.plateau.stop_reason}"})

        best = task.better(self.best, record, self.data)
        if best is not None:
            self.best = best
        if self.main:
            save_run(self, best=best is not None)

    def _finish(self) -> dict[str, Any]:
        config = self.config
        summary: dict[str, Any] = {
            "rule": config.rule, "model": config.model, "dataset": config.dataset, "epochs": self.epoch,
            "steps": self.step,
            **self.task.summary(self.history, self.best, self.model, self.data),
            "wall_time_s": self.elapsed,
            "world_size": self.env.world_size,
            "output_dir": str(self.out),
            CODE_KEY: code_version(),
        }
        if self.plateau is not None:
            summary["stop_reason"] = self.plateau.stop_reason or f"reached epochs = {config.epochs}"
        if self.main:
            write_text_atomic(self.out / "final.json", json.dumps(jsonable(summary), indent=2) + "\n")
        return summary
