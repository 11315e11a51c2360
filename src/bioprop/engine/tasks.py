"""What a training run learns to do: a :class:`Task`, chosen by the config's ``task`` from :data:`TASKS`.

The loop (:mod:`bioprop.engine.loop`) is the same for every task; a task supplies the parts that differ, the
data and its loaders, the loss, evaluation and the metrics records, and names the data sets and models it can
train. Classification (:mod:`bioprop.engine.classification`) is built in; :mod:`bioprop.detection` registers
``"detection"`` when it is imported. A new task is a subclass registered with :func:`register_task`; neither
the loop nor the config names one.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

import torch

from ..registry import Registry

if TYPE_CHECKING:  # config names the registered tasks, so this module cannot import it at run time
    from .config import TrainConfig
    from .distributed import DistEnv

__all__ = ["Task", "TaskData", "TASKS", "register_task", "create_task", "list_tasks", "describe_tasks", "TaskRun"]


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


class Task(ABC):
    """The per-task parts of a training run. Subclasses are registered with :func:`register_task`; the first line
    of their docstring is their description in ``bioprop list tasks``."""

    #: the registry name (set by :func:`register_task`)
    name: str = ""
    #: None: the engine's loop (:class:`bioprop.engine.loop.Run`) trains the task through the task's parts (see
    #: :class:`bioprop.engine.classification.ClassificationTask`: ``loss``, ``forward``, ``new_window``,
    #: ``evaluate``, ``skipped_evaluation``, ``analysis``); else a run class of the task's own, constructed as
    #: ``run_class(config, env, device, on_step, task)``
    run_class: ClassVar[Callable[..., TaskRun] | None] = None

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


#: every task ``train(config)`` can run, by name ``train(config)`` can run, by name
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
