"""Every per-layer rule, parametrised over the registry: δx = δy·B in closed form, state, scales, redraws."""
from __future__ import annotations

import copy
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bioprop
from bioprop.rules import RULES, LayerRule, create_rule, feedback_scale
from bioprop.seeding import derive_seed

LAYER_RULES = [r for r in bioprop.list_rules() if isinstance(create_rule(r), LayerRule)]
FEEDBACK_RULES = [r for r in LAYER_RULES if not RULES.get(r).exact]  # rules whose updates differ from backprop's


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5)).to(dtype)


def convnet(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 4)).to(dtype)


def grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_()
    out = model(x)
    gy = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    params = [p for n, p in model.named_parameters() if not n.endswith("feedback_weight")]
    gs = torch.autograd.grad(out, [x, *params], gy)
    return gs[0], list(gs[1:])


@pytest.mark.parametrize("make", [mlp, convnet])
def test_sham_equals_autograd(make) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(6, 12, dtype=torch.float64) if make is mlp else torch.randn(6, 3, 8, 8, dtype=torch.float64)
    ref_model, model = make(), bioprop.convert(make(), "sham")
    gx_ref, gp_ref = grads(ref_model, x)
    gx, gp = grads(model, x)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-13)
    for a, b in zip(gp, gp_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("rule", FEEDBACK_RULES)
def test_rule_differs_from_backprop(rule: str) -> None:
    x = torch.randn(6, 12, dtype=torch.float64)
    gx_ref, _ = grads(mlp(), x)
    gx, _ = grads(bioprop.convert(mlp(), rule, seed=1), x)
    assert not torch.allclose(gx, gx_ref, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("rule", LAYER_RULES)
def test_linear_layer_sends_error_through_b(rule: str) -> None:
    """For every rule, one layer: δx = δy·B (B as reported by feedback_weights), dW and db exact (NumPy)."""
    torch.manual_seed(0)
    net = bioprop.convert(nn.Sequential(nn.Linear(7, 5)).double(), rule, seed=3)
    b_now = bioprop.feedback_weights(net).get("0", net[0].weight.detach())
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)  # (B, T, C) input
    y = net(x)
    gy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(gy)
    b_used = bioprop.feedback_weights(net).get("0", net[0].weight.detach())
    torch.testing.assert_close(b_now, b_used)  # no redraw between forward and backward
    xn, gyn = x.detach().numpy().reshape(-1, 7), gy.numpy().reshape(-1, 5)
    np.testing.assert_allclose(x.grad.numpy().reshape(-1, 7), gyn @ b_used.numpy(), rtol=1e-10)
    np.testing.assert_allclose(net[0].weight.grad.numpy(), gyn.T @ xn, rtol=1e-10)
    np.testing.assert_allclose(net[0].bias.grad.numpy(), gyn.sum(0), rtol=1e-10)


@pytest.mark.parametrize("rule", LAYER_RULES)
@pytest.mark.parametrize("conv_args", [dict(stride=1, padding=1, groups=1), dict(stride=2, padding=2, groups=3),
                                       dict(stride=1, padding="same", groups=1, padding_mode="reflect")])
def test_conv_layer_sends_error_through_b(rule: str, conv_args: dict) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 9, 3, **conv_args).double()
    net = bioprop.convert(nn.Sequential(conv), rule, seed=3)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64, requires_grad=True)
    y = net(x)
    gy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(gy)
    b_used = bioprop.feedback_weights(net).get("0", net[0].weight.detach())
    # Reference: native conv (with B as the weight) for δx, native conv with W for dW and db.
    ref = nn.Conv2d(6, 9, 3, **conv_args).double()
    ref.weight.data.copy_(b_used)
    ref.bias.data.copy_(net[0].bias.detach())
    x_ref = x.detach().clone().requires_grad_()
    ref(x_ref).backward(gy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    ref.weight.data.copy_(net[0].weight.detach())
    ref.zero_grad()
    ref(x.detach()).backward(gy)
    torch.testing.assert_close(net[0].weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(net[0].bias.grad, ref.bias.grad, rtol=1e-10, atol=1e-12)


def test_closed_forms_of_b() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(40, 30)
    conv = nn.Conv2d(8, 16, (3, 5))
    w, wc = lin.weight.detach(), conv.weight.detach()
    # xiao2018: 1/sqrt(fan_in) for linear, sqrt(2/(kh·kw·C_out)) for conv; biotorch: Xavier std.
    assert feedback_scale(w, "xiao2018") == pytest.approx(1 / math.sqrt(40))
    assert feedback_scale(wc, "xiao2018") == pytest.approx(math.sqrt(2 / (3 * 5 * 16)))
    assert feedback_scale(w, "biotorch") == pytest.approx(math.sqrt(2 / 70))
    assert feedback_scale(wc, "biotorch") == pytest.approx(math.sqrt(2 / (8 * 15 + 16 * 15)))
    for scale, s in [("xiao2018", 1 / math.sqrt(40)), ("biotorch", math.sqrt(2 / 70)), ("unit", 1.0), (0.3, 0.3)]:
        net = bioprop.convert(nn.Sequential(copy.deepcopy(lin)), "usf", scale=scale)
        np.testing.assert_allclose(bioprop.feedback_weights(net)["0"].numpy(), s * np.sign(w.numpy()), rtol=1e-6)
    # frsf: |M| fixed, signs follow W; partial concordance: the fraction of concordant signs is p.
    net = bioprop.convert(nn.Sequential(nn.Linear(200, 300)), "frsf")
    b = bioprop.feedback_weights(net)["0"]
    assert torch.equal(torch.sign(b), torch.sign(net[0].weight.detach()))
    with torch.no_grad():
        net[0].weight.neg_()
    b2 = bioprop.feedback_weights(net)["0"]
    torch.testing.assert_close(b2, -b)
    for p in (0.0, 0.25, 0.9, 1.0):
        net = bioprop.convert(nn.Sequential(nn.Linear(200, 300)), "partial_concordance", concordance=p)
        agree = (torch.sign(bioprop.feedback_weights(net)["0"]) == torch.sign(net[0].weight)).double().mean()
        assert abs(float(agree) - p) < 0.01


def test_biotorch_fan_in_of_a_grouped_conv_is_torch_init_fan() -> None:
    """For groups > 1 the fans are torch.nn.init's: fan_in = (C_in/groups)·k_h·k_w, fan_out = C_out·k_h·k_w, and
    docs/rules.md says so."""
    conv = nn.Conv2d(8, 12, (3, 5), groups=4)
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(conv.weight)
    assert (fan_in, fan_out) == (8 // 4 * 15, 12 * 15)
    assert feedback_scale(conv.weight, "biotorch") == pytest.approx(math.sqrt(2 / (fan_in + fan_out)))
    assert feedback_scale(conv.weight, "biotorch") == pytest.approx(math.sqrt(2 / (2 * 15 + 12 * 15)))
    docs = (Path(__file__).parents[1] / "docs" / "rules.md").read_text()
    assert "fan_in = (C_in/groups)·k_h·k_w" in docs and "fan_in = C_in·k_h·k_w" not in docs


@pytest.mark.parametrize("scale", ["xiao2018", "biotorch"])  # both draw linear B from a uniform law
def test_fa_draw_statistics(scale: str) -> None:
    net = bioprop.convert(nn.Sequential(nn.Linear(400, 300)), "fa", scale=scale, seed=5)
    b = net[0].feedback_weight
    s = feedback_scale(b, scale)
    bound = s if scale == "xiao2018" else s * math.sqrt(3)
    assert float(b.abs().max()) <= bound and float(b.abs().max()) > 0.99 * bound
    assert float(b.std()) == pytest.approx(bound / math.sqrt(3), rel=0.02)
    conv = bioprop.convert(nn.Sequential(nn.Conv2d(64, 64, 3)), "fa", seed=5)[0].feedback_weight
    assert float(conv.std()) == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.03)  # xiao2018 conv: N(0, s²)


def test_norm_modes() -> None:
    torch.manual_seed(0)
    for rule in ("usf", "frsf", "brsf", "partial_concordance"):
        net = bioprop.convert(nn.Sequential(nn.Linear(30, 20)), rule, norm="init")
        w0 = net[0].weight.detach().norm()
        assert float(bioprop.feedback_weights(net)["0"].norm()) == pytest.approx(float(w0), rel=1e-5)
        net = bioprop.convert(nn.Sequential(nn.Linear(30, 20)), rule, norm="sn")
        with torch.no_grad():
            net[0].weight.mul_(3.0)
        assert float(bioprop.feedback_weights(net)["0"].norm()) == pytest.approx(float(net[0].weight.detach().norm()),
                                                                                rel=1e-5)


def test_brsf_redraws_exactly_once_per_update() -> None:
    torch.manual_seed(0)
    net = bioprop.convert(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)), "brsf", seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    layer = net[2]  # its input requires grad, so it needs B
    x = torch.randn(4, 5)

    def draws() -> int:
        return int(layer.feedback_draws)

    start = draws()
    net(x).sum().backward()
    first = layer.feedback_magnitude.clone()
    assert draws() == start  # no update yet: the draw made at conversion is used
    for _ in range(3):  # gradient accumulation: three micro-batches share one draw
        net(x).sum().backward()
    with torch.no_grad():
        net(x)  # evaluation never draws
    assert draws() == start and torch.equal(layer.feedback_magnitude, first)
    for step in range(1, 4):
        opt.step()
        opt.zero_grad()
        net(x).sum().backward()
        net(x).sum().backward()
        assert draws() == start + step
        assert not torch.equal(layer.feedback_magnitude, first)
        first = layer.feedback_magnitude.clone()


@pytest.mark.parametrize("rule", ["brsf", "bp_noise"])  # the rules that redraw once per update
def test_per_update_draw_sequence_is_reproducible_and_resumable(rule: str) -> None:
    def run(steps: int, state: dict | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        net = bioprop.convert(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)), rule, seed=7)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        if state is not None:
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
        for i in range(steps):
            x = torch.randn(4, 5, generator=torch.Generator().manual_seed(100 + i + (state or {}).get("i", 0)))
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
        return net, opt

    full, _ = run(6)
    half, opt = run(3)
    state = {"model": copy.deepcopy(half.state_dict()), "opt": copy.deepcopy(opt.state_dict()), "i": 3}
    resumed, _ = run(3, state)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("rule", FEEDBACK_RULES)
def test_state_round_trip(rule: str) -> None:
    net = bioprop.convert(convnet(dtype=torch.float32), rule, seed=11)
    before = bioprop.feedback_weights(net)
    other = bioprop.convert(convnet(seed=1, dtype=torch.float32), rule, seed=99)
    assert any(not torch.equal(before[k], v) for k, v in bioprop.feedback_weights(other).items()) or \
        rule in ("usf",)
    other.load_state_dict(net.state_dict())
    for name, b in bioprop.feedback_weights(other).items():
        torch.testing.assert_close(b, before[name], rtol=0, atol=0)
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        for name, b in bioprop.feedback_weights(clone).items():
            torch.testing.assert_close(b, before[name], rtol=0, atol=0)


def test_seed_fixes_state_and_names_decouple_layers() -> None:
    a = bioprop.feedback_weights(bioprop.convert(mlp(), "fa", seed=1))
    b = bioprop.feedback_weights(bioprop.convert(mlp(), "fa", seed=1))
    c = bioprop.feedback_weights(bioprop.convert(mlp(), "fa", seed=2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a)
    # Excluding a layer does not change the draws of the others.
    d = bioprop.feedback_weights(bioprop.convert(mlp(), "fa", seed=1, exclude=["0"]))
    assert set(d) == {"2", "4"} and all(torch.equal(a[k], d[k]) for k in d)


def test_weight_mirror_turns_b_towards_w() -> None:
    from bioprop.mirror import mirror_step
    torch.manual_seed(0)
    net = bioprop.convert(nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 4)), "wm", lr=0.1, decay=0.1,
                          seed=0)
    angle0 = bioprop.metrics.alignment(net)
    b_before = net[0].feedback_weight.clone()
    mirror_step(net, batch_size=8, step=0, seed=3)
    # Closed form of one step with the same noise: the seed of step 0 of layer "0" under seed 3.
    gen = torch.Generator().manual_seed(derive_seed(3, "weight_mirror", 0, "0"))
    x = torch.randn(8, 20, generator=gen)
    y = x @ net[0].weight.detach().t()
    torch.testing.assert_close(net[0].feedback_weight, 0.9 * b_before + 0.1 * y.t() @ x / 8)
    for step in range(1, 200):
        mirror_step(net, batch_size=64)
    angle = bioprop.metrics.alignment(net)
    assert all(angle[k] < 10 < angle0[k] for k in angle)
    convnet_wm = bioprop.convert(convnet(dtype=torch.float32), "wm", lr=0.1, decay=0.1)
    a0 = bioprop.metrics.alignment(convnet_wm)
    # a convolution's step, closed form: y xᵀ is the weight gradient of noise images one kernel footprint wide
    conv_name, conv = next((n, m) for n, m in convnet_wm.named_modules() if isinstance(m, nn.Conv2d))
    b_before = conv.feedback_weight.clone()
    mirror_step(convnet_wm, batch_size=8, step=0, seed=4)
    gen = torch.Generator().manual_seed(derive_seed(4, "weight_mirror", 0, conv_name))
    k = conv.weight.shape[2:]
    x = torch.randn(8, conv.in_channels, *[d * (s - 1) + 1 for s, d in zip(k, conv.dilation)], generator=gen)
    y = nn.functional.conv2d(x, conv.weight.detach(), dilation=conv.dilation, groups=conv.groups)
    yx = torch.nn.grad.conv2d_weight(x, conv.weight.shape, y, dilation=conv.dilation, groups=conv.groups)
    torch.testing.assert_close(conv.feedback_weight, 0.9 * b_before + 0.1 * yx / 8, rtol=1e-5, atol=1e-6)
    for _ in range(200):
        mirror_step(convnet_wm, batch_size=64)
    a1 = bioprop.metrics.alignment(convnet_wm)
    assert all(a1[k] < 15 < a0[k] for k in a1)


@pytest.mark.parametrize("rule", FEEDBACK_RULES + ["sham"])
def test_bf16_layers(rule: str) -> None:
    net = bioprop.convert(convnet(dtype=torch.float32), rule).to(torch.bfloat16)
    x = torch.randn(3, 3, 8, 8, dtype=torch.bfloat16)
    net(x).float().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all(), name


def test_brsf_magnitude_distribution() -> None:
    """brsf's 8-bit draws follow |M|'s distribution: U(0, b) for linear, half-normal for xiao2018 conv."""
    from bioprop.rules import draw_magnitude_8bit
    g = torch.Generator().manual_seed(0)
    w = torch.randn(500, 400)
    out = draw_magnitude_8bit(w, "xiao2018", g, torch.empty_like(w))
    bound = 1 / math.sqrt(400)
    levels = torch.round(out / bound * 256 - 0.5).long()
    torch.testing.assert_close((levels.double() + 0.5) / 256 * bound, out.double(), rtol=1e-5, atol=1e-9)
    counts = torch.bincount(levels.flatten(), minlength=256).double()
    expected = w.numel() / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 256 + 6 * math.sqrt(2 * 256)  # uniform over the 256 levels
    wc = torch.randn(128, 64, 3, 3)
    s = feedback_scale(wc, "xiao2018")
    oc = draw_magnitude_8bit(wc, "xiao2018", g, torch.empty_like(wc))
    assert float(oc.mean()) / s == pytest.approx(math.sqrt(2 / math.pi), rel=0.01)
    assert float((oc ** 2).mean()) / s ** 2 == pytest.approx(1.0, rel=0.02)
    second = draw_magnitude_8bit(wc, "xiao2018", g, torch.empty_like(wc))
    assert float(torch.corrcoef(torch.stack([oc.flatten(), second.flatten()]))[0, 1]) < 0.02


@pytest.mark.parametrize("rule", ["fa", "usf", "frsf", "dfa"])
@pytest.mark.parametrize("scale", [float("inf"), float("nan"), 0.0, -1.0, True])
def test_one_scale_validator_rejects_non_finite_and_non_positive_scales(rule, scale):
    """Layer and direct rules share one validator: inf was accepted by the layer rules and rejected by DFA."""
    with pytest.raises(ValueError, match=r"scale must be one of .* or a positive float, got"):
        bioprop.create_rule(rule, scale=scale)


def test_brsf_levels_use_every_byte_of_each_random_word() -> None:
    """Each of the eight bytes of a 64-bit random word is one uniform level: every byte position (index mod 8)
    takes the upper half of the levels half of the time (a word drawn over [0, 2^63) would never set the top
    byte's high bit), and the draw is a pure function of the generator's seed."""
    from bioprop.rules import draw_magnitude_8bit
    w = torch.randn(400, 320)
    out = draw_magnitude_8bit(w, "unit", torch.Generator().manual_seed(3), torch.empty_like(w))
    levels = torch.round(out * 256 - 0.5).long().flatten()  # "unit": level k is (k + 0.5)/256
    high = (levels >= 128).double().view(-1, 8).mean(0)  # (8,): one share per byte position
    tol = 5 * math.sqrt(0.25 / levels.view(-1, 8).shape[0])
    assert torch.all((high - 0.5).abs() < tol), high
    again = draw_magnitude_8bit(w, "unit", torch.Generator().manual_seed(3), torch.empty_like(w))
    assert torch.equal(out, again)


def test_feedback_weight_defaults_to_the_recipe_a_rule_gives() -> None:
    """A rule that defines only ``feedback`` (a recipe) gets ``feedback_weight`` = that recipe built from W (NumPy
    reference); one that defines neither is refused by name."""
    from bioprop.functional import AffineFeedback

    class OnlyRecipe(LayerRule):
        name = "only_recipe"

        def feedback(self, layer: nn.Module) -> AffineFeedback:
            return AffineFeedback(torch.ones_like(layer.weight), 0.5, -2.0)

    layer = nn.Linear(3, 2).double()
    b = OnlyRecipe().feedback_weight(layer)
    np.testing.assert_allclose(b.numpy(), 0.5 * layer.weight.detach().numpy() - 2.0, rtol=1e-15)

    class Neither(LayerRule):
        name = "neither"

    with pytest.raises(NotImplementedError, match="rule 'neither' defines neither feedback_weight nor feedback"):
        Neither().feedback_weight(layer)
