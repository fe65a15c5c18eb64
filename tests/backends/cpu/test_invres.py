"""The inverted residual CPU kernel against three PyTorch convolutions: odd
channel counts around the 16-lane blocks, strides, dilations, kernel sizes,
maps narrower than the 8-pixel blocks, epilogues, layouts; and its lowering
in the CPU plan (fires where worthwhile, matches eager, leaves other blocks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import segfast
from segfast.backends.cpu import invres, native
from segfast.backends.cpu.invres import NativeInvertedResidual, conv_spec, reference
from segfast.compiler import ops
from segfast.testing import assert_nhwc_close

needs_onednn_bf16 = pytest.mark.skipif(
    not ops._mkldnn_ok(torch.bfloat16),
    reason="oneDNN has no bf16 convolutions on this CPU (needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)",
)

lib = native.load()
pytestmark = pytest.mark.skipif(lib is None, reason=f"CPU kernels: {native.status()[1]}")


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert_nhwc_close(y, ref, 5e-6)


def _block(c_in, c_exp, c_out, k=3, stride=1, pad=1, dil=1, acts=("relu6", "relu6", "none"),
           bias=True, expand=True):  # fmt: skip
    def b(n):
        return torch.randn(n) * 0.1 if bias else None

    e = None
    if expand:
        e = conv_spec(torch.randn(c_exp, c_in, 1, 1) / c_in**0.5, b(c_exp), [1, 1], [0, 0], [1, 1],
                      1, acts[0], 0.1)  # fmt: skip
    else:
        c_exp = c_in
    d = conv_spec(torch.randn(c_exp, 1, k, k) / k, b(c_exp), [stride] * 2, [pad] * 2, [dil] * 2,
                  c_exp, acts[1], 0.1)  # fmt: skip
    p = conv_spec(torch.randn(c_out, c_exp, 1, 1) / c_exp**0.5, b(c_out), [1, 1], [0, 0], [1, 1],
                  1, acts[2], 0.1)  # fmt: skip
    return e, d, p


@pytest.mark.parametrize(
    ("c_in", "c_exp", "c_out", "hw", "k", "stride", "pad", "dil"),
    [
        (16, 96, 24, (17, 23), 3, 2, 1, 1),  # MobileNetV2's block 2, odd map
        (24, 144, 24, (12, 20), 3, 1, 1, 1),
        (3, 20, 5, (9, 7), 3, 1, 1, 1),  # nothing a multiple of 16
        (17, 40, 33, (5, 3), 3, 1, 1, 1),  # narrower than the 8-pixel block
        (8, 48, 16, (14, 15), 5, 2, 2, 1),  # 5×5 (MobileNetV3 / EfficientNet)
        (32, 64, 31, (16, 16), 3, 1, 2, 2),  # dilated (DeepLab's output stride 16)
        (12, 72, 12, (11, 13), 3, 1, 0, 1),  # no padding
        (64, 384, 64, (6, 6), 3, 1, 1, 1),  # wide, several 4-vector chunks
        (5, 100, 7, (10, 19), 3, 3, 1, 1),  # stride 3: rows skipped in the ring
        (5, 40, 7, (13, 50), 3, 3, 1, 1),  # stride 3 with 8-pixel interior blocks
        (8, 48, 16, (21, 40), 5, 1, 2, 1),  # 5×5 with interior blocks
        (8, 48, 16, (22, 41), 5, 2, 2, 1),  # 5×5 stride 2 with interior blocks
    ],
)
def test_matches_pytorch(c_in, c_exp, c_out, hw, k, stride, pad, dil):
    torch.manual_seed(c_in * 100 + c_exp)
    e, d, p = _block(c_in, c_exp, c_out, k, stride, pad, dil)
    x = torch.randn(3, c_in, *hw).contiguous(memory_format=torch.channels_last)  # 3: a
    block = NativeInvertedResidual(lib, e, d, p, False)  # thread's rows cross images
    _close(block(x), reference(x, e, d, p))


@pytest.mark.parametrize("c", [32, 24, 7])  # 32: rows read in place; others: copied and padded
def test_without_expansion(c):
    torch.manual_seed(c)
    e, d, p = _block(c, c, 16, expand=False)
    x = torch.randn(1, c, 13, 18).contiguous(memory_format=torch.channels_last)
    block = NativeInvertedResidual(lib, e, d, p, False)
    _close(block(x), reference(x, e, d, p))


@pytest.mark.parametrize("acts", [("relu", "relu", "relu"), ("none", "leaky_relu", "relu6"),
                                  ("leaky_relu", "none", "leaky_relu"),
                                  ("hardswish", "hardswish", "none"),  # MobileNetV3
                                  ("silu", "silu", "hardsigmoid"),  # EfficientNet
                                  ("sigmoid", "relu6", "silu")])  # fmt: skip
@pytest.mark.parametrize("res", [None, "before", "after"])
def test_epilogues(acts, res):
    torch.manual_seed(1)
    e, d, p = _block(20, 60, 20, acts=acts)
    x = torch.randn(1, 20, 10, 11).contiguous(memory_format=torch.channels_last) * 3
    r = None if res is None else torch.randn(1, 20, 10, 11)
    block = NativeInvertedResidual(lib, e, d, p, res == "after")
    _close(block(x, r), reference(x, e, d, p, r, res == "after"))


def test_any_input_layout_and_no_bias():
    torch.manual_seed(2)
    e, d, p = _block(16, 48, 24, bias=False)
    base = torch.randn(2, 21, 12, 9)
    x = base[:, 2:18]  # NCHW view with a channel offset
    block = NativeInvertedResidual(lib, e, d, p, False)
    _close(block(x), reference(x, e, d, p))
    r = torch.randn(2, 24, 12, 9)  # NCHW residual
    _close(block(x, r), reference(x, e, d, p, r))


def test_bad_inputs_get_pytorchs_error_not_the_kernel():
    torch.manual_seed(3)
    e, d, p = _block(8, 32, 8)
    block = NativeInvertedResidual(lib, e, d, p, False)
    with pytest.raises(RuntimeError):
        block(torch.randn(1, 9, 6, 6))  # wrong channel count: the composite convolutions
    with pytest.raises(RuntimeError):
        block(torch.randn(1, 8, 6, 6), torch.randn(1, 8, 3, 3))  # residual of the wrong shape
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        block(x)  # float64 against fp32 weights, as PyTorch's conv says


def test_rejects_what_is_not_an_inverted_residual():
    e, d, p = _block(8, 32, 8)
    wide = conv_spec(torch.randn(8, 32, 3, 3), None, [1, 1], [1, 1], [1, 1], 1, "none", 0.0)
    with pytest.raises(ValueError, match="1×1"):
        NativeInvertedResidual(lib, e, d, wide, False)
    gelu = conv_spec(d.weight, d.bias, d.stride, d.padding, d.dilation, d.groups, "gelu", 0.0)
    with pytest.raises(ValueError, match="activation"):
        NativeInvertedResidual(lib, e, gelu, p, False)
    half = conv_spec(p.weight.bfloat16(), None, [1, 1], [0, 0], [1, 1], 1, "none", 0.0)
    with pytest.raises(ValueError, match="fp32"):
        NativeInvertedResidual(lib, e, d, half, False)


def test_worthwhile():
    assert invres.worthwhile(96, 256, 256, 3)  # MobileNetV2 at 512²: 25 MB expanded
    assert not invres.worthwhile(96, 16, 16, 3)  # too small to matter
    assert not invres.worthwhile(960, 32, 32, 3)  # wide: oneDNN's GEMMs win
    assert not invres.worthwhile(256, 256, 256, 49)  # atrous rate 24 on a wide map: 12 MB ring
    assert invres.worthwhile(144, None, None, 3)  # dynamic H, W: taken as large


class TinyMobile(nn.Module):
    """MobileNetV2-style blocks (with and without expansion, strided, residual)
    and a block whose depthwise output is read twice (not fusable)."""

    def __init__(self) -> None:
        super().__init__()

        def cbr(i, o, k=1, s=1, g=1):
            return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False),
                                 nn.BatchNorm2d(o), nn.ReLU6())  # fmt: skip

        self.stem = cbr(3, 16, 3, 2)
        self.b1 = nn.Sequential(cbr(16, 16, 3, g=16), nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8))
        self.b2 = nn.Sequential(cbr(8, 48), cbr(48, 48, 3, 2, 48), nn.Conv2d(48, 12, 1))
        self.b3 = nn.Sequential(cbr(12, 72), cbr(72, 72, 3, 1, 72), nn.Conv2d(72, 12, 1))
        self.dw = cbr(12, 12, 3, g=12)
        self.pw = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        x = self.b2(self.b1(self.stem(x)))
        x = x + self.b3(x)
        d = self.dw(x)
        return self.pw(d) + d.mean(1, keepdim=True)


def test_plan_fuses_blocks_and_matches_eager(monkeypatch):
    torch.manual_seed(4)
    model = TinyMobile().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 38, 46)
    monkeypatch.setattr(invres, "MIN_EXPANDED_BYTES", 1)  # fuse even these small maps
    eng = segfast.compile(model, x, backend="torch")
    assert eng._runner.details["lowered"]["inverted residual block (segfast kernel)"] == 3
    report = segfast.check(eng, model, [x, torch.randn(2, 3, 38, 46)])
    assert report.passed, report
    assert max(a.rel_l2 for a in report.accuracy) <= 1e-5
    monkeypatch.setattr(invres, "MIN_EXPANDED_BYTES", 1 << 40)  # and not when not worth it
    eng = segfast.compile(model, x, backend="torch")
    assert "inverted residual block (segfast kernel)" not in eng._runner.details["lowered"]


class SeparableChain(nn.Module):
    """MobileNetV1 / stacked separable convs: dw → pw → dw → pw, where the first
    pointwise conv both ends a block and could start the next (it must do one);
    and the same after a bilinear upsample (the decoder fusion claims the first)."""

    def __init__(self, upsample: bool) -> None:
        super().__init__()

        def sep(c, o):
            return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
                                 nn.Conv2d(c, o, 1), nn.ReLU())  # fmt: skip

        self.upsample = upsample
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.a, self.b, self.c = sep(16, 32), sep(32, 32), sep(32, 8)

    def forward(self, x):
        y = self.stem(x)
        if self.upsample:
            y = nn.functional.interpolate(y, scale_factor=4.0, mode="bilinear")
        return self.c(self.b(self.a(y)))


@pytest.mark.parametrize("upsample", [False, True])
def test_plan_chains_of_separable_convs(monkeypatch, upsample):
    from segfast.backends.cpu import plan

    monkeypatch.setattr(invres, "MIN_EXPANDED_BYTES", 1)
    monkeypatch.setattr(plan, "MIN_BYTES", 1)
    torch.manual_seed(8)
    model = SeparableChain(upsample).eval()
    x = torch.randn(1, 3, 26, 34)
    eng = segfast.compile(model, x, backend="torch")
    lowered = eng._runner.details["lowered"]
    assert lowered["inverted residual block (segfast kernel)"] == (2 if upsample else 3)
    report = segfast.check(eng, model, [x, torch.randn(1, 3, 26, 34)])
    assert report.passed, report
    assert max(a.rel_l2 for a in report.accuracy) <= 1e-5


def test_plan_fuses_blocks_with_dynamic_shapes():
    torch.manual_seed(7)
    model = TinyMobile().eval()
    x = torch.randn(1, 3, 40, 36)
    eng = segfast.compile(model, x, backend="torch", dynamic=True)
    assert eng._runner.details["lowered"]["inverted residual block (segfast kernel)"] == 3
    for shape in [(1, 3, 40, 36), (1, 3, 30, 50), (1, 3, 17, 23)]:
        y = torch.randn(*shape)
        report = segfast.check(eng, model, y)
        assert report.passed, (shape, report)


@needs_onednn_bf16
def test_plan_keeps_bf16_blocks_on_onednn(monkeypatch):
    monkeypatch.setattr(invres, "MIN_EXPANDED_BYTES", 1)
    model = TinyMobile().eval()
    x = torch.randn(1, 3, 32, 32)
    eng = segfast.compile(model, x, backend="torch", precision="bf16")
    assert "inverted residual block (segfast kernel)" not in eng._runner.details["lowered"]
    assert segfast.check(eng, model, x).passed
