"""The rule registry and the layer-wise feedback policies.

A rule is a small policy object that says which feedback weight ``B`` a layer sends its error through. It holds
only its options; the per-layer state it needs (a fixed random ``B``, random magnitudes, a draw counter) lives
in registered buffers (or, for a learned ``B``, parameters) of the layer itself, so that it moves with
``.to()``, is saved in ``state_dict`` and is identical on every DDP rank. Its flags and hooks
(:mod:`bioprop.rules.base`) are its whole life cycle; ``docs/rules.md`` shows how to add one.

The package:

- :mod:`~bioprop.rules.base`: the registry, :class:`Rule`, :class:`LayerRule`, :class:`DirectRule`;
- :mod:`~bioprop.rules.scales`: scale conventions, random draws, seeds;
- :mod:`~bioprop.rules.lifecycle`: :func:`prepare` and :func:`after_step`, the calls of a training loop;
- the built-in policies: :mod:`~bioprop.rules.basic` (backprop, sham, fa), :mod:`~bioprop.rules.sign` (usf, brsf,
  frsf, partial_concordance), :mod:`~bioprop.rules.learning` (kp, wm). The direct rules (:mod:`bioprop.direct`)
  and the backprop controls (:mod:`bioprop.rules_controls`) are registered when :mod:`bioprop` is imported.
"""
from __future__ import annotations

from ..redraw import rebase_redraw_state, redraw_due, sync_redraw_state
from .base import (MODEL_RULE_ATTR, RULES, DirectRule, LayerRule, Rule, _RULES, create_rule, describe_rules,
                   list_rules, register_layer_conversion, register_rule, resolve_rule_name, rule_options)
from .scales import (NORM_MODES, SCALE_CONVENTIONS, check_norm, check_scale, draw_feedback, draw_magnitude_8bit,
                     feedback_scale, layer_seed, make_generator, register_state)
from .lifecycle import after_step, attached_rules, model_rule, prepare, remove_model_rules, reset_model_rules
from .basic import Backprop, FeedbackAlignment, Sham
from .sign import (BatchRandomSignConcordant, FixedRandomSignConcordant, PartialSignConcordant, RedrawnPerUpdate,
                   UniformSignConcordant)
from .learning import KolenPollack, WeightMirror

__all__ = [
    "Rule", "LayerRule", "DirectRule", "RULES", "register_rule", "list_rules", "create_rule", "rule_options",
    "resolve_rule_name", "describe_rules", "register_layer_conversion", "MODEL_RULE_ATTR",
    "check_scale", "check_norm", "feedback_scale", "draw_feedback", "draw_magnitude_8bit", "layer_seed",
    "make_generator", "register_state", "SCALE_CONVENTIONS", "NORM_MODES",
    "redraw_due", "sync_redraw_state", "rebase_redraw_state",
    "attached_rules", "model_rule", "after_step", "prepare", "remove_model_rules", "reset_model_rules",
    "Backprop", "Sham", "FeedbackAlignment", "UniformSignConcordant", "BatchRandomSignConcordant",
    "FixedRandomSignConcordant", "PartialSignConcordant", "RedrawnPerUpdate", "KolenPollack", "WeightMirror",
]
