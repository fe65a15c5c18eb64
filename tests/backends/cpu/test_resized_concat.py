"""A 1×1 conv of a concat of upsampled maps with the upsamples moved after the conv
(segfast.backends.cpu.resized_concat): against the graph's own computation over
modes, sizes, part mixes and epilogues; its fallbacks; and the plan taking it for a
SegFormer-style head (fired, equal to eager, left alone where it does not apply)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segfast
from segfast.backends.cpu import resized_concat
from segfast.backends.cpu.resized_concat import Part, ResizedConcatConv1x1
from segfast.compiler import ops

KIND = "conv2d 1×1 of a concat of upsamples, at the sources' resolutions"
CL = torch.channels_last

pytestmark = pytest.mark.skipif(not ops._mkldnn_ok(), reason="oneDNN is not usable here")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _case(parts, k, n, out_hw, act, bias, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = sum(p.channels for p in parts)
    w = (torch.randn(k, c, 1, 1, generator=g) / c**0.5).to(dtype)
    b = (torch.randn(k, generator=g) * 0.1).to(dtype) if bias else None
    args = []
    for i, p in enumerate(parts):
        if p.resize:
            hw = (max(1, out_hw[0] // (2 + i)), max(1, out_hw[1] // (2 + i)))
            args += [torch.randn(n, p.channels, *hw, generator=g).to(dtype).contiguous(
                memory_format=CL), list(out_hw)]  # fmt: skip
        else:
            args += [torch.randn(n, p.channels, *out_hw, generator=g).to(dtype), None]
    return ResizedConcatConv1x1(w, b, act, 0.1, parts), args


PARTS = {
    "segformer": [Part(40, True, "bilinear"), Part(40, True, "bilinear"), Part(40, False)],
    "all resized": [Part(33, True, "bilinear", True), Part(35, True, "nearest")],
    "two full": [Part(16, False), Part(48, True, "nearest-exact"), Part(9, False)],
    "scales": [Part(32, True, "bilinear", False, 2.0, 2.0), Part(8, False)],
}


@pytest.mark.parametrize("name", list(PARTS))
@pytest.mark.parametrize("act", ["none", "relu", "silu", "hardswish"])
@pytest.mark.parametrize(("n", "out_hw", "bias"), [(1, (16, 24), True), (2, (13, 7), False)])
def test_equals_the_conv_of_the_concat(name, act, n, out_hw, bias):
    parts = PARTS[name]
    if name == "scales":
        out_hw = (2 * (out_hw[0] // 2), 2 * (out_hw[1] // 2))
    conv, args = _case(parts, 21, n, out_hw, act, bias, seed=len(name) + n)
    if name == "scales":  # the source is exactly half, as the scale factor says
        args[0] = torch.randn(n, 32, out_hw[0] // 2, out_hw[1] // 2)
    y = conv(*args)
    ref = conv.reference(*args)
    assert y.shape == ref.shape == (n, 21, *out_hw)
    assert y.is_contiguous(memory_format=CL)
    assert _rel(y, ref) <= 1e-5


@pytest.mark.skipif(not ops._mkldnn_ok(torch.bfloat16), reason="no oneDNN bf16 convolutions")
def test_bf16_adds_the_upsampled_parts_in_fp32():
    conv, args = _case(PARTS["segformer"], 24, 1, (16, 16), "relu", True, torch.bfloat16)
    y = conv(*args)
    assert y.dtype == torch.bfloat16
    exact = ResizedConcatConv1x1(
        conv.weight.float(), conv.bias.float(), "relu", 0.1, conv.parts
    ).reference(*[a.float() if isinstance(a, torch.Tensor) else a for a in args])
    assert _rel(y, exact) <= 1e-2  # bf16: ~3 roundings of 2^-9
    assert _rel(conv.reference(*args), exact) <= 1e-2


def test_what_does_not_line_up_runs_the_reference():
    conv, args = _case(PARTS["segformer"], 8, 1, (12, 12), "relu", True)
    args[1] = [12, 13]  # an upsample to another size than the full-resolution part
    with pytest.raises(RuntimeError):  # the graph's own concat refuses it too
        conv(*args)
    conv, args = _case(PARTS["all resized"], 8, 1, (12, 12), "relu", True)
    args[3] = [10, 10]  # two upsamples to different sizes
    with pytest.raises(RuntimeError):
        conv(*args)
    conv, args = _case(PARTS["segformer"], 8, 2, (12, 12), "none", True)
    empty = [a[:0] if isinstance(a, torch.Tensor) else a for a in args]
    assert conv(*empty).shape == (0, 8, 12, 12)
    with pytest.raises(ValueError, match="expected 3 parts"):
        conv(*args[:4])


def test_rejects_what_it_does_not_compute():
    w = torch.randn(4, 10, 1, 1)
    with pytest.raises(ValueError, match="1×1"):
        ResizedConcatConv1x1(torch.randn(4, 10, 3, 3), None, "none", 0.0, [Part(10, True)])
    with pytest.raises(ValueError, match="add up"):
        ResizedConcatConv1x1(w, None, "none", 0.0, [Part(4, True), Part(4, False)])
    with pytest.raises(ValueError, match="no upsampled part"):
        ResizedConcatConv1x1(w, None, "none", 0.0, [Part(10, False)])


def test_worthwhile():
    assert resized_concat.worthwhile(256, 32 * 32, 128 * 128)
    assert resized_concat.worthwhile(32, 64 * 64, 128 * 128)  # exactly a quarter
    assert not resized_concat.worthwhile(31, 16 * 16, 128 * 128)  # narrow: the add costs more
    assert not resized_concat.worthwhile(256, 128 * 128, 128 * 128)  # not an upsample
    assert resized_concat.worthwhile(64, None, None)  # dynamic


class MLPHead(nn.Module):
    """SegFormer's head: four stages' token maps → Linear → [B, C, H, W] → bilinear to
    the first stage's size → concat → 1×1 conv + BN + ReLU → classifier. ``tap``: the
    second upsample is also read elsewhere (that part stays upsampled)."""

    def __init__(self, tap: bool = False) -> None:
        super().__init__()
        self.tap = tap
        chans = [16, 24, 32, 40]
        self.stages = nn.ModuleList()
        c_prev = 3
        for c in chans:
            self.stages.append(nn.Sequential(nn.Conv2d(c_prev, c, 3, 2, 1), nn.ReLU()))
            c_prev = c
        self.mlps = nn.ModuleList(nn.Linear(c, 48) for c in chans)
        self.fuse = nn.Sequential(nn.Conv2d(4 * 48, 48, 1, bias=False), nn.BatchNorm2d(48),
                                  nn.ReLU())  # fmt: skip
        self.cls = nn.Conv2d(48, 5, 1)

    def forward(self, x):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        size = feats[0].shape[2:]
        outs = []
        for f, mlp in zip(feats, self.mlps, strict=True):
            b, _, h, w = f.shape
            t = mlp(f.flatten(2).transpose(1, 2)).permute(0, 2, 1).reshape(b, -1, h, w)
            outs.append(F.interpolate(t, size=size, mode="bilinear", align_corners=False))
        y = self.cls(self.fuse(torch.cat(outs[::-1], 1)))
        if self.tap:
            y = y + outs[1].mean(1, keepdim=True)
        return y


@pytest.mark.parametrize("tap", [False, True])
def test_plan_takes_the_head_and_matches_eager(tap):
    torch.manual_seed(21)
    model = MLPHead(tap).eval()
    with torch.no_grad():
        model.fuse[1].running_mean.uniform_(-0.5, 0.5)
        model.fuse[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 96)
    eng = segfast.compile(model, x, backend="torch")
    assert eng._runner.details["lowered"][KIND] == 1
    report = segfast.check(eng, model, [x, torch.randn(2, 3, 64, 96)])
    assert report.passed, report
    assert max(a.rel_l2 for a in report.accuracy) <= 1e-5
    # dynamic sizes: odd ones, where the upsamples' scales are not whole
    dyn = segfast.compile(model, x[:1], backend="torch", dynamic=True)
    assert dyn._runner.details["lowered"][KIND] == 1
    for shape in [(1, 3, 64, 96), (1, 3, 50, 70), (1, 3, 33, 45)]:
        report = segfast.check(dyn, model, torch.randn(*shape))
        assert report.passed, (shape, report)
        assert max(a.rel_l2 for a in report.accuracy) <= 1e-5, shape


def test_plan_leaves_narrow_and_full_resolution_parts():
    """Parts under MIN_CHANNELS channels, and an upsample by less than 2× per side,
    stay as the graph has them (here: nothing to move, so the conv is a plain one)."""

    class Narrow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(3, 40, 3, 1, 1)
            self.fuse = nn.Conv2d(48, 4, 1)

        def forward(self, x):
            a = F.interpolate(self.a(x), scale_factor=2.0, mode="bilinear")  # 8 channels
            b = F.interpolate(self.b(x), size=(x.shape[2] + 2, x.shape[3] + 2), mode="bilinear")
            a = F.pad(a, (1, 1, 1, 1))
            return self.fuse(torch.cat([a, b], 1))

    torch.manual_seed(22)
    model = Narrow().eval()
    x = torch.randn(1, 3, 20, 30)
    eng = segfast.compile(model, x, backend="torch")
    assert KIND not in eng._runner.details["lowered"]
    assert segfast.check(eng, model, x).passed


class ASPPHead(nn.Module):
    """DeepLab v3+'s ASPP (smp's layout, small): branches and an image-pooling branch
    upsampled back, concatenated, projected by a 1×1 conv, then a separable conv. The
    projection is both a 1×1 conv of a concat with an upsampled part and the expand of an
    inverted-residual block (projection → depthwise → pointwise)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 2, 1), nn.ReLU())
        self.branches = nn.ModuleList([nn.Conv2d(64, 64, 1), nn.Conv2d(64, 64, 3, 1, 2, 2)])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(64, 64, 1), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(192, 128, 1, bias=False), nn.BatchNorm2d(128),
                                     nn.ReLU())  # fmt: skip
        self.sep = nn.Sequential(nn.Conv2d(128, 128, 3, 1, 1, groups=128, bias=False),
                                 nn.Conv2d(128, 32, 1), nn.ReLU())  # fmt: skip
        self.cls = nn.Conv2d(32, 3, 1)

    def forward(self, x):
        f = self.stem(x)
        p = F.interpolate(self.pool(f), size=f.shape[-2:], mode="bilinear", align_corners=False)
        y = self.project(torch.cat([b(f) for b in self.branches] + [p], 1))
        return self.cls(self.sep(y))


def test_a_conv_an_inverted_residual_block_took_is_left_to_it():
    """A dynamic DeepLab v3+ (smp, any encoder) did not build: its ASPP projection was
    claimed by both fusions, and the concat's inputs were dropped (KeyError at lowering)."""
    torch.manual_seed(23)
    model = ASPPHead().eval()
    with torch.no_grad():
        model.project[1].running_mean.uniform_(-0.5, 0.5)
        model.project[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 96, 128)
    for dynamic in (False, True):
        eng = segfast.compile(model, x, backend="torch", dynamic=dynamic)
        assert eng._runner.details["lowered"]["inverted residual block (segfast kernel)"] == 1
        for shape in [(1, 3, 96, 128), (1, 3, 70, 90)] if dynamic else [(1, 3, 96, 128)]:
            report = segfast.check(eng, model, torch.randn(*shape))
            assert report.passed, (dynamic, shape, report)
