"""The 17–24-output-channel CPU kernel against PyTorch: channel counts at both
ends, odd maps narrower and wider than the 12-pixel tile, kernel sizes,
paddings, dilations, activations, layouts; and its lowering in the CPU plan."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segfast
from segfast.backends.cpu import narrow, native
from segfast.backends.cpu.narrow import NarrowConv2d, reference
from segfast.testing import assert_nhwc_close

lib = native.load()
pytestmark = pytest.mark.skipif(lib is None, reason=f"CPU kernels: {native.status()[1]}")


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert_nhwc_close(y, ref, 5e-6)


@pytest.mark.parametrize(
    ("k", "c", "hw", "ks", "pad", "dil"),
    [
        (21, 64, (13, 29), 3, 1, 1),  # DeepLab's head shape, two tiles and a tail
        (17, 5, (7, 11), 3, 1, 1),  # narrower than a tile
        (24, 33, (12, 12), 3, 0, 1),  # no padding
        (19, 16, (9, 25), 1, 0, 1),  # 1×1
        (20, 8, (15, 14), 5, 4, 2),  # 5×5 dilated
        (22, 3, (6, 40), 3, 2, 1),  # padding wider than the taps
    ],
)
def test_matches_pytorch(k, c, hw, ks, pad, dil):
    torch.manual_seed(k * 100 + c)
    x = torch.randn(2, c, *hw).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(k, c, ks, ks) / (c * ks * ks) ** 0.5, torch.randn(k)
    conv = NarrowConv2d(lib, w, b, [pad, pad], [dil, dil], "none", 0.0)
    _close(conv(x), F.conv2d(x, w, b, 1, pad, dil))


def test_asymmetric_padding_and_dilation_three_images():
    torch.manual_seed(2)
    x = torch.randn(3, 20, 11, 31).contiguous(memory_format=torch.channels_last)  # 3: rows
    w, b = torch.randn(18, 20, 3, 5) / 17, torch.randn(18)  # of a thread cross images
    conv = NarrowConv2d(lib, w, b, [1, 3], [2, 1], "none", 0.0)
    _close(conv(x), F.conv2d(x, w, b, 1, (1, 3), (2, 1)))


@pytest.mark.parametrize(
    "act", ["relu", "relu6", "leaky_relu", "hardswish", "hardsigmoid", "silu", "sigmoid"]
)
def test_activations_and_no_bias(act):
    torch.manual_seed(1)
    x = torch.randn(1, 12, 10, 13) * 3
    w = torch.randn(21, 12, 3, 3) / 6
    conv = NarrowConv2d(lib, w, None, [1, 1], [1, 1], act, 0.1)
    _close(conv(x), reference(x, w, None, [1, 1], [1, 1], act, 0.1))  # NCHW input too


def test_rejects_and_falls_back():
    w = torch.randn(21, 8, 3, 3)
    with pytest.raises(ValueError, match="17–24"):
        NarrowConv2d(lib, torch.randn(16, 8, 3, 3), None, [1, 1], [1, 1], "none", 0.0)
    with pytest.raises(ValueError, match="17–24"):
        NarrowConv2d(lib, torch.randn(25, 8, 3, 3), None, [1, 1], [1, 1], "none", 0.0)
    with pytest.raises(ValueError, match="activation"):
        NarrowConv2d(lib, w, None, [1, 1], [1, 1], "gelu", 0.0)
    conv = NarrowConv2d(lib, w, None, [0, 0], [1, 1], "none", 0.0)
    with pytest.raises(RuntimeError):
        conv(torch.randn(1, 8, 2, 2))  # smaller than the kernel: PyTorch's own error
    with pytest.raises(RuntimeError):
        conv(torch.randn(1, 9, 6, 6))  # wrong channel count


def test_applies_and_worthwhile():
    assert narrow.applies(torch.randn(21, 256, 3, 3), [1, 1], 1)
    assert not narrow.applies(torch.randn(21, 256, 3, 3), [2, 2], 1)
    assert not narrow.applies(torch.randn(21, 256, 3, 3).bfloat16(), [1, 1], 1)
    assert narrow.worthwhile(256, 3, 3, 128, 128)
    assert not narrow.worthwhile(32, 1, 1, 64, 64)
    assert narrow.worthwhile(256, 3, 3, None, None)


class Head(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(32, classes, 3, padding=1)

    def forward(self, x):
        y = self.head(self.body(x))
        return F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)


@pytest.mark.parametrize(("classes", "fires"), [(21, True), (19, True), (16, False), (32, False)])
def test_plan_lowers_class_heads(monkeypatch, classes, fires):
    monkeypatch.setattr(narrow, "MIN_WORK", 1)
    torch.manual_seed(classes)
    model = Head(classes).eval()
    x = torch.randn(1, 3, 23, 37)
    eng = segfast.compile(model, x, backend="torch")
    kind = "conv2d with 17–24 output channels (segfast kernel)"
    assert (eng._runner.details["lowered"].get(kind, 0) == 1) == fires
    report = segfast.check(eng, model, [x, torch.randn(1, 3, 23, 37)])
    assert report.passed, report
    assert max(a.rel_l2 for a in report.accuracy) <= 1e-5
