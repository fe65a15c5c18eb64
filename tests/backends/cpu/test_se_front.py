"""The front of a squeeze-excitation block as one CPU kernel (``sf_invres_front``):
``[1×1 expand →] depthwise`` and the SE gate's mean from the rows as they are computed;
the gate from those means; and the plan fusing EfficientNet/MobileNetV3 SE blocks
(fired where worthwhile, equal to eager, left alone where the map has other readers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import segfast
from segfast.backends.cpu import invres, native
from segfast.backends.cpu.invres import NativeInvertedResidual, conv_spec, reference_front
from segfast.backends.cpu.se_gate import NativeSEGate
from segfast.models.edge import Bneck
from segfast.testing import assert_nhwc_close, randomised_bn

KIND = "squeeze-excitation block front: [1×1 expand →] depthwise + the gate's mean (segfast kernel)"

lib = native.load()
pytestmark = pytest.mark.skipif(lib is None, reason=f"CPU kernels: {native.status()[1]}")


def _front(c_in, c_exp, k=3, stride=1, dil=1, acts=("silu", "silu"), expand=True):
    pad = dil * (k - 1) // 2
    e = None
    if expand:
        e = conv_spec(torch.randn(c_exp, c_in, 1, 1) / c_in**0.5, torch.randn(c_exp) * 0.1,
                      [1, 1], [0, 0], [1, 1], 1, acts[0], 0.1)  # fmt: skip
    else:
        c_exp = c_in
    d = conv_spec(torch.randn(c_exp, 1, k, k) / k, torch.randn(c_exp) * 0.1, [stride] * 2,
                  [pad] * 2, [dil] * 2, c_exp, acts[1], 0.1)  # fmt: skip
    return e, d


@pytest.mark.parametrize(
    ("n", "c_in", "c_exp", "hw", "k", "stride", "dil", "expand"),
    [
        (1, 16, 96, (17, 23), 3, 2, 1, True),  # EfficientNet's stage 2, odd map
        (3, 24, 144, (12, 20), 3, 1, 1, True),  # three images: a thread's rows cross them
        (2, 3, 20, (9, 7), 5, 1, 1, True),  # nothing a multiple of 8
        (1, 17, 33, (5, 3), 3, 1, 1, True),  # narrower than the 8-pixel block
        (2, 24, 72, (22, 41), 5, 2, 1, True),  # MobileNetV3's 5×5 s2 with interior blocks
        (1, 40, 120, (16, 16), 5, 1, 2, True),  # dilated (LR-ASPP's last stage)
        (2, 24, 24, (13, 18), 3, 1, 1, False),  # no expansion, rows read in place
        (1, 13, 13, (11, 9), 3, 2, 1, False),  # no expansion, copied and padded
    ],
)
@pytest.mark.parametrize("acts", [("silu", "silu"), ("hardswish", "hardswish"),
                                  ("relu", "relu"), ("sigmoid", "none")])  # fmt: skip
def test_front_is_the_convs_and_their_mean(n, c_in, c_exp, hw, k, stride, dil, expand, acts):
    torch.manual_seed(c_in * 100 + c_exp + k)
    e, d = _front(c_in, c_exp, k, stride, dil, acts, expand)
    x = torch.randn(n, c_in, *hw).contiguous(memory_format=torch.channels_last) * 2
    y, pooled = NativeInvertedResidual(lib, e, d, None)(x)
    ref = reference_front(x, e, d)
    assert_nhwc_close(y, ref, 5e-6)
    # the mean of every (image, channel): padded channels (sigmoid(0) = 0.5) never leak in
    assert pooled.shape == (n, ref.shape[1])
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, ref.mean((2, 3)), rtol=2e-5, atol=2e-6)


def test_front_is_deterministic_and_takes_any_layout():
    torch.manual_seed(5)
    e, d = _front(16, 48, 3, 1)
    base = torch.randn(2, 20, 14, 15)
    x = base[:, 2:18]  # an NCHW view with a channel offset
    block = NativeInvertedResidual(lib, e, d, None)
    y1, p1 = block(x)
    y2, p2 = block(x)
    assert torch.equal(y1, y2)
    assert torch.equal(p1, p2)
    ref = reference_front(x, e, d)
    assert_nhwc_close(y1, ref, 5e-6)
    torch.testing.assert_close(p1, ref.mean((2, 3)), rtol=2e-5, atol=2e-6)


def test_front_falls_back_and_refuses_a_residual():
    torch.manual_seed(6)
    e, d = _front(8, 32, 3, 2)
    block = NativeInvertedResidual(lib, e, d, None)
    x = torch.randn(1, 8, 1, 1)  # 1×1 map, stride 2: still one output pixel
    y, p = block(x)
    torch.testing.assert_close(p, reference_front(x, e, d).mean((2, 3)))
    empty = torch.randn(0, 8, 6, 6)  # no images: the composite convolutions
    y, p = block(empty)
    assert y.shape == (0, 32, 3, 3)
    assert p.shape == (0, 32)
    with pytest.raises(RuntimeError):
        block(torch.randn(1, 9, 6, 6))  # wrong channel count: PyTorch's own error
    with pytest.raises(ValueError, match="no residual"):
        block(torch.randn(1, 8, 6, 6), torch.randn(1, 32, 3, 3))


@pytest.mark.parametrize("second", [True, False])
def test_gate_from_the_means_is_the_gate_of_the_map(second):
    torch.manual_seed(7)
    c, sq = 40, 10
    w2 = torch.randn(c, sq, 1, 1) if second else None
    gate = NativeSEGate(lib, torch.randn(sq, c, 1, 1), torch.randn(sq), "silu", 0.0, w2,
                        torch.randn(c) if second else None, "sigmoid", 0.0)  # fmt: skip
    x = torch.randn(3, c, 9, 11).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gate.from_pooled(x.mean((2, 3)).contiguous()), gate(x),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="contiguous fp32 means"):
        gate.from_pooled(torch.randn(3, c + 1))
    with pytest.raises(ValueError, match="contiguous fp32 means"):
        gate.from_pooled(torch.randn(3, c, dtype=torch.float64))


class TinySE(nn.Module):
    """EfficientNet MBConvs (SiLU, sigmoid gates, one without expansion) and MobileNetV3
    bnecks (hardswish / ReLU, hardsigmoid gates); ``tap``: the last block's depthwise
    output is also read outside the block (its front must not fuse)."""

    def __init__(self, tap: bool = False) -> None:
        super().__init__()
        self.tap = tap
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.SiLU())
        self.blocks = nn.Sequential(
            Bneck(16, 3, 16, 16, 4, "SI", 1, gate="sigmoid", se_act="SI", mean=True),
            Bneck(16, 3, 96, 24, 4, "SI", 2, gate="sigmoid", se_act="SI", mean=True),
            Bneck(24, 5, 72, 24, 18, "RE", 1),
            Bneck(24, 3, 120, 40, 30, "HS", 1, dilation=2),
        )
        self.head = nn.Conv2d(40, 3, 1)

    def forward(self, x):
        if not self.tap:
            return self.head(self.blocks(self.stem(x)))
        last = self.blocks[-1].block  # expand, depthwise, SE, project
        d = last[1](last[0](self.blocks[:-1](self.stem(x))))
        return self.head(last[3](last[2](d))) + d.mean((1,), keepdim=True)


def test_plan_fuses_se_fronts_and_matches_eager(monkeypatch):
    torch.manual_seed(9)
    model = randomised_bn(TinySE())
    x = torch.randn(2, 3, 38, 46)
    monkeypatch.setattr(invres, "MIN_EXPANDED_BYTES", 1)  # fuse even these small maps
    eng = segfast.compile(model, x, backend="torch")
    lowered = eng._runner.details["lowered"]
    assert lowered[KIND] == 4  # every SE block, the one without expansion included
    assert lowered["squeeze-excitation gate (segfast kernel)"] == 4
    report = segfast.check(eng, model, [x, torch.randn(2, 3, 38, 46)])
    assert report.passed, report
    assert max(a.rel_l2 for a in report.accuracy) <= 1e-5
    monkeypatch.setattr(invres, "MIN_EXPANDED_BYTES", 1 << 40)  # and not when not worth it
    eng = segfast.compile(model, x, backend="torch")
    assert KIND not in eng._runner.details["lowered"]


def test_plan_leaves_a_front_whose_map_is_read_elsewhere(monkeypatch):
    torch.manual_seed(10)
    model = randomised_bn(TinySE(tap=True))
    x = torch.randn(1, 3, 30, 34)
    monkeypatch.setattr(invres, "MIN_EXPANDED_BYTES", 1)
    eng = segfast.compile(model, x, backend="torch")
    assert eng._runner.details["lowered"][KIND] == 3  # not the tapped block
    report = segfast.check(eng, model, x)
    assert report.passed, report


def test_plan_fuses_se_fronts_with_dynamic_shapes(monkeypatch):
    torch.manual_seed(11)
    model = randomised_bn(TinySE())
    monkeypatch.setattr(invres, "MIN_EXPANDED_BYTES", 1)
    eng = segfast.compile(model, torch.randn(1, 3, 40, 36), backend="torch", dynamic=True)
    assert eng._runner.details["lowered"][KIND] == 4
    for shape in [(1, 3, 40, 36), (1, 3, 30, 50), (1, 3, 17, 23)]:
        report = segfast.check(eng, model, torch.randn(*shape))
        assert report.passed, (shape, report)


@pytest.mark.parametrize(("hw", "k", "sides"), [((17, 23), 3, (0, 1, 0, 1)),
                                                 ((16, 16), 3, (0, 1, 0, 1)),
                                                 ((13, 10), 5, (1, 2, 1, 2)),
                                                 ((9, 12), 3, (2, 0, 1, 3))])  # fmt: skip
@pytest.mark.parametrize("project", [False, True])
def test_an_asymmetric_zero_pad_folds_into_the_depthwise_conv(hw, k, sides, project):
    """efficientnet-pytorch's "same" padding (bottom and right only) as the kernel's
    padding: against F.pad of the expanded map and an unpadded conv."""
    torch.manual_seed(sum(hw) + k)
    top, bottom, left, right = sides
    e = conv_spec(torch.randn(40, 16, 1, 1) / 4, torch.randn(40) * 0.1, [1, 1], [0, 0], [1, 1],
                  1, "silu", 0.0)  # fmt: skip
    wd, bd = torch.randn(40, 1, k, k) / k, torch.randn(40) * 0.1
    d = conv_spec(wd, bd, [2, 2], [top, left], [1, 1], 40, "silu", 0.0, pad_end=[bottom, right])
    p = None
    if project:
        p = conv_spec(torch.randn(24, 40, 1, 1) / 6, torch.randn(24) * 0.1, [1, 1], [0, 0],
                      [1, 1], 1, "none", 0.0)  # fmt: skip
    x = torch.randn(2, 16, *hw).contiguous(memory_format=torch.channels_last)
    h = torch.nn.functional.silu(torch.nn.functional.conv2d(x, e.weight, e.bias))
    h = torch.nn.functional.pad(h, (left, right, top, bottom))
    want = torch.nn.functional.silu(torch.nn.functional.conv2d(h, wd, bd, 2, groups=40))
    block = NativeInvertedResidual(lib, e, d, p)
    assert block.out_size(*hw) == tuple(want.shape[2:])
    if project:
        want = torch.nn.functional.conv2d(want, p.weight, p.bias)
        assert_nhwc_close(block(x), want, 5e-6)
        return
    y, pooled = block(x)
    assert_nhwc_close(y, want, 5e-6)
    torch.testing.assert_close(pooled, want.mean((2, 3)), rtol=1e-5, atol=1e-5)
    assert_nhwc_close(reference_front(x, e, d), want, 5e-6)  # the reference pads alike


class SamePadded(nn.Module):
    """efficientnet-pytorch's blocks as smp's "efficientnet-b0" encoder builds them: a
    ZeroPad2d((0, 1, 0, 1)) between the expand conv and every stride-2 depthwise conv;
    an MBConv with an SE gate and one without (an inverted residual block, 5×5 with
    (1, 2, 1, 2)); ``shared``: the first pad also read by another conv (written, not
    folded)."""

    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        self.shared = shared
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.SiLU())
        self.expand1 = nn.Sequential(nn.Conv2d(16, 96, 1, bias=False), nn.BatchNorm2d(96),
                                     nn.SiLU())  # fmt: skip
        self.pad1 = nn.ZeroPad2d((0, 1, 0, 1))
        self.dw1 = nn.Sequential(nn.Conv2d(96, 96, 3, 2, groups=96, bias=False),
                                 nn.BatchNorm2d(96), nn.SiLU())  # fmt: skip
        self.se1, self.se2 = nn.Conv2d(96, 4, 1), nn.Conv2d(4, 96, 1)
        self.project1 = nn.Sequential(nn.Conv2d(96, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.expand2 = nn.Sequential(nn.Conv2d(24, 144, 1), nn.ReLU6())
        self.pad2 = nn.ZeroPad2d((1, 2, 1, 2))
        self.dw2 = nn.Sequential(nn.Conv2d(144, 144, 5, 2, groups=144), nn.ReLU6())
        self.project2 = nn.Conv2d(144, 40, 1)
        self.side = nn.Conv2d(96, 24, 3, 2)
        self.head = nn.Conv2d(40, 3, 1)

    def forward(self, x):
        p = self.pad1(self.expand1(self.stem(x)))
        d = self.dw1(p)
        s = torch.sigmoid(self.se2(nn.functional.silu(self.se1(d.mean((2, 3), keepdim=True)))))
        y = self.project1(d * s)
        if self.shared:
            y = y + self.side(p)
        y = self.project2(self.dw2(self.pad2(self.expand2(y))))
        return self.head(y)


@pytest.mark.parametrize("shared", [False, True])
def test_plan_folds_same_padding_into_blocks_and_fronts(monkeypatch, lowered_plans, shared):
    monkeypatch.setattr(invres, "MIN_EXPANDED_BYTES", 1)
    torch.manual_seed(12)
    model = randomised_bn(SamePadded(shared))
    x = torch.randn(2, 3, 40, 46)
    eng = segfast.compile(model, x, backend="torch")
    lowered = eng._runner.details["lowered"]
    assert lowered[KIND] == 1  # shared: the front reads the written pad, without its expand
    assert lowered["inverted residual block (segfast kernel)"] == 1
    pads = [s for s in lowered_plans[-1].steps if s.fn is torch.ops.aten.constant_pad_nd.default]
    assert len(pads) == (1 if shared else 0)  # a pad something else reads is written
    report = segfast.check(eng, model, [x, torch.randn(2, 3, 40, 46)])
    assert report.passed, report
    assert max(a.rel_l2 for a in report.accuracy) <= 1e-5
    if shared:
        return
    # dynamic sizes: odd and even maps under the same (0, 1, 0, 1) pad
    eng = segfast.compile(model, x[:1], backend="torch", dynamic=True)
    assert eng._runner.details["lowered"][KIND] == 1
    for shape in [(1, 3, 40, 46), (1, 3, 33, 47), (1, 3, 17, 20)]:
        report = segfast.check(eng, model, torch.randn(*shape))
        assert report.passed, (shape, report)
        assert max(a.rel_l2 for a in report.accuracy) <= 1e-5, shape


@pytest.mark.narrow_vectors
def test_a_pad_read_by_a_front_and_another_depthwise_conv_stays_written(monkeypatch):
    """AVX2's plan folds a pad read only by depthwise convs into sf_dwconv8; where one
    of those convs is an SE front (which reads the written pad: the pad has two
    readers), the pad must stay a step."""
    monkeypatch.setattr(lib, "wide_vectors", False)
    monkeypatch.setattr(lib, "avx2", True)
    monkeypatch.setattr(invres, "MIN_EXPANDED_BYTES", 1)

    class TwoReaders(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 3, 2, 1)
            self.pad = nn.ZeroPad2d((0, 1, 0, 1))
            self.dw_a = nn.Sequential(nn.Conv2d(32, 32, 3, 2, groups=32), nn.SiLU())
            self.dw_b = nn.Conv2d(32, 32, 3, 2, groups=32)
            self.se1, self.se2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
            self.project = nn.Conv2d(32, 16, 1)
            self.side = nn.Conv2d(32, 16, 1)

        def forward(self, x):
            p = self.pad(self.stem(x))
            d = self.dw_a(p)
            g = torch.sigmoid(self.se2(torch.relu(self.se1(d.mean((2, 3), keepdim=True)))))
            b = self.dw_b(p)  # read twice: not an inverted residual block
            return self.project(d * g) + self.side(b) + b.mean(1, keepdim=True)

    torch.manual_seed(13)
    model = TwoReaders().eval()
    x = torch.randn(1, 3, 40, 52)
    eng = segfast.compile(model, x, backend="torch")
    lowered = eng._runner.details["lowered"]
    assert lowered[KIND] == 1
    assert "depthwise conv2d (segfast kernel, 8-lane, pad folded)" not in lowered
    report = segfast.check(eng, model, [x, torch.randn(1, 3, 40, 52)])
    assert report.passed, report
