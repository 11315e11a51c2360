"""fa's ``zero_init`` option (nokland2016's reference code): B is the initial W, then W and b are zero; the
first gradients against a NumPy hand computation, and learning from the zero start where backprop cannot."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bioprop
import bioprop.models.mlp  # noqa: F401  (bioprop.models.mlp.zero_init_)


def _tanh_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_feedback_is_the_initial_weight_and_the_net_starts_at_zero():
    net = _tanh_mlp()
    initial = [layer.weight.detach().clone() for layer in (net[0], net[2])]
    converted = bioprop.convert(copy.deepcopy(net), "fa", zero_init=True)
    for layer, w0 in zip((converted[0], converted[2]), initial):
        assert torch.equal(layer.feedback_weight, w0)
        assert not layer.weight.any() and not layer.bias.any()
    state = converted.state_dict()
    reloaded = bioprop.convert(_tanh_mlp(seed=1), "fa", zero_init=True)
    reloaded.load_state_dict(state)
    assert torch.equal(reloaded[2].feedback_weight, initial[1])


def test_first_gradients_match_a_numpy_hand_computation():
    net = _tanh_mlp()
    w2 = net[2].weight.detach().numpy().copy()  # becomes B of the output layer, (3, 5)
    converted = bioprop.convert(net, "fa", zero_init=True)
    x = torch.randn(4, 6, dtype=torch.float64)
    target = torch.randn(4, 3, dtype=torch.float64)
    loss = 0.5 * ((converted(x) - target) ** 2).sum()
    loss.backward()
    # zero start: h = tanh(0) = 0 and y = 0, so e = y - t = -t; δh = e B2; δa = δh ⊙ (1 - tanh(0)²) = δh
    e = -target.numpy()  # (4, 3)
    delta_a = e @ w2  # (4, 5)
    np.testing.assert_allclose(converted[0].weight.grad.numpy(), delta_a.T @ x.numpy(), rtol=1e-12)
    np.testing.assert_allclose(converted[0].bias.grad.numpy(), delta_a.sum(0), rtol=1e-12)
    np.testing.assert_allclose(converted[2].weight.grad.numpy(), np.zeros((3, 5)))  # h = 0
    np.testing.assert_allclose(converted[2].bias.grad.numpy(), e.sum(0), rtol=1e-12)


def test_fa_learns_from_zero_where_backprop_keeps_the_hidden_layer_at_zero():
    torch.manual_seed(0)
    x = torch.randn(64, 6, dtype=torch.float64)
    y = torch.randn(64, 3, dtype=torch.float64)
    nets = {"fa": bioprop.convert(_tanh_mlp(), "fa", zero_init=True),
            "backprop": bioprop.models.mlp.zero_init_(_tanh_mlp())}
    for net in nets.values():
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        for _ in range(50):
            opt.zero_grad()
            (0.5 * ((net(x) - y) ** 2).sum(1).mean()).backward()
            opt.step()
    assert nets["fa"][0].weight.abs().sum() > 0
    assert not nets["backprop"][0].weight.any()  # symmetric zero start: backprop's hidden gradient stays 0


def test_zero_init_on_an_already_zero_net_and_a_bad_value_are_errors():
    with pytest.raises(ValueError, match="zero_init copies the layer's initial W into B, but W is all zero"):
        bioprop.convert(bioprop.models.mlp.zero_init_(_tanh_mlp()), "fa", zero_init=True)
    with pytest.raises(ValueError, match="zero_init must be True or False"):
        bioprop.convert(_tanh_mlp(), "fa", zero_init=1)
