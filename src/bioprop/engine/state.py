"""The checkpoint layout of a classification-loop run: what :func:`run_state` saves and :func:`restore_run` loads.

Everything a run needs to continue bit for bit is here (model, optimizer, constraints, counters, best and
history, every RNG, the plateau schedule's state, the logs' byte offsets); the rest of a run is a function of
``(seed, epoch, rank)``.
"""
from __future__ import annotations

from typing import Any

import torch

from .checkpoint import CheckpointError, rng_state, save_checkpoint, set_rng_state

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
    where = getattr(run, "resumed_from", None) or "the checkpoint"
    for part, target in (("model", run.model), ("optimizer", run.optimizer)):
        try:
            target.load_state_dict(checkpoint[part])
        except (RuntimeError, ValueError, KeyError) as err:  # another layout: keys, shapes or parameter groups
            raise CheckpointError(f"{part} state in {where} does not fit this run "
                                  f"({_layout_difference(target, checkpoint[part], err)}): it was written by a "
                                  "bioprop version with another state layout; resume it with that version, or "
                                  "start the run in a new output directory") from None
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


def _layout_difference(target: Any, saved: dict[str, Any], err: Exception) -> str:
    """What differs between ``saved`` and ``target``'s state: missing and unexpected keys (a few of each), or the
    first line of the loading error when the keys agree."""
    if isinstance(target, torch.nn.Module) and isinstance(saved, dict):
        expected = target.state_dict().keys()
        missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        parts = [f"{label} {', '.join(keys[:3])}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        if parts:
            return "; ".join(parts)
    return " ".join(str(err).split())[:200]


def save_run(run: Any, *, best: bool) -> None:
    """Write ``checkpoint.pt`` (the previous one kept as ``checkpoint.prev.pt``) and, when ``best``, ``best.pt``."""
    state = run_state(run)
    # best.pt first: a kill between the two files resumes from the previous epoch and rewrites both.
    if best:
        save_checkpoint(state, run.out / "best.pt")
    save_checkpoint(state, run.out / "checkpoint.pt",
                    previous=run.out / "checkpoint.prev.pt" if run.keep_previous else None)
    run.keep_previous, run.good_checkpoint = True, run.out / "checkpoint.pt"
