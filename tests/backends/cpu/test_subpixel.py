"""3×3 convs of a ×2 nearest upsample computed at the source resolution
(segfast.backends.cpu.subpixel): the conv's numbers over odd shapes, every fallback,
and the plan taking it for smp-style U-Net decoder blocks (fired, equal to eager)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segfast
from segfast.backends.cpu import native, subpixel
from segfast.compiler import ops
from segfast.testing import randomised_bn

KIND = "conv2d 3×3 of a ×2 nearest upsample, at the source resolution (segfast kernel)"

pytestmark = pytest.mark.skipif(native.load() is None, reason="segfast's CPU kernels not built")
needs_onednn_bf16 = pytest.mark.skipif(
    not ops._mkldnn_ok(torch.bfloat16), reason="oneDNN has no bf16 convolutions on this CPU"
)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _ref(skip, low, w, b, act, first=True, residual=None, mode="nearest"):
    """The conv of the joined, upsampled input, as the graph means it."""
    if skip is None:
        up = ops.resize_like_aten(low, [2 * low.shape[2], 2 * low.shape[3]], mode, False, 2.0, 2.0)
        return ops.conv2d_impl(up, w, b, [1, 1], [1, 1], [1, 1], 1, act, 0.1, residual, False,
                               None, "none", False, None, None, False)  # fmt: skip
    return ops.conv2d_impl(skip, w, b, [1, 1], [1, 1], [1, 1], 1, act, 0.1, residual, False,
                           low, mode, False, 2.0, 2.0, first)  # fmt: skip


def test_phase_weights_are_the_upsampled_conv():
    """Each phase's 2×2 kernel on the source equals the 3×3 kernel on the upsample."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(1, 2, 5, 6, generator=g, dtype=torch.float64)
    full = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, padding=1)
    z = F.conv2d(x, subpixel.phase_weights(w), padding=1)  # [1, 12, 6, 7]
    for a in (0, 1):
        for b in (0, 1):
            p = 2 * a + b
            torch.testing.assert_close(
                full[:, :, a::2, b::2], z[:, 3 * p : 3 * p + 3, a : a + 5, b : b + 6]
            )


@pytest.mark.parametrize(
    ("n", "cu", "cs", "k", "h", "w", "first"),
    [(1, 3, 0, 1, 1, 1, True), (2, 5, 3, 7, 4, 9, True), (2, 5, 3, 7, 4, 9, False),
     (1, 17, 0, 13, 6, 5, True), (3, 8, 16, 24, 3, 7, False), (1, 32, 9, 33, 5, 11, True),
     (1, 1, 1, 2, 2, 2, False)],
)  # fmt: skip
@pytest.mark.parametrize("act", ["none", "relu", "relu6", "leaky_relu", "hardswish", "silu"])
def test_conv_of_the_upsample_at_the_source(n, cu, cs, k, h, w, first, act):
    g = torch.Generator().manual_seed(n * 1000 + cu * 10 + k)
    low = _nhwc(torch.randn(n, cu, h, w, generator=g))
    skip = _nhwc(torch.randn(n, cs, 2 * h, 2 * w, generator=g)) if cs else None
    wt = torch.randn(k, cu + cs, 3, 3, generator=g) * 0.3
    b = torch.randn(k, generator=g)
    conv = subpixel.NearestUpConv3x3(native.load(), wt, b, act, 0.1, cu, first, "nearest",
                                     (2.0, 2.0))  # fmt: skip
    out = conv(skip, None, low)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, _ref(skip, low, wt, b, act, first), rtol=1e-5, atol=1e-5)


@needs_onednn_bf16
@pytest.mark.parametrize(
    ("n", "cu", "cs", "k", "h", "w", "first"),
    [(1, 3, 0, 1, 1, 1, True), (2, 5, 3, 7, 4, 9, False), (1, 17, 0, 13, 6, 5, True),
     (3, 8, 16, 24, 3, 7, False), (1, 64, 24, 33, 16, 16, True)],
)  # fmt: skip
@pytest.mark.parametrize("act", ["none", "relu", "silu", "hardswish"])
def test_bf16_conv_of_the_upsample_at_the_source(n, cu, cs, k, h, w, first, act):
    """bf16 (a bf16 engine's decoder): oneDNN's phase and skip convs in bf16, summed in
    fp32 and rounded once by sf_subpixel2. Against the fp32 conv of the same bf16
    operands: three roundings (the phase weights, the phase outputs, the result) — a
    rel-L2 of ~2.7e-3 measured where oneDNN's bf16 conv of the upsample has ~1.7e-3; a
    wrong phase or channel would be O(1)."""
    g = torch.Generator().manual_seed(n * 1000 + cu * 10 + k)
    low = _nhwc(torch.randn(n, cu, h, w, generator=g)).bfloat16()
    skip = _nhwc(torch.randn(n, cs, 2 * h, 2 * w, generator=g)).bfloat16() if cs else None
    wt = (torch.randn(k, cu + cs, 3, 3, generator=g) * 0.3).bfloat16()
    b = torch.randn(k, generator=g).bfloat16()
    conv = subpixel.NearestUpConv3x3(native.load(), wt, b, act, 0.1, cu, first, "nearest",
                                     (2.0, 2.0))  # fmt: skip
    out = conv(skip, None, low)
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = _ref(None if skip is None else skip.float(), low.float(), wt.float(), b.float(), act,
               first)  # fmt: skip
    assert float((out.float() - ref).norm() / ref.norm()) <= 4e-3


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
def test_nchw_sources_no_bias_and_nearest_exact(mode):
    g = torch.Generator().manual_seed(3)
    low = torch.randn(2, 6, 5, 7, generator=g)  # NCHW: oneDNN takes it, the result is NHWC
    skip = torch.randn(2, 4, 10, 14, generator=g)
    wt = torch.randn(9, 10, 3, 3, generator=g) * 0.3
    conv = subpixel.NearestUpConv3x3(native.load(), wt, None, "relu", 0.0, 6, True, mode,
                                     (None, None), up_size=(2, 6, 5, 7), skip_size=(2, 4, 10, 14))  # fmt: skip
    torch.testing.assert_close(conv(skip, None, low), _ref(skip, low, wt, None, "relu", mode=mode),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_what_it_cannot_take_runs_the_upsampled_conv():
    g = torch.Generator().manual_seed(5)
    lib = native.load()
    wt = torch.randn(8, 12, 3, 3, generator=g) * 0.3
    b = torch.randn(8, generator=g)
    two = subpixel.NearestUpConv3x3(lib, wt, b, "relu", 0.0, 8, True, "nearest", (None, None))
    low = _nhwc(torch.randn(1, 8, 5, 6, generator=g))
    two(_nhwc(torch.randn(1, 4, 10, 12, generator=g)), None, low)
    assert two._fallback_conv is None  # the calls it takes never pack the upsampled conv
    # the skip is not ×2 of the source (an odd size upsampled to the skip's): the
    # graph's own resize to that size, then the conv
    skip = _nhwc(torch.randn(1, 4, 11, 12, generator=g))
    want = ops.conv2d_impl(skip, wt, b, [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, None, False,
                           low, "nearest", False, None, None, True)  # fmt: skip
    torch.testing.assert_close(two(skip, None, low), want, rtol=1e-5, atol=1e-5)
    assert two._fallback_conv is not None  # packed on first use
    # a residual
    skip = _nhwc(torch.randn(1, 4, 10, 12, generator=g))
    r = torch.randn(1, 8, 10, 12, generator=g)
    torch.testing.assert_close(two(skip, r, low), _ref(skip, low, wt, b, "relu", residual=r),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    # empty maps
    assert two(skip[:0], None, low[:0]).shape == (0, 8, 10, 12)
    # the wrong sources are an error, not a guess
    with pytest.raises(ValueError, match="sources it was not built for"):
        two(None, None, low)
    one = subpixel.NearestUpConv3x3(lib, wt[:, :8], b, "relu", 0.0, 8, True, "nearest", (2.0, 2.0))
    with pytest.raises(ValueError, match="sources it was not built for"):
        one(skip, None, low)
    torch.testing.assert_close(one(None, None, low), _ref(None, low, wt[:, :8], b, "relu"),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_applies_only_to_what_it_computes():
    w = torch.randn(4, 4, 3, 3)
    args = ([1, 1], [1, 1], [1, 1], 1, "nearest", (2.0, 2.0), "relu")
    assert subpixel.applies(w, *args)
    assert subpixel.applies(w.bfloat16(), *args)
    assert not subpixel.applies(w.half(), *args)
    assert not subpixel.applies(torch.randn(4, 4, 5, 5), *args)
    assert not subpixel.applies(w, [2, 2], *args[1:])
    assert not subpixel.applies(w, [1, 1], [0, 0], *args[2:])
    assert not subpixel.applies(w, [1, 1], [1, 1], [2, 2], *args[3:])
    assert not subpixel.applies(torch.randn(4, 2, 3, 3), [1, 1], [1, 1], [1, 1], 2, *args[4:])
    assert not subpixel.applies(w, *args[:4], "bilinear", (2.0, 2.0), "relu")
    assert not subpixel.applies(w, *args[:4], "nearest", (4.0, 4.0), "relu")
    assert not subpixel.applies(w, *args[:4], "nearest", (2.0, 2.0), "gelu")
    with pytest.raises(ValueError, match="3×3"):
        subpixel.phase_weights(torch.randn(4, 4, 1, 1))
    with pytest.raises(ValueError, match="up_channels"):
        subpixel.NearestUpConv3x3(native.load(), w, None, "relu", 0.0, 0, True, "nearest",
                                  (2.0, 2.0))  # fmt: skip


def test_preferred_over_winograd_only_where_measured():
    assert subpixel.preferred(512, 256, 256, winograd=False)  # beats the direct conv
    assert not subpixel.preferred(3, 0, 16, winograd=False)  # an RGB-wide source: no gain
    assert subpixel.preferred(64, 0, 64, winograd=True)
    assert subpixel.preferred(128, 0, 128, winograd=True)
    assert not subpixel.preferred(256, 0, 256, winograd=True)  # wide: Winograd
    assert not subpixel.preferred(128, 64, 64, winograd=True)  # a large skip share
    assert subpixel.preferred(128, 0, 128, winograd=True, source_pixels=32 * 32)
    assert not subpixel.preferred(128, 0, 128, winograd=True, source_pixels=16 * 16)  # in cache
    assert subpixel.preferred(16, 0, 16, winograd=False, source_pixels=8 * 8)  # vs direct: always


def _block(c, o):
    return nn.Sequential(nn.Conv2d(c, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class TinyUnetDecoder(nn.Module):
    """segmentation_models_pytorch's U-Net decoder: upsample ×2 (nearest), join the
    skip, conv3×3-BN-ReLU twice; the last block without a skip. ``size_from_skip``:
    upsample to the skip's size (what code that must take odd sizes does)."""

    def __init__(self, skip_first: bool = False, size_from_skip: bool = False) -> None:
        super().__init__()
        self.skip_first, self.size_from_skip = skip_first, size_from_skip
        self.e1, self.e2, self.e3 = _block(3, 8), _block(8, 16), _block(16, 24)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.d1, self.d1b = _block(24 + 16, 16), _block(16, 16)
        self.d2 = _block(16 + 8, 12)
        self.d3 = _block(12, 5)
        self.head = nn.Conv2d(5, 3, 1)

    def _up(self, x, skip):
        if self.size_from_skip:
            return F.interpolate(x, size=skip.shape[-2:], mode="nearest")
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    def _join(self, x, skip):
        up = self._up(x, skip)
        return torch.cat([skip, up] if self.skip_first else [up, skip], 1)

    def forward(self, x):
        e1 = self.pool(self.e1(x))
        e2 = self.pool(self.e2(e1))
        e3 = self.pool(self.e3(e2))
        d = self.d1b(self.d1(self._join(e3, e2)))
        d = self.d2(self._join(d, e1))
        d = self.d3(F.interpolate(d, scale_factor=2.0, mode="nearest"))
        return self.head(d)


@pytest.mark.parametrize("skip_first", [False, True])
def test_plan_takes_the_decoder_convs_and_matches_eager(skip_first):
    torch.manual_seed(11)
    model = randomised_bn(TinyUnetDecoder(skip_first))
    x = torch.randn(2, 3, 40, 56)
    eng = segfast.compile(model, x, backend="torch")
    lowered = eng._runner.details["lowered"]
    assert lowered[KIND + " two-source"] == 2  # both joins
    assert lowered[KIND] == 1  # the last block's upsample, absorbed
    report = segfast.check(eng, model, [x, torch.randn(2, 3, 40, 56)])
    assert report.passed, report
    assert max(a.rel_l2 for a in report.accuracy) <= 1e-5
    off = segfast.compile(model, x, backend="torch", options={"subpixel": False})
    assert not any(k.startswith(KIND) for k in off._runner.details["lowered"])
    torch.testing.assert_close(eng(x), off(x), rtol=1e-4, atol=1e-5)


@needs_onednn_bf16
def test_bf16_plan_takes_the_decoder_convs():
    """A bf16 engine: every decoder conv of an upsample takes it (no Winograd in
    bf16 to prefer), the result within bf16's tolerance of eager and close to the same
    engine without it."""
    torch.manual_seed(11)
    model = randomised_bn(TinyUnetDecoder())
    x = torch.randn(2, 3, 40, 56)
    eng = segfast.compile(model, x, backend="torch", precision="bf16")
    lowered = eng._runner.details["lowered"]
    assert lowered[KIND + " two-source"] == 2
    assert lowered[KIND] == 1
    report = segfast.check(eng, model, [x, torch.randn(2, 3, 40, 56)])
    assert report.passed, report
    off = segfast.compile(model, x, backend="torch", precision="bf16",
                          options={"subpixel": False})  # fmt: skip
    assert not any(k.startswith(KIND) for k in off._runner.details["lowered"])
    with torch.inference_mode():
        ref = model(x)
    for e in (eng, off):
        y = e(x).float()
        assert float((y - ref).norm() / ref.norm()) <= 5e-3  # measured 2.3e-3 both
    # dynamic sizes: where a join is not ×2 the upsampled bf16 conv runs
    model = randomised_bn(TinyUnetDecoder(size_from_skip=True))
    eng = segfast.compile(model, torch.randn(1, 3, 64, 64), backend="torch", precision="bf16",
                          dynamic=True)  # fmt: skip
    assert eng._runner.details["lowered"][KIND + " two-source"] == 2
    for shape in [(1, 3, 64, 64), (1, 3, 50, 70)]:
        report = segfast.check(eng, model, torch.randn(*shape))
        assert report.passed, (shape, report)


def test_plan_with_dynamic_sizes_falls_back_where_the_skip_is_not_twice():
    """Upsampled to the skip's size: at 64×64 every skip is ×2, at 50×70 the 7×9 →
    13×18 join is not (the fallback runs the graph's own resize)."""
    torch.manual_seed(12)
    model = randomised_bn(TinyUnetDecoder(size_from_skip=True))
    eng = segfast.compile(model, torch.randn(1, 3, 64, 64), backend="torch", dynamic=True)
    assert eng._runner.details["lowered"][KIND + " two-source"] == 2
    for shape in [(1, 3, 64, 64), (1, 3, 50, 70), (1, 3, 32, 48)]:
        report = segfast.check(eng, model, torch.randn(*shape))
        assert report.passed, (shape, report)
        assert max(a.rel_l2 for a in report.accuracy) <= 1e-5, shape


class UpToFewClasses(nn.Module):
    """An upsample into a 3×3 conv with one output (a binary head at full resolution)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _block(3, 16)
        self.head = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, x):
        return self.head(F.interpolate(self.body(x), scale_factor=2.0, mode="nearest"))


def test_plan_leaves_few_output_convs_on_their_kernel():
    torch.manual_seed(13)
    model = randomised_bn(UpToFewClasses())
    x = torch.randn(1, 3, 24, 40)
    eng = segfast.compile(model, x, backend="torch")
    lowered = eng._runner.details["lowered"]
    if native.load().avx2:  # sf_conv_few takes it (AVX2 + FMA)
        assert lowered["conv2d with 1–4 output channels (segfast kernel)"] == 1
        assert KIND not in lowered
    else:
        assert lowered[KIND] == 1
    report = segfast.check(eng, model, x)
    assert report.passed, report
