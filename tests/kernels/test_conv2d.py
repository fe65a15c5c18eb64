"""segfast.kernels.conv2d against its PyTorch reference (and the reference against F.*).

Interpreter tests use small odd shapes; realistic layer shapes are GPU-only.
fp32 is held to atol = rtol = 1e-4 elementwise; fp16/bf16 to 2× PyTorch's own error in
that dtype against the fp32 reference (``assert_low_precision_close``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton

import segfast.kernels.conv2d as conv_mod
from segfast.kernels._common import ACTIVATIONS
from segfast.kernels.conv2d import conv2d, conv2d_reference, pack_conv_weight
from segfast.testing import assert_close, assert_low_precision_close, poison

CL = torch.channels_last
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def _gpu_settings(request, monkeypatch):
    """On a GPU: an fp32 reference without TF32, and one tile config for the small tests.

    PyTorch's fp32 conv (the reference) would use TF32 by default. Autotuning every small
    test over the whole config space would compile dozens of variants per test; the
    realistic-shape tests keep the full autotuner, the rest run one config other than
    the interpreter's (so a GPU run covers a second tiling).
    """
    if not torch.cuda.is_available():
        return
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    if request.node.originalname != "test_realistic_gpu":
        gemm = triton.Config(
            {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3
        )
        dw = triton.Config({"BLOCK_P": 64, "BLOCK_C": 32}, num_warps=4, num_stages=1)
        monkeypatch.setattr(conv_mod._conv2d_kernel, "configs", [gemm])
        monkeypatch.setattr(conv_mod._dw_conv2d_kernel, "configs", [dw])
        monkeypatch.setattr(conv_mod._conv2d_kernel, "cache", {})
        monkeypatch.setattr(conv_mod._dw_conv2d_kernel, "cache", {})


def _input(shape: tuple[int, ...], layout: str = "cl", dtype=torch.float32) -> torch.Tensor:
    """A [N, C, H, W] tensor in one of four memory layouts.

    The views are taken on the device and in the dtype (``.to`` would densify them).
    """
    n, c, h, w = shape

    def base(*s):
        return torch.randn(*s).to(device=DEVICE, dtype=dtype)

    if layout == "cl":
        t = base(n, c, h, w).to(memory_format=CL)
    elif layout == "contig":
        t = base(n, c, h, w)
    elif layout == "permuted":  # memory [W, C, N, H]: no stride is 1 where a kernel hopes
        t = base(w, c, n, h).permute(2, 1, 3, 0)
    elif layout == "sliced":  # a channel slice with every other row and an offset column
        t = base(n, c + 5, 2 * h, w + 3)[:, 2 : 2 + c, ::2, 1 : 1 + w]
    else:
        raise AssertionError(layout)
    assert tuple(t.shape) == shape
    if layout in ("permuted", "sliced") and min(shape) > 1:
        assert not t.is_contiguous()
        assert not t.is_contiguous(memory_format=CL)
    return t


def _weight(shape: tuple[int, ...], layout: str = "packed", dtype=torch.float32) -> torch.Tensor:
    """A [Cout, Cin, KH, KW] weight with unit-variance outputs, in one of four layouts."""
    co, ci, kh, kw = shape
    w = (torch.randn(co, ci, kh, kw) / (ci * kh * kw) ** 0.5).to(device=DEVICE, dtype=dtype)
    if layout == "packed":
        w = pack_conv_weight(w)
    elif layout == "sliced":
        big = torch.zeros(co, ci + 3, kh, kw + 2, device=DEVICE, dtype=dtype)
        big[:, 1 : 1 + ci, :, 1 : 1 + kw] = w
        w = big[:, 1 : 1 + ci, :, 1 : 1 + kw]
    elif layout == "permuted":
        w = w.permute(3, 1, 0, 2).contiguous().permute(2, 1, 3, 0)
    elif layout != "contig":
        raise AssertionError(layout)
    assert tuple(w.shape) == shape
    return w


def _vec(n: int, kind: str, dtype=torch.float32) -> torch.Tensor:
    v = torch.rand(n) + 0.5 if kind == "scale" else torch.randn(n) * 0.5
    return v.to(device=DEVICE, dtype=dtype)


def _check_fp32(*args, default_out: bool = False, **kwargs) -> torch.Tensor:
    """conv2d == conv2d_reference in fp32, written into a poisoned out=; with
    ``default_out`` also through the default (channels_last) allocation."""
    ref = conv2d_reference(*args, **kwargs)
    out = poison(torch.empty_like(ref))
    res = conv2d(*args, out=out, **kwargs)
    assert res is out
    assert_close(out, ref, atol=1e-4, rtol=1e-4)
    if default_out:
        default = conv2d(*args, **kwargs)
        assert default.is_contiguous(memory_format=CL)
        assert default.dtype == ref.dtype
        assert_close(default, ref, atol=1e-4, rtol=1e-4)
    return ref


def _check_lowp(*args, **kwargs) -> None:
    """A fp16/bf16 conv2d is no worse than 2× PyTorch's own error in that dtype."""
    dtype = args[0].dtype
    ref32 = conv2d_reference(*args, out_dtype=torch.float32, **kwargs)
    torch_lowp = conv_mod._reference(*args, compute_dtype=dtype, **_reference_defaults(kwargs))
    out = poison(torch.empty_like(torch_lowp))
    conv2d(*args, out=out, **kwargs)
    assert out.dtype == dtype
    assert_low_precision_close(out, ref32, torch_lowp)


def _reference_defaults(kwargs: dict) -> dict:
    """conv2d's keyword defaults, overridden by kwargs (``_reference`` has none)."""
    base = {
        "stride": 1,
        "padding": 0,
        "dilation": 1,
        "groups": 1,
        "act": "none",
        "act_param": 0.01,
        "residual": None,
        "residual_after_act": False,
        "x2": None,
        "x2_resize": "none",
        "x2_align_corners": False,
        "x2_scales": None,
        "x2_first": False,
        "out": None,
        "out_dtype": None,
    }
    return {**base, **kwargs}


# ------------------------------------------------------------------------------ geometry

# (id, x shape, Cout, (KH, KW), conv kwargs). C1 ≤ 8 takes the flat-K loop, C1 > 8 the
# per-tap channel-block loop (19 channels: one full and one partial 16-block); Cout 23
# and 2×13×17 pixels give partial tiles along both GEMM dims.
GEOMETRY = [
    ("1x1", (1, 5, 7, 9), 6, (1, 1), {}),
    ("1x1_blocked", (2, 19, 13, 17), 23, (1, 1), {}),
    ("3x3_flat", (1, 5, 7, 9), 6, (3, 3), {"padding": 1}),
    ("3x3", (2, 19, 13, 17), 23, (3, 3), {"padding": 1}),
    ("3x3_nopad", (1, 19, 13, 17), 10, (3, 3), {}),
    ("3x3_dil2", (2, 19, 13, 17), 23, (3, 3), {"padding": 2, "dilation": 2}),
    ("3x3_s2", (2, 19, 13, 17), 23, (3, 3), {"padding": 1, "stride": 2}),
    ("3x3_atrous6", (1, 17, 15, 14), 40, (3, 3), {"padding": 6, "dilation": 6}),
    ("7x7_s2_stem", (1, 3, 19, 23), 8, (7, 7), {"padding": 3, "stride": 2}),
    ("7x7_s2", (1, 19, 13, 17), 10, (7, 7), {"padding": 3, "stride": 2}),
    ("1x3", (2, 19, 13, 17), 23, (1, 3), {"padding": (0, 1)}),
    ("3x1_flat_mixed", (1, 5, 7, 9), 6, (3, 1), {"padding": (1, 0), "stride": (2, 1)}),
    ("3x3_rect", (1, 19, 13, 17), 9, (3, 3), {"padding": (2, 1), "dilation": (2, 1), "stride": (1, 2)}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("xs", "cout", "k", "kw"), [g[1:] for g in GEOMETRY], ids=[g[0] for g in GEOMETRY]
)
def test_geometry_fp32(xs, cout, k, kw):
    x = _input(xs)
    w = _weight((cout, xs[1], *k))
    _check_fp32(x, w, _vec(cout, "scale"), _vec(cout, "shift"), default_out=True, **kw)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_activations(act):
    # Pre-activation values span ±8 (relu6's clamp, leaky's negative side), and a few are
    # pushed to ±300 through the residual: exp() overflow must give the right limits
    # (silu/sigmoid/tanh), never NaN.
    x = _input((1, 19, 7, 9))
    w = _weight((21, 19, 3, 3))
    res = 3.0 * _input((1, 21, 7, 9))
    res[0, :3, 0, :4] = 300.0
    res[0, 3:6, 1, :4] = -300.0
    scale = torch.full((21,), 2.5, device=DEVICE)
    _check_fp32(x, w, scale, None, padding=1, act=act, act_param=0.2, residual=res)


@pytest.mark.parametrize(("has_scale", "has_shift"), [(False, False), (True, False), (False, True)])
def test_scale_shift_optional(has_scale, has_shift):
    x = _input((1, 19, 7, 9))
    w = _weight((12, 19, 3, 3))
    scale = _vec(12, "scale") if has_scale else None
    shift = _vec(12, "shift") if has_shift else None
    _check_fp32(x, w, scale, shift, padding=1, act="leaky_relu")


@pytest.mark.parametrize("after", [False, True], ids=["before_act", "after_act"])
@pytest.mark.parametrize("res_layout", ["cl", "permuted"])
def test_residual(after, res_layout):
    x = _input((2, 19, 9, 11))
    w = _weight((23, 19, 3, 3))
    res = _input((2, 23, 5, 6), res_layout)
    ref = _check_fp32(
        x, w, _vec(23, "scale"), _vec(23, "shift"),
        stride=2, padding=1, act="relu", residual=res, residual_after_act=after,
    )  # fmt: skip
    # the two orders really differ here (negative residuals survive only after the act)
    assert bool((ref < 0).any()) == after


# (x layout, weight layout): every layout of each at least once, not the full cross.
LAYOUTS = [
    ("cl", "packed"),
    ("contig", "contig"),
    ("permuted", "sliced"),
    ("sliced", "packed"),
    ("cl", "permuted"),
]


@pytest.mark.parametrize(
    ("x_layout", "w_layout"), LAYOUTS, ids=[f"x_{a}-w_{b}" for a, b in LAYOUTS]
)
def test_layouts(x_layout, w_layout):
    x = _input((2, 19, 13, 17), x_layout)
    w = _weight((23, 19, 3, 3), w_layout)
    _check_fp32(x, w, _vec(23, "scale"), _vec(23, "shift"), padding=1, act="relu")


def test_layouts_flat_k():
    x = _input((1, 3, 11, 13), "permuted")
    w = _weight((16, 3, 3, 3), "sliced")
    _check_fp32(x, w, None, _vec(16, "shift"), padding=1, stride=2)


def test_pack_conv_weight_layout():
    w = torch.randn(6, 5, 3, 2)
    p = pack_conv_weight(w)
    assert torch.equal(p, w)
    assert p.stride() == (1, 6, 5 * 6 * 2, 5 * 6)  # memory [KH, KW, Cin, Cout]
    assert p.permute(2, 3, 1, 0).is_contiguous()


# ------------------------------------------------------------------------------ two sources

# (id, x shape, x2 shape, resize, align_corners, x2_scales, x2_first). The x2 7×9 → 15×20
# cases have non-integer ratios; 7×9 → 14×18 with scales (2, 2) is the exact ×2; scale 1.7
# gives 11×15, where the given scale (src step 1/1.7) and in/out (7/11, 9/15) really
# differ; 17×19 → 7×9 resizes down. Every mode runs with both concat orders; C1 = 5 takes
# x's flat-K loop, C1 = 19 its channel-block loop.
TWO_SOURCE = [
    ("none", (2, 19, 9, 11), (2, 7, 9, 11), "none", False, None, False),
    ("none_first", (2, 5, 9, 11), (2, 7, 9, 11), "none", False, None, True),
    ("nearest_size", (1, 5, 15, 20), (1, 19, 7, 9), "nearest", False, None, False),
    ("nearest_size_first", (1, 19, 15, 20), (1, 6, 7, 9), "nearest", False, None, True),
    ("nearest_x2", (1, 6, 14, 18), (1, 7, 7, 9), "nearest", False, (2.0, 2.0), False),
    ("nearest_s1.7_first", (1, 6, 11, 15), (1, 7, 7, 9), "nearest", False, (1.7, 1.7), True),
    ("bilinear_size", (1, 5, 15, 20), (1, 19, 7, 9), "bilinear", False, None, False),
    ("bilinear_size_first", (1, 19, 15, 20), (1, 6, 7, 9), "bilinear", False, None, True),
    ("bilinear_size_ac", (1, 5, 15, 20), (1, 19, 7, 9), "bilinear", True, None, False),
    ("bilinear_size_ac_first", (1, 6, 15, 20), (1, 7, 7, 9), "bilinear", True, None, True),
    ("bilinear_x2", (1, 6, 14, 18), (1, 7, 7, 9), "bilinear", False, (2.0, 2.0), True),
    ("bilinear_x2_ac", (1, 6, 14, 18), (1, 7, 7, 9), "bilinear", True, (2.0, 2.0), False),
    ("bilinear_s1.7", (1, 6, 11, 15), (1, 7, 7, 9), "bilinear", False, (1.7, 1.7), False),
    ("bilinear_down_first", (1, 6, 7, 9), (1, 5, 17, 19), "bilinear", False, None, True),
    # scales that disagree with the sizes: ATen's per-device size short-cuts (2×, 1×)
    ("nearest_2x_s2.05", (1, 6, 14, 9), (1, 7, 7, 9), "nearest", False, (2.05, 1.05), False),
    ("bilinear_1x_s1.05_first", (1, 6, 14, 9), (1, 7, 7, 9), "bilinear", False, (2.05, 1.05), True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("xs", "x2s", "mode", "ac", "scales", "first"),
    [t[1:] for t in TWO_SOURCE],
    ids=[t[0] for t in TWO_SOURCE],
)
def test_two_source(xs, x2s, mode, ac, scales, first):
    x = _input(xs)
    x2 = _input(x2s, "contig" if first else "cl")
    w = _weight((10, xs[1] + x2s[1], 3, 3))
    _check_fp32(
        x, w, _vec(10, "scale"), _vec(10, "shift"), padding=1, act="relu",
        x2=x2, x2_resize=mode, x2_align_corners=ac, x2_scales=scales, x2_first=first,
    )  # fmt: skip


def test_two_source_strided_conv():
    # stride 2 + dilation with a bilinear second source: the resize coordinates follow the
    # conv's input pixels, not its output pixels.
    x = _input((1, 19, 15, 20), "sliced")
    x2 = _input((1, 6, 7, 9), "permuted")
    w = _weight((9, 25, 3, 3), "contig")
    _check_fp32(
        x, w, None, None, stride=2, padding=2, dilation=2,
        x2=x2, x2_resize="bilinear", x2_align_corners=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "ac"), [("nearest", False), ("bilinear", False), ("bilinear", True)]
)
@pytest.mark.parametrize("how", ["size", "scale_factor"])
def test_reference_resize_matches_interpolate(mode, ac, how):
    # The reference (ATen upsample ops, scales passed through) against the composite a
    # model would run: F.interpolate + torch.cat + F.conv2d.
    x2 = torch.randn(1, 4, 7, 9)
    if how == "size":
        up = F.interpolate(
            x2, size=(15, 20), mode=mode, align_corners=ac if mode != "nearest" else None
        )
        scales = None
    else:
        up = F.interpolate(
            x2, scale_factor=1.7, mode=mode, align_corners=ac if mode != "nearest" else None
        )
        scales = (1.7, 1.7)
    x = torch.randn(1, 3, *up.shape[-2:])
    w = torch.randn(5, 7, 3, 3)
    expected = F.conv2d(torch.cat([x, up], 1), w, padding=1)
    got = conv2d_reference(
        x, w, padding=1, x2=x2, x2_resize=mode, x2_align_corners=ac, x2_scales=scales
    )
    assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_reference_matches_batch_norm():
    # scale/shift are a folded BatchNorm (+ conv bias): the reference reproduces
    # F.conv2d + F.batch_norm + F.relu, and so does the kernel.
    x = _input((1, 19, 9, 11))
    w = _weight((12, 19, 3, 3), "contig")
    bias, mean, var = torch.randn(12), torch.randn(12), torch.rand(12) + 0.5
    gamma, beta = torch.rand(12) + 0.5, torch.randn(12)
    scale = gamma / torch.sqrt(var + 1e-5)
    shift = beta + (bias - mean) * scale
    expected = F.relu(
        F.batch_norm(F.conv2d(x.cpu(), w.cpu(), bias, padding=1), mean, var, gamma, beta, eps=1e-5)
    )
    args = (x, w, scale.to(DEVICE), shift.to(DEVICE))
    assert_close(conv2d_reference(*args, padding=1, act="relu"), expected, atol=1e-5, rtol=1e-5)
    assert_close(conv2d(*args, padding=1, act="relu").cpu(), expected, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ out=


@pytest.mark.parametrize("depthwise", [False, True], ids=["gemm", "depthwise"])
def test_out_channel_slice(depthwise):
    # A producer writing straight into its channel slice of a channels_last concat buffer:
    # the slice gets the result, every other channel of the buffer keeps its value.
    x = _input((2, 12, 9, 11))
    cout, groups = (12, 12) if depthwise else (7, 1)
    w = _weight((cout, 1 if depthwise else 12, 3, 3))
    scale = _vec(cout, "scale")
    buf = torch.randn(2, 30, 9, 11, device=DEVICE).to(memory_format=CL)
    before = buf.clone()
    out = poison(buf[:, 5 : 5 + cout])
    kw = {"padding": 1, "groups": groups, "act": "relu6"}
    res = conv2d(x, w, scale, None, out=out, **kw)
    assert res.data_ptr() == out.data_ptr()
    assert_close(buf[:, 5 : 5 + cout], conv2d_reference(x, w, scale, None, **kw))
    assert torch.equal(buf[:, :5], before[:, :5])
    assert torch.equal(buf[:, 5 + cout :], before[:, 5 + cout :])


def test_out_dtype_fp16_from_fp32():
    # fp32 compute, fp16 store. Kernel and reference each round a fp32 value (equal to
    # ~1e-6) to fp16 once, so they may differ by one fp16 ulp: rtol 2**-10.
    x = _input((1, 19, 7, 9))
    w = _weight((10, 19, 3, 3))
    shift = _vec(10, "shift")
    ref = conv2d_reference(x, w, None, shift, padding=1, out_dtype=torch.float16)
    got = conv2d(x, w, None, shift, padding=1, out_dtype=torch.float16)
    assert got.dtype == torch.float16
    assert_close(got, ref, atol=1e-6, rtol=2**-10)


# ------------------------------------------------------------------------------ depthwise

# (id, x shape, (KH, KW), conv kwargs, x layout, w layout, residual_after_act)
DEPTHWISE = [
    ("3x3_s1", (1, 19, 13, 17), (3, 3), {"padding": 1}, "cl", "packed", False),
    ("3x3_s2", (2, 19, 13, 17), (3, 3), {"padding": 1, "stride": 2}, "contig", "contig", True),
    ("3x3_dil2", (1, 40, 9, 11), (3, 3), {"padding": 2, "dilation": 2}, "permuted", "packed", False),
    ("5x5_s2", (1, 12, 13, 17), (5, 5), {"padding": 2, "stride": 2}, "sliced", "sliced", True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("xs", "k", "kw", "xl", "wl", "after"),
    [d[1:] for d in DEPTHWISE],
    ids=[d[0] for d in DEPTHWISE],
)
def test_depthwise(xs, k, kw, xl, wl, after):
    c = xs[1]
    x = _input(xs, xl)
    w = _weight((c, 1, *k), wl)
    ho = conv2d_reference(x, w, groups=c, **kw).shape[-2:]
    res = 2.0 * _input((xs[0], c, *ho), "cl")
    _check_fp32(
        x, w, _vec(c, "scale"), _vec(c, "shift"), groups=c, act="relu6",
        residual=res, residual_after_act=after, **kw,
    )  # fmt: skip


# (id, x shape, Cout, (KH, KW), (top, bottom, left, right), stride, groups): TensorFlow-
# style "same" padding at stride 2 pads one more at the end (efficientnet-pytorch's
# Conv2dStaticSamePadding); the kernels read zeros past the map, so any split works.
ASYMMETRIC = [
    ("3x3_s2_same", (2, 19, 16, 18), 23, (3, 3), (0, 1, 0, 1), 2, 1),
    ("stem_flat_s2_same", (1, 3, 16, 18), 8, (3, 3), (0, 1, 0, 1), 2, 1),
    ("dw5x5_s2_same", (1, 16, 16, 14), 16, (5, 5), (1, 2, 1, 2), 2, 16),
    ("lopsided", (1, 19, 9, 11), 10, (3, 3), (2, 0, 0, 3), 1, 1),
]


@pytest.mark.parametrize(
    ("xs", "cout", "k", "pads", "stride", "groups"),
    [a[1:] for a in ASYMMETRIC],
    ids=[a[0] for a in ASYMMETRIC],
)
def test_asymmetric_padding(xs, cout, k, pads, stride, groups):
    x = _input(xs)
    w = _weight((cout, xs[1] // groups, *k))
    b = _vec(cout, "shift")
    top, bottom, left, right = pads
    ref = F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, stride, 0, 1, groups)
    out = conv2d(x, w, None, b, stride=stride, padding=pads, groups=groups, act="none")
    assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert_close(conv2d_reference(x, w, None, b, stride=stride, padding=pads, groups=groups), ref)
    with pytest.raises(ValueError, match="padding must be four ints >= 0"):
        conv2d(x, w, None, b, stride=stride, padding=(0, -1, 0, 1), groups=groups)


def test_depthwise_no_epilogue_params():
    x = _input((1, 19, 7, 9))
    _check_fp32(x, _weight((19, 1, 3, 3)), None, None, groups=19, padding=1)


# ------------------------------------------------------------------------------ fp16 / bf16

BF16_GPU = pytest.param(torch.bfloat16, marks=pytest.mark.gpu, id="bf16")
LOWP = [pytest.param(torch.float16, id="fp16"), BF16_GPU]


@pytest.mark.parametrize("dtype", LOWP)
def test_lowp_gemm(dtype):
    x = _input((2, 19, 13, 17), "cl", dtype)
    w = _weight((23, 19, 3, 3), "packed", dtype)
    res = _input((2, 23, 13, 17), "permuted", dtype)
    _check_lowp(x, w, _vec(23, "scale"), _vec(23, "shift"), padding=1, act="silu", residual=res)


@pytest.mark.parametrize("dtype", LOWP)
def test_lowp_stem(dtype):
    x = _input((1, 3, 19, 23), "contig", dtype)
    w = _weight((8, 3, 7, 7), "contig", dtype)
    _check_lowp(x, w, _vec(8, "scale"), _vec(8, "shift"), padding=3, stride=2, act="relu")


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize(
    ("mode", "ac", "first"),
    [("bilinear", False, False), ("bilinear", True, True), ("nearest", False, True)],
)
def test_lowp_two_source(dtype, mode, ac, first):
    # bilinear: the kernel blends x2 in fp32 and rounds the blended tile once to the
    # storage dtype before tl.dot — the rounding PyTorch does when it materialises up(x2).
    x = _input((1, 19, 15, 20), "cl", dtype)
    x2 = _input((1, 17, 7, 9), "cl", dtype)
    w = _weight((10, 36, 3, 3), "packed", dtype)
    _check_lowp(
        x, w, _vec(10, "scale"), _vec(10, "shift"), padding=1, act="relu",
        x2=x2, x2_resize=mode, x2_align_corners=ac, x2_first=first,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", LOWP)
def test_lowp_depthwise(dtype):
    x = _input((2, 19, 13, 17), "sliced", dtype)
    w = _weight((19, 1, 3, 3), "packed", dtype)
    res = _input((2, 19, 7, 9), "cl", dtype)
    _check_lowp(
        x, w, _vec(19, "scale"), _vec(19, "shift"), groups=19, padding=1, stride=2,
        act="relu6", residual=res,
    )  # fmt: skip


# ------------------------------------------------------------------------------ int64 offsets


class _LaunchSpy:
    """Wraps a Triton kernel object and records the keyword arguments of each launch."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.calls: list[dict] = []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.calls.append(kwargs)
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def spies(monkeypatch):
    gemm = _LaunchSpy(conv_mod._conv2d_kernel)
    dw = _LaunchSpy(conv_mod._dw_conv2d_kernel)
    monkeypatch.setattr(conv_mod, "_conv2d_kernel", gemm)
    monkeypatch.setattr(conv_mod, "_dw_conv2d_kernel", dw)
    return gemm, dw


def test_int64_offsets(monkeypatch, spies):
    # Real > 2**31-element tensors do not fit a test machine; lowering the threshold
    # compiles the int64-offset variant of both kernels on small tensors.
    monkeypatch.setattr(conv_mod, "_INT32_MAX", 0)
    gemm, dw = spies
    x = _input((1, 19, 9, 11), "permuted")
    x2 = _input((1, 6, 5, 6), "sliced")
    res = _input((1, 10, 9, 11), "contig")
    _check_fp32(
        x, _weight((10, 25, 3, 3)), _vec(10, "scale"), None, padding=1, residual=res,
        x2=x2, x2_resize="bilinear",
    )  # fmt: skip
    _check_fp32(_input((1, 3, 9, 11), "contig"), _weight((10, 3, 3, 3)), None, None, padding=1)
    _check_fp32(_input((1, 19, 9, 11), "contig"), _weight((19, 1, 3, 3)), None, None, groups=19)
    assert gemm.calls
    assert dw.calls
    assert all(c["IDX64"] for c in gemm.calls + dw.calls)


def test_loop_variant_selection(spies):
    # C1 ≤ 8 takes the flat-K loop (the RGB stem), wider inputs the per-tap channel blocks;
    # int32 offsets for ordinary sizes; ieee dot for fp32.
    gemm, _ = spies
    conv2d(_input((1, 3, 9, 11)), _weight((4, 3, 3, 3)))
    conv2d(_input((1, 9, 9, 11)), _weight((4, 9, 3, 3)))
    assert [c["FLAT_K"] for c in gemm.calls] == [True, False]
    assert not any(c["IDX64"] for c in gemm.calls)
    assert all(c["DOT_PRECISION"] == "ieee" for c in gemm.calls)


def test_split_k_heuristic():
    # (M, Cout, K iterations of 64 channels, SMs) -> split
    assert conv_mod._split_k_for(32 * 32, 256, 9 * 32, 132) == 8  # ASPP 2048→256 @ 32²
    assert conv_mod._split_k_for(64 * 128, 256, 9 * 32, 132) == 1  # ASPP @ 64×128: 128 tiles
    assert conv_mod._split_k_for(512 * 512, 64, 9, 132) == 1  # U-Net 64 @ 512²
    assert conv_mod._split_k_for(32 * 32, 1024, 9 * 16, 132) == 2  # 64 tiles
    assert conv_mod._split_k_for(32 * 32, 256, 20, 132) == 2  # a short K limits the split
    assert conv_mod._split_k_for(7 * 7, 2048, 9 * 32, 16) == 1  # 16 tiles fill 16 SMs


SPLIT_CASES = [
    ("blocked_residual_after", (2, 19, 9, 11), None, {"residual_after_act": True}),
    ("flat_two_source", (1, 5, 15, 20), (1, 19, 7, 9), {"x2_resize": "bilinear"}),
]


@pytest.mark.parametrize(
    ("xs", "x2s", "extra"), [c[1:] for c in SPLIT_CASES], ids=[c[0] for c in SPLIT_CASES]
)
def test_split_k(monkeypatch, spies, xs, x2s, extra):
    # Split-K only triggers on a GPU with few output tiles; force 4 splits here: uneven
    # over 18 channel-block iterations, and more splits than the 3 flat-K iterations
    # (some programs get no x iteration at all). Written into a channel slice.
    monkeypatch.setattr(conv_mod, "_split_k", lambda p, device: 4)
    gemm, _ = spies
    x = _input(xs)
    x2 = _input(x2s) if x2s is not None else None
    cin = xs[1] + (x2s[1] if x2s is not None else 0)
    w = _weight((23, cin, 3, 3))
    res = _input((xs[0], 23, *xs[2:]), "permuted")
    kw = {"padding": 1, "act": "tanh", "residual": res, "x2": x2, **extra}
    scale, shift = _vec(23, "scale"), _vec(23, "shift")
    buf = torch.randn(xs[0], 40, *xs[2:], device=DEVICE).to(memory_format=CL)
    before = buf.clone()
    out = poison(buf[:, 7:30])
    conv2d(x, w, scale, shift, out=out, **kw)
    assert_close(out, conv2d_reference(x, w, scale, shift, **kw), atol=1e-4, rtol=1e-4)
    assert torch.equal(buf[:, :7], before[:, :7])
    assert torch.equal(buf[:, 30:], before[:, 30:])
    assert [c["SPLIT_K"] for c in gemm.calls] == [4]


# ------------------------------------------------------------------------------ errors


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(device=DEVICE, dtype=dtype)


ERRORS = [
    ("groups2", lambda: ((_t(1, 4, 5, 5), _t(4, 2, 3, 3)), {"groups": 2}), ValueError, "groups must be 1 or equal"),
    ("weight_rank", lambda: ((_t(1, 4, 5, 5), _t(4, 4, 3)), {}), ValueError, r"weight must be 4-D"),
    ("x_rank", lambda: ((_t(4, 5, 5), _t(4, 4, 3, 3)), {}), ValueError, r"x must be 4-D"),
    ("cin_mismatch", lambda: ((_t(1, 4, 5, 5), _t(4, 5, 3, 3)), {}), ValueError, r"Cin = C1 \+ C2 = 4 \+ 0"),
    ("cin_mismatch_x2", lambda: ((_t(1, 4, 5, 5), _t(4, 5, 3, 3)), {"x2": _t(1, 2, 5, 5)}), ValueError, r"C1 \+ C2 = 4 \+ 2 = 6"),
    ("x2_batch", lambda: ((_t(1, 4, 5, 5), _t(4, 6, 3, 3)), {"x2": _t(2, 2, 5, 5)}), ValueError, "x2 must have x's batch size 1, got 2"),
    ("x2_size", lambda: ((_t(1, 4, 5, 5), _t(4, 6, 3, 3)), {"x2": _t(1, 2, 3, 3)}), ValueError, "x2_resize='none'"),
    ("x2_dtype", lambda: ((_t(1, 4, 5, 5), _t(4, 6, 3, 3)), {"x2": _t(1, 2, 5, 5, dtype=torch.float16)}), TypeError, "x2 must have x's dtype"),
    ("x2_resize_name", lambda: ((_t(1, 4, 5, 5), _t(4, 6, 3, 3)), {"x2": _t(1, 2, 5, 5), "x2_resize": "bicubic"}), ValueError, "x2_resize must be one of"),
    ("x2_opts_without_x2", lambda: ((_t(1, 4, 5, 5), _t(4, 4, 3, 3)), {"x2_resize": "bilinear"}), ValueError, "need x2"),
    ("x2_depthwise", lambda: ((_t(1, 4, 5, 5), _t(4, 1, 3, 3)), {"groups": 4, "x2": _t(1, 2, 5, 5)}), ValueError, "only supported with groups=1"),
    ("int_dtype", lambda: ((_t(1, 4, 5, 5).to(torch.int32), _t(4, 4, 3, 3).to(torch.int32)), {}), TypeError, "x must be float32, float16 or bfloat16, got torch.int32"),
    ("weight_dtype", lambda: ((_t(1, 4, 5, 5), _t(4, 4, 3, 3, dtype=torch.float16)), {}), TypeError, "weight must have x's dtype"),
    ("out_shape", lambda: ((_t(1, 4, 5, 5), _t(6, 4, 3, 3)), {"out": _t(1, 6, 5, 5)}), ValueError, r"out must be \[N, Cout, Ho, Wo\] = \(1, 6, 3, 3\), got \(1, 6, 5, 5\)"),
    ("residual_shape", lambda: ((_t(1, 4, 5, 5), _t(6, 4, 3, 3)), {"residual": _t(1, 4, 3, 3)}), ValueError, "residual must be"),
    ("scale_shape", lambda: ((_t(1, 4, 5, 5), _t(6, 4, 3, 3), _t(4)), {}), ValueError, r"scale must be \[Cout\]"),
    ("act", lambda: ((_t(1, 4, 5, 5), _t(6, 4, 3, 3)), {"act": "mish"}), ValueError, "activation must be one of"),
    ("stride0", lambda: ((_t(1, 4, 5, 5), _t(6, 4, 3, 3)), {"stride": 0}), ValueError, "stride must be >= 1"),
    ("padding_triple", lambda: ((_t(1, 4, 5, 5), _t(6, 4, 3, 3)), {"padding": (1, 1, 1)}), ValueError, "padding must be an int or a pair"),
    ("too_small", lambda: ((_t(1, 4, 2, 2), _t(6, 4, 3, 3)), {}), ValueError, "smaller than the dilated kernel"),
]  # fmt: skip


@pytest.mark.parametrize("fn", [conv2d, conv2d_reference], ids=["kernel", "reference"])
@pytest.mark.parametrize(
    ("make", "exc", "match"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_errors(fn, make, exc, match):
    args, kwargs = make()
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_error_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3))


# ------------------------------------------------------------------------------ GPU only


# (id, x shape, Cout, (KH, KW), conv kwargs, x2 shape or None)
REALISTIC = [
    ("unet_3x3_64@512", (1, 64, 512, 512), 64, (3, 3), {"padding": 1}, None),
    ("aspp_2048@32_rate12", (1, 2048, 32, 32), 256, (3, 3), {"padding": 12, "dilation": 12}, None),
    ("decoder_64@256+128@128", (1, 64, 256, 256), 64, (3, 3), {"padding": 1}, (1, 128, 128, 128)),
    ("stem_7x7_s2", (2, 3, 512, 512), 64, (7, 7), {"padding": 3, "stride": 2}, None),
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"]
)
@pytest.mark.parametrize(
    ("xs", "cout", "k", "kw", "x2s"), [r[1:] for r in REALISTIC], ids=[r[0] for r in REALISTIC]
)
def test_realistic_gpu(xs, cout, k, kw, x2s, dtype):
    x = _input(xs, "cl", dtype)
    x2 = _input(x2s, "cl", dtype) if x2s is not None else None
    cin = xs[1] + (x2s[1] if x2s is not None else 0)
    w = _weight((cout, cin, *k), "packed", dtype)
    args = (x, w, _vec(cout, "scale"), _vec(cout, "shift"))
    kw = {**kw, "act": "relu"}
    if x2 is not None:
        kw.update(x2=x2, x2_resize="bilinear")
    # fp64 reference (stored as fp32): with long reductions (K up to 18432) the kernel's
    # own accumulation error is then the only error measured.
    ref_kw = {**_reference_defaults(kw), "out_dtype": torch.float32}
    ref = conv_mod._reference(*args, compute_dtype=torch.float64, **ref_kw)
    out = poison(torch.empty(ref.shape, dtype=dtype, device=DEVICE).to(memory_format=CL))
    conv2d(*args, out=out, **kw)
    if dtype == torch.float32:
        assert_close(out, ref, atol=1e-4, rtol=1e-4)
    else:
        lowp = conv_mod._reference(*args, compute_dtype=dtype, **_reference_defaults(kw))
        assert_low_precision_close(out, ref, lowp)
