"""Rule state across copies, loads and deferred initialisation, and learned feedback with an early optimizer."""
from __future__ import annotations

import copy
import pickle
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import bioprop


def brsf_net(seed: int = 7, torch_seed: int = 0) -> nn.Sequential:
    torch.manual_seed(torch_seed)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return bioprop.convert(net, "brsf", seed=seed)


def batch(i: int) -> torch.Tensor:
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)


@pytest.mark.parametrize("how", ["deepcopy", "state_dict", "pickle"])
def test_brsf_copy_inside_an_accumulation_window_continues_the_same_draws(how: str) -> None:
    """A copy taken after a backward pass but before opt.step makes no extra draw: from then on its B's and
    gradients equal the original's, step for step (the original is the reference)."""
    net = brsf_net()
    net(batch(0)).pow(2).sum().backward()  # first micro-batch of the window
    if how == "deepcopy":
        other = copy.deepcopy(net)
    elif how == "pickle":
        other = pickle.loads(pickle.dumps(net))
    else:
        other = brsf_net(seed=99, torch_seed=5)  # different state everywhere until the load
        other.load_state_dict(net.state_dict())
    for p, q in zip(net.parameters(), other.parameters()):  # the window's gradients so far (copies drop them)
        q.grad = p.grad.clone()
    runs = []
    for model in (net, other):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        trace = []
        model(batch(1)).pow(2).sum().backward()  # second micro-batch: same draw as the first
        for step in range(3):
            trace.append([t.clone() for t in bioprop.feedback_weights(model).values()]
                         + [p.grad.clone() for p in model.parameters()]
                         + [m.feedback_draws.clone() for m in model if hasattr(m, "feedback_draws")])
            opt.step()
            opt.zero_grad()
            for micro in range(2):
                model(batch(10 + 2 * step + micro)).pow(2).sum().backward()
        runs.append(trace)
    for step, (ref, got) in enumerate(zip(*runs)):
        for a, b in zip(ref, got):
            assert torch.equal(a, b), f"step {step}"
    assert int(net[4].feedback_draws) == 4  # conversion draw + one per update, none for the copy


def test_brsf_state_saved_after_an_update_redraws_once_when_loaded() -> None:
    net = brsf_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(batch(0)).sum().backward()
    opt.step()  # W changed since the draw served a forward pass: the next forward pass draws
    other = brsf_net(seed=99)
    other.load_state_dict(net.state_dict())
    for model in (net, other):
        model(batch(1)).sum().backward()
    assert int(other[4].feedback_draws) == int(net[4].feedback_draws) == 2
    assert torch.equal(other[4].feedback_magnitude, net[4].feedback_magnitude)


STATEFUL = ["fa", "usf", "brsf", "frsf", "partial_concordance", "kp", "wm", "bp_noise", "bp_alignment"]


def small_convnet() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 5, 6),
                         nn.Tanh(), nn.Linear(6, 3))


@pytest.mark.parametrize("rule,options", [(r, {}) for r in STATEFUL] + [("frsf", {"norm": "init"}),
                                                                      ("fa", {"scale": "biotorch"})])
def test_deferred_init_then_reset_feedback_equals_a_real_conversion(rule: str, options: dict) -> None:
    torch.manual_seed(0)
    real = bioprop.convert(small_convnet(), rule, seed=3, **options)
    with torch.device("meta"):
        deferred = bioprop.convert(small_convnet(), rule, seed=3, **options)
        out = deferred(torch.randn(2, 2, 5, 5, requires_grad=True))  # a meta forward pass only checks shapes
        out.sum().backward()
    assert out.is_meta and out.shape == (2, 3)
    deferred.to_empty(device="cpu")
    x = torch.randn(2, 2, 5, 5)
    stateless = not any(".feedback_" in k for k in real.state_dict())  # usf: B follows W, nothing to draw
    if not stateless:
        with pytest.raises(RuntimeError, match=r"bioprop.reset_feedback\(model\)"):
            deferred(x)
    weights = {k: v for k, v in real.state_dict().items() if ".feedback_" not in k}
    deferred.load_state_dict(weights, strict=False)  # W and b only: the feedback state is still undrawn
    if not stateless:
        with pytest.raises(RuntimeError, match="never drawn"):
            deferred(x)
    kept = {k: v for k, v in deferred.named_parameters()}
    assert bioprop.reset_feedback(deferred) is deferred
    assert all(p is kept[k] for k, p in deferred.named_parameters())  # identity kept: optimizers stay valid
    ref, got = real.state_dict(), deferred.state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
    deferred.zero_grad(set_to_none=True)  # the meta backward left gradients, which to_empty() did not fill
    for net in (real, deferred):
        net(x.requires_grad_(True)).square().sum().backward()
    for (name, p), q in zip(real.named_parameters(), deferred.parameters()):
        assert torch.equal(q.grad, p.grad), name


def test_deferred_init_with_a_checkpoint_needs_no_reset_and_meta_reset_is_refused() -> None:
    real = bioprop.convert(small_convnet(), "brsf", seed=1)
    with torch.device("meta"):
        deferred = bioprop.convert(small_convnet(), "brsf", seed=1)
    with pytest.raises(ValueError, match="to_empty"):
        bioprop.reset_feedback(deferred)
    deferred.to_empty(device="cpu")
    deferred.load_state_dict(real.state_dict())
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    torch.testing.assert_close(deferred(x), real(x), rtol=0, atol=0)
    moved = copy.deepcopy(real).to("meta").to_empty(device="cpu")  # a real model sent to meta is marked too
    with pytest.raises(RuntimeError, match="reset_feedback"):
        moved(x)
    bioprop.reset_feedback(moved)
    fresh = bioprop.convert(small_convnet(), "brsf", seed=1)
    assert torch.equal(moved[0].feedback_magnitude, fresh[0].feedback_magnitude)


def test_deferred_init_of_dfa_draws_the_same_d() -> None:
    torch.manual_seed(0)
    real = bioprop.convert(small_convnet(), "dfa", seed=2)
    with torch.device("meta"):
        deferred = bioprop.convert(small_convnet(), "dfa", seed=2)
        deferred(torch.randn(2, 2, 5, 5, requires_grad=True)).sum().backward()  # D drawn on meta
    deferred.to_empty(device="cpu")
    deferred.load_state_dict({k: v for k, v in real.state_dict().items() if "feedback" not in k}, strict=False)
    bioprop.reset_feedback(deferred)
    deferred.zero_grad(set_to_none=True)
    x, y = torch.randn(2, 2, 5, 5), torch.tensor([0, 2])
    for net in (real, deferred):
        nn.functional.cross_entropy(net(x), y).backward()
    for (name, p), q in zip(real.named_parameters(), deferred.parameters()):
        assert torch.equal(q.grad, p.grad), name
    assert {k: v.shape for k, v in bioprop.feedback_weights(deferred).items()} == \
        {k: v.shape for k, v in bioprop.feedback_weights(real).items()}


def kp_run(early: bool, make_opt: Any, steps: int = 6) -> tuple[nn.Module, torch.optim.Optimizer, list]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    opt = make_opt(net.parameters()) if early else None
    net = bioprop.convert(net, "kp", seed=4)
    opt = opt if early else make_opt(net.parameters())
    d0 = [(m.weight - m.feedback_weight).detach().clone() for m in net if hasattr(m, "feedback_weight")]
    for i in range(steps):
        opt.zero_grad()
        net(batch(i)).pow(2).sum().backward()
        opt.step()
    return net, opt, d0


SGD = lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.1)  # noqa: E731
ADAMW = lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)  # noqa: E731


@pytest.mark.parametrize("make_opt", [SGD, ADAMW], ids=["sgd_momentum_wd", "adamw"])
def test_kolen_pollack_learns_b_with_an_optimizer_built_before_convert(make_opt: Any) -> None:
    """Both orders give the same run as the optimizer built after convert, bit for bit, and W − B follows KP's
    closed form: B gets W's update, and the weight decay shrinks W − B."""
    after, opt_after, d0 = kp_run(False, make_opt)
    before, opt_before, _ = kp_run(True, make_opt)
    for (name, p), q in zip(after.named_parameters(), before.parameters()):
        assert torch.equal(q, p), name
    assert [len(g["params"]) for g in opt_before.param_groups] == [len(g["params"]) for g in opt_after.param_groups]
    for i, state in opt_after.state_dict()["state"].items():  # same parameter order: the state dicts fit either way
        for key, value in state.items():
            assert torch.equal(opt_before.state_dict()["state"][i][key], value), (i, key)
    layers = [m for m in before if hasattr(m, "feedback_weight")]
    for layer, d in zip(layers, d0):
        d, expected = d.numpy(), None
        if make_opt is SGD:  # m_t = μ m_{t-1} + λ D_{t-1} (m_1 = λ D_0), D_t = D_{t-1} − η m_t
            m = np.zeros_like(d)
            for t in range(6):
                m = 0.1 * d if t == 0 else 0.9 * m + 0.1 * d
                d = d - 0.05 * m
            expected = d
        else:  # decoupled decay: D_t = (1 − ηλ)^t D_0 (the Adam parts of W and B are equal)
            expected = (1 - 0.01 * 0.1) ** 6 * d
        np.testing.assert_allclose((layer.weight - layer.feedback_weight).detach().numpy(), expected,
                                   rtol=1e-9, atol=1e-12)


def test_kolen_pollack_adoption_survives_deepcopy_and_leaves_other_rules_alone() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    copy_net = copy.deepcopy(bioprop.convert(copy.deepcopy(net), "kp", seed=1))
    # an optimizer that knows only W and b, as one built before convert does
    opt = torch.optim.SGD([p for n, p in copy_net.named_parameters() if "feedback" not in n], lr=0.1)
    b = copy_net[2].feedback_weight.detach().clone()
    copy_net(batch(0)).sum().backward()
    opt.step()
    assert not torch.equal(copy_net[2].feedback_weight, b)
    torch.testing.assert_close(copy_net[2].feedback_weight - b, copy_net[2].weight.grad * -0.1, rtol=1e-12, atol=0)
    fa_opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fa = bioprop.convert(net, "fa")
    fa(batch(0)).sum().backward()
    fa_opt.step()
    assert sum(len(g["params"]) for g in fa_opt.param_groups) == 4
