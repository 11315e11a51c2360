"""Batch Manhattan and the weight constraints, checked against NumPy closed forms and torch.optim.SGD."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

import bioprop
from bioprop.optim import (BatchManhattan, ConstantNorm, FixedSign, apply_constraints, create_constraint,
                           list_constraints, manhattan_param_groups, resolve_constraint_name)




def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))


def _convnet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _batch(net: nn.Module, seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 6) if isinstance(net[0], nn.Linear) else (n, 2, 6, 6)
    return torch.randn(shape, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train_step(net: nn.Module, opt: torch.optim.Optimizer, seed: int, constraints=()) -> float:
    x, y = _batch(net, seed)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    apply_constraints(constraints)
    return float(loss.detach())


def _set_grads(params: list[torch.Tensor], rng: np.random.Generator) -> list[np.ndarray]:
    """Random gradients with some exact zeros (sign(0) = 0 must give no step)."""
    grads = []
    for p in params:
        g = rng.standard_normal(p.shape)
        g[rng.random(p.shape) < 0.2] = 0.0
        p.grad = torch.tensor(g, dtype=p.dtype)
        grads.append(g)
    return grads


# ----------------------------------------------------------------------------------------------- Batch Manhattan


def test_bm_one_step_closed_form() -> None:
    rng = np.random.default_rng(0)
    params = [nn.Parameter(torch.tensor(rng.standard_normal(s))) for s in [(5, 3), (7,), (2, 3, 4)]]
    w0 = [p.detach().numpy().copy() for p in params]
    grads = _set_grads(params, rng)
    BatchManhattan(params, lr=0.05, weight_decay=0.1).step()
    for p, w, g in zip(params, w0, grads):
        np.testing.assert_allclose(p.detach().numpy(), w - 0.05 * (np.sign(g) + 0.1 * w), rtol=0, atol=1e-15)
    # without weight decay every entry moves by exactly lr, or not at all where the gradient is 0
    p = nn.Parameter(torch.tensor(rng.standard_normal((4, 4))))
    before = p.detach().clone()
    g = _set_grads([p], rng)[0]
    BatchManhattan([p], lr=0.01).step()
    moved = (before - p.detach()).numpy()
    np.testing.assert_allclose(moved, 0.01 * np.sign(g), rtol=1e-12, atol=0)
    assert (g == 0).any() and (g != 0).any() and (moved[g == 0] == 0).all()


@pytest.mark.parametrize("foreach", [None, True, False])
def test_bm_momentum_weight_decay_steps_closed_form(foreach: bool | None) -> None:
    rng = np.random.default_rng(1)
    params = [nn.Parameter(torch.tensor(rng.standard_normal(s))) for s in [(4, 6), (6,)]]
    lr, mu, wd = 0.03, 0.9, 0.01
    opt = BatchManhattan(params, lr=lr, momentum=mu, weight_decay=wd, foreach=foreach)
    w = [p.detach().numpy().copy() for p in params]
    buf = [np.zeros_like(x) for x in w]
    for _ in range(6):
        grads = _set_grads(params, rng)
        opt.step()
        for i, g in enumerate(grads):  # xiao2018: d = sign(g) + λW; buf = μ buf + d; W -= η buf
            d = np.sign(g) + wd * w[i]
            buf[i] = mu * buf[i] + d
            w[i] = w[i] - lr * buf[i]
    for p, ref in zip(params, w):
        np.testing.assert_allclose(p.detach().numpy(), ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 1e-3)])
def test_plain_group_is_sgd(momentum: float, weight_decay: float, foreach: bool) -> None:
    net_bm, net_sgd = _mlp(), _mlp()
    opt_bm = BatchManhattan(net_bm.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay,
                            manhattan=False, foreach=foreach)
    opt_sgd = torch.optim.SGD(net_sgd.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    for step in range(5):
        _train_step(net_bm, opt_bm, step)
        _train_step(net_sgd, opt_sgd, step)
    for a, b in zip(net_bm.parameters(), net_sgd.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(net_bm[0].weight, _mlp()[0].weight)


def test_step_leaves_gradients_untouched() -> None:
    net = _mlp()
    opt = BatchManhattan(manhattan_param_groups(net, plain_last_layer=True), lr=0.1, momentum=0.9,
                         weight_decay=0.5)
    x, y = _batch(net, 0)
    nn.functional.cross_entropy(net(x), y).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    opt.step()
    opt.step()  # second step exercises the momentum buffers
    for p, g in zip(net.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_mixed_groups_sign_and_plain() -> None:
    net = _mlp().double()
    groups = manhattan_param_groups(net, plain=("2",), plain_last_layer=True, weight_decay=0.01)
    names = {id(p): n for n, p in net.named_parameters()}
    assert [g["manhattan"] for g in groups] == [True, False]
    assert sorted(names[id(p)] for p in groups[1]["params"]) == ["2.bias", "2.weight", "4.bias", "4.weight"]
    assert sorted(names[id(p)] for p in groups[0]["params"]) == ["0.bias", "0.weight"]
    opt = BatchManhattan(groups, lr=0.1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    x, y = _batch(net, 3)
    nn.functional.cross_entropy(net(x.double()), y).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt.step()
    for n, p in net.named_parameters():
        step = grads[n].sign() if n.startswith("0.") else grads[n]
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * (step + 0.01 * before[n]), rtol=1e-14, atol=1e-14)


def test_param_group_selectors() -> None:
    net = _convnet()
    by_type = manhattan_param_groups(net, plain=nn.BatchNorm2d)
    assert {id(p) for p in by_type[1]["params"]} == {id(net[1].weight), id(net[1].bias)}
    by_pattern = manhattan_param_groups(net, plain="*.bias")
    assert len(by_pattern[1]["params"]) == 4 and all(p.dim() == 1 for p in by_pattern[1]["params"])
    assert len(manhattan_param_groups(net)) == 1  # nothing plain: one group
    with pytest.raises(ValueError, match="'fc' match nothing in the model; its trainable parameters: 0.weight, 0.bias"):
        manhattan_param_groups(net, plain="fc")
    with pytest.raises(ValueError, match="sets 'params' and 'manhattan' itself"):
        manhattan_param_groups(net, manhattan=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), "lr must be a number >= 0"),
    (dict(lr=0.1, momentum=-0.5), "momentum must be a number >= 0"),
    (dict(lr=0.1, weight_decay="x"), "weight_decay must be a number >= 0"),
    (dict(lr=0.1, manhattan=1), "manhattan must be True"),
    (dict(lr=0.1, foreach="yes"), "foreach must be None, True or False"),
])
def test_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchManhattan(_mlp().parameters(), **kwargs)


def test_bad_group_option_and_sparse_gradient() -> None:
    net = _mlp()
    with pytest.raises(ValueError, match="param group 1: lr must be"):
        BatchManhattan([{"params": net[0].parameters()}, {"params": net[2].parameters(), "lr": -2}], lr=0.1)
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        BatchManhattan(emb.parameters(), lr=0.1).step()


def test_lr_scheduler_sets_the_step_length() -> None:
    p = nn.Parameter(torch.randn(50, dtype=torch.float64))
    opt = BatchManhattan([p], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    rng = np.random.default_rng(2)
    seen = []
    for _ in range(6):
        before = p.detach().clone()
        g = _set_grads([p], rng)[0]
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        np.testing.assert_allclose((before - p.detach()).numpy(), lr * np.sign(g), rtol=1e-12, atol=0)
        seen.append(lr)
    np.testing.assert_allclose(seen, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-12)


def _round_trip(obj: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_bm_state_dict_resume_is_identical() -> None:
    net = _mlp()
    opt = BatchManhattan(manhattan_param_groups(net, plain_last_layer=True), lr=0.01, momentum=0.9,
                         weight_decay=1e-3)
    for step in range(4):
        _train_step(net, opt, step)
    saved = _round_trip({"model": net.state_dict(), "opt": opt.state_dict()})
    assert len(saved["opt"]["state"]) == 6 and [g["manhattan"] for g in saved["opt"]["param_groups"]] == [True, False]

    resumed = _mlp(seed=99)
    resumed.load_state_dict(saved["model"])
    opt2 = BatchManhattan(manhattan_param_groups(resumed, plain_last_layer=True), lr=0.5, momentum=0.0)
    opt2.load_state_dict(saved["opt"])  # restores lr, momentum, manhattan flags and buffers
    for step in range(4, 8):
        _train_step(net, opt, step)
        _train_step(resumed, opt2, step)
    for a, b in zip(net.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- constraints


def _random_steps(net: nn.Module, constraints: list, steps: int, seed: int = 0) -> None:
    """Large random in-place steps (to provoke norm drift and sign flips), each followed by the projections."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(steps):
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.abs().mean().clamp_min(1e-3))
            apply_constraints(constraints)


def _relative_norm_error(net: nn.Module, norms: dict[str, float]) -> float:
    params = dict(net.named_parameters())
    return max(abs(params[n].detach().double().norm().item() / v - 1) for n, v in norms.items())


def test_constant_norm_holds_after_many_steps() -> None:
    net = _convnet()
    w0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    const = ConstantNorm(net)
    assert sorted(const.params) == ["0.weight", "3.weight", "6.weight"]  # linear/conv weights only
    norms = {n: float(w0[n].double().norm()) for n in const.params}
    _random_steps(net, [const], steps=200)
    assert _relative_norm_error(net, norms) < 1e-6
    for n in const.params:  # the weights did move: direction changed, only the norm is held
        cos = torch.nn.functional.cosine_similarity(net.get_parameter(n).flatten(), w0[n].flatten(), dim=0)
        assert cos < 0.99
    assert not torch.equal(net[1].weight, w0["1.weight"])  # BN weight is not constrained...
    unconstrained = _convnet()
    _random_steps(unconstrained, [], steps=200)
    assert _relative_norm_error(unconstrained, norms) > 0.1  # ...and without the projection norms drift


def test_fixed_sign_holds_after_many_steps() -> None:
    net = _mlp()
    with torch.no_grad():
        net[0].weight[:3] = 0.0  # entries with no initial sign
    signs0 = {n: p.detach().sign() for n, p in net.named_parameters()}
    net_w0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    ei = FixedSign(net)
    _random_steps(net, [ei], steps=100, seed=1)
    clamped = 0
    for n in ei.params:
        w = net.get_parameter(n).detach()
        was_signed = signs0[n] != 0
        assert (w.sign() * signs0[n] >= 0).all()  # no sign flips
        clamped += int(((w == 0) & was_signed).sum())
        assert ((w != 0) & (w != net_w0[n])).float().mean() > 0.5  # most entries moved and stayed nonzero
    assert clamped > 0  # the projection had work to do
    free = net[0].weight.detach()[:3]
    assigned = ei.signs["0.weight"][:3]
    assert (assigned != 0).all() and (free.sign() * assigned >= 0).all()
    assert (net[0].bias.sign() != signs0["0.bias"]).any()  # biases are not constrained


def test_fixed_sign_rule_exactly() -> None:
    layer = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0, 0.0]]))
    ei = FixedSign(layer)
    assert list(ei.params) == ["weight"]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-0.5, -2.0, 0.25]]))
    ei()
    assert layer.weight.tolist() == [[0.0, -2.0, 0.25]]  # flipped entry clamped; the free entry takes sign +
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, 0.5, -0.125]]))
    ei()
    assert layer.weight.tolist() == [[2.0, 0.0, 0.0]]  # a clamped entry may grow back on its own side


@pytest.mark.parametrize("order", ["sign_first", "norm_first"])
def test_both_constraints_hold_together(order: str) -> None:
    net = _convnet()
    ei, const = FixedSign(net), ConstantNorm(net)
    signs0 = {n: p.detach().sign() for n, p in net.named_parameters()}
    norms = {n: float(v) for n, v in const.norms.items()}
    _random_steps(net, [ei, const] if order == "sign_first" else [const, ei], steps=100)
    assert _relative_norm_error(net, norms) < 1e-6
    assert all((net.get_parameter(n).sign() * signs0[n] >= 0).all() for n in ei.params)


def test_include_exclude_and_errors() -> None:
    net = _convnet()
    assert list(ConstantNorm(net, include=("0", "6")).params) == ["0.weight", "6.weight"]
    assert list(FixedSign(net, exclude=nn.Linear).params) == ["0.weight", "3.weight"]
    assert list(ConstantNorm(nn.DataParallel(net)).params) == ["0.weight", "3.weight", "6.weight"]
    with pytest.raises(ValueError, match="'fc' match nothing in the model; its linear/conv layers: 0, 3, 6"):
        FixedSign(net, exclude="fc")
    with pytest.raises(ValueError, match="no layer left to constrain"):
        ConstantNorm(net, exclude=(nn.Linear, nn.Conv2d))
    with torch.no_grad():
        net[3].weight.zero_()
    with pytest.raises(ValueError, match="3.weight start with norm 0"):
        ConstantNorm(net)
    with pytest.raises(ValueError, match="unknown constraint 'bogus'; allowed: constant_norm, fixed_sign"):
        create_constraint("bogus", net)
    with pytest.raises(ValueError, match="no option.*'scale'"):
        create_constraint("ei", net, scale=2)
    assert list_constraints() == ["constant_norm", "fixed_sign"]
    assert isinstance(create_constraint("Const", _convnet(), exclude="6"), ConstantNorm)
    assert [resolve_constraint_name(n) for n in ("E/I", "ei", "fixed-sign", "constant_norm")] == [
        "fixed_sign", "fixed_sign", "fixed_sign", "constant_norm"]


def test_constant_norm_keeps_a_zeroed_weight_at_zero() -> None:
    net = _mlp()
    const = ConstantNorm(net)
    with torch.no_grad():
        net[2].weight.zero_()
        net[0].weight.mul_(5.0)
    const()
    assert torch.equal(net[2].weight, torch.zeros_like(net[2].weight))
    torch.testing.assert_close(net[0].weight.double().norm(), const.norms["0.weight"], rtol=1e-6, atol=0)


def test_constraints_follow_a_model_cast_after_construction() -> None:
    net = _mlp()
    ei, const = FixedSign(net), ConstantNorm(net)
    signs0 = {n: p.detach().sign().double() for n, p in net.named_parameters()}
    net.double()  # same Parameter objects, new dtype: the constraints must follow
    _random_steps(net, [ei, const], steps=20)
    assert net[0].weight.dtype == torch.float64 and ei.signs["0.weight"].dtype == torch.float64
    assert _relative_norm_error(net, {n: float(v) for n, v in const.norms.items()}) < 1e-12
    assert all((net.get_parameter(n).sign() * signs0[n] >= 0).all() for n in ei.params)
    assert ei.state_dict()["signs"]["0.weight"].dtype == torch.int8


def test_constraint_state_round_trip_and_resume() -> None:
    net = _mlp()
    with torch.no_grad():
        net[2].weight[0] = 0.0  # unassigned signs must survive the round trip too
    opt = BatchManhattan(net.parameters(), lr=0.05, momentum=0.9)
    constraints = [FixedSign(net), ConstantNorm(net)]
    for step in range(5):
        _train_step(net, opt, step, constraints)
    saved = _round_trip({"model": net.state_dict(), "opt": opt.state_dict(),
                         "constraints": [c.state_dict() for c in constraints]})

    rebuilt = _mlp(seed=5)  # a new model object whose own initial weights differ
    rebuilt.load_state_dict(saved["model"])
    opt2 = BatchManhattan(rebuilt.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(saved["opt"])
    constraints2 = [FixedSign(rebuilt), ConstantNorm(rebuilt)]
    for c, state in zip(constraints2, saved["constraints"]):
        c.load_state_dict(state)
    for a, b in zip(constraints, constraints2):
        for key, entries in a.state_dict().items():
            for name, value in entries.items():
                torch.testing.assert_close(b.state_dict()[key][name], value, rtol=0, atol=0)
    for step in range(5, 10):
        _train_step(net, opt, step, constraints)
        _train_step(rebuilt, opt2, step, constraints2)
    for a, b in zip(net.parameters(), rebuilt.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    fresh = ConstantNorm(_mlp(seed=5))  # without loading, a rebuilt model's norms would differ
    assert any(fresh.norms[n] != constraints[1].norms[n] for n in fresh.norms)
    with pytest.raises(ValueError, match="expects the dict written by ConstantNorm.state_dict.*key 'norms'"):
        ConstantNorm(_mlp()).load_state_dict(saved["constraints"][0])
    with pytest.raises(ValueError, match="parameter names do not match"):
        ConstantNorm(_mlp(), exclude="4").load_state_dict(saved["constraints"][1])
    with pytest.raises(ValueError, match="signs of 0.weight have shape"):
        FixedSign(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3))
                  ).load_state_dict(saved["constraints"][0])


# ----------------------------------------------------------------------------------------------- with every rule

MODIFIERS = ["batch_manhattan", "constant_norm", "fixed_sign", "all"]


@pytest.mark.parametrize("net_fn", [_mlp, _convnet], ids=["mlp", "conv"])
@pytest.mark.parametrize("modifier", MODIFIERS)
@pytest.mark.parametrize("rule", bioprop.list_rules())
def test_modifiers_with_every_rule(rule: str, modifier: str, net_fn) -> None:
    net = bioprop.convert(net_fn(), rule, seed=0)
    w0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    if modifier in ("batch_manhattan", "all"):
        opt: torch.optim.Optimizer = BatchManhattan(manhattan_param_groups(net, plain_last_layer=True), lr=0.01,
                                                    momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    constraints = {"constant_norm": [ConstantNorm(net)], "fixed_sign": [FixedSign(net)],
                   "all": [ConstantNorm(net), FixedSign(net)]}.get(modifier, [])
    losses = [_train_step(net, opt, step, constraints) for step in range(6)]
    assert all(np.isfinite(losses))
    first = next(n for n in w0 if n.endswith("weight"))  # the input layer learns from a fed-back error
    assert not torch.equal(net.get_parameter(first), w0[first])
    for c in constraints:
        for n, p in c.params.items():
            if isinstance(c, ConstantNorm):
                torch.testing.assert_close(p.detach().double().norm(), c.norms[n], rtol=1e-6, atol=0)
            else:
                assert (p.detach().sign() * w0[n].sign() >= 0).all()


def test_fixed_sign_with_a_zero_initialised_dfa_net() -> None:
    # nokland2016 starts tanh nets at zero under DFA: every sign is free until the first update sets it
    net = bioprop.convert(_mlp(), "dfa", seed=0, zero_init=True)
    ei = FixedSign(net)
    assert all(int((s == 0).sum()) == s.numel() for s in ei.signs.values())
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    _train_step(net, opt, 0, [ei])
    first = {n: s.clone() for n, s in ei.signs.items()}
    assert all((first[n] == torch.sign(p.detach())).all() for n, p in ei.params.items())
    assert (first["0.weight"] != 0).float().mean() > 0.9  # DFA reached the first layer in one step
    for step in range(1, 30):
        _train_step(net, opt, step, [ei])
    for n, p in ei.params.items():
        assigned = first[n] != 0
        assert torch.equal(ei.signs[n][assigned], first[n][assigned])  # once set, a sign never changes
        assert (p.detach().sign() * ei.signs[n] >= 0).all()
    with pytest.raises(ValueError, match="start with norm 0"):
        ConstantNorm(bioprop.convert(_mlp(), "dfa", seed=0, zero_init=True))
