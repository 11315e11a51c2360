"""The training engine: ``TrainConfig`` and ``train(config)``, used by ``bioprop train`` and the demo.

Examples::

    >>> from bioprop.engine import TrainConfig, train
    >>> summary = train(TrainConfig(dataset="digits", model="mlp", rule="fa", epochs=2,
    ...                             output_dir="runs/digits-fa"))       # doctest: +SKIP
    >>> summary["final_test_error"]                                      # doctest: +SKIP

A run is a short pipeline (:mod:`~bioprop.engine.pipeline`): build data, build model, build optimisation,
restore, wrap; then the loop (:mod:`~bioprop.engine.loop`). What differs between tasks is a :class:`Task`
(:mod:`~bioprop.engine.tasks`), chosen by the config's ``task``; classification and detection are built in.
"""
from .build import LOSSES, OPTIMIZERS, SCHEDULES, build_loss, build_optimizer, lr_factor
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, config_from_dict, load_toml
from .loop import StepInfo, TrainingDiverged, evaluate, train
from .runlog import read_records
from .tasks import TASKS, Task, TaskData, create_task, describe_tasks, list_tasks, register_task
# The package registers its built-in tasks: classification, then detection, whose run is built from the engine's
# modules loaded above.
from . import classification  # noqa: E402,F401
from .. import detection  # noqa: E402,F401

__all__ = ["TrainConfig", "train", "evaluate", "TrainingDiverged", "ConfigError", "CheckpointError", "StepInfo",
           "config_from_dict", "load_toml", "save_checkpoint", "load_checkpoint", "build_optimizer", "build_loss",
           "lr_factor", "read_records", "OPTIMIZERS", "SCHEDULES", "LOSSES", "TASKS", "Task", "TaskData",
           "register_task", "create_task", "list_tasks", "describe_tasks"]
