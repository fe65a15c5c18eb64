"""Shared model helpers: mirror padding, pad-to-multiple, center crop, bilinear kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segfast.models._common import (
    bilinear_kernel,
    center_crop,
    check_image_input,
    mirror_pad,
    pad_to_multiple,
)


@pytest.mark.parametrize(
    ("shape", "pads"),
    [
        ((5, 7), (2, 1, 3, 0)),  # narrower than the image: one reflection
        ((5, 7), (4, 4, 6, 6)),  # exactly dim - 1
        ((3, 4), (11, 7, 9, 13)),  # several reflections
        ((2, 2), (5, 0, 0, 5)),
    ],
)
def test_mirror_pad_matches_numpy_reflect(shape, pads):
    top, bottom, left, right = pads
    x = torch.arange(2 * shape[0] * shape[1], dtype=torch.float32).reshape(1, 2, *shape)
    got = mirror_pad(x, top, bottom, left, right)
    want = np.pad(x.numpy(), ((0, 0), (0, 0), (top, bottom), (left, right)), mode="reflect")
    np.testing.assert_array_equal(got.numpy(), want)


def test_mirror_pad_no_op_and_errors():
    x = torch.randn(1, 1, 4, 4)
    assert mirror_pad(x, 0, 0, 0, 0) is x
    with pytest.raises(ValueError, match="H and W >= 2"):
        mirror_pad(torch.randn(1, 1, 1, 4), 1, 0, 0, 0)


@pytest.mark.parametrize(("h", "w", "m"), [(37, 53, 32), (64, 64, 32), (1, 1, 8)])
def test_pad_to_multiple(h, w, m):
    x = torch.randn(1, 2, h, w)
    y = pad_to_multiple(x, m)
    ph, pw = y.shape[-2] - h, y.shape[-1] - w
    assert (y.shape[-2] % m, y.shape[-1] % m) == (0, 0)
    assert 0 <= ph < m
    assert 0 <= pw < m
    torch.testing.assert_close(y[..., :h, :w], x, rtol=0, atol=0)
    assert y[..., h:, :].abs().sum() == 0
    assert y[..., :, w:].abs().sum() == 0


def test_center_crop():
    x = torch.arange(7 * 6).reshape(1, 1, 7, 6)
    y = center_crop(x, 3, 4)
    torch.testing.assert_close(y, x[..., 2:5, 1:5], rtol=0, atol=0)
    with pytest.raises(ValueError, match="larger"):
        center_crop(x, 8, 6)


def test_bilinear_kernel_is_bilinear_upsampling():
    w = bilinear_kernel(3, 4)
    assert w.shape == (3, 3, 4, 4)
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(w[1, 1], taps[:, None] * taps[None, :])
    assert w[0, 1].abs().sum() == 0  # channels do not mix
    # As a stride-2 transposed conv it reproduces bilinear ×2 upsampling inside the image.
    x = torch.randn(1, 3, 6, 6)
    up = F.conv_transpose2d(x, w, stride=2, padding=1)
    ref = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(up[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1])


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((3, 8, 8), "4-D"),
        ((1, 2, 8, 8), "expects 3 input channels, got 2"),
        ((1, 3, 4, 8), "needs H and W >= 5, got 4x8"),
    ],
)
def test_check_image_input(shape, message):
    with pytest.raises(ValueError, match=message):
        check_image_input(torch.randn(*shape), 3, 5, "Net")


def test_check_image_input_dtype():
    with pytest.raises(ValueError, match=r"floating-point image batch, got dtype torch\.uint8"):
        check_image_input(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 3, 5, "Net")
    check_image_input(torch.zeros(1, 3, 8, 8, dtype=torch.float16), 3, 5, "Net")
