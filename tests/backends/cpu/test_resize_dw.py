"""Depthwise convolution of a bilinear upsample, fused: against PyTorch's
upsample followed by the depthwise conv, over sizes, scales and alignments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segfast.backends.cpu import native, resize_dw
from segfast.backends.cpu.resize_dw import ResizeDepthwiseConv2d, source_scale
from segfast.compiler import ops
from segfast.testing import assert_low_precision_close

needs_onednn_bf16 = pytest.mark.skipif(
    not ops._mkldnn_ok(torch.bfloat16),
    reason="oneDNN has no bf16 convolutions on this CPU (needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)",
)

lib = native.load()
pytestmark = pytest.mark.skipif(lib is None, reason=f"CPU kernels: {native.status()[1]}")


def _reference(x, size, align, scales, w, b, stride, pad, dil, act):
    up = ops.resize_like_aten(x, size, "bilinear", align, *scales)
    y = F.conv2d(up.double(), w.double(), None if b is None else b.double(), stride, pad, dil,
                 w.shape[0])  # fmt: skip
    return ops.activation(y, act, 0.1)


@pytest.mark.parametrize(
    ("c", "src", "size", "align", "scales"),
    [
        (16, (8, 8), (32, 32), False, (None, None)),
        (70, (5, 7), (13, 29), False, (None, None)),
        (3, (6, 6), (6, 6), False, (None, None)),  # equal size: a copy
        (33, (4, 9), (11, 9), True, (None, None)),
        (20, (5, 5), (10, 10), False, (2.0, 2.0)),  # scale_factor given
        (129, (7, 3), (15, 7), False, (2.2, 2.5)),  # non-integral scales
        (8, (1, 1), (9, 12), False, (None, None)),  # from a 1×1 map
    ],
)
@pytest.mark.parametrize(("stride", "pad", "dil"), [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_matches_upsample_then_depthwise(c, src, size, align, scales, stride, pad, dil):
    x = torch.randn(2, c, *src).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(c, 1, 3, 3), torch.randn(c)
    conv = ResizeDepthwiseConv2d(lib, w, b, [stride] * 2, [pad] * 2, [dil] * 2, "relu6", 0.1,
                                 align, scales)  # fmt: skip
    y = conv(x, size)
    ref = _reference(x, size, align, scales, w, b, [stride] * 2, [pad] * 2, [dil] * 2, "relu6")
    assert y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert (y.double() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_bands(monkeypatch):
    """Tiny scratch (one row per band): same result."""
    x = torch.randn(1, 40, 9, 11).contiguous(memory_format=torch.channels_last)
    w = torch.randn(40, 1, 3, 3)
    conv = ResizeDepthwiseConv2d(lib, w, None, [1, 1], [1, 1], [1, 1], "none", 0.0, False,
                                 (None, None))  # fmt: skip
    whole = conv(x, (36, 44))
    monkeypatch.setattr(resize_dw, "SCRATCH_BYTES", 1)
    assert torch.equal(conv(x, (36, 44)), whole)


def test_source_scale_is_atens():
    assert source_scale(32, 128, False, None) == 0.25
    assert source_scale(5, 13, True, None) == pytest.approx(4 / 12)
    assert source_scale(5, 1, True, None) == 0.0
    assert source_scale(5, 11, False, 2.2) == pytest.approx(1 / 2.2)


def test_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="depthwise weight"):
        ResizeDepthwiseConv2d(lib, torch.randn(4, 2, 3, 3), None, [1, 1], [1, 1], [1, 1],
                              "none", 0.0, False, (None, None))  # fmt: skip
    with pytest.raises(ValueError, match="activation"):
        ResizeDepthwiseConv2d(lib, torch.randn(4, 1, 3, 3), None, [1, 1], [1, 1], [1, 1],
                              "gelu", 0.0, False, (None, None))  # fmt: skip


@pytest.mark.parametrize("with_b", [False, True])
@pytest.mark.parametrize("dw_bias", [False, True])
@pytest.mark.parametrize(("k", "a_first"), [(70, True), (16, False)])
@pytest.mark.parametrize(
    ("size", "ks", "pad", "dil"), [((20, 24), 3, 1, 1), ((21, 25), 3, 1, 1), ((19, 23), 5, 4, 2)]
)
def test_upsample_separable_mixes_at_the_source(with_b, dw_bias, k, a_first, size, ks, pad, dil):
    """act(pw(cat([dw(up(a)), b])) + bias) with the pointwise mixing done per tap
    at the source resolution, against the plain chain in float64."""
    c, cb = 24, 10
    a = torch.randn(2, c, 5, 6).contiguous(memory_format=torch.channels_last)
    b = torch.randn(2, cb, *size).contiguous(memory_format=torch.channels_last) if with_b else None
    wd = torch.randn(c, 1, ks, ks) / ks
    bd = torch.randn(c) if dw_bias else None
    cin = c + (cb if with_b else 0)
    wp, bp = torch.randn(k, cin, 1, 1) / cin**0.5, torch.randn(k)
    cols = slice(0, c) if a_first or not with_b else slice(cb, cb + c)
    conv = resize_dw.UpsampleSeparableConv2d(lib, wd, bd, [pad, pad], [dil, dil], wp, bp, cols,
                                             "relu", 0.0, False, (None, None))  # fmt: skip
    y = conv(a, size, b)
    up = ops.resize_like_aten(a.double(), size, "bilinear", False, None, None)
    d = F.conv2d(up, wd.double(), None if bd is None else bd.double(), 1, pad, dil, c)
    if with_b:
        d = torch.cat([d, b.double()] if a_first else [b.double(), d], 1)
    ref = F.conv2d(d, wp.double(), bp.double()).relu()
    assert y.shape == ref.shape
    assert ((y.double() - ref).norm() / ref.norm()).item() <= 1e-5


def test_upsample_separable_refuses_other_inputs():
    conv = resize_dw.UpsampleSeparableConv2d(
        lib, torch.randn(8, 1, 3, 3), None, [1, 1], [1, 1], torch.randn(4, 8, 1, 1), None,
        slice(0, 8), "none", 0.0, False, (None, None),
    )  # fmt: skip
    with pytest.raises(ValueError, match="not built for"):
        conv(torch.randn(1, 8, 3, 3), (6, 6), torch.randn(1, 2, 6, 6))


@needs_onednn_bf16
def test_upsample_separable_bf16_against_float64():
    """bf16 in and out (W_t·a rounded to bf16, the tap sums in fp32), K = 70: whole
    64-channel blocks and a partial one."""
    torch.manual_seed(3)
    c, cb, k, size = 24, 10, 70, (21, 25)
    a = torch.randn(1, c, 6, 7).contiguous(memory_format=torch.channels_last)
    b = torch.randn(1, cb, *size).contiguous(memory_format=torch.channels_last)
    wd, wp, bp = torch.randn(c, 1, 3, 3) / 3, torch.randn(k, c + cb, 1, 1) / 6, torch.randn(k)
    conv = resize_dw.UpsampleSeparableConv2d(
        lib, wd.bfloat16(), None, [1, 1], [1, 1], wp.bfloat16(), bp.bfloat16(), slice(0, c),
        "relu6", 0.0, False, (None, None),
    )  # fmt: skip
    y = conv(a.bfloat16(), size, b.bfloat16())
    assert y.dtype == torch.bfloat16
    up = ops.resize_like_aten(a.double(), size, "bilinear", False, None, None)
    d = torch.cat([F.conv2d(up, wd.double(), None, 1, 1, 1, c), b.double()], 1)
    ref = F.conv2d(d, wp.double(), bp.double()).clamp(0, 6)
    # against PyTorch's own bf16 chain (upsample, depthwise, pointwise in bf16)
    ub = F.interpolate(a.bfloat16(), size=size, mode="bilinear", align_corners=False)
    db = torch.cat([F.conv2d(ub, wd.bfloat16(), None, 1, 1, 1, c), b.bfloat16()], 1)
    yb = F.conv2d(db, wp.bfloat16(), bp.bfloat16()).clamp(0, 6)
    assert_low_precision_close(y, ref, yb, factor=1.5)
