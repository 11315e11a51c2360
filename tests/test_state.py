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


