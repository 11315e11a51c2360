"""``schedule = "halve_on_plateau"``: nokland2016's learning-rate halving on a smoothed training error.

After each epoch, with ``err`` the epoch's training error in % (over all processes) and ``m`` the smoothed error::

    epoch 1:      m = err                                  (no halving)
    later epochs: halve the lr if not err < m;  then m = s·m + (1 − s)·err

The run stops at the end of the epoch in which the ``plateau_halvings``-th halving happens, or once
``m <= plateau_stop_error``, or at ``epochs``. (For ``s > 0`` comparing ``err`` with the old or with the updated
``m`` is the same test, since ``err < s·m + (1 − s)·err`` exactly when ``err < m``.)

Unlike the other schedules the lr here depends on the training history, so the state (``m``, the number of
halvings, the stop reason) is saved in the checkpoint; it holds only Python numbers, so a resumed run continues
bit for bit. Under DDP every process sees the same reduced training error and takes the same decisions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["PlateauHalving"]


@dataclass
class PlateauHalving:
    """The state of the ``halve_on_plateau`` schedule.

    Attributes:
        smoothing: s in ``m <- s·m + (1 − s)·err``, in [0, 1).
        max_halvings: stop after this many halvings.
        stop_error: stop once ``m`` is at or below this training error (%).
        smoothed: m, the smoothed training error in % (None before the first epoch).
        halvings: halvings so far; the lr is ``lr · 0.5 ** halvings``.
        stop_reason: why the run stops ("" while it goes on).
    """

    smoothing: float = 0.75
    max_halvings: int = 8
    stop_error: float = 0.01
    smoothed: float | None = None
    halvings: int = 0
    stop_reason: str = ""

    @property
    def factor(self) -> float:
        """The multiplier of the configured lr for the next epoch."""
        return 0.5 ** self.halvings

    def update(self, train_error: float) -> bool:
        """Take in one epoch's training error (%); return whether the lr was halved.

        Sets :attr:`stop_reason` when a stopping condition is met.
        """
        halved = False
        if self.smoothed is None:
            self.smoothed = train_error
        else:
            halved = not train_error < self.smoothed
            self.smoothed = self.smoothing * self.smoothed + (1.0 - self.smoothing) * train_error
            self.halvings += int(halved)
        if self.halvings >= self.max_halvings:
            self.stop_reason = f"the lr was halved {self.halvings} times (plateau_halvings = {self.max_halvings})"
        elif self.smoothed <= self.stop_error:
            self.stop_reason = (f"the smoothed training error {self.smoothed:.4g}% reached plateau_stop_error = "
                                f"{self.stop_error:g}%")
        return halved

    def state_dict(self) -> dict[str, Any]:
        """The state as primitives (for a ``weights_only`` checkpoint)."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.smoothed = None if state["smoothed"] is None else float(state["smoothed"])
        self.halvings = int(state["halvings"])
        self.stop_reason = str(state["stop_reason"])
