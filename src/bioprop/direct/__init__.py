r"""Direct and indirect feedback alignment (nokland2016) at the cost of a forward pass.

``bioprop.convert(model, "dfa")`` cuts the model into blocks at markers (:class:`DirectFeedback`) and sends the
output error :math:`e = \partial L/\partial \hat y` to every block directly: :math:`\delta h_l = e\,D_l` with a
fixed random :math:`D_l`. Inside a block (linear/conv, BN, nonlinearity, pooling, residual sum) plain autograd
runs; nothing flows from one block to the block below. The user's loop is unchanged::

    net = bioprop.convert(net, "dfa", seed=0)          # markers placed after each hidden nonlinearity
    loss = F.cross_entropy(net(x), y)                  # any loss, computed outside the model
    loss.backward()                                    # trains every block; one matmul e·[D_1 … D_L]
    opt.step()

``"ifa"`` sends the error to the first block only and on from block to block through the forward weights;
``"dense_fa"`` sends every block the output error and the error of every block above it, each through its own
fixed random matrix.
The definitions, the placement rules and the options are in ``docs/direct.md``.

Public helpers:

- :func:`exact_gradients`: markers pass gradients straight through (plain backprop), e.g. for a reference pass.
- :func:`markers`: the active markers by name; set ``marker.record = True`` to keep the signal each backward
  delivers in ``marker.last_signal``.
- :func:`initialize`: draw every ``D`` now from an example input (``D``'s size depends on the model output).
- :func:`remove_direct_feedback`: back to plain backprop (``convert(model, "backprop")`` calls it).
"""
from __future__ import annotations

from .marker import DIRECT_SCALES, DirectFeedback, direct_scale, draw_direct_feedback
from .rules import (DenseFeedbackAlignment, DirectFeedbackAlignment, IndirectFeedbackAlignment, exact_gradients,
                    initialize, markers, redraw_direct_feedback, remove_direct_feedback)

__all__ = [
    "DirectFeedback", "DirectFeedbackAlignment", "IndirectFeedbackAlignment", "DenseFeedbackAlignment",
    "remove_direct_feedback",
    "exact_gradients", "markers", "initialize", "DIRECT_SCALES", "direct_scale", "draw_direct_feedback",
    "redraw_direct_feedback",
]
