"""What a training run learns to do: a :class:`Task`, chosen by the config's ``task`` from :data:`TASKS`.

The loop (:mod:`bioprop.engine.loop`) is the same for every task; a task supplies the parts that differ, the
data and its loaders, the loss, evaluation and the metrics records, which epoch is the best one and what
``final.json`` says, and names the data sets and models it can train. Classification
(:mod:`bioprop.engine.classification`) is built in; :mod:`bioprop.detection` registers ``"detection"`` when it
is imported. A new task is a subclass registered with :func:`register_task`; neither the loop nor the config
names one.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

import torch
from torch import Tensor, nn

from ..registry import Registry

if TYPE_CHECKING:  # config names the registered tasks, so this module cannot import it at run time
    from .build import LossFn
    from .config import TrainConfig
    from .distributed import DistEnv
    from .runlog import MetricsLog, TensorBoardLog

__all__ = ["Task", "TaskData", "TASKS", "register_task", "create_task", "list_tasks", "describe_tasks", "TaskRun",
           "StepWindow"]


@dataclass
class TaskData:
    """The data side of a run, as :meth:`Task.build_data` returns it.

    Attributes:
        train_loader, test_loader: per-rank loaders with ``set_epoch`` and ``len``.
        val_loader: the validation loader, or None without a validation split.
        model_kwargs: the data's shape as the model builder takes it (``num_classes``, ``in_channels``,
            ``image_size``).
        example_input: a small input batch of the right shape on the device, e.g. ``(2, C, H, W)`` zeros, for
            rules that size their state on a first forward pass.
        extra: anything else the task keeps about its data.
    """

    train_loader: Any
    test_loader: Any
    val_loader: Any | None
    model_kwargs: dict[str, int]
    example_input: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.model_kwargs["num_classes"])


class TaskRun(Protocol):
    """A run object: built from the config, :meth:`run` trains and returns the summary."""

    def run(self) -> dict[str, Any]: ...


class StepWindow(Protocol):
    """The training sums of the steps since the last read, kept on the device (:meth:`Task.new_window`), e.g.
    :class:`bioprop.engine.evaluation.RunningSums`.

    Attributes:
        count: samples added since the last read (known on the host, no device sync).
        first_step: the first step of the window (1-based, as the "train" record counts).
    """

    count: int
    first_step: int

    def add(self, loss: Tensor, output: Any, target: Any) -> None:
        """Add one step: its loss (scalar), and the output and target :meth:`Task.forward` returned for the
        rank's batch."""

    def read(self, env: DistEnv, step: int) -> dict[str, float]:
        """The sums over every process since the last read, keyed by the field of the "train" record each one
        averages into (e.g. ``{"loss": loss·n, "acc": correct}``), with the samples under ``"n"``: the record
        holds ``sums[k] / n``, the "epoch" record ``train_<k>`` over the epoch. Starts a new window at ``step``.
        Every process calls it together (a collective)."""

    def seconds(self) -> float:
        """Wall time since the window started."""


class Task(ABC):
    """The per-task parts of a training run. Subclasses are registered with :func:`register_task`; the first line
    of their docstring is their description in ``bioprop list tasks``.

    Every task defines :meth:`dataset_names`, :meth:`model_names` and :meth:`build_data`. A task trained by the
    engine's loop (:class:`bioprop.engine.loop.Run`, ``run_class = None``) also defines the loop's parts:
    :meth:`loss`, :meth:`forward`, :meth:`new_window`, :meth:`evaluate`, :meth:`skipped_evaluation` and
    :meth:`analysis`, and the parts that turn its epoch records into the run's results (:data:`RESULT_PARTS`:
    :meth:`history_entry`, :meth:`new_best`, :meth:`better`, :meth:`summary`, :meth:`epoch_line`); both built-in
    tasks do (:class:`bioprop.engine.classification.ClassificationTask`,
    :class:`bioprop.detection.engine.DetectionTask`). A task with a run class of its own composes the
    pipeline's steps itself and needs none of them. Shapes below are per process: ``B/N`` is the rank's share
    of the global batch ``B`` over ``N`` processes.
    """

    #: the registry name (set by :func:`register_task`)
    name: str = ""
    #: None: the engine's loop trains the task through the loop's parts below; else a run class of the task's
    #: own, constructed as ``run_class(config, env, device, on_step, task)``
    run_class: ClassVar[Callable[..., TaskRun] | None] = None

    #: the parts :class:`bioprop.engine.loop.Run` calls, which a task with ``run_class = None`` defines
    LOOP_PARTS: ClassVar[tuple[str, ...]] = ("loss", "forward", "new_window", "evaluate", "skipped_evaluation",
                                            "analysis")
    #: the parts the loop turns epoch records into results with (best.pt, the history, final.json, the epoch line)
    RESULT_PARTS: ClassVar[tuple[str, ...]] = ("history_entry", "new_best", "better", "summary", "epoch_line")
    #: whether a rule that cannot apply to the model is reported as ``rule 'x' on model 'y': ...``
    rule_error_prefix: ClassVar[bool] = True

    @abstractmethod
    def dataset_names(self) -> list[str]:
        """The data sets this task trains on (the allowed values of ``dataset``)."""

    @abstractmethod
    def model_names(self) -> list[str]:
        """The models this task trains (the allowed values of ``model``)."""

    @abstractmethod
    def build_data(self, config: TrainConfig, env: DistEnv, device: torch.device) -> TaskData:
        """The first step of a run: the splits and per-rank loaders of ``config.dataset``, and the data's shape.

        Raises:
            ConfigError: a bad data option or batch size.
            DatasetError: missing or corrupt data files.
        """

    def model_built(self, data: TaskData, model: nn.Module, config: TrainConfig, env: DistEnv,
                    device: torch.device) -> None:
        """Called once the model is built and converted, before the optimizer: e.g. loaders that resize as the
        model says fill in ``data``'s loaders here. The default does nothing."""

    # ----------------------------------------------------------------------------------- the loop's parts

    def _no_part(self, part: str) -> NotImplementedError:
        return NotImplementedError(f"task {self.name or type(self).__name__!r} does not define {part}(), which the "
                                   "engine's loop calls; define it, or give the task a run_class of its own")

    def loss(self, config: TrainConfig, data: TaskData, model: nn.Module) -> Any:
        """The loss of training (and evaluation) that :meth:`forward` applies, for the data that
        :meth:`build_data` returned (e.g. its number of classes) and the built model (e.g. its own loss): for
        classification a :data:`~bioprop.engine.build.LossFn`, ``loss_fn(output (B/N, K), target (B/N,)) ->
        scalar``; for detection the model's own loss of a batch."""
        raise self._no_part("loss")

    def forward(self, model: nn.Module, loss_fn: LossFn, batch: Any, config: TrainConfig,
                device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One training batch through the model (under autocast when ``config.amp``).

        Args:
            model: the model as the loop trains it (the DDP / compile wrapper).
            batch: what the train loader yields, e.g. ``(x (B/N, C, H, W), y (B/N,))`` on the device.

        Returns:
            ``(loss, output, x, y)``: the scalar loss to back-propagate, the output the window adds (the model
            output ``(B/N, K)`` for classification), the input as the model saw it and the target; the loop adds
            ``loss, output, y`` to the window and hands ``x, y`` to :meth:`analysis`.
        """
        raise self._no_part("forward")

    def new_window(self, device: torch.device, step: int) -> StepWindow:
        """The device-side sums of the training steps after ``step`` (the "train" records)."""
        raise self._no_part("new_window")

    def evaluate(self, model: nn.Module, data: TaskData, loss_fn: LossFn, config: TrainConfig, device: torch.device,
                 env: DistEnv) -> dict[str, Any]:
        """The evaluation fields of an "epoch" record, over every process's shard of the test (and validation)
        set: at least ``test_error`` (%, lower is better; it selects ``best.pt``), and ``val_error`` when
        ``data.val_loader`` is set (it then selects instead). Every process calls it together."""
        raise self._no_part("evaluate")

    def skipped_evaluation(self) -> dict[str, Any]:
        """The same fields as :meth:`evaluate`, all None, for an epoch without evaluation (``eval_every``)."""
        raise self._no_part("skipped_evaluation")

    def analysis(self, model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, head: dict[str, Any],
                 device: torch.device, log: MetricsLog, layer_log: MetricsLog, tb: TensorBoardLog) -> None:
        """Write the analysis record of one training batch (``x``, ``y`` as :meth:`forward` returned them) on
        the main process, every ``metrics_every`` steps and at the end of each epoch.

        Args:
            model: the model itself (not its wrapper).
            head: the record's first fields (``kind``, ``epoch``, ``step``).
            log, layer_log, tb: ``metrics.jsonl``, its per-layer side file and TensorBoard.
        """
        raise self._no_part("analysis")

    # ----------------------------------------------------------------------------------- the results' parts

    def history_entry(self, record: dict[str, Any]) -> dict[str, Any]:
        """What the run's history (kept in the checkpoint, read by :meth:`summary`) keeps of an "epoch"
        record."""
        raise self._no_part("history_entry")

    def new_best(self) -> dict[str, Any]:
        """The best epoch of a run before its first epoch (``{"epoch": 0, ...}``, kept in the checkpoint)."""
        raise self._no_part("new_best")

    def better(self, best: dict[str, Any], record: dict[str, Any], data: TaskData) -> dict[str, Any] | None:
        """The new best epoch (:meth:`new_best`'s layout) when the "epoch" record ``record`` beats ``best``, else
        None; the loop then writes ``best.pt``."""
        raise self._no_part("better")

    def summary(self, history: list[dict[str, Any]], best: dict[str, Any], model: nn.Module,
                data: TaskData) -> dict[str, Any]:
        """The task's fields of ``final.json`` and of the summary ``train`` returns, from the history
        (:meth:`history_entry` per epoch), the best epoch and the trained model (not its wrapper)."""
        raise self._no_part("summary")

    def epoch_line(self, record: dict[str, Any], epochs: int) -> str:
        """The line printed after each epoch (``verbose``) for an "epoch" record."""
        raise self._no_part("epoch_line")


#: every task ``train(config)`` can run, by name
TASKS: Registry[type[Task]] = Registry("task")


def register_task(name: str, *, description: str = "") -> Callable[[type[Task]], type[Task]]:
    """Class decorator registering a :class:`Task` under ``name``."""
    def decorator(cls: type[Task]) -> type[Task]:
        cls.name = name
        TASKS.add(name, cls, description=description, options=False)
        return cls
    return decorator


def list_tasks() -> list[str]:
    """Names accepted by the config's ``task``."""
    return TASKS.names()


def describe_tasks() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every task."""
    return TASKS.describe()


def create_task(name: str) -> Task:
    """The task registered under ``name``.

    Raises:
        ValueError: an unknown task, listing the allowed ones.
    """
    return TASKS.create(name)
