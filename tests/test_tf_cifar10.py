"""The ``tf_cifar10`` zoo model (moskovitz2018's "CIFAR-10 1"): the TensorFlow tutorial's parameter count, TF
"SAME" pooling against a NumPy reference, and the 24×24 crop against per-sample slicing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bioprop
from bioprop.data.transforms import crop_windows
from bioprop.models import count_parameters, create_model
from bioprop.models.convnets import CropInput, _same_max_pool


def test_parameter_count_is_the_tutorials():
    # The TensorFlow CIFAR-10 tutorial states 1,068,298 learnable parameters for its net.
    net = create_model("tf_cifar10", num_classes=10, in_channels=3, image_size=32)
    assert count_parameters(net) == 1_068_298
    net.eval()
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def _tf_same_max_pool(x: np.ndarray) -> np.ndarray:
    """3×3/2 max pooling with TF "SAME" padding (-inf pads, the extra one at the end), per the TF definition."""
    n, c, h, w = x.shape
    out_h, out_w = -(-h // 2), -(-w // 2)
    pad_h, pad_w = max((out_h - 1) * 2 + 3 - h, 0), max((out_w - 1) * 2 + 3 - w, 0)
    padded = np.full((n, c, h + pad_h, w + pad_w), -np.inf)
    padded[:, :, pad_h // 2:pad_h // 2 + h, pad_w // 2:pad_w // 2 + w] = x
    out = np.empty((n, c, out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            out[:, :, i, j] = padded[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(2, 3))
    return out


@pytest.mark.parametrize("size", [24, 12, 7])
def test_pooling_is_tensorflow_same_pooling_on_relu_outputs(size):
    x = torch.relu(torch.randn(2, 3, size, size, dtype=torch.float64))
    layers, out_size = _same_max_pool(size)
    got = nn.Sequential(*layers)(x)
    assert got.shape[-1] == out_size == -(-size // 2)
    np.testing.assert_array_equal(got.numpy(), _tf_same_max_pool(x.numpy()))


def test_crop_windows_equal_per_sample_slices():
    images = torch.arange(4 * 2 * 6 * 7, dtype=torch.float32).reshape(4, 2, 6, 7)
    offsets = torch.tensor([[0, 0], [2, 3], [1, 2], [2, 0]])
    got = crop_windows(images, offsets, 4)
    for i, (top, left) in enumerate(offsets.tolist()):
        assert torch.equal(got[i], images[i, :, top:top + 4, left:left + 4])


def test_crop_input_is_central_in_eval_and_a_random_window_in_training():
    x = torch.randn(16, 3, 32, 32)
    crop = CropInput(24)
    assert torch.equal(crop.eval()(x), x[:, :, 4:28, 4:28])
    torch.manual_seed(0)
    out = crop.train()(x)
    seen_flip, seen_offsets = False, set()
    for i in range(16):
        matches = [(t, l, f) for t in range(9) for l in range(9) for f in (False, True)
                   if torch.equal(out[i], (x[i, :, t:t + 24, l:l + 24].flip(2) if f else x[i, :, t:t + 24, l:l + 24]))]
        assert len(matches) == 1, i
        seen_flip |= matches[0][2]
        seen_offsets.add(matches[0][:2])
    assert seen_flip and len(seen_offsets) > 4


def test_converts_with_layer_and_direct_rules_and_rejects_a_bad_crop():
    for rule in ("fa", "usf", "dfa"):
        net = bioprop.convert(create_model("tf_cifar10", in_channels=3, image_size=32), rule)
        net(torch.randn(4, 3, 32, 32)).sum().backward()
        assert net[1].weight.grad is not None and net[1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"crop must be an int in \[0, image_size = 28\]"):
        create_model("tf_cifar10", in_channels=3, image_size=28, crop=30)
    assert count_parameters(create_model("tf_cifar10", in_channels=3, image_size=24, crop=0)) == 1_068_298
