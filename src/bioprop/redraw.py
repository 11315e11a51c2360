"""Draws renewed once per weight update (brsf's magnitudes): when the next forward pass must draw.

The decision rests on saved state, so a copy, a loaded ``state_dict`` or a resumed run continues the same
sequence of draws as the original, also inside a gradient-accumulation window.
"""
from __future__ import annotations

from torch import nn

__all__ = ["redraw_due", "sync_redraw_state", "rebase_redraw_state"]

# State of a draw renewed once per weight update, in the int64 buffer ``feedback_used`` (gloo has no bool):
_FRESH, _USED, _STALE = 0, 1, 2  # not used yet / used, W unchanged since / used, and W changed in place since


def redraw_due(layer: nn.Module) -> bool:
    """Whether a draw renewed once per update (brsf's magnitudes) must be renewed before this forward pass.

    Call it once per forward pass that needs the draw; it records that the current draw has served one. The
    answer rests on the layer's buffer ``feedback_used`` (0: the draw has not served a forward pass yet; 1: it has,
    and W has not changed since; 2: it has, and W was changed in place since), so it is saved and copied with
    the layer. The 1 → 2 change is seen through W's in-place version counter, which exists only in this process:
    a rule that uses this function calls :func:`sync_redraw_state` in ``before_save`` and
    :func:`rebase_redraw_state` in ``after_load``. The first forward pass after a draw never renews it, whatever
    in-place writes (such as DDP's initial broadcast) happened since the draw was made.

    Args:
        layer: a feedback layer with an int64 scalar buffer ``feedback_used`` (register it as 0 with the draw).

    Returns:
        True when the caller must make a new draw now (it then serves this forward pass).
    """
    used = int(layer.feedback_used)
    version = layer.weight._version
    due = used == _STALE or (used == _USED and getattr(layer, "_feedback_seen_version", None) != version)
    if used != _USED:
        layer.feedback_used.fill_(_USED)
    layer._feedback_seen_version = version
    return due


def sync_redraw_state(layer: nn.Module) -> None:
    """Write into ``feedback_used`` whether W changed in place since the current draw served a forward pass, so
    that the saved or copied state decides the next redraw on its own (see :func:`redraw_due`)."""
    used = layer.feedback_used
    if used.is_meta or layer.weight.is_meta:
        return
    if int(used) == _USED and getattr(layer, "_feedback_seen_version", None) != layer.weight._version:
        used.fill_(_STALE)


def rebase_redraw_state(layer: nn.Module) -> None:
    """Take W's version counter in this process as the point from which changes of W count (after a load or a
    copy, whose W has a counter of its own)."""
    layer._feedback_seen_version = layer.weight._version
