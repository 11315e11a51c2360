"""Direct and indirect feedback alignment against closed forms computed independently in NumPy (float64)."""
from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bioprop
from bioprop import direct
from bioprop.rules import make_generator
from ddp_harness import run_two_processes

# ----------------------------------------------------------------------------------------------- helpers


def tanh_mlp(widths: tuple[int, ...] = (6, 5, 4, 7, 3), dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Flatten, then (Linear, Tanh) per hidden layer, then the output Linear."""
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers).to(dtype)


def small_convnet() -> nn.Sequential:
    """(N, 2, 6, 6) -> conv3x3 pad 1 -> tanh -> maxpool 2 | conv3x3 -> tanh -> flatten | linear -> (N, 5)."""
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4, 5)).double()


def np_(t: Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def softmax_ce_error(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """dL/dlogits of the batch-mean softmax cross-entropy."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    p[np.arange(len(targets)), targets] -= 1.0
    return p / len(targets)


def grads_of(model: nn.Module) -> dict[str, np.ndarray]:
    return {name: np_(p.grad) for name, p in model.named_parameters()}


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model if isinstance(m, nn.Linear)]


def mlp_forward(weights: list[np.ndarray], biases: list[np.ndarray], x: np.ndarray
                ) -> tuple[list[np.ndarray], np.ndarray]:
    """NumPy forward of the tanh MLP: hidden outputs h_0 = x, h_1..h_L and the logits."""
    hs = [x]
    for w, b in zip(weights[:-1], biases[:-1]):
        hs.append(np.tanh(hs[-1] @ w.T + b))
    return hs, hs[-1] @ weights[-1].T + biases[-1]


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int) -> np.ndarray:
    """Cross-correlation, stride 1: (N, C, H, W) * (O, C, k, k) -> (N, O, H', W')."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[-1]
    ho, wo = xp.shape[2] - k + 1, xp.shape[3] - k + 1
    out = np.zeros((x.shape[0], w.shape[0], ho, wo))
    for i in range(k):
        for j in range(k):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + ho, j:j + wo], w[:, :, i, j])
    return out + b[None, :, None, None]


def conv2d_weight_grad(x: np.ndarray, delta: np.ndarray, k: int, pad: int) -> np.ndarray:
    """dL/dW[o, c, i, j] = Σ_{n,y,x} delta[n, o, y, x] · x_padded[n, c, y + i, x + j]."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = delta.shape[2:]
    grad = np.zeros((delta.shape[1], x.shape[1], k, k))
    for i in range(k):
        for j in range(k):
            grad[:, :, i, j] = np.einsum("nohw,nchw->oc", delta, xp[:, :, i:i + ho, j:j + wo])
    return grad


def maxpool2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2x2 max pooling; returns the output and the one-hot mask of each window's maximum."""
    n, c, h, w = x.shape
    windows = x.reshape(n, c, h // 2, 2, w // 2, 2)
    out = windows.max(axis=(3, 5))
    mask = windows == out[:, :, :, None, :, None]
    return out, mask.reshape(n, c, h, w)


def run_step(model: nn.Module, x: Tensor, y: Tensor) -> np.ndarray:
    """One forward/backward with cross-entropy; returns the logits."""
    model.zero_grad()
    out = model(x)
    F.cross_entropy(out, y).backward()
    return np_(out)


# ----------------------------------------------------------------------------------------------- closed forms


def test_dfa_mlp_matches_closed_form() -> None:
    torch.manual_seed(0)
    net = bioprop.convert(tanh_mlp(), "dfa", seed=3)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    logits = run_step(net, x, y)
    layers = linear_layers(net)
    weights, biases = [np_(m.weight) for m in layers], [np_(m.bias) for m in layers]
    hs, np_logits = mlp_forward(weights, biases, np_(x))
    np.testing.assert_allclose(logits, np_logits, rtol=1e-12)
    e = softmax_ce_error(np_logits, y.numpy())  # (N, n_out)
    feedback = [np_(d) for d in bioprop.feedback_weights(net).values()]  # D_1, D_2, D_3
    assert [d.shape for d in feedback] == [(3, 5), (3, 4), (3, 7)]
    grads = grads_of(net)
    names = [n for n, m in net.named_children() if isinstance(m, nn.Linear)]
    for l, d in enumerate(feedback):
        delta_a = (e @ d) * (1.0 - hs[l + 1] ** 2)  # δa_l = (e·D_l) ⊙ f'(a_l)
        np.testing.assert_allclose(grads[f"{names[l]}.weight"], delta_a.T @ hs[l], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(grads[f"{names[l]}.bias"], delta_a.sum(0), rtol=1e-10, atol=1e-14)
    # the output layer gets its exact gradient
    np.testing.assert_allclose(grads[f"{names[-1]}.weight"], e.T @ hs[-1], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grads[f"{names[-1]}.bias"], e.sum(0), rtol=1e-10, atol=1e-14)


def test_feedback_matrix_follows_documented_draw() -> None:
    net = bioprop.convert(tanh_mlp(), "dfa", seed=11)
    direct.initialize(net, torch.randn(2, 6, dtype=torch.float64))
    for name, d in bioprop.feedback_weights(net).items():
        n_out, n_units = d.shape
        bound = 1.0 / np.sqrt(n_units)  # nokland2016: U(±1/√n_units), n_units = units receiving the signal
        expected = torch.empty(n_out, n_units).uniform_(-bound, bound, generator=make_generator(11, name))
        torch.testing.assert_close(d, expected.double(), rtol=0, atol=0)
    net = bioprop.convert(tanh_mlp(), "dfa", seed=11, scale=0.25)
    direct.initialize(net, torch.randn(2, 6, dtype=torch.float64))
    for name, d in bioprop.feedback_weights(net).items():
        expected = torch.empty(d.shape).uniform_(-0.25, 0.25, generator=make_generator(11, name))
        torch.testing.assert_close(d, expected.double(), rtol=0, atol=0)


def test_dfa_convnet_matches_closed_form() -> None:
    torch.manual_seed(1)
    net = bioprop.convert(small_convnet(), "dfa", seed=0)
    assert list(direct.markers(net)) == ["2.direct_feedback", "5.direct_feedback"]  # after pool, after flatten
    x, y = torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.randint(0, 5, (3,))
    logits = run_step(net, x, y)
    w1, b1, w2, b2 = np_(net[0].weight), np_(net[0].bias), np_(net[3].weight), np_(net[3].bias)
    w3, b3 = np_(net[6].weight), np_(net[6].bias)
    t1 = np.tanh(conv2d(np_(x), w1, b1, pad=1))  # (N, 3, 6, 6)
    p1, mask = maxpool2(t1)  # (N, 3, 3, 3)
    t2 = np.tanh(conv2d(p1, w2, b2, pad=0))  # (N, 4, 1, 1)
    h2 = t2.reshape(3, -1)
    np_logits = h2 @ w3.T + b3
    np.testing.assert_allclose(logits, np_logits, rtol=1e-12)
    e = softmax_ce_error(np_logits, y.numpy())
    d1, d2 = [np_(d) for d in bioprop.feedback_weights(net).values()]
    assert d1.shape == (5, 27) and d2.shape == (5, 4)  # D maps n_out to C·H·W of the marked map
    # block 1: the signal arrives after the pool, goes to each window's max, then through tanh'
    signal1 = (e @ d1).reshape(p1.shape)
    delta1 = np.repeat(np.repeat(signal1, 2, axis=2), 2, axis=3) * mask * (1.0 - t1 ** 2)
    # block 2: the signal arrives after flatten
    delta2 = (e @ d2).reshape(t2.shape) * (1.0 - t2 ** 2)
    grads = grads_of(net)
    np.testing.assert_allclose(grads["0.weight"], conv2d_weight_grad(np_(x), delta1, 3, 1), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grads["0.bias"], delta1.sum((0, 2, 3)), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grads["3.weight"], conv2d_weight_grad(p1, delta2, 3, 0), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grads["3.bias"], delta2.sum((0, 2, 3)), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grads["6.weight"], e.T @ h2, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grads["6.bias"], e.sum(0), rtol=1e-10, atol=1e-14)


def test_ifa_mlp_matches_closed_form() -> None:
    torch.manual_seed(2)
    net = bioprop.convert(tanh_mlp(), "ifa", seed=5)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    run_step(net, x, y)
    layers = linear_layers(net)
    weights, biases = [np_(m.weight) for m in layers], [np_(m.bias) for m in layers]
    hs, logits = mlp_forward(weights, biases, np_(x))
    e = softmax_ce_error(logits, y.numpy())
    d1 = np_(net[2].direct_feedback.feedback_matrix)  # only the first block has a D
    assert d1.shape == (3, 5) and net[4].direct_feedback.feedback_matrix is None
    deltas = [(e @ d1) * (1.0 - hs[1] ** 2)]  # δa_1 = (e·D_1) ⊙ f'(a_1)
    for l in (2, 3):  # δa_l = (δa_{l-1} W_lᵀ) ⊙ f'(a_l): forward through the forward weights
        deltas.append((deltas[-1] @ weights[l - 1].T) * (1.0 - hs[l] ** 2))
    grads = grads_of(net)
    for l, (layer_name, delta) in enumerate(zip(("1", "3", "5"), deltas)):
        np.testing.assert_allclose(grads[f"{layer_name}.weight"], delta.T @ hs[l], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(grads[f"{layer_name}.bias"], delta.sum(0), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grads["7.weight"], e.T @ hs[-1], rtol=1e-10, atol=1e-14)
    # the relay markers report the forward weight their signal arrives through
    torch.testing.assert_close(bioprop.feedback_weights(net)["4.direct_feedback"], net[3].weight.detach())


def test_ifa_convnet_relays_through_the_convolution() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 3, padding=1), nn.Tanh(),
                        nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double()
    net = bioprop.convert(net, "ifa", seed=1)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    out = net(x)
    e = torch.randn_like(out)
    out.backward(e)
    w1, b1, w2, b2 = np_(net[0].weight), np_(net[0].bias), np_(net[2].weight), np_(net[2].bias)
    t1 = np.tanh(conv2d(np_(x), w1, b1, pad=1))  # (N, 3, 4, 4)
    t2 = np.tanh(conv2d(t1, w2, b2, pad=1))
    d1 = np_(net[1].direct_feedback.feedback_matrix)  # (4, 48)
    delta1 = (np_(e) @ d1).reshape(t1.shape) * (1.0 - t1 ** 2)
    relayed = conv2d(delta1, w2, np.zeros(3), pad=1)  # block 1's error forward through conv 2, no bias
    delta2 = relayed * (1.0 - t2 ** 2)
    np.testing.assert_allclose(np_(net[0].weight.grad), conv2d_weight_grad(np_(x), delta1, 3, 1), rtol=1e-10)
    np.testing.assert_allclose(np_(net[2].weight.grad), conv2d_weight_grad(t1, delta2, 3, 1), rtol=1e-10)
    np.testing.assert_allclose(np_(net[2].bias.grad), delta2.sum((0, 2, 3)), rtol=1e-10)


@pytest.mark.parametrize("rule", ["dfa", "ifa", "dense_fa"])
def test_autograd_grad_and_accumulation_agree_with_backward(rule: str) -> None:
    torch.manual_seed(2)
    net = bioprop.convert(tanh_mlp(), rule, seed=5)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    run_step(net, x, y)
    expected = [p.grad.clone() for p in net.parameters()]
    got = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # two half batches accumulated (each loss weighted by its share) give the full-batch gradient
    net.zero_grad()
    for part in (slice(0, 4), slice(4, 8)):
        (0.5 * F.cross_entropy(net(x[part]), y[part])).backward()
    for p, b in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, b, rtol=1e-12, atol=1e-14)
    # a retained graph can be walked twice
    net.zero_grad()
    loss = F.cross_entropy(net(x), y)
    loss.backward(retain_graph=True)
    loss.backward()
    for p, b in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, 2 * b, rtol=1e-12, atol=1e-14)


def test_excluded_block_learns_by_backprop_from_the_block_above() -> None:
    torch.manual_seed(4)
    net = bioprop.convert(tanh_mlp(), "dfa", seed=1, exclude=["3"])  # no marker after block "3"
    assert list(direct.markers(net)) == ["2.direct_feedback", "6.direct_feedback"]
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    run_step(net, x, y)
    layers = linear_layers(net)
    weights, biases = [np_(m.weight) for m in layers], [np_(m.bias) for m in layers]
    hs, logits = mlp_forward(weights, biases, np_(x))
    e = softmax_ce_error(logits, y.numpy())
    d1, d3 = [np_(d) for d in bioprop.feedback_weights(net).values()]
    delta3 = (e @ d3) * (1.0 - hs[3] ** 2)
    delta2 = (delta3 @ weights[2]) * (1.0 - hs[2] ** 2)  # exact backprop inside the merged block
    delta1 = (e @ d1) * (1.0 - hs[1] ** 2)
    grads = grads_of(net)
    for name, delta, h in (("1", delta1, hs[0]), ("3", delta2, hs[1]), ("5", delta3, hs[2])):
        np.testing.assert_allclose(grads[f"{name}.weight"], delta.T @ h, rtol=1e-10, atol=1e-14)


def test_no_gradient_crosses_a_marker() -> None:
    torch.manual_seed(0)
    net = bioprop.convert(tanh_mlp(), "dfa", seed=0)
    seen: dict[str, Tensor] = {}
    entry_inputs: list[bool] = []

    def keep_block_output(module: nn.Module, args: tuple, output: Tensor) -> None:
        # prepended, so it sees the block output before the marker: the tensor the lower block is attached to
        output.register_hook(lambda g: seen.__setitem__("h1", g))

    net[2].register_forward_hook(keep_block_output, prepend=True)
    net[3].register_forward_pre_hook(lambda m, args: entry_inputs.append(args[0].requires_grad))
    out = net(torch.randn(4, 6, dtype=torch.float64))
    e = torch.randn_like(out)
    out.backward(e)  # e = dL/dy for the loss L = <y, e>
    d1 = bioprop.feedback_weights(net)["2.direct_feedback"]
    # only the DFA signal, nothing from above (which would differ by O(1), not by rounding)
    torch.testing.assert_close(seen["h1"], e @ d1, rtol=1e-12, atol=1e-15)
    assert entry_inputs == [False]  # the block above gets its input detached: it sends nothing down


def test_sequence_outputs_with_batch_dims() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    net = bioprop.convert(net, "dfa", batch_dims=2)
    x = torch.randn(2, 5, 4, dtype=torch.float64)  # (B, T, C)
    out = net(x)
    e = torch.randn_like(out)  # (B, T, n_out): one error per position
    out.backward(e)
    d = np_(bioprop.feedback_weights(net)["1.direct_feedback"])
    assert d.shape == (3, 6)  # D maps n_out to the units of one position
    w1, b1 = np_(net[0].weight), np_(net[0].bias)
    h0 = np_(x).reshape(10, 4)
    h1 = np.tanh(h0 @ w1.T + b1)
    delta = (np_(e).reshape(10, 3) @ d) * (1.0 - h1 ** 2)
    np.testing.assert_allclose(np_(net[0].weight.grad), delta.T @ h0, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="batch_dims"):
        net(torch.randn(4, dtype=torch.float64))  # nothing left after the two batch dims
    whole = bioprop.convert(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double(), "dfa")
    whole(x).sum().backward()  # batch_dims=1: one sample is a whole sequence, D is (T·3, T·6)
    assert bioprop.feedback_weights(whole)["1.direct_feedback"].shape == (15, 30)
    with pytest.raises(ValueError, match="D is fixed once drawn"):
        whole(torch.randn(2, 7, 4, dtype=torch.float64))  # another length: another D would be needed


def test_explicit_markers_in_a_residual_model() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(3, 4)
            self.mark0 = direct.DirectFeedback(entry="stem")
            self.fc = nn.Linear(4, 4)
            self.mark1 = direct.DirectFeedback(entry="fc")
            self.head = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            h0 = self.mark0(torch.tanh(self.stem(x)))
            h1 = self.mark1(h0 + torch.tanh(self.fc(h0)))  # the marker sits at the block output, after the sum
            return self.head(h1)

    torch.manual_seed(0)
    model = Residual().double()
    plain = copy.deepcopy(model)
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(model(x), plain(x))  # an unconverted marker is the identity
    model = bioprop.convert(model, "dfa", seed=2)
    assert list(direct.markers(model)) == ["mark0", "mark1"]
    out = model(x)
    e = torch.randn_like(out)
    out.backward(e)
    d0, d1 = [np_(d) for d in bioprop.feedback_weights(model).values()]
    ws = {n: np_(p) for n, p in model.named_parameters()}
    h0 = np.tanh(np_(x) @ ws["stem.weight"].T + ws["stem.bias"])
    t1 = np.tanh(h0 @ ws["fc.weight"].T + ws["fc.bias"])
    delta1 = (np_(e) @ d1) * (1.0 - t1 ** 2)  # the skip path ends at the marker below: only fc's branch learns
    delta0 = (np_(e) @ d0) * (1.0 - h0 ** 2)
    np.testing.assert_allclose(np_(model.fc.weight.grad), delta1.T @ h0, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(np_(model.stem.weight.grad), delta0.T @ np_(x), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(np_(model.head.weight.grad), np_(e).T @ (h0 + t1), rtol=1e-10, atol=1e-14)
    # back to backprop: the written-in markers become the identity again
    bioprop.convert(model, "backprop")
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "feedback_matrix" not in k})
    model.zero_grad()
    model(x).sum().backward()
    plain(x).sum().backward()
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_marker_outside_its_model_passes_gradients_through() -> None:
    torch.manual_seed(0)
    base = tanh_mlp()
    plain = copy.deepcopy(base)[1:5]
    net = bioprop.convert(base, "dfa")
    part = net[1:5]  # a new Sequential sharing the modules, without the converted model's projection
    x = torch.randn(3, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match="ran outside the forward pass"):
        part(x).sum().backward()
    plain(x).sum().backward()
    for a, b in zip(part.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_model_must_return_one_tensor() -> None:
    class TwoOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.mark, self.head = nn.Linear(3, 4), direct.DirectFeedback(), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            h = self.mark(torch.tanh(self.fc(x)))
            return self.head(h), h

    net = bioprop.convert(TwoOutputs(), "dfa")
    with pytest.raises(TypeError, match="must return a single tensor"):
        net(torch.randn(2, 3))
    with torch.no_grad():
        net(torch.randn(2, 3))  # nothing is projected without gradients
    with pytest.raises(ValueError, match="entry"):
        bioprop.convert(TwoOutputs(), "ifa")  # ifa needs to know each block's first layer


# ----------------------------------------------------------------------------------------------- signals


def test_exact_gradients_and_recorded_signals() -> None:
    torch.manual_seed(0)
    plain = tanh_mlp()
    net = bioprop.convert(copy.deepcopy(plain), "dfa", seed=0)
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    marks = direct.markers(net)
    for marker in marks.values():
        marker.record = True
    out = net(x)
    F.cross_entropy(out, y).backward()
    logits = out.detach().requires_grad_()
    e = torch.autograd.grad(F.cross_entropy(logits, y), logits)[0]
    for name, marker in marks.items():
        torch.testing.assert_close(marker.last_signal, e @ marker.feedback_matrix, rtol=1e-12, atol=1e-15)
    # under exact_gradients: plain backprop, and the recorded signal is the backprop error at the marker
    net.zero_grad()
    with direct.exact_gradients(net):
        F.cross_entropy(net(x), y).backward()
    F.cross_entropy(plain(x), y).backward()
    for a, b in zip(net.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-15)
    w3, w5 = net[5].weight.detach(), net[7].weight.detach()
    h3 = torch.tanh(net[5](torch.tanh(net[3](torch.tanh(net[1](x))))))
    torch.testing.assert_close(marks["6.direct_feedback"].last_signal, e @ w5)
    torch.testing.assert_close(marks["4.direct_feedback"].last_signal, ((e @ w5) * (1 - h3 ** 2)) @ w3)
    # and outside the context the rule is back
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    assert not torch.allclose(net[1].weight.grad, plain[1].weight.grad)


def test_eval_and_no_grad_are_plain_forward_passes() -> None:
    torch.manual_seed(0)
    plain = tanh_mlp()
    net = bioprop.convert(copy.deepcopy(plain), "dfa")
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        out = net(x)
    assert all(m.feedback_matrix is None for m in direct.markers(net).values())  # nothing drawn, nothing recorded
    torch.testing.assert_close(out, plain(x).detach(), rtol=0, atol=0)
    out = net(x)
    assert out.grad_fn is not None and "DirectProjection" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, plain(x), rtol=0, atol=0)  # the forward value never changes


# ----------------------------------------------------------------------------------------------- state


def test_state_dict_round_trip_keeps_d() -> None:
    torch.manual_seed(0)
    net = bioprop.convert(tanh_mlp(), "dfa", seed=1)
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    run_step(net, x, y)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert sum("feedback_matrix" in k for k in state) == 3
    other = bioprop.convert(tanh_mlp(), "dfa", seed=99)  # another seed: the loaded D must win
    other.load_state_dict(state)  # before its first forward pass: D is taken from the checkpoint
    for (name, a), b in zip(bioprop.feedback_weights(net).items(), bioprop.feedback_weights(other).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    run_step(other, x, y)
    for a, b in zip(net.parameters(), other.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_converting_twice_keeps_d() -> None:
    torch.manual_seed(0)
    net = bioprop.convert(tanh_mlp(), "dfa", seed=1)
    direct.initialize(net, torch.randn(2, 6, dtype=torch.float64))
    with torch.no_grad():  # D that no draw would give: a redraw would be visible
        for marker in direct.markers(net).values():
            marker.feedback_matrix.mul_(3.0)
    before = bioprop.feedback_weights(net)
    bioprop.convert(net, "dfa", seed=1)
    after = bioprop.feedback_weights(net)
    assert list(after) == list(before) and len(direct.markers(net)) == 3
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
    bioprop.convert(net, "fa", seed=1)  # another rule in between
    assert direct.markers(net) == {} and "2.direct_feedback" not in net.state_dict()
    bioprop.convert(net, "dfa", seed=1)
    for name, value in bioprop.feedback_weights(net).items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert not any(isinstance(m, bioprop.FeedbackLinear) for m in net.modules())  # native layers inside blocks
    bioprop.convert(net, "dfa", seed=2)  # another seed: a new draw
    direct.initialize(net, torch.randn(2, 6, dtype=torch.float64))
    assert not torch.equal(bioprop.feedback_weights(net)["2.direct_feedback"], before["2.direct_feedback"])


def test_backprop_conversion_restores_plain_model_and_copies_work() -> None:
    torch.manual_seed(0)
    plain = tanh_mlp()
    net = bioprop.convert(copy.deepcopy(plain), "dfa", seed=1)
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    run_step(net, x, y)
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        run_step(clone, x, y)
        for a, b in zip(net.parameters(), clone.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
        assert all(m.__dict__["_controller"] is clone.__dict__["_bioprop_direct"]
                   for m in direct.markers(clone).values())
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):  # a copy's hooks come off with it
        bioprop.convert(clone, "backprop")
        assert list(clone.state_dict()) == list(plain.state_dict())
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in clone.modules())
        run_step(clone, x, y)
        run_step(plain, x, y)
        for a, b in zip(clone.parameters(), plain.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    bioprop.convert(net, "backprop")
    assert list(net.state_dict()) == list(plain.state_dict())
    run_step(net, x, y)
    run_step(plain, x, y)
    for a, b in zip(net.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_options_and_errors() -> None:
    net = bioprop.convert(tanh_mlp(), "dfa", zero_init=True)
    assert all(float(p.detach().abs().sum()) == 0.0 for p in net.parameters())  # the output layer included
    with pytest.warns(UserWarning, match="ReLU"):
        bioprop.convert(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)), "dfa", zero_init=True)
    with pytest.raises(ValueError, match="allowed: nokland2016, biotorch"):
        bioprop.convert(tanh_mlp(), "dfa", scale="xavier")
    with pytest.raises(ValueError, match="batch_dims"):
        bioprop.convert(tanh_mlp(), "ifa", batch_dims=0)
    with pytest.raises(ValueError, match="allowed options: scale, zero_init, batch_dims"):
        bioprop.convert(tanh_mlp(), "dfa", sigma=1.0)
    with pytest.raises(ValueError, match="last_layer"):
        bioprop.convert(tanh_mlp(), "dfa", last_layer="fa")
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = nn.Linear(2, 3), nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.tanh(self.fc(x)))

    with pytest.raises(ValueError, match="insert bioprop.direct.DirectFeedback"):
        bioprop.convert(Custom(), "dfa")
    with pytest.raises(ValueError, match="no hidden block"):
        bioprop.convert(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2)), "dfa")
    with pytest.raises(ValueError, match="no pooling"):
        net = bioprop.convert(small_convnet(), "ifa")
        net(torch.randn(2, 2, 6, 6, dtype=torch.float64))
    net = bioprop.convert(nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 4), nn.ReLU(),
                                        nn.Linear(4, 2)), "ifa")
    with pytest.raises(ValueError, match="in place"):
        net(torch.randn(2, 3))


# ----------------------------------------------------------------------------------------------- learning


def digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0  # (1797, 64)
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order[:1400]], y[order[:1400]], x[order[1400:]], y[order[1400:]]


def deep_tanh_mlp(depth: int, width: int, rule: str) -> nn.Sequential:
    """depth x width tanh MLP on the 64 digit pixels, every weight and bias zero (nokland2016's start)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    fan_in = 64
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.Tanh()]
        fan_in = width
    net = nn.Sequential(*layers, nn.Linear(fan_in, 10))
    if rule == "backprop":
        for layer in linear_layers(net):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        return net
    return bioprop.convert(net, rule, zero_init=True)


def bce_one_hot(logits: Tensor, y: Tensor) -> Tensor:
    """nokland2016's loss: sigmoid outputs, binary cross-entropy to one-hot targets, summed over classes."""
    return F.binary_cross_entropy_with_logits(logits, F.one_hot(y, logits.shape[1]).to(logits.dtype),
                                              reduction="sum") / len(y)


def train_digits(net: nn.Module, loss_fn, lr: float, epochs: int, steps: int | None = None) -> float:
    """RMSprop, batch 64 (nokland2016's optimiser); returns the held-out accuracy."""
    x_train, y_train, x_test, y_test = digits_split()
    opt = torch.optim.RMSprop(net.parameters(), lr=lr)
    order = torch.Generator().manual_seed(1)
    done = 0
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=order)
        for start in range(0, len(perm), 64):
            batch = perm[start:start + 64]
            opt.zero_grad()
            loss_fn(net(x_train[batch]), y_train[batch]).backward()
            opt.step()
            done += 1
            if steps is not None and done == steps:
                break
    with torch.no_grad():
        return float((net(x_test).argmax(1) == y_test).float().mean())


@pytest.fixture
def one_thread():
    """The learning tests run faster on one thread when the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_dfa_learns_from_zero_init_where_backprop_cannot(one_thread: None) -> None:
    _, _, _, y_test = digits_split()
    chance = float(torch.bincount(y_test).max()) / len(y_test)  # the best a constant prediction can do
    accuracy = {rule: train_digits(deep_tanh_mlp(10, 240, rule), F.cross_entropy, lr=3e-3, epochs=3)
                for rule in ("dfa", "backprop")}
    assert chance < 0.15
    assert accuracy["backprop"] <= chance + 1e-9  # zero weights above: every hidden gradient is exactly 0
    assert accuracy["dfa"] > 0.6, accuracy  # about 0.9 after these 66 steps


def test_dfa_moves_every_layer_of_a_100x240_zero_init_net(one_thread: None) -> None:
    nets = {rule: deep_tanh_mlp(100, 240, rule) for rule in ("dfa", "backprop")}
    for net in nets.values():  # nokland2016's loss and optimiser, three steps
        train_digits(net, bce_one_hot, lr=1e-4, epochs=1, steps=3)
    hidden = {rule: linear_layers(net)[:-1] for rule, net in nets.items()}
    assert all(float(layer.weight.detach().abs().max()) > 0 and float(layer.bias.detach().abs().min()) > 0
               for layer in hidden["dfa"])  # all 100 hidden layers have left zero
    assert all(float(layer.weight.detach().abs().max()) == 0 and float(layer.bias.detach().abs().max()) == 0
               for layer in hidden["backprop"])  # backprop cannot leave a zero start


# ----------------------------------------------------------------------------------------------- DDP

DDP_STEPS = 3
DDP_BATCH = 8


def ddp_model(rule: str) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 6), nn.Tanh(),
                        nn.Linear(6, 3))
    return bioprop.convert(net, rule, seed=7)


def ddp_batches() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(DDP_BATCH, 1, 5, 5, generator=g), torch.randint(0, 3, (DDP_BATCH,), generator=g))
            for _ in range(DDP_STEPS)]


def ddp_train(model: nn.Module, data: list[tuple[Tensor, Tensor]]) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path: Path) -> None:
    # DDP wraps each model before its first forward pass: D is drawn by each rank on its own.
    states = run_two_processes(tmp_path, ["dfa", "ifa", "dense_fa"], ddp_model, ddp_batches, ddp_train)
    for rule in ("dfa", "ifa", "dense_fa"):
        rank0, rank1 = states[rule]
        single = ddp_model(rule)
        ddp_train(single, ddp_batches())
        state = single.state_dict()
        assert sum("feedback_matrix" in k for k in state) == {"dfa": 2, "ifa": 1, "dense_fa": 2}[rule]
        assert list(rank0) == list(state)
        for key, value in state.items():
            torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)  # D and weights identical on ranks
            torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6, msg=f"{rule}: {key}")
