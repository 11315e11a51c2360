"""convert(): any nn.Module, same Parameters, exclusion, last layer, idempotence, summary, errors."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import bioprop
from bioprop.layers import FeedbackConv2d, FeedbackLinear, layer_feedback


class Custom(nn.Module):
    """A non-Sequential model with nesting, a residual sum, attention and an LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.rnn = nn.LSTM(4, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.block(h)  # (B, 4, H, W)
        seq = h.flatten(2).transpose(1, 2)  # (B, H·W, 4)
        seq, _ = self.attn(seq, seq, seq)
        seq, _ = self.rnn(seq)
        return self.head(seq.mean(1))


def test_keeps_parameter_objects_and_optimizer() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    params = list(net.parameters())
    values = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(net.parameters(), lr=0.5)  # created before conversion
    net = bioprop.convert(net, "fa", seed=0)
    assert isinstance(net[0], FeedbackLinear) and isinstance(net[0], nn.Linear)
    assert [id(p) for p in net.parameters()] == [id(p) for p in params]
    assert all(torch.equal(p, v) for p, v in zip(net.parameters(), values))
    net(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert all(not torch.equal(p, v) for p, v in zip(net.parameters(), values))


def test_custom_model_summary_and_warning() -> None:
    torch.manual_seed(0)
    model = Custom()
    with pytest.warns(UserWarning, match=r"attn \(MultiheadAttention\).*rnn \(LSTM\).*Supported layer types"):
        model = bioprop.convert(model, "usf")
    summary = bioprop.conversion_summary(model)
    assert [n for n, _, _ in summary.converted] == ["stem", "block.0", "head"]
    kept = {n: reason for n, _, reason in summary.kept}
    assert kept["block.1"] == "exact by design"
    assert kept["attn"].startswith("cannot take feedback") and kept["rnn"].startswith("cannot take feedback")
    assert "attn.out_proj" not in kept  # the attention block is reported once, as a whole
    assert isinstance(model.block[0], FeedbackConv2d)
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    out = model(torch.randn(2, 3, 4, 4))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert "converted 3 layer(s)" in str(summary)


def test_exclude_by_name_pattern_and_type() -> None:
    model = Custom()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = bioprop.convert(model, "fa", exclude=["stem", "block.*"])
    assert type(model.stem) is nn.Conv2d and type(model.block[0]) is nn.Conv2d
    assert isinstance(model.head, FeedbackLinear)
    model = Custom()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = bioprop.convert(model, "fa", exclude=[nn.Conv2d])
    assert type(model.stem) is nn.Conv2d and isinstance(model.head, FeedbackLinear)
    with pytest.raises(ValueError, match="exclude takes"):
        bioprop.convert(nn.Linear(2, 2), "fa", exclude=[3])


def test_last_layer_backprop_is_exact() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    net = bioprop.convert(net, "fa", last_layer="backprop")
    assert isinstance(net[0], FeedbackLinear) and type(net[2]) is nn.Linear
    # The output layer sends δ·W exactly: check against the closed form.
    h = torch.randn(3, 8, requires_grad=True)
    net[2](h).backward(torch.ones(3, 2))
    torch.testing.assert_close(h.grad, torch.ones(3, 2) @ net[2].weight.detach())
    with pytest.raises(ValueError, match="per-layer rule"):
        bioprop.convert(net, "fa", last_layer="dfa")
    with pytest.raises(ValueError, match="unknown rule 'nope'"):
        bioprop.convert(net, "fa", last_layer="nope")


def test_converting_twice_is_safe() -> None:
    torch.manual_seed(0)
    net = bioprop.convert(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), "fa", seed=0)
    b = bioprop.feedback_weights(net)
    layer = net[0]
    net = bioprop.convert(net, "fa", seed=123)  # same rule and options: state kept, never redrawn silently
    assert net[0] is layer
    assert all(torch.equal(b[k], v) for k, v in bioprop.feedback_weights(net).items())
    weight = net[0].weight
    net = bioprop.convert(net, "usf")
    assert net[0].weight is weight and "feedback_weight" not in dict(net[0].named_buffers())
    assert net[0].rule.name == "usf"
    net = bioprop.convert(net, "backprop")  # back to native layers
    assert type(net[0]) is nn.Linear and net[0].weight is weight
    assert bioprop.feedback_weights(net) == {}


def test_single_layer_and_hooks_survive() -> None:
    layer = nn.Linear(3, 2)
    calls: list[int] = []
    layer.register_forward_hook(lambda m, i, o: calls.append(1))
    new = bioprop.convert(layer, "usf")
    assert isinstance(new, FeedbackLinear) and new.weight is layer.weight
    new(torch.randn(1, 3))
    assert calls == [1]


def test_unknown_rule_and_option_errors_list_allowed() -> None:
    with pytest.raises(ValueError, match=r"unknown rule 'fb'.*allowed rules: backprop, sham, fa, usf"):
        bioprop.convert(nn.Linear(2, 2), "fb")
    with pytest.raises(ValueError, match=r"rule 'usf' has no option\(s\) 'sclae'; allowed options: scale, norm"):
        bioprop.convert(nn.Linear(2, 2), "usf", sclae=1.0)
    with pytest.raises(ValueError, match=r"unknown scale 'big'; allowed: xiao2018, biotorch, unit"):
        bioprop.convert(nn.Linear(2, 2), "fa", scale="big")
    with pytest.raises(ValueError, match="concordance must be a fraction"):
        bioprop.convert(nn.Linear(2, 2), "partial_concordance", concordance=1.5)
    with pytest.raises(ValueError, match="not been converted"):
        bioprop.conversion_summary(nn.Linear(2, 2))
    assert bioprop.convert(nn.Sequential(nn.Linear(2, 2)), "sign_symmetry")[0].rule.name == "usf"


def test_list_rules_contract() -> None:
    rules = bioprop.list_rules()
    for name in ("backprop", "sham", "fa", "usf", "brsf", "frsf", "partial_concordance", "kp", "wm"):
        assert name in rules
    assert rules[:6] == ["backprop", "sham", "fa", "usf", "brsf", "frsf"]


def test_rule_object_and_direct_construction() -> None:
    layer = FeedbackLinear(5, 3, rule="frsf", seed=2, scale="biotorch")
    assert layer.rule.options() == {"scale": "biotorch", "norm": None}
    assert "rule='frsf'" in repr(layer)
    conv = FeedbackConv2d(3, 4, 3, stride=2, padding=1, rule="fa", seed=1)
    y = conv(torch.randn(2, 3, 8, 8))
    assert y.shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match="has no option"):
        FeedbackConv2d(3, 4, 3, rule="fa", concordance=0.5)


class Aliased(nn.Module):
    """One Linear registered under two names and used twice, plus a shared block."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = self.a
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.tanh(self.a(x))))


def test_convert_keeps_a_layer_registered_twice_shared() -> None:
    torch.manual_seed(0)
    net = bioprop.convert(Aliased().double(), "fa", seed=3)
    assert isinstance(net.a, FeedbackLinear) and net.b is net.a
    summary = bioprop.conversion_summary(net)
    assert [name for name, _, _ in summary.converted] == ["a", "head"]
    assert summary.aliases == {"a": ["b"]} and "also registered as b" in str(summary)
    assert len(list(net.parameters())) == 4  # a.weight, a.bias, head.weight, head.bias: one Parameter each
    # Both uses send their error through the same B (NumPy closed form); dW accumulates over both uses.
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 3, dtype=torch.float64)
    net(x).backward(g)
    xn, gn = x.detach().numpy(), g.numpy()
    w, bias, fb = (t.detach().numpy() for t in (net.a.weight, net.a.bias, net.a.feedback_weight))
    fbh = net.head.feedback_weight.detach().numpy()
    h1 = np.tanh(xn @ w.T + bias)
    h2 = h1 @ w.T + bias
    d2 = gn @ fbh  # δ at the output of the second use
    d1 = (d2 @ fb) * (1 - h1 ** 2)  # δ at the pre-activation of the first use
    np.testing.assert_allclose(net.a.weight.grad.numpy(), d2.T @ h1 + d1.T @ xn, rtol=1e-10)
    np.testing.assert_allclose(net.a.bias.grad.numpy(), d2.sum(0) + d1.sum(0), rtol=1e-10)
    np.testing.assert_allclose(x.grad.numpy(), d1 @ fb, rtol=1e-10)
    np.testing.assert_allclose(net.head.weight.grad.numpy(), gn.T @ h2, rtol=1e-10)


def test_aliased_layer_under_sham_equals_native_and_exclusion_by_alias() -> None:
    torch.manual_seed(1)
    native = Aliased().double()
    sham = bioprop.convert(Aliased().double(), "sham")
    sham.load_state_dict(native.state_dict())
    x = torch.randn(4, 5, dtype=torch.float64)
    for net in (native, sham):
        net(x).square().sum().backward()
    for (name, p), q in zip(native.named_parameters(), sham.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12, msg=name)
    kept = bioprop.convert(Aliased(), "fa", exclude=["b"])
    assert type(kept.a) is nn.Linear and kept.b is kept.a
    assert ("a", "Linear", "excluded") in bioprop.conversion_summary(kept).kept
    back = bioprop.convert(bioprop.convert(Aliased(), "usf"), "backprop")
    assert type(back.a) is nn.Linear and back.b is back.a


def test_layer_feedback_is_the_one_accessor_of_the_b_a_layer_uses() -> None:
    """``layer_feedback``: None for exact layers, the rule's B otherwise (no copy, no side effect);
    ``feedback_weights`` copies it (W where exact) and lists no inactive direct-feedback marker."""
    torch.manual_seed(0)
    plain, exact = nn.Linear(3, 2), FeedbackLinear(3, 2, rule="backprop")
    fa, usf = FeedbackLinear(3, 2, rule="fa", seed=1), FeedbackLinear(3, 2, rule="usf")
    assert layer_feedback(plain) is None and layer_feedback(exact) is None
    b = layer_feedback(fa)
    assert b is not None and b.data_ptr() == fa.feedback_weight.data_ptr() and not b.requires_grad
    np.testing.assert_array_equal(np.sign(layer_feedback(usf).numpy()), np.sign(usf.weight.detach().numpy()))
    net = nn.Sequential(plain, exact, fa, usf, bioprop.direct.DirectFeedback())
    weights = bioprop.feedback_weights(net)
    assert list(weights) == ["1", "2", "3"]  # the plain layer and the marker (never converted) are not listed
    torch.testing.assert_close(weights["1"], exact.weight.detach(), rtol=0, atol=0)
    for name, layer in (("2", fa), ("3", usf)):
        torch.testing.assert_close(weights[name], layer_feedback(layer), rtol=0, atol=0)
        assert weights[name].data_ptr() != layer_feedback(layer).data_ptr()  # a copy
