"""kernels/head.py: the fused segmentation head against its PyTorch reference.

Masks are compared exactly except where the reference's own decision is numerically
ambiguous: random continuous logits have no exact ties, but the kernel and ATen round the
conv / bilinear blend differently (last ulp), so pixels whose top-2 logit gap is below
1e-5 × the image's largest |logit| (threshold: |P − t| < 1e-6) may flip. Those are counted
and must be rare; exact ties and NaN are tested with constructed inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segfast.kernels.head import (
    MODES,
    bilinear_scale,
    seg_head,
    seg_head_reference,
    upsample_argmax,
)
from segfast.testing import assert_close, assert_low_precision_close, poison

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CL = torch.channels_last
PROB_MODES = ("softmax", "sigmoid", "logits")
FP32 = {"atol": 1e-5, "rtol": 1e-5}


def _modes(K: int) -> list[str]:
    return [m for m in MODES if m != "threshold" or K <= 2]


def _features(shape, layout="contiguous", dtype=torch.float32):
    """[N, C, H, W] normal values in the given memory layout."""
    N, C, H, W = shape
    if layout == "contiguous":
        return torch.randn(shape, dtype=dtype, device=DEV)
    if layout == "channels_last":
        return torch.randn(shape, dtype=dtype, device=DEV).contiguous(memory_format=CL)
    if layout == "sliced":  # a crop of a larger, every-other-column tensor
        big = torch.randn(N, C + 3, H + 2, 2 * W, dtype=dtype, device=DEV)
        return big[:, 2 : 2 + C, 1 : 1 + H, ::2]
    if layout == "permuted":
        return torch.randn(W, N, H, C, dtype=dtype, device=DEV).permute(1, 3, 2, 0)
    raise ValueError(layout)


def _head(K: int, C: int, dtype=torch.float32, weight_layout="kc11"):
    """(weight, bias) of a 1×1 conv C → K; weight [K, C, 1, 1], [K, C] or a transposed view."""
    if weight_layout == "kc11":
        w = torch.randn(K, C, 1, 1, dtype=dtype, device=DEV) / C**0.5
    elif weight_layout == "kc":
        w = torch.randn(K, C, dtype=dtype, device=DEV) / C**0.5
    else:  # "transposed": a [K, C] view of a [C, K] tensor (K stride 1)
        w = (torch.randn(C, K, dtype=dtype, device=DEV) / C**0.5).t()
    return w, torch.randn(K, dtype=dtype, device=DEV)


def _assert_mask(mask, ref_mask, logits, mode, threshold=0.5, max_frac=0.01, skip=None):
    """Exact equality except at numerically ambiguous pixels (see module docstring);
    pixels where ``skip`` is True are checked elsewhere."""
    assert mask.shape == ref_mask.shape
    assert mask.dtype == ref_mask.dtype
    bad = mask.long().cpu() != ref_mask.long().cpu()
    logits = logits.double().cpu()  # [N, K, H, W] reference fp32 logits
    K = logits.shape[1]
    if mode == "threshold":
        prob = torch.sigmoid(logits[:, 0]) if K == 1 else torch.softmax(logits, 1)[:, 1]
        near = (prob - threshold).abs() < 1e-6
    elif K == 1:
        near = torch.zeros_like(bad)
    else:
        top2 = logits.topk(2, dim=1).values
        scale = logits.abs().amax(dim=(1, 2, 3)).clamp_min(1.0)[:, None, None]
        near = (top2[:, 0] - top2[:, 1]) < 1e-5 * scale
    if skip is not None:
        bad, near = bad & ~skip.cpu(), near & ~skip.cpu()
    unexplained = bad & ~near
    assert not unexplained.any(), (
        f"{int(unexplained.sum())} of {bad.numel()} mask pixels differ from the reference "
        f"away from near-ties, first at {unexplained.nonzero()[:5].tolist()}"
    )
    assert near.double().mean() <= max_frac, f"{int(near.sum())} near-tie pixels: too many"


def _check(x, w, b, mode, **kw):
    """Run kernel (into a poisoned out=, and default allocation) and compare to reference."""
    ref = seg_head_reference(x, w, b, mode=mode, **kw)
    out = poison(torch.empty_like(ref))
    got = seg_head(x, w, b, mode=mode, out=out, **kw)
    assert got is out
    fresh = seg_head(x, w, b, mode=mode, **kw)
    assert fresh.shape == ref.shape
    assert fresh.dtype == ref.dtype
    if mode in PROB_MODES:
        assert fresh.is_contiguous(memory_format=CL)
        if ref.dtype == torch.float32:
            assert_close(out, ref, **FP32)
        assert torch.equal(out, fresh)
    else:
        logits = seg_head_reference(x, w, b, mode="logits", out_dtype=torch.float32, **kw)
        _assert_mask(out, ref, logits, mode, kw.get("threshold", 0.5))
        assert torch.equal(out, fresh)
    return out, ref


# --- every mode × class count, with and without weight / upsample ------------------------


@pytest.mark.parametrize("K", [1, 2, 3, 21, 70])
@pytest.mark.parametrize("with_weight", [True, False], ids=["conv", "logits_in"])
@pytest.mark.parametrize("out_size", [None, (30, 41)], ids=["same", "up30x41"])
def test_modes(K, with_weight, out_size):
    # 1×5×7×9 features; classes 70 span several class blocks in both kernels.
    layout = "channels_last" if K % 2 else "contiguous"
    if with_weight:
        x = _features((1, 5, 7, 9), layout)
        w, b = _head(K, 5)
    else:
        x, w, b = _features((1, K, 7, 9), layout), None, None
    for mode in _modes(K):
        _check(x, w, b, mode, out_size=out_size)


@pytest.mark.parametrize(
    ("out_size", "scales"),
    [
        ((14, 18), None),  # ×2
        ((28, 36), None),  # ×4
        ((56, 72), None),  # ×8
        ((30, 41), None),  # non-integer
        ((17, 22), (2.5, 2.5)),  # scale_factor=2.5: ATen uses 1/2.5, not 7/17
        ((7, 20), None),  # height unchanged: ATen copies that dimension
        ((5, 4), None),  # downsample
        ((1, 1), None),
    ],
    ids=["x2", "x4", "x8", "30x41", "scales2.5", "one_dim", "down", "1x1"],
)
@pytest.mark.parametrize("align_corners", [False, True], ids=["ac0", "ac1"])
def test_upsample_sizes(out_size, scales, align_corners):
    x = _features((2, 21, 7, 9), "channels_last")
    _check(x, None, None, "argmax", out_size=out_size, scales=scales, align_corners=align_corners)
    _check(x, None, None, "softmax", out_size=out_size, scales=scales, align_corners=align_corners)
    xf = _features((1, 19, 7, 9))
    w, b = _head(3, 19)  # C=19: two C chunks under the interpreter
    _check(xf, w, b, "argmax", out_size=out_size, scales=scales, align_corners=align_corners)


def test_reference_matches_interpolate():
    """The reference's resampling is F.interpolate's, scale_factor path included."""
    y = torch.randn(2, 4, 7, 9, device=DEV)
    for sf in (2.0, 2.5, 8.0):
        for ac in (False, True):
            want = F.interpolate(y, scale_factor=sf, mode="bilinear", align_corners=ac)
            H, W = want.shape[-2:]
            got = seg_head_reference(
                y, out_size=(H, W), scales=(sf, sf), align_corners=ac, mode="logits"
            )
            assert torch.equal(got, want.contiguous(memory_format=CL))
    want = F.interpolate(y, size=(30, 41), mode="bilinear").softmax(1)
    got = seg_head_reference(y, out_size=(30, 41), mode="softmax")
    assert torch.equal(got, want)
    w, b = torch.randn(3, 4, 1, 1, device=DEV), torch.randn(3, device=DEV)
    got = seg_head_reference(y, w, b, mode="logits")
    assert_close(got, F.conv2d(y.double(), w.double(), b.double()), atol=1e-6, rtol=1e-6)


def test_bilinear_scale():
    assert bilinear_scale(7, 14, False, None) == 0.5
    assert bilinear_scale(7, 17, False, 2.5) == pytest.approx(0.4, rel=1e-7)
    assert bilinear_scale(7, 13, True, None) == 0.5
    assert bilinear_scale(7, 1, True, None) == 0.0
    assert bilinear_scale(9, 9, True, 3.0) == 1.0  # unchanged size: copy


# --- layouts, weight forms, dtypes, out= --------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "permuted"])
@pytest.mark.parametrize("weight_layout", ["kc11", "kc", "transposed"])
def test_layouts(layout, weight_layout):
    x = _features((2, 19, 11, 13), layout)
    w, b = _head(3, 19, weight_layout=weight_layout)
    _check(x, w, b, "argmax", out_size=(22, 26))
    _check(x, w, b, "logits")
    _check(x[:, :3], None, None, "softmax", out_size=(22, 26))


@pytest.mark.parametrize("with_weight", [True, False], ids=["conv", "logits_in"])
def test_fp16(with_weight):
    x = _features((1, 5 if with_weight else 21, 7, 9), "channels_last", torch.float16)
    w, b = _head(21, 5, torch.float16) if with_weight else (None, None)
    kw = {"out_size": (30, 41)}
    for mode in _modes(21):
        out, _ = _check(x, w, b, mode, **kw)
        if mode not in PROB_MODES:
            continue
        assert out.dtype == torch.float16
        ref32 = seg_head_reference(x, w, b, mode=mode, out_dtype=torch.float32, **kw)
        y = x if w is None else F.conv2d(x, w, b)  # the same chain in fp16
        y = F.interpolate(y, size=kw["out_size"], mode="bilinear")
        lowp = {"softmax": y.softmax(1), "sigmoid": y.sigmoid(), "logits": y}[mode]
        assert_low_precision_close(out, ref32, lowp)


def test_mixed_dtypes_and_out_dtype():
    """fp16 features with fp32 weights: the dot runs in fp32; out_dtype overrides x.dtype."""
    x = _features((1, 19, 7, 9), "channels_last", torch.float16)
    w, b = _head(3, 19, torch.float32)
    _check(x, w, b, "argmax", out_size=(14, 18))
    out, _ = _check(x, w, b, "softmax", out_dtype=torch.float32)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.int32, torch.int64])
def test_mask_dtype_and_strided_out(mask_dtype):
    x = _features((2, 21, 7, 9))
    kw = {"out_size": (14, 18), "mask_dtype": mask_dtype}
    ref = seg_head_reference(x, **kw)
    assert ref.dtype == mask_dtype
    big = poison(torch.empty(2, 3 * 14, 18, dtype=mask_dtype, device=DEV))
    view = big[:, 1::3]  # every third row of a larger buffer
    seg_head(x, out=view, **kw)
    logits = seg_head_reference(x, mode="logits", out_size=(14, 18))
    _assert_mask(view, ref, logits, "argmax")
    untouched = torch.ones_like(big, dtype=torch.bool)
    untouched[:, 1::3] = False
    assert (big[untouched] == torch.iinfo(mask_dtype).max).all()


def test_prob_out_channel_slice():
    """softmax written into channels [2:5] of a channels_last buffer; the rest untouched."""
    x = _features((2, 19, 7, 9), "channels_last")
    w, b = _head(3, 19)
    buf = poison(torch.empty(2, 8, 14, 18, device=DEV, memory_format=CL))
    seg_head(x, w, b, mode="softmax", out_size=(14, 18), out=buf[:, 2:5])
    ref = seg_head_reference(x, w, b, mode="softmax", out_size=(14, 18))
    assert_close(buf[:, 2:5], ref, **FP32)
    assert torch.isnan(buf[:, :2]).all()
    assert torch.isnan(buf[:, 5:]).all()


def test_many_classes_int32():
    """K = 300 > 256: int32 masks, five class blocks in the conv kernel."""
    x = _features((1, 5, 7, 9))
    w, b = _head(300, 5)
    _check(x, w, b, "argmax", mask_dtype=torch.int32)
    _check(x, w, b, "argmax", mask_dtype=torch.int64, out_size=(10, 12))


def test_threshold_value():
    x = _features((1, 2, 7, 9))
    for t in (0.2, 0.5, 0.9):
        _check(x, None, None, "threshold", threshold=t, out_size=(14, 18))
        _check(x[:, :1], None, None, "threshold", threshold=t)


def test_upsample_argmax_alias():
    x = _features((1, 21, 7, 9))
    got = upsample_argmax(x, (30, 41), mask_dtype=torch.int64)
    assert torch.equal(got, seg_head(x, out_size=(30, 41), mask_dtype=torch.int64))


def test_empty_batch():
    x = torch.randn(0, 3, 7, 9, device=DEV)
    assert seg_head(x, out_size=(14, 18)).shape == (0, 14, 18)


# --- exact ties and NaN: the first maximum, like torch.argmax ------------------------------


@pytest.mark.parametrize("K", [3, 70])
def test_first_max_ties(K):
    # Integer logits in {0, 1, 2}: nearly every pixel has tied maxima, across class blocks
    # (K=70 spans three gather blocks). Blending with λ ∈ {0, ½} (align_corners, 7 → 13)
    # keeps every value exact, so the ties survive the upsample unchanged.
    x = torch.randint(0, 3, (2, K, 7, 9), device=DEV).float()
    x[0, :, 0, 0] = 2.0  # all classes tied
    for kw in ({}, {"out_size": (13, 17), "align_corners": True}):
        got = seg_head(x, mask_dtype=torch.int64, **kw)
        want = seg_head_reference(x, mask_dtype=torch.int64, **kw)
        assert torch.equal(got, want)
    assert got[0, 0, 0] == 0
    # ties produced by the conv: two identical weight rows, first one wins
    # (small integers: every product and sum is exact, whatever the summation order)
    xf = torch.randint(1, 4, (1, 5, 7, 9), device=DEV).float()
    w = torch.randint(-3, 4, (K, 5), device=DEV).float()
    w[K - 1] = w[0] = 10.0  # class 0 and K−1 identical and dominant
    got = seg_head(xf, w, mask_dtype=torch.int64)
    assert (got == 0).all()


# NaN·λ and inf·0 in the blend are intended (ATen computes the same); numpy warns.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_is_the_maximum():
    """torch.argmax semantics: NaN beats +inf, the first NaN wins; NaN-free pixels normal."""
    K = 70
    x = torch.randn(1, K, 7, 9, device=DEV)
    x[0, :, 0, 0] = float("-inf")
    x[0, 5, 0, 1] = float("inf")
    x[0, 40, 0, 1] = float("nan")
    x[0, 3, 1, 2] = float("nan")
    x[0, 60, 1, 2] = float("nan")
    x[0, 65, 2, 2] = float("nan")  # NaN only in the last class block
    x[0, 1, 2, 2] = float("inf")
    got = seg_head(x)
    want = seg_head_reference(x)
    assert torch.equal(got, want)
    assert [int(got[0, 0, 0]), int(got[0, 0, 1]), int(got[0, 1, 2]), int(got[0, 2, 2])] == [
        0,
        40,
        3,
        65,
    ]
    # with an upsample the NaN spreads to the pixels that blend it, as in ATen
    got = seg_head(x, out_size=(14, 18), mask_dtype=torch.int64)
    want = seg_head_reference(x, out_size=(14, 18), mask_dtype=torch.int64)
    logits = seg_head_reference(x, mode="logits", out_size=(14, 18))
    odd_px = ~torch.isfinite(logits).all(1)  # NaN or ±inf: exact, whatever the ties
    assert odd_px.any()
    assert torch.equal(got[odd_px], want[odd_px])
    _assert_mask(got, want, logits.nan_to_num(0.0, 0.0, 0.0), "argmax", skip=odd_px)


# --- errors -----------------------------------------------------------------------------


def test_errors():
    x = _features((1, 5, 7, 9))
    w, b = _head(300, 5)
    with pytest.raises(ValueError, match="uint8 mask holds at most 256"):
        seg_head(x, w, b)
    with pytest.raises(ValueError, match="weight has 4 input channels but x has C=5"):
        seg_head(x, torch.randn(3, 4, device=DEV))
    with pytest.raises(ValueError, match=r"weight must be \[K, C\] or \[K, C, 1, 1\]"):
        seg_head(x, torch.randn(3, 5, 3, 3, device=DEV))
    with pytest.raises(ValueError, match="mode must be one of"):
        seg_head(x, mode="max")
    with pytest.raises(ValueError, match=r"needs K=1 .* or K=2"):
        seg_head(x[:, :3], mode="threshold")
    with pytest.raises(ValueError, match="x must be 4-D"):
        seg_head(x[0])
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        seg_head(x.to(torch.int32))
    with pytest.raises(ValueError, match="bias needs weight"):
        seg_head(x, bias=torch.randn(5, device=DEV))
    with pytest.raises(ValueError, match=r"bias must be \[K\]=\[3\]"):
        seg_head(x, torch.randn(3, 5, device=DEV), torch.randn(4, device=DEV))
    with pytest.raises(TypeError, match="mask_dtype must be"):
        seg_head(x, mask_dtype=torch.float32)
    with pytest.raises(TypeError, match="out_dtype must be"):
        seg_head(x, mode="softmax", out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"out must be \[1, 7, 9\]"):
        seg_head(x, out=torch.empty(1, 7, 8, dtype=torch.uint8, device=DEV))
    with pytest.raises(TypeError, match=r"out must have dtype torch\.uint8"):
        seg_head(x, out=torch.empty(1, 7, 9, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="scales needs out_size"):
        seg_head(x, scales=(2.0, 2.0))
    with pytest.raises(ValueError, match="out_size must be"):
        seg_head(x, out_size=(0, 5))
    # the reference validates identically
    with pytest.raises(ValueError, match="uint8 mask holds at most 256"):
        seg_head_reference(x, w, b)


# --- GPU: bf16 and realistic shapes ---------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("with_weight", [True, False], ids=["conv", "logits_in"])
def test_bf16_gpu(with_weight):
    x = _features((2, 64 if with_weight else 21, 33, 47), "channels_last", torch.bfloat16)
    w, b = _head(21, 64, torch.bfloat16) if with_weight else (None, None)
    kw = {"out_size": (129, 185)}
    for mode in _modes(21):
        out, _ = _check(x, w, b, mode, **kw)
        if mode in PROB_MODES:
            ref32 = seg_head_reference(x, w, b, mode=mode, out_dtype=torch.float32, **kw)
            y = x if w is None else F.conv2d(x, w, b)
            y = F.interpolate(y, size=kw["out_size"], mode="bilinear")
            lowp = {"softmax": y.softmax(1), "sigmoid": y.sigmoid(), "logits": y}[mode]
            assert_low_precision_close(out, ref32, lowp)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("N", "C", "K", "hw", "out_size"),
    [
        (2, 256, 21, (64, 64), (512, 512)),  # DeepLab ×8
        (1, 512, 19, (128, 256), (1024, 2048)),  # Cityscapes ×8
        (2, 64, 2, (256, 256), None),  # U-Net binary, no upsample
        (1, 96, 150, (67, 91), (539, 731)),  # ADE20K, odd sizes
    ],
)
def test_realistic_gpu(N, C, K, hw, out_size):
    x = _features((N, C, *hw), "channels_last")
    w, b = _head(K, C)
    for mode in ("argmax", "softmax"):
        _check(x, w, b, mode, out_size=out_size, mask_dtype=torch.int32)
    xh = x.half()
    _check(xh, w.half(), b.half(), "argmax", out_size=out_size, mask_dtype=torch.int32)


@pytest.mark.gpu
def test_int64_offsets_gpu():
    """More than 2**31 output elements: offsets must be 64-bit. With align_corners the
    ratios (32/8192, 64/16384) are exact powers of two, so every 256th output row/column
    samples an input pixel exactly."""
    x = _features((1, 16, 33, 65), "channels_last", torch.float16)
    out = seg_head(x, mode="logits", out_size=(8193, 16385), align_corners=True)
    assert out.numel() > 2**31
    assert torch.equal(out[:, :, ::256, ::256], x)
    mask = seg_head(x[:, :3], out_size=(8193, 16385), align_corners=True)
    assert torch.equal(mask[:, ::256, ::256], x[:, :3].argmax(1).to(torch.uint8))
