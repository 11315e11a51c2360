"""bioprop.metrics against independent NumPy / autograd references, and the shadow backward's promise to leave
training state untouched."""
from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

import bioprop
from bioprop import metrics
from bioprop.metrics import shadow_backward


def np_angle(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.degrees(np.arccos(np.clip(cos, -1, 1))))


def mlp(seed: int = 0, *, dropout: float = 0.0, bn: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 24), nn.Tanh(), nn.Dropout(dropout),
        nn.Linear(24, 24), *( [nn.BatchNorm1d(24)] if bn else []), nn.Tanh(), nn.Dropout(dropout),
        nn.Linear(24, 5))


def convnet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout2d(0.2),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(8, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def batch(seed: int = 1, n: int = 32, conv: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g) if conv else torch.randn(n, 12, generator=g)
    return x, torch.randint(0, 5, (n,), generator=g)


# ----------------------------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("shape", [(7,), (5, 9), (4, 3, 3, 3)])
def test_angle_matches_numpy(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    assert metrics.angle(a, b) == pytest.approx(np_angle(a.numpy(), b.numpy()), abs=1e-9)
    assert metrics.angle(a, 3 * a) == pytest.approx(0.0, abs=1e-5)
    assert metrics.angle(a, -a) == pytest.approx(180.0, abs=1e-5)
    assert math.isnan(metrics.angle(torch.zeros(shape), b))
    with pytest.raises(ValueError, match="same number of elements"):
        metrics.angle(a, torch.ones(a.numel() + 1))


def test_weight_statistics_match_numpy() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 4, 3, 3, generator=g) ** 3  # heavy tails: kurtosis well above 3
    b = torch.randn(6, 4, 3, 3, generator=g)
    b[0, 0] = 0.0
    w[1, 1, 1] = 0.0
    wn, bn_ = w.double().numpy().ravel(), b.double().numpy().ravel()
    assert metrics.norm_ratio(w, b) == pytest.approx(np.linalg.norm(bn_) / np.linalg.norm(wn), rel=1e-12)
    centred = wn - wn.mean()
    assert metrics.kurtosis(w) == pytest.approx(np.mean(centred ** 4) / np.mean(centred ** 2) ** 2, rel=1e-10)
    assert metrics.kurtosis(w) == pytest.approx(scipy.stats.kurtosis(wn, fisher=False), rel=1e-10)
    assert metrics.kurtosis(torch.randn(200_000, generator=g)) == pytest.approx(3.0, abs=0.05)  # Gaussian: 3
    assert math.isnan(metrics.kurtosis(torch.full((5,), 2.0)))
    assert metrics.mean_abs(w) == pytest.approx(np.abs(wn).mean(), rel=1e-12)
    assert metrics.sign_concordance(w, b) == pytest.approx(np.mean(np.sign(wn) == np.sign(bn_)), abs=0)
    assert metrics.sign_concordance(w, w.sign()) == 1.0
    assert metrics.sign_concordance(w[w != 0], -w[w != 0]) == 0.0
    hist = metrics.magnitude_histogram(w, bins=11)
    counts, edges = np.histogram(np.abs(wn), bins=11, range=(0.0, np.abs(wn).max()))
    assert hist["counts"] == counts.tolist()
    np.testing.assert_allclose(hist["edges"], edges, rtol=1e-12)
    assert metrics.magnitude_histogram(torch.zeros(4), bins=2)["counts"] == [4, 0]
    with pytest.raises(ValueError, match="bins"):
        metrics.magnitude_histogram(w, bins=0)


def test_lillicrap_values_match_numpy() -> None:
    g = torch.Generator().manual_seed(5)
    e, w, b = torch.randn(9, 4, generator=g), torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    expected = np.einsum("no,oi,pi,np->n", e.numpy(), w.numpy(), b.numpy(), e.numpy())
    np.testing.assert_allclose(metrics.lillicrap_values(e, w, b).numpy(), expected, rtol=1e-5, atol=1e-5)
    # B = W: |e W|² >= 0 for every sample
    assert (metrics.lillicrap_values(e, w, w) >= 0).all()


# ----------------------------------------------------------------------------------------------- alignment


def test_alignment_uses_current_feedback_and_sign_for_exact_layers() -> None:
    net = bioprop.convert(mlp(), "fa", seed=2, last_layer="backprop")
    w0, b0 = net[0].weight.detach().numpy(), net[0].feedback_weight.numpy()
    w_out = net[6].weight.detach().numpy()
    angles = metrics.alignment(net)
    assert list(angles) == ["0", "3", "6"]
    assert angles["0"] == pytest.approx(np_angle(w0, b0), abs=1e-9)
    assert angles["6"] == pytest.approx(np_angle(w_out, np.sign(w_out)), abs=1e-9)  # exact: W vs sign(W)
    assert list(metrics.alignment(net, exact="skip")) == ["0", "3"]
    with pytest.raises(ValueError, match="allowed: sign, skip"):
        metrics.alignment(net, exact="zero")
    # usf: B = s·sign(W), so the angle equals the W-vs-sign(W) angle; sham: B = W, angle 0
    usf = bioprop.convert(mlp(), "usf")
    w = usf[3].weight.detach().numpy()
    assert metrics.alignment(usf)["3"] == pytest.approx(np_angle(w, np.sign(w)), abs=1e-9)
    assert metrics.alignment(bioprop.convert(mlp(), "sham"))["3"] == pytest.approx(0.0, abs=1e-5)


def test_weight_statistics_per_layer() -> None:
    net = bioprop.convert(convnet(), "frsf", seed=1)
    stats = metrics.weight_statistics(net, bins=7)
    layer = net[4]
    w = layer.weight.detach().double().numpy()
    b = np.sign(w) * layer.feedback_magnitude.double().numpy()
    assert stats["norm_ratio"]["4"] == pytest.approx(np.linalg.norm(b) / np.linalg.norm(w), rel=1e-10)
    assert stats["sign_concordance"]["4"] == 1.0
    assert stats["alignment"]["4"] == pytest.approx(np_angle(w, b), abs=1e-9)
    assert stats["kurtosis"]["4"] == pytest.approx(scipy.stats.kurtosis(w.ravel(), fisher=False), rel=1e-6)
    assert sum(stats["hist"]["4"]["counts"]) == w.size
    assert sorted(stats) == sorted(["alignment", "norm_ratio", "kurtosis", "mean_abs_w", "sign_concordance", "hist"])


# ----------------------------------------------------------------------------------------------- shadow backward


def test_sham_gradient_agreement_is_exactly_zero_even_with_dropout() -> None:
    # Dropout in train mode: both passes must see the same mask, or the angle would be far from 0.
    net = bioprop.convert(mlp(dropout=0.5, bn=True), "sham").train()
    x, y = batch()
    result = shadow_backward(net, x, y, F.cross_entropy)
    for name, grad in result.rule_grads.items():
        assert torch.equal(grad, result.exact_grads[name]), name
    angles = metrics.gradient_agreement(net, x, y, F.cross_entropy)
    assert set(angles) == {"0", "3", "7"}
    assert all(a == pytest.approx(0.0, abs=1e-5) for a in angles.values())


def test_gradient_agreement_fa_matches_oracles() -> None:
    net = bioprop.convert(mlp(dropout=0.3), "fa", seed=4).train()
    x, y = batch()
    rng = torch.get_rng_state()
    result = shadow_backward(net, x, y, F.cross_entropy)
    # Oracle 1: the rule pass is the gradient training computes (same RNG -> same dropout mask).
    torch.set_rng_state(rng)
    train_copy = copy.deepcopy(net)
    F.cross_entropy(train_copy(x), y).backward()
    # Oracle 2: the exact pass is plain autograd on the unconverted model.
    torch.set_rng_state(rng)
    plain = bioprop.convert(copy.deepcopy(net), "backprop")
    assert not any(isinstance(m, bioprop.FeedbackLinear) for m in plain.modules())
    F.cross_entropy(plain(x), y).backward()
    for name in ("0", "3", "6"):
        torch.testing.assert_close(result.rule_grads[name], train_copy.get_submodule(name).weight.grad)
        torch.testing.assert_close(result.exact_grads[name], plain.get_submodule(name).weight.grad)
    torch.set_rng_state(rng)
    angles = metrics.gradient_agreement(net, x, y, F.cross_entropy)
    expected = {n: np_angle(train_copy.get_submodule(n).weight.grad.numpy(), plain.get_submodule(n).weight.grad.numpy())
                for n in ("0", "3", "6")}
    for name in expected:
        assert angles[name] == pytest.approx(expected[name], abs=1e-4)
    assert angles["0"] > 1.0 and angles["3"] > 1.0  # hidden layers: B != W
    assert angles["6"] == pytest.approx(0.0, abs=1e-5)  # the output layer's dW never depends on B


def _snapshot(net: nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in net.named_parameters()},
        "grads": {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None},
        "buffers": {n: b.clone() for n, b in net.named_buffers()},
        "opt": copy.deepcopy(opt.state_dict()),
        "rng": torch.get_rng_state().clone(),
        "drawn_versions": {n: getattr(m, "_feedback_drawn_version", None) for n, m in net.named_modules()},
        "rules": {n: m.rule for n, m in net.named_modules() if hasattr(m, "rule")},
    }


def _assert_same(a: dict, b: dict) -> None:
    for key in ("params", "grads", "buffers"):
        assert a[key].keys() == b[key].keys(), key
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}:{name}"
    assert torch.equal(a["rng"], b["rng"])
    assert a["drawn_versions"] == b["drawn_versions"]
    assert all(a["rules"][n] is b["rules"][n] for n in a["rules"])
    sa, sb = a["opt"], b["opt"]
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for k in sa["state"]:
        assert torch.equal(sa["state"][k]["momentum_buffer"], sb["state"][k]["momentum_buffer"])


@pytest.mark.parametrize("rule", ["brsf", "kp", "usf"])
def test_shadow_backward_leaves_training_state_untouched(rule: str) -> None:
    net = bioprop.convert(mlp(dropout=0.3, bn=True), rule, seed=3).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = batch()
    for _ in range(2):  # momentum buffers exist, .grad is populated, W changed in place (brsf redraw pending)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    before = _snapshot(net, opt)
    record = metrics.training_metrics(net, x, y, F.cross_entropy)
    assert record["grad_angle"]
    _assert_same(before, _snapshot(net, opt))


@pytest.mark.parametrize("rule", ["brsf", "fa"])
def test_training_with_metrics_is_bitwise_identical_to_training_without(rule: str) -> None:
    """The strongest form of 'untouched': interleaving metric calls changes nothing in the training run."""
    def run(with_metrics: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(11)
        net = bioprop.convert(mlp(dropout=0.4, bn=True), rule, seed=5).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        for step in range(6):
            x, y = batch(seed=step)
            if with_metrics and step % 2 == 0:
                metrics.training_metrics(net, x, y, F.cross_entropy)  # before the step's forward
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            if with_metrics:
                metrics.training_metrics(net, x, y, F.cross_entropy)  # between backward and step
            opt.step()
        return {n: t.detach().clone() for n, t in [*net.named_parameters(), *net.named_buffers()]}

    plain, measured = run(False), run(True)
    for name in plain:
        assert torch.equal(plain[name], measured[name]), name


def test_lillicrap_condition_at_the_output_layer_matches_numpy() -> None:
    net = bioprop.convert(mlp(), "fa", seed=6)
    x, y = batch(n=40)
    got = metrics.lillicrap_condition(net, x, y, F.cross_entropy)
    out = net(x)
    e = torch.autograd.grad(F.cross_entropy(out, y), out)[0].numpy()  # e = dL/dŷ
    w, b = net[6].weight.detach().numpy(), net[6].feedback_weight.numpy()
    values = np.einsum("no,oi,pi,np->n", e, w, b, e)
    assert list(got) == ["6"]
    assert got["6"]["fraction"] == pytest.approx(np.mean(values > 0), abs=1e-12)
    assert got["6"]["mean"] == pytest.approx(values.mean(), rel=1e-4, abs=1e-12)
    # Output layer exact: the condition is read at the topmost feedback layer, with the true error there.
    partial = bioprop.convert(mlp(), "fa", seed=6, last_layer="backprop")
    assert list(metrics.lillicrap_condition(partial, x, y, F.cross_entropy)) == ["3"]
    assert metrics.lillicrap_condition(mlp(), x, y, F.cross_entropy) == {}


def test_lillicrap_condition_conv_output_layer() -> None:
    net = bioprop.convert(convnet(), "usf").eval()
    x, y = batch(n=6, conv=True)
    got = metrics.lillicrap_condition(net, x, y, F.cross_entropy)
    # reference: the input gradients of the 1x1 output conv through W and through B, via torch.nn.grad
    feats = net[:6](x).detach()
    out = net[6](feats)
    e = torch.autograd.grad(F.cross_entropy(net[7:](out), y), out)[0]
    w = net[6].weight.detach()
    b = net[6].rule.feedback_weight(net[6])
    through_w = torch.nn.grad.conv2d_input(feats.shape, w, e)
    through_b = torch.nn.grad.conv2d_input(feats.shape, b, e)
    values = (through_w * through_b).flatten(1).sum(1).double().numpy()
    assert got["6"]["fraction"] == pytest.approx(np.mean(values > 0), abs=1e-12)
    assert got["6"]["mean"] == pytest.approx(values.mean(), rel=1e-4)
    assert got["6"]["fraction"] > 0.5  # sign-concordant feedback mostly satisfies it


# ----------------------------------------------------------------------------------------------- training_metrics


def test_training_metrics_is_strict_json_with_every_key() -> None:
    net = bioprop.convert(mlp(), "fa")
    with torch.no_grad():
        net[3].weight.zero_()  # zero init (nokland2016): the angle to W is undefined -> None, not NaN
    x, y = batch()
    record = metrics.training_metrics(net, x, y, F.cross_entropy, bins=5)
    text = json.dumps(record, allow_nan=False)
    assert set(json.loads(text)) == set(metrics.METRIC_KEYS)
    assert record["alignment"]["3"] is None and record["kurtosis"]["3"] is None
    assert record["alignment"]["0"] == pytest.approx(metrics.alignment(net)["0"])
    assert len(record["hist"]["0"]["counts"]) == 5
    weights_only = metrics.training_metrics(net)
    assert weights_only["grad_angle"] == {} and weights_only["alignment"]
    with pytest.raises(ValueError, match="x, y and loss_fn together"):
        metrics.training_metrics(net, x)
    with pytest.raises(ValueError, match="scalar"):
        metrics.gradient_agreement(net, x, y, lambda out, t: F.cross_entropy(out, t, reduction="none"))


def test_metrics_see_through_wrappers() -> None:
    net = bioprop.convert(mlp(), "usf")
    compiled_like = nn.Module()
    compiled_like._orig_mod = net  # what torch.compile's wrapper holds
    assert metrics.alignment(compiled_like) == metrics.alignment(net)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_shadow_backward_restores_cuda_rng_and_matches_masks() -> None:
    net = bioprop.convert(mlp(dropout=0.5), "sham").cuda().train()
    x, y = (t.cuda() for t in batch())
    cuda_rng, cpu_rng = torch.cuda.get_rng_state(), torch.get_rng_state()
    angles = metrics.gradient_agreement(net, x, y, F.cross_entropy)
    assert all(a == pytest.approx(0.0, abs=1e-4) for a in angles.values())
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng) and torch.equal(torch.get_rng_state(), cpu_rng)


# ----------------------------------------------------------------------------------------------- direct feedback


def dfa_net(seed: int = 0, dropout: float = 0.0) -> nn.Sequential:
    return bioprop.convert(mlp(seed, dropout=dropout), "dfa", seed=seed)


def test_dfa_signal_angle_matches_projection_of_the_output_error() -> None:
    net = dfa_net()
    x, y = batch()
    bioprop.direct.initialize(net, x)  # draw every D now, so the reference below can read it
    angles = metrics.dfa_signal_angle(net, x, y, F.cross_entropy)
    markers = bioprop.direct.markers(net)
    assert list(angles) == list(markers) and len(angles) == 2
    # reference: plain backprop on an unconverted copy gives e = dL/dŷ and the true error at each marked h
    plain = bioprop.convert(copy.deepcopy(net), "backprop")
    hidden = [plain[1](plain[0](x))]
    hidden.append(plain[4](plain[3](plain[2](hidden[0]))))  # dropout(p=0), linear, tanh
    out = plain[6](plain[5](hidden[1]))
    e, *true = torch.autograd.grad(F.cross_entropy(out, y), [out, *hidden])
    for (name, marker), h_true in zip(markers.items(), true):
        delivered = (e @ marker.feedback_matrix).numpy()  # δh_l = e · D_l
        assert angles[name] == pytest.approx(np_angle(delivered, h_true.numpy()), abs=1e-4)
    # the weight-gradient angles compare DFA's real training gradient with backprop's
    result = shadow_backward(net, x, y, F.cross_entropy)
    train_copy = copy.deepcopy(net)
    F.cross_entropy(train_copy(x), y).backward()
    F.cross_entropy(plain(x), y).backward()
    for name in ("0", "3", "6"):
        torch.testing.assert_close(result.rule_grads[name], train_copy.get_submodule(name).weight.grad)
        torch.testing.assert_close(result.exact_grads[name], plain.get_submodule(name).weight.grad)
    assert metrics.gradient_agreement(net, x, y, F.cross_entropy)["0"] > 1.0


def test_dfa_metrics_leave_marker_state_and_training_untouched() -> None:
    fresh = dfa_net()
    markers = list(bioprop.direct.markers(fresh).values())
    assert all(m.feedback_matrix is None for m in markers)  # D is drawn by the first training forward
    x, y = batch()
    record = metrics.training_metrics(fresh, x, y, F.cross_entropy)
    assert record["dfa_signal_angle"] and record["lillicrap"] == {}
    assert all(m.feedback_matrix is None for m in markers)

    def run(with_metrics: bool) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(2)
        net = dfa_net(dropout=0.3).train()
        for marker in bioprop.direct.markers(net).values():
            marker.record = True
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        for step in range(4):
            xb, yb = batch(seed=step)
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            if with_metrics:
                metrics.training_metrics(net, xb, yb, F.cross_entropy)
            opt.step()
        signals = [m.last_signal.clone() for m in bioprop.direct.markers(net).values()]
        return {n: t.detach().clone() for n, t in [*net.named_parameters(), *net.named_buffers()]}, signals

    (plain, plain_signals), (measured, measured_signals) = run(False), run(True)
    for name in plain:
        assert torch.equal(plain[name], measured[name]), name
    for a, b in zip(plain_signals, measured_signals):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- cost


def test_measure_cost_times_both_and_gives_the_interval(capsys: pytest.CaptureFixture[str]) -> None:
    net = bioprop.convert(mlp(), "fa").train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = batch()
    cost = metrics.measure_cost(net, x, y, F.cross_entropy, opt, repeats=3, warmup=1)
    assert cost.step_s > 0 and cost.metrics_s > 0 and 0 < cost.weights_ratio
    assert metrics.MetricsCost(0.01, 0.055, 5.5, 2.0).interval_for(0.05) == 110  # ceil(5.5 / 0.05)
    assert metrics.MetricsCost(0.01, 0.001, 0.01, 0.0).interval_for(0.05) == 1
    from bioprop.metrics.cost import main
    main(["--rules", "usf", "--width", "16", "--repeats", "2"])
    out = capsys.readouterr().out
    assert "2x16 tanh MLP" in out and re.search(r"^\| usf \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| \d+ \|$", out, re.M)
