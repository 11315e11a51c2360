"""Rule state across copies, loads and deferred initialisation, and learned feedback with an early optimizer."""
from __future__ import annotations

import copy
import pickle

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
