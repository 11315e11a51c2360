"""Feedback ops against independent references: NumPy for linear, native autograd convolutions for conv."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bioprop.functional import AffineFeedback, SignFeedback, feedback_conv, feedback_linear


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that run (forward and backward) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("lead", [(7,), (3, 5), (2, 3, 4), ()])
def test_linear_matches_numpy_closed_form(lead: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    fb = torch.randn(4, 6, generator=g, dtype=torch.float64)
    y = feedback_linear(x, w, b, fb)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gy)

    xn, wn, bn, fbn, gyn = (t.detach().numpy() for t in (x, w, b, fb, gy))
    np.testing.assert_allclose(y.detach().numpy(), xn @ wn.T + bn, rtol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), gyn @ fbn, rtol=1e-12)  # δx = δy · B
    g2, x2 = gyn.reshape(-1, 4), xn.reshape(-1, 6)
    np.testing.assert_allclose(w.grad.numpy(), g2.T @ x2, rtol=1e-12)  # dW = δyᵀ x, exact
    np.testing.assert_allclose(b.grad.numpy(), g2.sum(0), rtol=1e-12)
    assert not np.allclose(x.grad.numpy(), gyn @ wn)  # the feedback path really differs from W


CONV_CASES = [
    # (dim, in_ch, out_ch, kernel, stride, padding, dilation, groups, bias)
    (2, 4, 6, 3, 1, 1, 1, 1, True),
    (2, 4, 6, 3, 2, 0, 1, 2, False),
    (2, 6, 6, 3, 1, 2, 2, 3, True),
    (2, 4, 8, (3, 1), (2, 1), (1, 0), 1, 4, True),
    (1, 3, 5, 5, 2, 2, 1, 1, True),
    (1, 4, 4, 3, 1, 1, 1, 4, False),
    (3, 2, 4, 3, 1, 1, 1, 1, True),
]


def _tuple(v: int | tuple[int, ...], dim: int) -> tuple[int, ...]:
    return (v,) * dim if isinstance(v, int) else tuple(v)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_matches_native_convolutions(case: tuple) -> None:
    dim, cin, cout, k, stride, padding, dilation, groups, bias = case
    g = torch.Generator().manual_seed(1)
    k, stride, padding, dilation = (_tuple(v, dim) for v in (k, stride, padding, dilation))
    spatial = (9,) * dim
    x = torch.randn(2, cin, *spatial, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(cout, cin // groups, *k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(cout, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    fb = torch.randn(w.shape, generator=g, dtype=torch.float64)
    y = feedback_conv(x, w, b, fb, stride, padding, dilation, groups)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gy)

    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dim]
    # Reference: native convolutions with W (forward, dW, db) and with B in place of W (δx).
    x_ref = x.detach().clone().requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    b_ref = b.detach().clone().requires_grad_() if bias else None
    y_ref = conv(x_ref, w_ref, b_ref, stride, padding, dilation, groups)
    y_ref.backward(gy)
    x_fb = x.detach().clone().requires_grad_()
    conv(x_fb, fb, None, stride, padding, dilation, groups).backward(gy)

    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_fb.grad, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(x.grad, x_ref.grad)


def test_gradcheck_weight_path() -> None:
    """dW and db are true gradients (δx is not, by design), so gradcheck them with x constant."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g)
    w = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    fb = torch.randn(4, 5, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda w, b: feedback_linear(x, w, b, fb), (w, b))

    xc = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=g)
    wc = torch.randn(6, 2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    bc = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    fbc = torch.randn(6, 2, 3, 3, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda w, b: feedback_conv(xc, w, b, fbc, (2, 1), (1, 0), (1, 1), 2), (wc, bc))


def test_gradcheck_with_b_equal_w_is_full_gradient() -> None:
    """With B = W the op is plain backprop, so gradcheck passes for x as well."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: feedback_linear(x, w, None, w.detach()), (x, w))
    xc = torch.randn(2, 2, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    wc = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: feedback_conv(x, w, None, w.detach(), (1, 1), (1, 1), (1, 1)),
                                    (xc, wc))


def test_input_gradient_skipped_when_not_needed() -> None:
    x = torch.randn(8, 5)
    w = torch.randn(4, 5, requires_grad=True)
    fb = torch.randn(4, 5)
    counter = OpCounter()
    y = feedback_linear(x, w, None, fb)
    with counter:
        y.sum().backward()
    assert counter.ops.count("mm") == 1  # dW only
    x.requires_grad_()
    y = feedback_linear(x, w, None, fb)
    with counter:
        y.sum().backward()
    assert counter.ops.count("mm") + counter.ops.count("matmul") >= 2


def test_conv_uses_one_fused_backward() -> None:
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    y = feedback_conv(x, w, b, torch.randn(4, 3, 3, 3), (1, 1), (1, 1), (1, 1))
    counter = OpCounter()
    with counter:
        y.sum().backward()
    conv_ops = [op for op in counter.ops if "conv" in op]
    assert conv_ops == ["convolution_backward"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, generator=g).to(dtype).requires_grad_()
    w = torch.randn(3, 5, generator=g).to(dtype).requires_grad_()
    fb = torch.randn(3, 5, generator=g).to(dtype)
    feedback_linear(x, w, None, fb).sum().backward()
    ref = torch.ones(6, 3, dtype=torch.float64) @ fb.double()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), ref, rtol=tol, atol=tol)

    xc = torch.randn(2, 2, 6, 6, generator=g).to(dtype).requires_grad_()
    wc = torch.randn(3, 2, 3, 3, generator=g).to(dtype).requires_grad_()
    fbc = torch.randn(3, 2, 3, 3, generator=g).to(dtype)
    feedback_conv(xc, wc, None, fbc, (1, 1), (1, 1), (1, 1)).sum().backward()
    xr = xc.detach().double().requires_grad_()
    F.conv2d(xr, fbc.double(), None, 1, 1).sum().backward()
    torch.testing.assert_close(xc.grad.double(), xr.grad, rtol=tol, atol=tol * 10)


def test_autocast_bf16_on_cpu() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, generator=g, requires_grad=True)
    w = torch.randn(3, 5, generator=g, requires_grad=True)
    fb = torch.randn(3, 5, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = feedback_linear(x, w, None, fb)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, torch.ones(6, 3) @ fb, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w.grad, torch.ones(3, 6) @ x.detach(), rtol=2e-2, atol=2e-2)


def test_shape_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="feedback_weight must have the weight's shape"):
        feedback_linear(torch.randn(2, 3), torch.randn(4, 3), None, torch.randn(3, 4))


@pytest.mark.parametrize("dims,padding_mode,padding", [(1, "zeros", 1), (2, "zeros", 1), (2, "reflect", 1),
                                                       (2, "circular", "same"), (3, "zeros", 0)])
def test_unbatched_conv_input_matches_native_layer(dims: int, padding_mode: str, padding: int | str) -> None:
    """A converted conv accepts (C, *spatial) in training as the native layer does: sham == native in the output
    and in dx, dW, db."""
    import bioprop
    conv_type = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dims]
    torch.manual_seed(0)
    native = conv_type(4, 6, 3, padding=padding, padding_mode=padding_mode, groups=2).double()
    converted = bioprop.convert(torch.nn.Sequential(conv_type(4, 6, 3, padding=padding, padding_mode=padding_mode,
                                                              groups=2).double()), "sham")[0]
    converted.load_state_dict(native.state_dict())
    x = torch.randn(4, *[5] * dims, dtype=torch.float64)
    outs = []
    for layer in (native, converted):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=torch.float64)).view(y.shape))
        outs.append((y.detach(), xi.grad, layer.weight.grad, layer.bias.grad))
    assert outs[0][0].dim() == dims + 1
    for ref, got in zip(*outs):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("magnitude", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.3, "tensor"])
def test_sign_feedback_is_built_in_the_backward(magnitude: bool, scale: float | str) -> None:
    """A SignFeedback gives δx = δy·B with B = scale · magnitude ∘ sign(W) (NumPy reference), exact dW and db, for
    linear and conv; SignFeedback.build is that B."""
    g = torch.Generator().manual_seed(6)
    s = torch.tensor(0.7, dtype=torch.float64) if scale == "tensor" else scale
    s_float = float(s)
    w = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    m = torch.rand(4, 5, dtype=torch.float64, generator=g) - 0.3 if magnitude else None
    recipe = SignFeedback(magnitude=m, scale=s)
    b_ref = s_float * np.sign(w.detach().numpy()) * (1.0 if m is None else m.numpy())
    np.testing.assert_allclose(recipe.build(w).numpy(), b_ref, rtol=1e-15)
    x = torch.randn(3, 2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    y = feedback_linear(x, w, bias, recipe)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    y.backward(gy)
    gyn, xn = gy.numpy().reshape(-1, 4), x.detach().numpy().reshape(-1, 5)
    np.testing.assert_allclose(x.grad.numpy().reshape(-1, 5), gyn @ b_ref, rtol=1e-12)
    np.testing.assert_allclose(w.grad.numpy(), gyn.T @ xn, rtol=1e-12)
    np.testing.assert_allclose(bias.grad.numpy(), gyn.sum(0), rtol=1e-12)

    wc = torch.randn(6, 2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    mc = torch.rand(6, 2, 3, 3, dtype=torch.float64, generator=g) if magnitude else None
    recipe = SignFeedback(magnitude=mc, scale=s)
    xc = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=g, requires_grad=True)
    yc = feedback_conv(xc, wc, None, recipe, (2, 1), (1, 0), (1, 1), 2)
    gyc = torch.randn(yc.shape, dtype=torch.float64, generator=g)
    yc.backward(gyc)
    xr = xc.detach().clone().requires_grad_()
    F.conv2d(xr, recipe.build(wc), None, (2, 1), (1, 0), (1, 1), 2).backward(gyc)
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-12, atol=1e-13)
    wr = wc.detach().clone().requires_grad_()
    F.conv2d(xc.detach(), wr, None, (2, 1), (1, 0), (1, 1), 2).backward(gyc)
    torch.testing.assert_close(wc.grad, wr.grad, rtol=1e-12, atol=1e-13)
    # dW and db are the true gradients, as with a built B
    assert torch.autograd.gradcheck(lambda w, b: feedback_linear(x.detach(), w, b, SignFeedback(m, s)),
                                    (w.detach().requires_grad_(), bias.detach().requires_grad_()))


@pytest.mark.parametrize("rows", [1, 64])
def test_sign_feedback_scale_on_b_or_on_dx_gives_the_same_gradient(rows: int) -> None:
    """The recipe's scale goes into the built B when B has no more entries than δx, else onto δx: both placements
    give δx = δy · (s · sign(W)) (NumPy reference), for linear (1 row: δx smaller; 64 rows: B smaller) and conv
    (a 1x1 input: δx smaller; a 9x9 input: B smaller)."""
    from bioprop.functional import _fold_scale
    g = torch.Generator().manual_seed(11)
    s = 0.37
    w = torch.randn(40, 5, dtype=torch.float64, generator=g)
    x = torch.randn(rows, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = feedback_linear(x, w, None, SignFeedback(scale=s))
    gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    y.backward(gy)
    np.testing.assert_allclose(x.grad.numpy(), gy.numpy() @ (s * np.sign(w.numpy())), rtol=1e-12)
    built, left = _fold_scale(torch.sign(w), s, rows * 5)
    assert (left == 1.0 and torch.equal(built, s * torch.sign(w))) if rows == 64 else \
        (left == s and torch.equal(built, torch.sign(w)))

    wc = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=g)
    side = 1 if rows == 1 else 9
    xc = torch.randn(1, 4, side, side, dtype=torch.float64, generator=g, requires_grad=True)
    yc = feedback_conv(xc, wc, None, SignFeedback(scale=s), (1, 1), (1, 1), (1, 1))
    gyc = torch.randn(yc.shape, dtype=torch.float64, generator=g)
    yc.backward(gyc)
    xr = xc.detach().clone().requires_grad_()
    F.conv2d(xr, s * torch.sign(wc), None, 1, 1).backward(gyc)
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-12, atol=1e-13)


def test_sign_feedback_keeps_no_b_between_forward_and_backward() -> None:
    """With a SignFeedback the op saves x, W itself and the magnitudes (no new W-sized tensor), and builds B in the
    backward; with a built B it saves that B."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 5, generator=g, requires_grad=True)
    w = torch.randn(4, 5, generator=g, requires_grad=True)
    m = torch.rand(4, 5, generator=g)
    for op in (feedback_linear, lambda *a: feedback_conv(*a, (1,), (1,), (1,))):
        xi = x if op is feedback_linear else x.detach().reshape(8, 1, 5).expand(8, 5, 5).contiguous().requires_grad_()
        wi = w if op is feedback_linear else w.reshape(4, 5, 1).detach().requires_grad_()
        mi = m if op is feedback_linear else m.reshape(4, 5, 1)
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = op(xi, wi, None, SignFeedback(magnitude=mi, scale=0.5))
        owned = {xi.data_ptr(), wi.data_ptr(), mi.data_ptr()}
        assert saved and all(t.data_ptr() in owned for t in saved)
        y.sum().backward()
        assert xi.grad is not None and torch.isfinite(xi.grad).all()
        saved.clear()
        built = SignFeedback(magnitude=mi, scale=0.5).build(wi)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            op(xi, wi, None, built)
        assert any(t.data_ptr() == built.data_ptr() for t in saved)


def test_sign_feedback_under_autocast_takes_signs_from_the_uncast_weight() -> None:
    """Under bf16 autocast the recipe's B is built in W's dtype from the uncast W, then cast, as a built B is."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 5, generator=g, requires_grad=True)
    w = torch.randn(3, 5, generator=g, requires_grad=True)
    with torch.no_grad():
        w[0, 0] = 1e-41  # a float32 subnormal that bf16 rounds to 0: its sign must still be +1
    m = torch.rand(3, 5, generator=g)
    recipe = SignFeedback(magnitude=m, scale=0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = feedback_linear(x, w, None, recipe)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    b = recipe.build(w)
    assert b[0, 0] > 0
    ref = (torch.ones(6, 3, dtype=torch.bfloat16) @ (b / 0.25).to(torch.bfloat16)).float() * 0.25
    torch.testing.assert_close(x.grad, ref, rtol=0, atol=0)


def test_sign_feedback_magnitude_shape_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="SignFeedback.magnitude must have the weight's shape"):
        feedback_linear(torch.randn(2, 3), torch.randn(4, 3), None, SignFeedback(torch.randn(3, 4)))


def test_feedback_ops_bind_no_signature_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's Function.apply binds the forward's signature with inspect on every call (about 60 µs): the
    feedback ops skip it, and their gradients are still the closed form dL/dx = δ·B."""
    import inspect

    def no_binding(*args: object, **kwargs: object) -> None:
        raise AssertionError("inspect.signature called in a feedback op")

    x = torch.randn(3, 4, requires_grad=True)
    w, b = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4)
    image, kernel = torch.randn(2, 4, 6, 6, requires_grad=True), torch.randn(3, 4, 3, 3)
    monkeypatch.setattr(inspect, "signature", no_binding)
    feedback_linear(x, w, None, b).sum().backward()
    feedback_conv(image, kernel, None, SignFeedback(), [1, 1], [1, 1], [1, 1]).sum().backward()
    monkeypatch.undo()
    assert torch.allclose(x.grad, b.sum(0).expand(3, 4))  # δ = 1 everywhere
    assert torch.allclose(w.grad, x.detach().sum(0).expand(5, 4))
    grad_y = torch.ones(2, 3, 6, 6)
    expected = torch.nn.grad.conv2d_input(image.shape, torch.sign(kernel), grad_y, padding=1)
    assert torch.allclose(image.grad, expected, atol=1e-5)


def test_feedback_ops_under_torch_func_transforms() -> None:
    """Under torch.func the ops take torch's own apply path, with the same B-routed gradient."""
    w, b = torch.randn(5, 4), torch.randn(5, 4)
    x = torch.randn(3, 4)
    grad_x = torch.func.grad(lambda t: feedback_linear(t, w, None, b).pow(2).sum())(x)
    delta = 2 * (x @ w.t())  # dL/dy
    assert torch.allclose(grad_x, delta @ b, atol=1e-5)


@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (0.6, -0.8), ("tensor", "tensor")])
def test_affine_feedback_is_built_in_the_backward(alpha: float | str, beta: float | str) -> None:
    """An AffineFeedback gives δx = δy·(αW + βT) (NumPy reference) and exact dW, for linear and conv, while the
    op saves only x, W and T (no W-sized tensor of its own)."""
    g = torch.Generator().manual_seed(9)
    a = torch.tensor(0.6, dtype=torch.float64) if alpha == "tensor" else alpha
    b = torch.tensor(-0.8, dtype=torch.float64) if beta == "tensor" else beta
    w = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    offset = torch.randn(4, 5, dtype=torch.float64, generator=g)
    recipe = AffineFeedback(offset, a, b)
    b_ref = float(a) * w.detach().numpy() + float(b) * offset.numpy()
    np.testing.assert_allclose(recipe.build(w).numpy(), b_ref, rtol=1e-14)
    x = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = feedback_linear(x, w, None, recipe)
    assert saved and all(t.data_ptr() in {x.data_ptr(), w.data_ptr(), offset.data_ptr()} for t in saved)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    y.backward(gy)
    np.testing.assert_allclose(x.grad.numpy(), gy.numpy() @ b_ref, rtol=1e-12)
    np.testing.assert_allclose(w.grad.numpy(), gy.numpy().T @ x.detach().numpy(), rtol=1e-12)

    wc = torch.randn(6, 2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    recipe = AffineFeedback(torch.randn(6, 2, 3, 3, dtype=torch.float64, generator=g), a, b)
    xc = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=g, requires_grad=True)
    yc = feedback_conv(xc, wc, None, recipe, (1, 1), (1, 1), (1, 1), 2)
    gyc = torch.randn(yc.shape, dtype=torch.float64, generator=g)
    yc.backward(gyc)
    xr = xc.detach().clone().requires_grad_()
    F.conv2d(xr, recipe.build(wc), None, 1, 1, 1, 2).backward(gyc)
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match=r"AffineFeedback.offset must have the weight's shape \(4, 5\)"):
        feedback_linear(x, w, None, AffineFeedback(torch.randn(5, 4)))
