"""Kolen-Pollack against its literal form: B a parameter that receives W's gradient, stepped by the same optimizer.

bioprop keeps ``B = W + c·(B₀ − W₀)`` instead (:func:`bioprop.learned.shared_update_decay`); the literal form runs
B through the feedback op as a parameter of its own (the op hands a ``B`` that requires grad ``W``'s gradient), so
every optimizer's own code computes the reference.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

import bioprop
from bioprop.functional import feedback_conv, feedback_linear
from bioprop.optim import BatchManhattan

STEPS = 6

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd_wd": lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=0.1),
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1),
    "sgd_nesterov_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.2),
    "sgd_dampening_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "adam_decoupled": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.05, decoupled_weight_decay=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "rmsprop_momentum": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
    "batch_manhattan": lambda p: BatchManhattan(p, lr=0.01, momentum=0.9, weight_decay=0.1),
}


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.Tanh(),
                         nn.Linear(5, 3)).double()


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)


class LiteralKP(nn.Module):
    """The same net with W, b and B as parameters; B enters the feedback op as a parameter, so it gets W's
    gradient and the optimizer updates it as it updates W."""

    def __init__(self, converted: nn.Sequential) -> None:
        super().__init__()
        b = bioprop.feedback_weights(converted)
        self.w = nn.ParameterList([nn.Parameter(converted[i].weight.detach().clone()) for i in (0, 3, 5)])
        self.bias = nn.ParameterList([nn.Parameter(converted[i].bias.detach().clone()) for i in (0, 3, 5)])
        self.b = nn.ParameterList([nn.Parameter(b[str(i)].clone()) for i in (0, 3, 5)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(feedback_conv(x, self.w[0], self.bias[0], self.b[0], [1, 1], [1, 1], [1, 1])).flatten(1)
        h = torch.tanh(feedback_linear(h, self.w[1], self.bias[1], self.b[1]))
        return feedback_linear(h, self.w[2], self.bias[2], self.b[2])

    def ordered(self) -> list[nn.Parameter]:
        return [p for i in range(3) for p in (self.w[i], self.bias[i], self.b[i])]


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = STEPS, start: int = 0) -> None:
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)  # the lr of each step is read at the step
    for i in range(start, start + steps):
        x, y = batch(i)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("early", [False, True], ids=["opt_after_convert", "opt_before_convert"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_kp_equals_the_literal_rule(name: str, early: bool) -> None:
    """W and B after six steps (lr halved every two) equal the literal rule's, for every optimizer for which the
    shared update is exact, whether the optimizer was built before or after conversion."""
    make = OPTIMIZERS[name]
    plain = net()
    opt = make(plain.parameters()) if early else None
    model = bioprop.convert(plain, "kp", seed=3)
    opt = opt if early else make(model.parameters())
    literal = LiteralKP(model)
    train(model, opt)
    train(literal, make(literal.ordered()))
    got = bioprop.feedback_weights(model)
    for j, i in enumerate((0, 3, 5)):
        torch.testing.assert_close(model[i].weight.detach(), literal.w[j].detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got[str(i)], literal.b[j].detach(), rtol=1e-9, atol=1e-12)
    assert not [n for n, _ in model.named_parameters() if "feedback" in n]  # B has no gradient, no optimizer state


def test_kp_difference_follows_the_closed_form() -> None:
    """SGD with momentum and weight decay: D = W − B follows m_t = μ m_{t−1} + λ D_{t−1} (m_1 = λ D_0),
    D_t = D_{t−1} − η m_t (NumPy), whatever the gradients were."""
    model = bioprop.convert(net(), "kp", seed=1)
    d0 = {k: (model[int(k)].weight - b).detach().numpy() for k, b in bioprop.feedback_weights(model).items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
    for i in range(STEPS):
        x, y = batch(i)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for k, b in bioprop.feedback_weights(model).items():
        d, m = d0[k], None
        for t in range(STEPS):
            m = 0.1 * d if t == 0 else 0.9 * m + 0.1 * d
            d = d - 0.05 * m
        np.testing.assert_allclose((model[int(k)].weight - b).detach().numpy(), d, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("how", ["state_dict", "deepcopy"])
def test_kp_resumes_from_a_copy_exactly(how: str) -> None:
    """Three steps, a copy of model and optimizer, three more steps on each: the same W and B, bit for bit."""
    make = OPTIMIZERS["sgd_momentum_wd"]
    model = bioprop.convert(net(), "kp", seed=2)
    opt = make(model.parameters())
    train(model, opt, steps=3)
    if how == "deepcopy":
        other, other_opt = copy.deepcopy((model, opt))
    else:
        other = bioprop.convert(net(), "kp", seed=9)  # other draws: everything must come from the state dicts
        other.load_state_dict(model.state_dict())
        other_opt = make(other.parameters())
        other_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict keeps the tensors it gets
    train(model, opt, steps=3, start=3)
    train(other, other_opt, steps=3, start=3)
    for (name, p), q in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(p, q), name
    for k, b in bioprop.feedback_weights(model).items():
        assert torch.equal(b, bioprop.feedback_weights(other)[k])
    assert model[0].feedback_offset_state.view(torch.float64)[0] < 1.0  # the weight decay has shrunk W − B


def test_kp_skips_a_step_that_leaves_w_alone() -> None:
    """A layer without gradient is skipped by the optimizer, and its B stays where it was (W − B unchanged)."""
    model = bioprop.convert(net(), "kp", seed=1)
    opt = OPTIMIZERS["sgd_momentum_wd"](model.parameters())
    before = bioprop.feedback_weights(model)
    x, _ = batch(0)
    opt.zero_grad(set_to_none=True)
    model[:3](x).sum().backward()  # only the conv layer gets a gradient
    opt.step()
    after = bioprop.feedback_weights(model)
    assert torch.equal(after["5"], before["5"]) and torch.equal(after["3"], before["3"])
    assert not torch.equal(after["0"], before["0"])


@pytest.mark.parametrize("make,what", [
    (lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01), "Adam with coupled weight_decay=0.01"),
    (lambda p: torch.optim.LBFGS(p), "LBFGS"),
])
def test_kp_refuses_an_optimizer_whose_update_of_b_would_differ(make: Any, what: str) -> None:
    model = bioprop.convert(net(), "kp", seed=1)
    opt = make(model.parameters())
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError) as info:
        opt.step(lambda: torch.zeros(()))
    message = str(info.value)
    assert what in message and "allowed: SGD or BatchManhattan" in message and "\n" not in message


def c_of(layer: nn.Module) -> float:
    return float(layer.feedback_offset_state.view(torch.float64)[0])


def test_kp_follows_steps_made_with_a_closure() -> None:
    """``optimizer.step(closure)`` (Lightning's way): the closure's backward runs inside the step and must use the
    B of that step; W and B equal the literal rule's after six steps."""
    make = OPTIMIZERS["sgd_momentum_wd"]
    model = bioprop.convert(net(), "kp", seed=3)
    literal = LiteralKP(model)
    for m, opt in ((model, make(model.parameters())), (literal, make(literal.ordered()))):
        for i in range(STEPS):
            x, y = batch(i)

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(m(x), y)
                loss.backward()
                return loss
            opt.step(closure)
    got = bioprop.feedback_weights(model)
    for j, i in enumerate((0, 3, 5)):
        torch.testing.assert_close(model[i].weight.detach(), literal.w[j].detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got[str(i)], literal.b[j].detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fused", [False, True])
def test_kp_ignores_a_step_that_grad_scaler_skips(fused: bool) -> None:
    """An inf gradient at step 2: GradScaler skips that update (a fused optimizer still runs its step and skips
    inside it), and B follows exactly the steps the literal rule takes."""
    make = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1, fused=fused)  # noqa: E731
    model = bioprop.convert(net(), "kp", seed=3)
    literal = LiteralKP(model)
    for m, opt in ((model, make(model.parameters())), (literal, make(literal.ordered()))):
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        for i in range(5):
            x, y = batch(i)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y) * (float("inf") if i == 2 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    got = bioprop.feedback_weights(model)
    for j, i in enumerate((0, 3, 5)):
        torch.testing.assert_close(model[i].weight.detach(), literal.w[j].detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got[str(i)], literal.b[j].detach(), rtol=1e-9, atol=1e-12)


def test_kp_state_survives_a_partial_load_and_dtype_round_trips() -> None:
    """A ``load_state_dict`` without the kp state leaves c as it is; ``.to(bfloat16)`` and back keep c's bits."""
    model = bioprop.convert(net(), "kp", seed=1)
    train(model, OPTIMIZERS["sgd_momentum_wd"](model.parameters()), steps=4)
    c = c_of(model[0])
    assert c < 1.0
    model.load_state_dict({}, strict=False)
    assert c_of(model[0]) == c
    model.to(torch.bfloat16).to(torch.float64)
    assert c_of(model[0]) == c


def test_kp_compiles_once_whatever_c_is() -> None:
    """c reaches the op as a tensor: torch.compile does not recompile as the weight decay changes it."""
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    model = bioprop.convert(net(), "kp", seed=1)
    opt = OPTIMIZERS["sgd_momentum_wd"](model.parameters())
    forward = torch.compile(model, backend=counter)
    frames = []
    for i in range(4):
        x, y = batch(i)
        opt.zero_grad()
        nn.functional.cross_entropy(forward(x), y).backward()
        opt.step()
        frames.append(counter.frame_count)
    assert c_of(model[0]) < 1.0 and frames[0] > 0 and frames[-1] == frames[1], frames


def test_kp_layers_that_share_w_each_follow_its_steps() -> None:
    """Two layers tied to one W: each keeps its own B₀ − W₀, and both follow the optimizer's steps of W."""
    torch.manual_seed(0)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    tied[2].weight = tied[0].weight
    model = bioprop.convert(tied, "kp", seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.2)
    for i in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4, dtype=torch.float64, requires_grad=True)).pow(2).sum().backward()
        opt.step()
    assert c_of(model[0]) == c_of(model[2]) == pytest.approx((1 - 0.1 * 0.2) ** 3, rel=1e-12)
