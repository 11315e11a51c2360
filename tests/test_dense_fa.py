"""Dense feedback alignment against closed forms computed independently in NumPy (float64)."""
from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import bioprop
from bioprop import direct
from bioprop.rules import make_generator

from test_direct import (conv2d, conv2d_weight_grad, grads_of, linear_layers, maxpool2, mlp_forward, np_, run_step,
                         small_convnet, softmax_ce_error, tanh_mlp)


def test_dense_fa_mlp_matches_closed_form() -> None:
    """3 hidden tanh blocks: δh_l = e·D_{out→l} + Σ_{k>l} δa_k·D_{k→l}, top block first."""
    torch.manual_seed(0)
    net = bioprop.convert(tanh_mlp(), "dense_fa", seed=3)  # widths 6 -> 5 -> 4 -> 7 -> 3
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    logits = run_step(net, x, y)
    layers = linear_layers(net)
    weights, biases = [np_(m.weight) for m in layers], [np_(m.bias) for m in layers]
    hs, np_logits = mlp_forward(weights, biases, np_(x))
    np.testing.assert_allclose(logits, np_logits, rtol=1e-12)
    e = softmax_ce_error(np_logits, y.numpy())  # (N, n_out)
    d1, d2, d3 = [np_(d) for d in bioprop.feedback_weights(net).values()]
    # rows: the output (3), then the first-layer outputs of the blocks above, top block first (7, then 4)
    assert d3.shape == (3, 7) and d2.shape == (3 + 7, 4) and d1.shape == (3 + 7 + 4, 5)
    delta3 = (e @ d3) * (1.0 - hs[3] ** 2)
    delta2 = (e @ d2[:3] + delta3 @ d2[3:]) * (1.0 - hs[2] ** 2)
    delta1 = (e @ d1[:3] + delta3 @ d1[3:10] + delta2 @ d1[10:]) * (1.0 - hs[1] ** 2)
    grads = grads_of(net)
    names = [n for n, m in net.named_children() if isinstance(m, nn.Linear)]
    for name, delta, h_below in zip(names, (delta1, delta2, delta3), hs):
        np.testing.assert_allclose(grads[f"{name}.weight"], delta.T @ h_below, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(grads[f"{name}.bias"], delta.sum(0), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grads[f"{names[-1]}.weight"], e.T @ hs[-1], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grads[f"{names[-1]}.bias"], e.sum(0), rtol=1e-10, atol=1e-14)
    # each stacked D is one draw of the documented law, U(±1/√n_units), seeded by the marker's name
    for name, d in bioprop.feedback_weights(net).items():
        bound = 1.0 / np.sqrt(d.shape[1])
        expected = torch.empty(d.shape).uniform_(-bound, bound, generator=make_generator(3, name))
        torch.testing.assert_close(d, expected.double(), rtol=0, atol=0)


def test_dense_fa_convnet_with_pooling_inside_a_block() -> None:
    torch.manual_seed(1)
    net = bioprop.convert(small_convnet(), "dense_fa", seed=0)
    assert list(direct.markers(net)) == ["2.direct_feedback", "5.direct_feedback"]  # after pool, after flatten
    x, y = torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.randint(0, 5, (3,))
    run_step(net, x, y)
    w1, b1, w2, b2 = np_(net[0].weight), np_(net[0].bias), np_(net[3].weight), np_(net[3].bias)
    w3, b3 = np_(net[6].weight), np_(net[6].bias)
    t1 = np.tanh(conv2d(np_(x), w1, b1, pad=1))  # (N, 3, 6, 6)
    p1, mask = maxpool2(t1)  # (N, 3, 3, 3)
    t2 = np.tanh(conv2d(p1, w2, b2, pad=0))  # (N, 4, 1, 1): block 2's first-layer output has 4 units
    e = softmax_ce_error(t2.reshape(3, -1) @ w3.T + b3, y.numpy())
    d1, d2 = [np_(d) for d in bioprop.feedback_weights(net).values()]
    assert d1.shape == (5 + 4, 27) and d2.shape == (5, 4)
    delta2 = (e @ d2).reshape(t2.shape) * (1.0 - t2 ** 2)
    signal1 = (e @ d1[:5] + delta2.reshape(3, -1) @ d1[5:]).reshape(p1.shape)  # arrives after the pool
    delta1 = np.repeat(np.repeat(signal1, 2, axis=2), 2, axis=3) * mask * (1.0 - t1 ** 2)
    grads = grads_of(net)
    np.testing.assert_allclose(grads["0.weight"], conv2d_weight_grad(np_(x), delta1, 3, 1), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grads["0.bias"], delta1.sum((0, 2, 3)), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grads["3.weight"], conv2d_weight_grad(p1, delta2, 3, 0), rtol=1e-10, atol=1e-14)


def test_dense_fa_state_survives_state_dict_deepcopy_and_pickle() -> None:
    torch.manual_seed(0)
    net = bioprop.convert(tanh_mlp(), "dense_fa", seed=1)
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    run_step(net, x, y)
    expected = [p.grad.clone() for p in net.parameters()]
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert sum("feedback_matrix" in k for k in state) == 3
    other = bioprop.convert(tanh_mlp(), "dense_fa", seed=99)  # another seed: the loaded D must win
    other.load_state_dict(state)  # before its first forward pass
    for clone in (other, copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        for (name, a), b in zip(bioprop.feedback_weights(net).items(), bioprop.feedback_weights(clone).values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        run_step(clone, x, y)
        for g, p in zip(expected, clone.parameters()):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_dense_fa_errors() -> None:
    net = bioprop.convert(nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 4), nn.ReLU(),
                                        nn.Linear(4, 2)), "dense_fa")
    with pytest.raises(ValueError, match="dense_fa reads the output of each block's first layer"):
        net(torch.randn(2, 3))
    assert bioprop.create_rule("DenseFA").name == "dense_fa"
