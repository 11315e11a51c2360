"""The rule life cycle: flags from the registry, ``bioprop.prepare`` and ``bioprop.after_step``."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import bioprop
from bioprop import direct
from bioprop.engine import config_from_dict, train
from bioprop.mirror import mirror_step
from bioprop.rules import RULES, DirectRule, LayerRule, create_rule

LAYER_RULES = [r for r in bioprop.list_rules() if isinstance(create_rule(r), LayerRule)]
EXACT_RULES = [r for r in bioprop.list_rules() if RULES.get(r).exact]
NATIVE_RULES = [r for r in bioprop.list_rules() if RULES.get(r).native]


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def weight_grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model(x.clone().requires_grad_()).pow(2).sum().backward()
    return [m.weight.grad.clone() for m in model.modules() if isinstance(m, nn.Linear)]


def test_flags_name_the_exact_and_native_rules() -> None:
    assert EXACT_RULES[:2] == ["backprop", "sham"] and NATIVE_RULES == ["backprop"]
    assert all(RULES.get(r).exact for r in NATIVE_RULES)
    assert [r for r in bioprop.list_rules() if getattr(RULES.get(r), "indirect", False)] == ["ifa"]


@pytest.mark.parametrize("rule", EXACT_RULES)
def test_an_exact_rule_gives_backprop_updates(rule: str) -> None:
    """Independent reference: plain autograd on the unconverted model."""
    x = torch.randn(5, 6, dtype=torch.float64)
    for got, want in zip(weight_grads(bioprop.convert(mlp(), rule, seed=2), x), weight_grads(mlp(), x)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("rule", LAYER_RULES)
def test_native_rules_restore_native_layers_and_the_others_do_not(rule: str) -> None:
    net = bioprop.convert(mlp(), rule)
    native = all(type(m) is nn.Linear for m in net.modules() if isinstance(m, nn.Linear))
    assert native == RULES.get(rule).native


@pytest.mark.parametrize("options", [dict(noise=0.0), dict(angle=0.0)])
def test_instance_exactness_follows_options(options: dict) -> None:
    rule = "bp_noise" if "noise" in options else "bp_alignment"
    assert create_rule(rule, **options).is_exact() and not create_rule(rule).is_exact()


def test_after_step_is_a_weight_mirror_step_seeded_by_the_conversion() -> None:
    net = bioprop.convert(mlp(), "wm", seed=5, lr=0.1, decay=0.05)
    reference = copy.deepcopy(net)
    for step in range(3):
        bioprop.after_step(net, step)
        assert mirror_step(reference, 64, step=step, seed=5) == 3
        for name, b in bioprop.feedback_weights(net).items():
            torch.testing.assert_close(b, bioprop.feedback_weights(reference)[name], rtol=0, atol=0)
    # without a step index each layer counts its own steps
    bioprop.after_step(net)
    mirror_step(reference, 64, step=3, seed=5)
    assert all(int(m.feedback_mirror_steps) == 4 for m in net.modules() if hasattr(m, "feedback_mirror_steps"))
    for name, b in bioprop.feedback_weights(net).items():
        torch.testing.assert_close(b, bioprop.feedback_weights(reference)[name], rtol=0, atol=0)


@pytest.mark.parametrize("rule", [r for r in LAYER_RULES if r != "wm"] + ["dfa"])
def test_after_step_leaves_rules_without_per_step_work_alone(rule: str) -> None:
    net = bioprop.convert(mlp(), rule, seed=1)
    bioprop.prepare(net, torch.zeros(2, 6, dtype=torch.float64))
    before = copy.deepcopy(net.state_dict())
    bioprop.after_step(net, 0)
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_prepare_draws_the_d_the_first_training_pass_draws() -> None:
    prepared = bioprop.prepare(bioprop.convert(mlp(), "dfa", seed=3), torch.zeros(2, 6, dtype=torch.float64))
    trained = bioprop.convert(mlp(), "dfa", seed=3)
    trained(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
    d_prepared, d_trained = direct.markers(prepared), direct.markers(trained)
    assert d_prepared.keys() == d_trained.keys()
    for name, marker in d_prepared.items():
        torch.testing.assert_close(marker.feedback_matrix, d_trained[name].feedback_matrix, rtol=0, atol=0)
    assert isinstance(create_rule("dfa"), DirectRule)


def test_prepare_runs_no_forward_pass_for_layer_rules() -> None:
    net = bioprop.convert(mlp(), "fa")
    calls: list[int] = []
    net.register_forward_hook(lambda *args: calls.append(1))
    bioprop.prepare(net, torch.zeros(2, 6, dtype=torch.float64))
    assert calls == []


def test_the_engine_runs_the_rules_after_step(tmp_path: Path) -> None:
    """A wm run of 3 steps: every layer made 3 mirror steps, with the step index of the engine."""
    config = config_from_dict(dict(dataset="digits", model="mlp", model_args={"depth": 1, "width": 16}, rule="wm",
                                   epochs=1, max_steps=3, batch_size=32, lr=0.05, output_dir=str(tmp_path / "run"),
                                   progress=False, verbose=False, log_every=5, metrics_every=0, device="cpu"))
    counts: list[list[int]] = []

    def on_step(info) -> None:  # type: ignore[no-untyped-def]
        counts.append([int(m.feedback_mirror_steps) for m in info.model.modules()
                       if hasattr(m, "feedback_mirror_steps")])

    train(config, on_step=on_step)
    assert counts and [c[0] for c in counts] == [1, 2, 3] and all(len(set(c)) == 1 for c in counts)


def test_every_rule_has_a_one_line_description_for_bioprop_list() -> None:
    described = dict(bioprop.describe_rules())
    assert list(described) == bioprop.list_rules()
    for name, text in described.items():
        assert text and "\n" not in text and len(text) <= 110 and ":math:" not in text, name
