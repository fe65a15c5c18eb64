"""The 17–24- and 1–4-output-channel CPU kernels against PyTorch: channel counts
at both ends, odd maps narrower and wider than their tiles, kernel sizes, paddings,
dilations, activations, layouts; and their lowering in the CPU plan."""

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


# -- 1–4 output channels: sf_conv_few ------------------------------------------------


@pytest.mark.parametrize(
    ("k", "c", "hw", "ks", "pad"),
    [
        (1, 16, (19, 37), (3, 3), (1, 1)),  # smp's binary head; 37 wide: 4 tiles + 5 pixels
        (2, 13, (7, 9), (3, 3), (1, 1)),  # 8 + 5 input channels
        (3, 40, (12, 8), (1, 1), (0, 0)),  # 1×1
        (4, 8, (9, 11), (5, 5), (2, 2)),
        (1, 24, (6, 17), (7, 7), (3, 3)),
        (2, 9, (10, 6), (2, 4), (0, 2)),  # even, uneven kernel and padding: the generic row
        (1, 16, (5, 5), (3, 3), (4, 3)),  # padding wider than the taps
        (1, 3, (9, 9), (3, 3), (1, 1)),  # fewer than 8 input channels
    ],
)
def test_few_outputs_match_pytorch(k, c, hw, ks, pad):
    torch.manual_seed(k * 100 + c)
    x = torch.randn(2, c, *hw).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(k, c, *ks) / (c * ks[0] * ks[1]) ** 0.5, torch.randn(k)
    conv = narrow.FewOutputConv2d(lib, w, b, list(pad), "none", 0.0)
    _close(conv(x), F.conv2d(x, w, b, 1, pad))
    _close(conv(x), F.conv2d(x, w, b, 1, pad))  # the per-thread rows are reused


@pytest.mark.parametrize(
    "act", ["relu", "relu6", "leaky_relu", "hardswish", "hardsigmoid", "silu", "sigmoid"]
)
def test_few_outputs_activations_layouts_no_bias(act):
    torch.manual_seed(3)
    base = torch.randn(3, 20, 10, 13).contiguous(memory_format=torch.channels_last) * 3
    x = base[:, 2:18]  # a channel slice: pixel stride 20, not 16
    w = torch.randn(2, 16, 3, 3) / 6
    conv = narrow.FewOutputConv2d(lib, w, None, [1, 1], act, 0.1)
    _close(conv(x), reference(x, w, None, [1, 1], [1, 1], act, 0.1))
    _close(conv(x.contiguous()), reference(x, w, None, [1, 1], [1, 1], act, 0.1))  # NCHW


def test_few_outputs_rejects_and_falls_back():
    with pytest.raises(ValueError, match="1–4"):
        narrow.FewOutputConv2d(lib, torch.randn(5, 8, 3, 3), None, [1, 1], "none", 0.0)
    with pytest.raises(ValueError, match="activation"):
        narrow.FewOutputConv2d(lib, torch.randn(1, 8, 3, 3), None, [1, 1], "gelu", 0.0)
    assert not narrow.few_applies(torch.randn(1, 8, 3, 3), [2, 2], [1, 1], 1)
    assert not narrow.few_applies(torch.randn(1, 8, 3, 3), [1, 1], [2, 2], 1)
    assert narrow.few_worthwhile(16, 3, 3, 256)
    assert not narrow.few_worthwhile(4, 3, 3, 256)  # under one vector of input channels
    assert not narrow.few_worthwhile(512, 3, 3, 512)  # its packed rows would leave L2
    w, b = torch.randn(1, 8, 3, 3), torch.randn(1)
    conv = narrow.FewOutputConv2d(lib, w, b, [0, 0], "none", 0.0)
    with pytest.raises(RuntimeError):
        conv(torch.randn(1, 8, 2, 2))  # smaller than the kernel: PyTorch's own error
    with pytest.raises(RuntimeError):
        conv(torch.randn(1, 9, 6, 6))  # wrong channel count


@pytest.mark.narrow_vectors
@pytest.mark.parametrize(("classes", "output", "kind"), [
    (1, "logits", "conv2d with 1–4 output channels (segfast kernel)"),
    (3, "logits", "conv2d with 1–4 output channels (segfast kernel)"),
    (3, "mask", "head: [resize +] argmax (segfast kernel)"),
    (8, "logits", None),
])  # fmt: skip
@pytest.mark.parametrize("wide", [False, True])
def test_plan_lowers_few_class_heads(monkeypatch, classes, output, kind, wide):
    """With AVX2, with or without AVX-512, a 1–4-class head conv — 3×3 on the
    features, or the 1×1 inside an argmax head — runs sf_conv_few; 8 classes stay on
    oneDNN. The engine matches eager."""
    if wide and not lib.wide_vectors:
        pytest.skip("the 16-lane kernels need AVX-512 on this CPU")
    monkeypatch.setattr(lib, "wide_vectors", wide)
    monkeypatch.setattr(lib, "avx2", True)
    built = []

    class Recorded(narrow.FewOutputConv2d):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(narrow, "FewOutputConv2d", Recorded)
    torch.manual_seed(classes)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
            self.head = nn.Conv2d(16, classes, 3 if output == "logits" else 1, padding="same")

        def forward(self, x):
            return self.head(self.body(x))

    model = Net().eval()
    x = torch.randn(1, 3, 21, 35)
    eng = segfast.compile(model, x, backend="torch", output=output)
    lowered = eng._runner.details["lowered"]
    few = "conv2d with 1–4 output channels (segfast kernel)"
    if kind is None:
        assert few not in lowered
    else:
        assert lowered[kind] == 1
    assert len(built) == (kind is not None)  # the argmax head's 1×1 conv too
    report = segfast.check(eng, model, [x, torch.randn(1, 3, 21, 35)])
    assert report.passed, report
