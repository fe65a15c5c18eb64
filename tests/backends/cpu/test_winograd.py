"""Winograd F(4×4, 3×3) against the direct convolution in float64: odd sizes,
padding 0/1, channel counts off the 16-lane blocks, batches, bands, the
two-source prologue, residuals and activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segfast.backends.cpu import native, winograd
from segfast.backends.cpu.winograd import WinogradConv2d, reference, transform_weight
from segfast.compiler import ops

lib = native.load()
needs_lib = pytest.mark.skipif(lib is None, reason=f"CPU kernels: {native.status()[1]}")

# fp32 Winograd F(4,3) vs float64: measured 1–2e-6 relative (rel-L2) on random layers.
REL_L2 = 1e-5


def _rel_l2(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _wino(*args, **kwargs) -> WinogradConv2d:
    """The Winograd kernel on every map size (min_tiles=0: these tests check its
    arithmetic on maps smaller than it would be used for)."""
    return WinogradConv2d(*args, min_tiles=0, **kwargs)


def _layer(c: int, k: int, bias: bool = True):
    w = torch.randn(k, c, 3, 3) / (9 * c) ** 0.5
    return w, (torch.randn(k) if bias else None)


def test_reference_is_the_convolution():
    x = torch.randn(2, 5, 9, 11)
    w, b = _layer(5, 7)
    for pad in (0, 1):
        ref = F.conv2d(x.double(), w.double(), b.double(), padding=pad)
        assert torch.allclose(reference(x, w, b, (pad, pad)), ref, atol=1e-10)


def test_weight_transform_shape_and_errors():
    assert transform_weight(torch.randn(7, 5, 3, 3)).shape == (36, 5, 7)
    with pytest.raises(ValueError, match=r"\[K, C, 3, 3\]"):
        transform_weight(torch.randn(7, 5, 5, 5))


@needs_lib
@pytest.mark.parametrize(
    ("n", "c", "k", "h", "w", "pad"),
    [
        (1, 3, 5, 1, 1, 1),
        (1, 16, 16, 4, 4, 1),
        (2, 17, 33, 7, 9, 1),
        (3, 40, 24, 13, 5, 0),
        (1, 130, 70, 12, 19, 1),
        (1, 64, 64, 3, 3, 0),
    ],
)
def test_matches_direct_convolution(n, c, k, h, w, pad):
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    wt, b = _layer(c, k)
    conv = _wino(lib, wt, b, (pad, pad), "none", 0.0, False)
    y = conv(x)
    ref = F.conv2d(x.double(), wt.double(), b.double(), padding=pad)
    assert y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert _rel_l2(y, ref) <= REL_L2


@needs_lib
def test_bands(monkeypatch):
    """Images larger than one band run band by band; the result does not change."""
    x = torch.randn(2, 24, 37, 29).contiguous(memory_format=torch.channels_last)
    wt, b = _layer(24, 20)
    conv = _wino(lib, wt, b, (1, 1), "relu", 0.0, False)
    whole = conv(x)
    monkeypatch.setattr(winograd, "BAND_BYTES", 1)  # one tile row per band
    banded = conv(x)
    assert torch.equal(whole, banded)
    ref = F.conv2d(x.double(), wt.double(), b.double(), padding=1).relu()
    assert _rel_l2(banded, ref) <= REL_L2


@needs_lib
@pytest.mark.parametrize("act", ["none", "relu", "relu6", "leaky_relu", "silu", "sigmoid", "tanh"])
@pytest.mark.parametrize("res", [None, "before", "after"])
def test_epilogues(act, res):
    x = torch.randn(1, 20, 10, 7).contiguous(memory_format=torch.channels_last)
    wt, b = _layer(20, 18)
    r = None if res is None else torch.randn(1, 18, 10, 7)
    after = res == "after"
    conv = _wino(lib, wt, b, (1, 1), act, 0.1, after)
    y = F.conv2d(x.double(), wt.double(), b.double(), padding=1)
    if r is not None and not after:
        y = y + r.double()
    y = ops.activation(y, act, 0.1)
    if r is not None and after:
        y = y + r.double()
    assert _rel_l2(conv(x, r), y) <= REL_L2


@needs_lib
@pytest.mark.parametrize("x2_first", [False, True])
@pytest.mark.parametrize("resize", ["none", "bilinear", "nearest"])
def test_two_sources(x2_first, resize):
    """conv(cat([x, up(x2)])) without the concat: both sources written into V."""
    x = torch.randn(2, 12, 10, 14).contiguous(memory_format=torch.channels_last)
    x2 = torch.randn(2, 20, 5, 7) if resize != "none" else torch.randn(2, 20, 10, 14)
    wt, b = _layer(32, 16)
    conv = _wino(lib, wt, b, (1, 1), "relu", 0.0, False, resize, False, None, None, x2_first)
    joined = ops.join_sources(x, x2, resize, False, None, None, x2_first)
    ref = F.conv2d(joined.double(), wt.double(), b.double(), padding=1).relu()
    assert _rel_l2(conv(x, None, x2), ref) <= REL_L2


@needs_lib
def test_falls_back_where_it_does_not_apply():
    wt, b = _layer(6, 4)
    conv = _wino(lib, wt, b, (1, 1), "relu", 0.0, False)
    x = torch.randn(1, 6, 5, 5)
    r = torch.randn(1, 4, 1, 1)  # a broadcast residual: the composite implementation
    ref = (F.conv2d(x.double(), wt.double(), b.double(), padding=1) + r.double()).relu()
    assert _rel_l2(conv(x, r), ref) <= REL_L2
    with pytest.raises(ValueError, match="fp32 only"):
        WinogradConv2d(lib, wt.half(), None, (1, 1), "none", 0.0, False)


def test_applies_and_worthwhile():
    w = torch.randn(8, 8, 3, 3)
    assert winograd.applies(w, [1, 1], [1, 1], 1)
    assert not winograd.applies(w, [2, 2], [1, 1], 1)
    assert not winograd.applies(w, [1, 1], [2, 2], 1)
    assert not winograd.applies(torch.randn(8, 1, 3, 3), [1, 1], [1, 1], 8)
    assert not winograd.applies(w.bfloat16(), [1, 1], [1, 1], 1)
    assert winograd.worthwhile(128, 128, 64, 64)
    assert not winograd.worthwhile(32, 32, 256, 256)
    assert not winograd.worthwhile(256, 256, 4, 4)
    # AVX2 only: C·K/(C + K) ≥ 27 (a U-Net decoder's 152→64 and 64→64, not 96→32)
    assert winograd.worthwhile(152, 64, 64, 64, wide_vectors=False)
    assert winograd.worthwhile(64, 64, 64, 64, wide_vectors=False)
    assert not winograd.worthwhile(64, 64, 64, 64, wide_vectors=True)
    assert not winograd.worthwhile(96, 32, 128, 128, wide_vectors=False)
    assert not winograd.worthwhile(256, 256, 4, 4, wide_vectors=False)
    # under 16 output tiles a call waits on the transformed weights (MAnet's 1280→1280
    # at 8×8); more images in the call give the tiles back
    for wide in (True, False):
        assert not winograd.worthwhile(1280, 1280, 8, 8, wide_vectors=wide)
        assert not winograd.worthwhile(256, 256, 12, 12, wide_vectors=wide)
        assert winograd.worthwhile(256, 256, 16, 16, wide_vectors=wide)
        assert winograd.worthwhile(256, 256, 8, 8, wide_vectors=wide, n=4)
        assert winograd.worthwhile(256, 256, 4, 64, wide_vectors=wide)


@needs_lib
@pytest.mark.parametrize("two_sources", [False, True])
def test_small_maps_at_run_time_take_the_direct_conv(two_sources):
    """An engine with dynamic sizes can meet a map with fewer than MIN_TILES output
    tiles (the plan saw only the example): such a call runs oneDNN's direct conv, a
    larger one Winograd; both equal the convolution."""
    wt, b = _layer(24, 16)
    conv = WinogradConv2d(lib, wt, b, (1, 1), "relu", 0.0, False, "nearest" if two_sources
                          else "none", False, None, None, False)  # fmt: skip
    for hw, direct in (((8, 8), True), ((12, 12), True), ((16, 16), False), ((8, 64), False)):
        conv._direct_convs.clear()
        x = torch.randn(1, 24 - 8 * two_sources, *hw).contiguous(memory_format=torch.channels_last)
        x2 = torch.randn(1, 8, hw[0] // 2, hw[1] // 2) if two_sources else None
        joined = x if x2 is None else ops.join_sources(x, x2, "nearest", False, None, None, False)
        ref = F.conv2d(joined.double(), wt.double(), b.double(), padding=1).relu()
        assert _rel_l2(conv(x, None, x2), ref) <= REL_L2
        assert bool(conv._direct_convs) == direct, hw
