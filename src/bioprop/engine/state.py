"""The checkpoint layout of a classification-loop run: what :func:`run_state` saves and :func:`restore_run` loads.

Everything a run needs to continue bit for bit is here (model, optimizer, constraints, counters, best and
history, every RNG, the plateau schedule's state, the logs' byte offsets); the rest of a run is a function of
``(seed, epoch, rank)``.
"""
from __future__ import annotations

from typing import Any

from .checkpoint import rng_state, save_checkpoint, set_rng_state

__all__ = ["CHECKPOINT_FORMAT", "run_state", "restore_run", "save_run"]

#: bumped when the checkpoint layout changes incompatibly
CHECKPOINT_FORMAT = 1


def run_state(run: Any) -> dict[str, Any]:
    """The checkpoint of ``run`` (a :class:`bioprop.engine.loop.Run`) at the end of its current epoch."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "schedule": {"name": run.config.schedule, "step": run.step, "steps_per_epoch": run.steps_per_epoch},
        "constraints": {c.name: c.state_dict() for c in run.constraints},
        "epoch": run.epoch,
        "step": run.step,
        "elapsed_s": run.elapsed,
        "best": dict(run.best),
        "history": [dict(h) for h in run.history],
        "rng": rng_state(),
        "config": run.config.to_dict(),
        "log_bytes": run.log.tell(),
        **({"plateau": run.plateau.state_dict()} if run.plateau is not None else {}),
        "loss_reference": run.loss_reference,
        "layer_log_bytes": run.layer_log.tell(),
    }


def restore_run(run: Any, checkpoint: dict[str, Any]) -> None:
    """Load ``checkpoint`` (written by :func:`run_state`) into a freshly built ``run``."""
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    for constraint in run.constraints:
        constraint.load_state_dict(checkpoint["constraints"][constraint.name])
    run.epoch, run.step = int(checkpoint["epoch"]), int(checkpoint["step"])
    run.elapsed = float(checkpoint["elapsed_s"])
    run.best = dict(checkpoint["best"])
    run.history = [dict(h) for h in checkpoint["history"]]
    set_rng_state(checkpoint["rng"])
    if run.plateau is not None:
        run.plateau.load_state_dict(checkpoint["plateau"])
    run.loss_reference = checkpoint.get("loss_reference")  # absent in older checkpoints: set it again


def save_run(run: Any, *, best: bool) -> None:
    """Write ``checkpoint.pt`` (the previous one kept as ``checkpoint.prev.pt``) and, when ``best``, ``best.pt``."""
    state = run_state(run)
    # best.pt first: a kill between the two files resumes from the previous epoch and rewrites both.
    if best:
        save_checkpoint(state, run.out / "best.pt")
    save_checkpoint(state, run.out / "checkpoint.pt",
                    previous=run.out / "checkpoint.prev.pt" if run.keep_previous else None)
    run.keep_previous, run.good_checkpoint = True, run.out / "checkpoint.pt"
