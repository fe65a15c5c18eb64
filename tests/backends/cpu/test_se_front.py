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
