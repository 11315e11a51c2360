"""The backprop controls (bp_noise, bp_alignment) and the uSF norm readings, against closed forms in NumPy."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import bioprop
from bioprop.rules import make_generator
from bioprop.seeding import derive_seed

from test_rules import convnet, grads, mlp


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy().copy()  # a copy: buffers change in place


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    return math.degrees(math.acos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1.0, 1.0)))


@pytest.mark.parametrize("make", [mlp, convnet])
@pytest.mark.parametrize("rule, options", [("bp_noise", {"noise": 0.0}), ("bp_alignment", {"angle": 0.0}),
                                           ("bp_alignment", {"angle": 0})])
def test_zero_noise_and_zero_angle_are_sham(make, rule: str, options: dict) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(6, 12, dtype=torch.float64) if make is mlp else torch.randn(6, 3, 8, 8, dtype=torch.float64)
    sham, control = bioprop.convert(make(), "sham"), bioprop.convert(make(), rule, seed=4, **options)
    gx_ref, gp_ref = grads(sham, x)
    for _ in range(2):  # also after a redraw would have happened
        gx, gp = grads(control, x)
        assert torch.equal(gx, gx_ref) and all(torch.equal(a, b) for a, b in zip(gp, gp_ref))
        with torch.no_grad():
            for p in control.parameters():
                p.add_(0.0)  # bumps the version counters, as an optimizer step does
    for name, b in bioprop.feedback_weights(control).items():
        assert torch.equal(b, control.get_submodule(name).weight.detach())


def np_alignment(w: np.ndarray, u: np.ndarray, angle: float) -> np.ndarray:
    """B = ‖W‖ (cos θ Ŵ + sin θ Û), Û = the part of U orthogonal to W, normalised."""
    w_hat = w / np.linalg.norm(w)
    v = u - (u.ravel() @ w_hat.ravel()) * w_hat
    theta = math.radians(angle)
    return np.linalg.norm(w) * (math.cos(theta) * w_hat + math.sin(theta) * v / np.linalg.norm(v))


@pytest.mark.parametrize("angle", [0.05, 1.0, 10.0, 37.0, 89.5, 90, 120.0, 180.0])
def test_bp_alignment_holds_the_angle(angle: float) -> None:
    torch.manual_seed(0)
    # float64: with lr=0.5 the entries of W grow to about 50, where float32 rounding alone is near the tolerance
    net = bioprop.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).double(),
                          "bp_alignment", seed=2, angle=angle)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    directions = {name: np_(net.get_submodule(name).feedback_direction) for name in ("0", "2")}
    for step in range(3):  # the angle holds as W moves; U stays fixed
        for name, b in bioprop.feedback_weights(net).items():
            w = np_(net.get_submodule(name).weight)
            u = np_(net.get_submodule(name).feedback_direction)
            np.testing.assert_array_equal(u, directions[name])
            assert abs(angle_deg(np_(b), w) - angle) < 0.1, (step, name)
            np.testing.assert_allclose(np.linalg.norm(np_(b)), np.linalg.norm(w), rtol=1e-5)
            np.testing.assert_allclose(np_(b), np_alignment(w, u, angle), rtol=1e-4, atol=1e-6)
        opt.zero_grad()
        net(torch.randn(4, 3, 6, 6, dtype=torch.float64, requires_grad=True)).pow(2).sum().backward()
        opt.step()


def test_bp_alignment_direction_is_a_seeded_unit_vector() -> None:
    net = bioprop.convert(mlp(), "bp_alignment", seed=3, angle=45.0)
    again = bioprop.convert(mlp(), "bp_alignment", seed=3, angle=45.0)
    for name in ("0", "2", "4"):
        u = net.get_submodule(name).feedback_direction
        assert u.shape == net.get_submodule(name).weight.shape
        assert float(u.norm()) == pytest.approx(1.0, rel=1e-12)
        assert torch.equal(u, again.get_submodule(name).feedback_direction)
        expected = torch.randn(u.shape, generator=make_generator(3, name), dtype=torch.float64)
        torch.testing.assert_close(u, expected / expected.norm(), rtol=0, atol=0)


def test_bp_noise_closed_form_and_statistics() -> None:
    torch.manual_seed(0)
    noise = 0.6
    net = bioprop.convert(nn.Sequential(nn.Linear(400, 300)).double(), "bp_noise", seed=1, noise=noise)
    layer = net[0]
    w = np_(layer.weight)
    b = np_(bioprop.feedback_weights(net)["0"])
    xi = np_(layer.feedback_noise)
    np.testing.assert_array_equal(b, w + xi)  # B = W + ξ exactly
    # ξ ~ N(0, (noise · std W)²): 120000 entries, so the std is known to about 0.2 %
    assert xi.std() == pytest.approx(noise * w.std(), rel=0.01)
    assert abs(xi.mean()) < 0.01 * noise * w.std()
    assert abs(angle_deg(b, w) - math.degrees(math.atan(noise))) < 0.5  # about atan(noise) for zero-mean W
    # δx = δy · B for the B of this update
    x = torch.randn(5, 400, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(5, 300, dtype=torch.float64)
    net(x).backward(gy)
    np.testing.assert_allclose(np_(x.grad), np_(gy) @ b, rtol=1e-10)


def test_bp_noise_redraws_exactly_once_per_update() -> None:
    torch.manual_seed(0)
    net = bioprop.convert(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double(), "bp_noise", seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    layer = net[2]  # its input requires grad, so it needs B
    x = torch.randn(4, 5, dtype=torch.float64)

    def input_grad_of_layer() -> np.ndarray:
        """dL/dh at the input of net[2] for L = sum(out), computed with the B the layer uses now."""
        h = torch.tanh(net[0](x)).detach().requires_grad_()
        net[2](h).sum().backward()
        return np_(h.grad)

    start = int(layer.feedback_draws)
    first = np_(layer.feedback_noise)
    for _ in range(3):  # gradient accumulation: all micro-batches share the conversion draw
        net(x).sum().backward()
    with torch.no_grad():
        net(x)  # evaluation never draws
    assert int(layer.feedback_draws) == start
    np.testing.assert_array_equal(np_(layer.feedback_noise), first)
    for step in range(1, 4):
        opt.step()
        opt.zero_grad()
        net(x).sum().backward()
        noise_now = np_(layer.feedback_noise)
        net(x).sum().backward()  # a second micro-batch of the same update: no new draw
        assert int(layer.feedback_draws) == start + step
        np.testing.assert_array_equal(np_(layer.feedback_noise), noise_now)
        assert not np.array_equal(noise_now, first)
        # draw k: N(0, (0.75 · std W)²) from the generator seeded with derive_seed(seed, k), for the W it was made for
        k = int(layer.feedback_draws) - 1
        generator = torch.Generator().manual_seed(derive_seed(int(layer.feedback_seed), k))
        std = 0.75 * float(layer.weight.detach().float().std(correction=0))
        expected_noise = torch.empty(layer.weight.shape, dtype=torch.float64).normal_(0.0, std, generator=generator)
        np.testing.assert_array_equal(noise_now, np_(expected_noise))
        # the error sent down is δy·(W + ξ) with this update's ξ (δy = 1 for a sum)
        expected = np.ones((4, 3)) @ (np_(layer.weight) + noise_now)
        np.testing.assert_allclose(input_grad_of_layer(), expected, rtol=1e-12)
        first = noise_now


def test_options_are_checked() -> None:
    for rule, key, bad in [("bp_noise", "noise", -0.1), ("bp_noise", "noise", "big"), ("bp_noise", "noise", True),
                           ("bp_alignment", "angle", 181.0), ("bp_alignment", "angle", -1)]:
        with pytest.raises(ValueError, match=f"{rule} option {key} must be"):
            bioprop.convert(mlp(), rule, **{key: bad})
    with pytest.raises(ValueError, match="allowed: None, 'init', 'sn'$"):
        bioprop.convert(mlp(), "frsf", norm="fa_init")  # frsf's magnitudes are random already
    with pytest.raises(ValueError, match="allowed: None, 'init', 'sn', 'fa_init'"):
        bioprop.convert(mlp(), "usf", norm="SN")


# ----------------------------------------------------------------------------------------------- uSF readings


def test_usf_norm_readings_against_the_third_party_definitions() -> None:
    """SN: B_t = ‖W_t‖·sign(W_t)/‖sign(W_t)‖ (ours = theirs). Init.: ours c·sign(W_t) with ‖B_0‖ = ‖W_0‖;
    theirs (norm="fa_init") |B₀| ∘ sign(W_t) with B₀ fa's B (= frsf)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(30, 20), nn.Tanh(), nn.Conv1d(1, 4, 3))  # only the B's are read: never run

    def converted(rule: str, **options: object) -> nn.Module:
        return bioprop.convert(copy.deepcopy(base).double(), rule, seed=5, **options)

    sn, init, fa_init = converted("usf", norm="sn"), converted("usf", norm="init"), converted("usf", norm="fa_init")
    fa, frsf = converted("fa"), converted("frsf")
    w0 = {name: np_(base.get_submodule(name).weight) for name in ("0", "2")}
    for net in (sn, init, fa_init):  # W_t: every weight moved, and some signs flipped
        with torch.no_grad():
            for name in ("0", "2"):
                weight = net.get_submodule(name).weight
                weight.mul_(1.7).add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(9),
                                                         dtype=weight.dtype))
    for name in ("0", "2"):
        wt = np_(sn.get_submodule(name).weight)
        s = np.sign(wt)
        np.testing.assert_allclose(np_(bioprop.feedback_weights(sn)[name]),
                                   np.linalg.norm(wt) * s / np.linalg.norm(s), rtol=1e-12)
        # ours: a uniform magnitude fixed at conversion so that ‖B_0‖ = ‖W_0‖
        c = np.linalg.norm(w0[name]) / np.linalg.norm(np.sign(w0[name]))
        np.testing.assert_allclose(np_(bioprop.feedback_weights(init)[name]), c * s, rtol=1e-12)
        # theirs: FA's initial B, its magnitudes kept, its signs following W_t
        b0 = np_(bioprop.feedback_weights(fa)[name])
        np.testing.assert_array_equal(np_(bioprop.feedback_weights(fa_init)[name]), np.abs(b0) * s)
        np.testing.assert_array_equal(np_(frsf.get_submodule(name).feedback_magnitude), np.abs(b0))


@pytest.mark.parametrize("rule, options", [("bp_noise", {"noise": 0.5}), ("bp_alignment", {"angle": 30.0})])
def test_controls_hold_no_b_between_forward_and_backward(rule: str, options: dict) -> None:
    """The controls' B (W + ξ, αW + βU) is built in the op's backward: the forward saves only x, W and the
    rule's own state, and δx is still δy · B for the B that feedback_weights reports."""
    net = bioprop.convert(nn.Sequential(nn.Linear(30, 20)).double(), rule, seed=2, **options)
    layer = net[0]
    x = torch.randn(6, 30, dtype=torch.float64, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = net(x)
    state = {t.data_ptr() for name, t in layer.named_buffers() if name.startswith("feedback_")}
    assert saved and all(t.data_ptr() in {x.data_ptr(), layer.weight.data_ptr()} | state for t in saved)
    b = np_(bioprop.feedback_weights(net)["0"])
    gy = torch.randn(6, 20, dtype=torch.float64)
    y.backward(gy)
    np.testing.assert_allclose(np_(x.grad), np_(gy) @ b, rtol=1e-10)
