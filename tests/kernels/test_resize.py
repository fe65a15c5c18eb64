"""segfast.kernels.resize against ATen's upsample ops and F.interpolate.

Bilinear, nearest and nearest-exact disagree between exporters all the time, so
every mode is checked on up- and down-sampling, integer and non-integer ratios,
degenerate sizes (5→1, 1→5), scale_factor-derived scales that differ from in/o,
both align_corners, every layout, fp32 and fp16, and a property test over random
sizes. Nearest modes copy values, so they must be bitwise equal; bilinear is an
fp32 blend, held to 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segfast.kernels.resize import _aten_steps, resize, resize_reference
from segfast.testing import assert_close, assert_low_precision_close, poison

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # dev dependency; the property test is skipped without it
    given = None

MODES = [("bilinear", False), ("bilinear", True), ("nearest", False), ("nearest-exact", False)]
MODE_IDS = ["bilinear", "bilinear-ac", "nearest", "nearest-exact"]
# (H, W) -> (Ho, Wo): non-integer up, down, exact 2×, one dimension unchanged, to/from 1
SIZES = [
    ((7, 9), (16, 20)),
    ((33, 47), (8, 11)),
    ((7, 9), (14, 18)),
    ((7, 9), (7, 20)),
    ((5, 1), (1, 5)),
    ((4, 6), (3, 3)),
]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same logical tensor in another memory layout."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    # non-contiguous: every other channel of a wider tensor, W transposed into H's place
    n, c, h, w = x.shape
    big = torch.zeros(n, 2 * c, w, h, dtype=x.dtype).transpose(2, 3)
    view = big[:, ::2]
    view.copy_(x)
    assert not view.is_contiguous()
    assert not view.is_contiguous(memory_format=torch.channels_last)
    return view


def _check(out: torch.Tensor, ref: torch.Tensor, mode: str) -> None:
    if mode == "bilinear":
        assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(out, ref), (out - ref).abs().max()


@pytest.mark.parametrize(("mode", "align_corners"), MODES, ids=MODE_IDS)
@pytest.mark.parametrize(("in_hw", "out_hw"), SIZES, ids=[f"{a}->{b}" for a, b in SIZES])
def test_sizes_fp32(mode, align_corners, in_hw, out_hw):
    x = torch.randn(2, 3, *in_hw)
    out = poison(torch.empty(2, 3, *out_hw, memory_format=torch.channels_last))
    y = resize(x, out_hw, mode, align_corners, out=out)
    assert y is out
    ref = resize_reference(x, out_hw, mode, align_corners)
    _check(y, ref, mode)
    # the reference is F.interpolate with a size
    kw = {"align_corners": align_corners} if mode == "bilinear" else {}
    assert torch.equal(ref, F.interpolate(x, size=out_hw, mode=mode, **kw))


@pytest.mark.parametrize(("mode", "align_corners"), MODES, ids=MODE_IDS)
@pytest.mark.parametrize(
    "scale_factor",
    [1.7, (0.45, 2.3), 0.33, 1.1, 2.05],
    ids=["1.7", "0.45x2.3", "0.33", "1.1-same-size", "2.05-2x-size"],
)
def test_scale_factor_matches_interpolate(mode, align_corners, scale_factor):
    """A graph that used scale_factor passes it as ATen's scales: the source step
    is 1/scale, not in/o (1.1 and 2.05 hit ATen's same-size and 2× shortcuts)."""
    x = torch.randn(1, 4, 7, 9)
    kw = {"align_corners": align_corners} if mode == "bilinear" else {}
    ref = F.interpolate(x, scale_factor=scale_factor, mode=mode, **kw)
    sf = scale_factor if isinstance(scale_factor, tuple) else (scale_factor, scale_factor)
    out = poison(torch.empty_like(ref, memory_format=torch.channels_last))
    y = resize(x, tuple(ref.shape[-2:]), mode, align_corners, scales=sf, out=out)
    _check(y, ref, mode)


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "nearest-exact"])
def test_scales_change_the_result(mode):
    """Not vacuous: on 7×9 with scale_factor 1.7, in/o and 1/1.7 give different pixels."""
    x = torch.randn(1, 2, 7, 9)
    ref = F.interpolate(x, scale_factor=1.7, mode=mode)
    without = resize(x, tuple(ref.shape[-2:]), mode)
    assert not torch.allclose(without, ref)
    # and recompute_scale_factor=True is exactly the no-scales case
    recomputed = F.interpolate(x, scale_factor=1.7, mode=mode, recompute_scale_factor=True)
    _check(without, recomputed, mode)


@pytest.mark.parametrize(("mode", "align_corners"), MODES, ids=MODE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
def test_layouts(mode, align_corners, layout):
    x = torch.randn(2, 5, 7, 9)
    xl = _layout(x, layout)
    y = resize(xl, (11, 6), mode, align_corners)  # default allocation
    assert y.is_contiguous(memory_format=torch.channels_last)
    _check(y, resize_reference(x, (11, 6), mode, align_corners), mode)


@pytest.mark.parametrize(("mode", "align_corners"), MODES, ids=MODE_IDS)
def test_out_channel_slice(mode, align_corners):
    """A producer writing into its channel slice of a channels_last concat buffer."""
    x = torch.randn(2, 3, 7, 9)
    buf = poison(torch.empty(2, 8, 16, 20, memory_format=torch.channels_last))
    before = buf.clone()
    y = resize(x, (16, 20), mode, align_corners, out=buf[:, 2:5])
    _check(y, resize_reference(x, (16, 20), mode, align_corners), mode)
    _check(buf[:, 2:5], resize_reference(x, (16, 20), mode, align_corners), mode)
    rest = torch.cat([buf[:, :2], buf[:, 5:]], 1)
    assert torch.equal(rest.isnan(), torch.cat([before[:, :2], before[:, 5:]], 1).isnan())


@pytest.mark.parametrize(("mode", "align_corners"), MODES, ids=MODE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
def test_residual(mode, align_corners, layout):
    """resize(x) + r in one pass (the Triton backend's add(resize(x), r)): x and the
    residual in any layout, odd channel counts, up- and down-sampling."""
    for n, c, in_hw, out_hw in ((2, 5, (7, 9), (16, 20)), (1, 3, (33, 47), (8, 11))):
        x = torch.randn(n, c, *in_hw)
        r = torch.randn(n, c, *out_hw)
        y = resize(_layout(x, layout), out_hw, mode, align_corners, residual=_layout(r, layout))
        _check(y, resize_reference(x, out_hw, mode, align_corners) + r, mode)
        _check(y, resize_reference(x, out_hw, mode, align_corners, residual=r), mode)


def test_residual_into_a_slice_and_not_in_place():
    """A sum can land in a channel slice of a concat buffer; a residual sharing the
    output's memory is refused (a GPU autotuner would add it once per timed run)."""
    x = torch.randn(1, 3, 7, 9)
    acc = torch.randn(1, 3, 16, 20).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="share memory"):
        resize(x, (16, 20), out=acc, residual=acc)
    big = torch.randn(1, 6, 16, 20).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="share memory"):
        resize(x, (16, 20), out=big[:, :3], residual=big[:, 3:])
    buf = poison(torch.empty(1, 8, 16, 20, memory_format=torch.channels_last))
    r = torch.randn(1, 3, 16, 20)
    resize(x, (16, 20), "nearest", out=buf[:, 4:7], residual=r)
    assert torch.equal(buf[:, 4:7], resize_reference(x, (16, 20), "nearest") + r)
    assert buf[:, :4].isnan().all()
    assert buf[:, 7:].isnan().all()


def test_residual_fp16_rounds_once():
    """Blend and sum in fp32, one rounding: as close to the fp32 result as fp16 allows,
    and no further than ATen's two fp16 ops (upsample, then add)."""
    x = torch.randn(2, 5, 7, 9).half().contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 5, 16, 20).half()
    y = resize(x, (16, 20), residual=r)
    assert y.dtype == torch.half
    ref32 = resize_reference(x.float(), (16, 20)) + r.float()
    assert_low_precision_close(y, ref32, resize_reference(x, (16, 20)) + r)


@pytest.mark.parametrize(("mode", "align_corners"), MODES, ids=MODE_IDS)
@pytest.mark.parametrize(("in_hw", "out_hw"), [((7, 9), (16, 20)), ((33, 47), (8, 11))])
def test_fp16(mode, align_corners, in_hw, out_hw):
    x = torch.randn(2, 5, *in_hw).half().contiguous(memory_format=torch.channels_last)
    out = poison(torch.empty(2, 5, *out_hw, dtype=torch.half, memory_format=torch.channels_last))
    y = resize(x, out_hw, mode, align_corners, out=out)
    if mode != "bilinear":  # a copy: exact
        assert torch.equal(y, resize_reference(x, out_hw, mode))
        return
    ref32 = resize_reference(x.float(), out_hw, mode, align_corners)
    lowp = resize_reference(x, out_hw, mode, align_corners)
    assert_low_precision_close(y, ref32, lowp)


def test_fp16_in_fp32_out():
    """out_dtype=float32 keeps the fp32 blend: as exact as the fp32 op on the same values."""
    x = torch.randn(1, 4, 7, 9).half()
    y = resize(x, (16, 20), out_dtype=torch.float32)
    assert y.dtype == torch.float32
    assert_close(y, resize_reference(x.float(), (16, 20)), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize(("mode", "align_corners"), MODES, ids=MODE_IDS)
def test_bf16(mode, align_corners):
    x = torch.randn(2, 24, 33, 47, device="cuda").bfloat16()
    x = x.contiguous(memory_format=torch.channels_last)
    y = resize(x, (70, 90), mode, align_corners)
    if mode != "bilinear":
        assert torch.equal(y, resize_reference(x, (70, 90), mode))
        return
    ref32 = resize_reference(x.float(), (70, 90), mode, align_corners)
    assert_low_precision_close(y, ref32, resize_reference(x, (70, 90), mode, align_corners))


@pytest.mark.gpu
@pytest.mark.parametrize(("mode", "align_corners"), MODES, ids=MODE_IDS)
@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((1, 21, 128, 256), (512, 1024)),
        ((1, 256, 64, 64), (128, 128)),
        ((2, 19, 97, 129), (33, 65)),
    ],
)
def test_realistic_gpu(mode, align_corners, shape, size):
    """DeepLab/FCN logit upsampling and decoder ×2 on the GPU, against ATen on CUDA."""
    x = torch.randn(*shape, device="cuda").half().contiguous(memory_format=torch.channels_last)
    y = resize(x, size, mode, align_corners)
    if mode != "bilinear":
        assert torch.equal(y, resize_reference(x, size, mode))
        return
    ref32 = resize_reference(x.float(), size, mode, align_corners)
    assert_low_precision_close(y, ref32, resize_reference(x, size, mode, align_corners))
    y32 = resize(x.float(), size, mode, align_corners)
    assert_close(y32, ref32, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize(("mode", "align_corners"), MODES, ids=MODE_IDS)
@pytest.mark.parametrize("scale_factor", [1.1, 2.05, 1.7, (1.0, 2.5)])
def test_cuda_shortcuts(mode, align_corners, scale_factor):
    """ATen's CUDA kernels take other shortcuts than its CPU ones (module docstring)."""
    x = torch.randn(1, 32, 7, 9, device="cuda").contiguous(memory_format=torch.channels_last)
    kw = {"align_corners": align_corners} if mode == "bilinear" else {}
    ref = F.interpolate(x, scale_factor=scale_factor, mode=mode, **kw)
    sf = scale_factor if isinstance(scale_factor, tuple) else (scale_factor, scale_factor)
    _check(resize(x, tuple(ref.shape[-2:]), mode, align_corners, scales=sf), ref, mode)


def _f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def test_device_rules():
    """The step table for each device, from ATen's sources (UpSample.h/.cuh)."""
    # in == out on one dimension with a scale that says otherwise
    assert _aten_steps((7, 9), (7, 18), "bilinear", False, (1.1, 2.0), "cpu") == (1.0, 0.5)
    assert _aten_steps((7, 9), (7, 18), "bilinear", False, (1.1, 2.0), "cuda") == (
        _f32(1 / 1.1),
        0.5,
    )
    assert _aten_steps((7, 9), (7, 9), "bilinear", False, (1.1, 1.1), "cuda") == (1.0, 1.0)
    assert _aten_steps((7, 9), (7, 9), "nearest-exact", False, (1.1, 1.1), "cpu") == (
        _f32(1 / 1.1),
        _f32(1 / 1.1),
    )
    assert _aten_steps((7, 9), (7, 9), "nearest-exact", False, (1.1, 1.1), "cuda") == (1.0, 1.0)
    # nearest's 2× shortcut is CPU-only
    assert _aten_steps((10, 3), (20, 5), "nearest", False, (2.05, None), "cpu") == (
        0.5,
        _f32(3 / 5),
    )
    assert _aten_steps((10, 3), (20, 5), "nearest", False, (2.05, None), "cuda") == (
        _f32(1 / 2.05),
        _f32(3 / 5),
    )
    # align_corners ignores scales; o == 1 gives 0
    assert _aten_steps((5, 8), (1, 3), "bilinear", True, (0.2, 0.4), "cpu") == (0.0, _f32(7 / 2))


if given is not None:

    @settings(
        max_examples=30,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        h=st.integers(1, 12),
        w=st.integers(1, 12),
        mode=st.sampled_from(MODES),
        fh=st.floats(0.2, 3.0),
        fw=st.floats(0.2, 3.0),
        use_scale=st.booleans(),
        channels_last=st.booleans(),
    )
    def test_property_matches_interpolate(h, w, mode, fh, fw, use_scale, channels_last):
        """Random sizes and ratios, sized by F.interpolate itself (scale_factor, or
        the size it implies), against F.interpolate."""
        mode, align_corners = mode
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h * 131 + w))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        size = (max(int(h * fh), 1), max(int(w * fw), 1))
        kw = {"align_corners": align_corners} if mode == "bilinear" else {}
        if use_scale and int(h * fh) >= 1 and int(w * fw) >= 1:
            ref = F.interpolate(x, scale_factor=(fh, fw), mode=mode, **kw)
            scales = (fh, fw)
        else:
            ref = F.interpolate(x, size=size, mode=mode, **kw)
            scales = None
        y = resize(x, tuple(ref.shape[-2:]), mode, align_corners, scales=scales)
        _check(y, ref, mode)

else:

    @pytest.mark.skip(reason="hypothesis is not installed (a dev dependency)")
    def test_property_matches_interpolate():
        pass


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda x: resize(x[0], (4, 4)), ValueError, "4-D"),
        (lambda x: resize(x.long(), (4, 4)), TypeError, "float32"),
        (lambda x: resize(x, (4, 4), "bicubic"), ValueError, "mode must be one of"),
        (lambda x: resize(x, (4, 4), "nearest", True), ValueError, "align_corners"),
        (lambda x: resize(x, (0, 4)), ValueError, "size must be two positive ints"),
        (lambda x: resize(x, (4,)), ValueError, "size must be two positive ints"),
        (lambda x: resize(x, (4, 4), scales=2.0), ValueError, "scales must be None or a pair"),
        (lambda x: resize(x, (4, 4), out=torch.empty(1, 2, 4, 5)), ValueError, "out must have"),
        (
            lambda x: resize(x, (4, 4), out=torch.empty(1, 2, 4, 4), out_dtype=torch.half),
            TypeError,
            "disagrees",
        ),
        (lambda x: resize(x, (4, 4), out_dtype=torch.int32), TypeError, "out_dtype"),
        (lambda x: resize(x, (4, 4), residual=torch.zeros(1, 2, 4, 5)), ValueError, "residual"),
        (
            lambda x: resize(x, (4, 4), residual=torch.zeros(1, 2, 4, 4).long()),
            TypeError,
            "residual",
        ),
    ],
    ids=[
        "rank",
        "dtype",
        "mode",
        "align-nearest",
        "zero-size",
        "size-len",
        "scales",
        "out-shape",
        "out-dtype",
        "bad-out-dtype",
        "residual-shape",
        "residual-dtype",
    ],
)
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(1, 2, 5, 5))


def test_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        resize(torch.randn(1, 2, 5, 5), (4, 4))
