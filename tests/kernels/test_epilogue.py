"""The shared epilogue activations, through both convolution kernels, judged
relative to an fp64 reference — including values near zero, where a naive
tanh = (1 − e^{−2y}) / (1 + e^{−2y}) loses digits to cancellation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segfast.kernels._common import ACTIVATIONS, apply_activation_reference
from segfast.kernels.conv2d import conv2d
from segfast.kernels.conv_transpose2d import conv_transpose2d
from segfast.testing import assert_rel_l2


@pytest.mark.parametrize("act", sorted(set(ACTIVATIONS) - {"none"}))
@pytest.mark.parametrize("magnitude", [1e-6, 1e-2, 3.0, 40.0])
def test_activations_relative_to_fp64(act, magnitude):
    x = torch.randn(1, 6, 5, 7) * magnitude
    w = torch.randn(4, 6, 1, 1)
    y = conv2d(x, w, act=act, act_param=0.1)
    ref = apply_activation_reference(F.conv2d(x.double(), w.double()), act, 0.1)
    assert_rel_l2(y, ref, 1e-5)


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "silu"])
def test_transposed_conv_small_outputs(act):
    """A DCGAN-like output layer whose pre-activations are ~1e-5."""
    x = torch.randn(2, 8, 4, 4) * 1e-3
    w = torch.randn(8, 3, 4, 4) * 1e-2
    y = conv_transpose2d(x, w, stride=2, padding=1, act=act)
    ref = apply_activation_reference(
        F.conv_transpose2d(x.double(), w.double(), stride=2, padding=1), act
    )
    assert_rel_l2(y, ref, 1e-5)


def test_nan_propagates_through_relu():
    x = torch.randn(1, 2, 3, 3)
    x[0, 0, 1, 1] = float("nan")
    y = conv2d(x, torch.ones(1, 2, 1, 1), act="relu")
    assert torch.isnan(y[0, 0, 1, 1])
    assert torch.isfinite(y[0, 0, 0, 0])
