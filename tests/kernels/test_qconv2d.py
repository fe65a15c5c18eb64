"""segfast.kernels.qconv2d against its meaning, the composite ``ops.qconv2d_impl``.

The kernel sums the int8 products exactly (int32) and dequantizes once; the composite
sums fp32 (fp16/bf16) products of the same integers. So they agree to the rounding of
the composite's float arithmetic, bounded per element by a few ulps of the dtype times
the magnitude of what was summed — ``s_x·s_w[c]·Σ|q_x·q_w| + |bias| + |residual|``
(``_bound``, the per-dtype table ``ULPS``) — and the quantized integers themselves
must be identical (the rounding-tie tests check them exactly).

Interpreter tests use small odd shapes; realistic layers and bf16 are GPU-only.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import triton

import segfast.kernels.qconv2d as q_mod
from segfast.compiler.ops import dequantize_weight, fake_quant, join_sources, qconv2d_impl
from segfast.compiler.quant.apply import quantize_weight
from segfast.kernels._common import ACTIVATIONS
from segfast.kernels.qconv2d import pack_qconv_weight, qconv2d
from segfast.testing import poison

CL = torch.channels_last
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# dtype → (ulp of 1 in that dtype, how many): the composite rounds each dequantized
# operand, each product and its running sums, the bias / residual adds and the
# activation in the dtype; the kernel rounds once (fp32 epilogue, one store). Measured
# on the interpreter shapes (K ≤ 333): fp32 ≤ 2 ulps × magnitude (oneDNN's blocked
# fp32 sums; 8 leaves room for other ISAs' blockings), fp16 ≤ 0.6.
ULPS = {
    torch.float32: (2.0**-23, 8),
    torch.float16: (2.0**-10, 4),
    torch.bfloat16: (2.0**-7, 4),
}


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def _gpu_settings(request, monkeypatch):
    """On a GPU: no TF32 in the composite's fp32 conv, and one tile config for the small
    tests (a second tiling besides the interpreter's); realistic tests autotune."""
    if not torch.cuda.is_available():
        return
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    if request.node.originalname != "test_realistic_gpu":
        gemm = triton.Config(
            {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3
        )
        dw = triton.Config({"BLOCK_P": 64, "BLOCK_C": 32}, num_warps=4, num_stages=1)
        monkeypatch.setattr(q_mod._qconv2d_kernel, "configs", [gemm])
        monkeypatch.setattr(q_mod._qdw_conv2d_kernel, "configs", [dw])
        monkeypatch.setattr(q_mod._qconv2d_kernel, "cache", {})
        monkeypatch.setattr(q_mod._qdw_conv2d_kernel, "cache", {})


def _input(shape: tuple[int, ...], layout: str = "cl", dtype=torch.float32) -> torch.Tensor:
    """A [N, C, H, W] tensor (values ~N(0, 2²)) in one of four memory layouts."""
    n, c, h, w = shape

    def base(*s):
        return (2.0 * torch.randn(*s)).to(device=DEVICE, dtype=dtype)

    if layout == "cl":
        t = base(n, c, h, w).to(memory_format=CL)
    elif layout == "contig":
        t = base(n, c, h, w)
    elif layout == "permuted":  # memory [W, C, N, H]
        t = base(w, c, n, h).permute(2, 1, 3, 0)
    elif layout == "sliced":  # a channel slice with every other row and an offset column
        t = base(n, c + 5, 2 * h, w + 3)[:, 2 : 2 + c, ::2, 1 : 1 + w]
    else:
        raise AssertionError(layout)
    assert tuple(t.shape) == shape
    return t


def _qweight(shape: tuple[int, ...], layout: str = "packed") -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight [Cout, Cin, KH, KW] in a layout, fp32 w_scale [Cout]) from a random
    float weight, quantized per output channel as segfast's int8 stage does."""
    co, ci, kh, kw = shape
    q, s = quantize_weight(torch.randn(co, ci, kh, kw) / (ci * kh * kw) ** 0.5, 0)
    q, s = q.to(DEVICE), s.to(DEVICE)
    if layout == "packed":
        q = pack_qconv_weight(q)
    elif layout == "sliced":
        big = torch.zeros(co, ci + 3, kh, kw + 2, dtype=torch.int8, device=DEVICE)
        big[:, 1 : 1 + ci, :, 1 : 1 + kw] = q
        q = big[:, 1 : 1 + ci, :, 1 : 1 + kw]
    elif layout == "nchw_packed":  # conv2d's float packing: Cout stride 1
        q = q.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    elif layout != "contig":
        raise AssertionError(layout)
    assert tuple(q.shape) == shape
    return q, s


def _x_scale(*xs: torch.Tensor | None) -> float:
    """amax / 127 over the inputs, a little under the max so that some values clamp."""
    return 0.9 * max(float(t.float().abs().max()) for t in xs if t is not None) / 127


def _pair(v) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


def _composite(x, weight, bias, *, x_scale, w_scale, out_dtype=None, **kw) -> torch.Tensor:
    """``qconv2d_impl`` called with the launcher's keyword arguments (its positional
    graph signature: pairs as lists, the x2 scales split)."""
    scales = kw.get("x2_scales")
    y = qconv2d_impl(
        x, weight, bias, _pair(kw.get("stride", 1)), _pair(kw.get("padding", 0)),
        _pair(kw.get("dilation", 1)), kw.get("groups", 1), kw.get("act", "none"),
        kw.get("act_param", 0.01), kw.get("residual"), kw.get("residual_after_act", False),
        kw.get("x2"), kw.get("x2_resize", "none"), kw.get("x2_align_corners", False),
        None if scales is None else scales[0], None if scales is None else scales[1],
        kw.get("x2_first", False), x_scale, w_scale,
    )  # fmt: skip
    return y if out_dtype is None else y.to(out_dtype)


def _bound(x, weight, bias, *, x_scale, w_scale, dtype, **kw) -> torch.Tensor:
    """Per element: ULPS[dtype] × (s_x·s_w·Σ|q_x·q_w| + |bias| + |residual|), in fp64."""
    inp = join_sources(
        x.double(), None if kw.get("x2") is None else kw["x2"].double(),
        kw.get("x2_resize", "none"), kw.get("x2_align_corners", False),
        *(kw.get("x2_scales") or (None, None)), kw.get("x2_first", False),
    )  # fmt: skip
    xq = fake_quant(inp.to(x.dtype), x_scale).double().abs()
    wq = dequantize_weight(weight, w_scale, 0, torch.float64).abs()
    mag = F.conv2d(
        xq, wq, None, _pair(kw.get("stride", 1)), _pair(kw.get("padding", 0)),
        _pair(kw.get("dilation", 1)), kw.get("groups", 1),
    )  # fmt: skip
    if bias is not None:
        mag = mag + bias.double().abs()[None, :, None, None]
    if kw.get("residual") is not None:
        mag = mag + kw["residual"].double().abs()
    eps, n = ULPS[dtype]
    return n * eps * mag


def _assert_within(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    """|out − ref| ≤ bound elementwise (+ one ulp of ref for the final rounding); on
    failure: how many, where, the worst, NaN/Inf."""
    o, r, b = out.double().cpu(), ref.double().cpu(), bound.double().cpu()
    eps = ULPS.get(out.dtype, (2.0**-23, 1))[0]
    b = b + eps * r.abs()
    err = (o - r).abs()
    bad = ~(err <= b)  # NaN counts as bad
    if bool(bad.any()):
        idx = bad.nonzero()[:5].tolist()
        worst = float(((err - b) / b.clamp_min(1e-30)).nan_to_num(float("inf")).max())
        lines = [
            f"{int(bad.sum())} of {o.numel()} elements beyond the bound (worst {worst:.3g}× "
            f"over; NaN {int(o.isnan().sum())}, Inf {int(o.isinf().sum())})",
            *(
                f"  at {tuple(i)}: out={o[tuple(i)].item():.8g} ref={r[tuple(i)].item():.8g} "
                f"bound={b[tuple(i)].item():.3g}"
                for i in idx
            ),
        ]
        raise AssertionError("\n".join(lines))


def _check(x, weight, bias, *, default_out: bool = False, **kw) -> torch.Tensor:
    """qconv2d == the composite within the bound, written into a poisoned out= (and
    through the default channels_last allocation with ``default_out``)."""
    ref = _composite(x, weight, bias, **kw)
    bound = _bound(x, weight, bias, dtype=x.dtype, **kw)
    out = poison(torch.empty_like(ref, memory_format=CL))
    assert qconv2d(x, weight, bias, out=out, **kw) is out
    _assert_within(out, ref, bound)
    if default_out:
        got = qconv2d(x, weight, bias, **kw)
        assert got.is_contiguous(memory_format=CL)
        assert got.dtype == x.dtype
        _assert_within(got, ref, bound)
    return ref


def _vec(n: int, dtype=torch.float32) -> torch.Tensor:
    return (0.5 * torch.randn(n)).to(device=DEVICE, dtype=dtype)


# ------------------------------------------------------------------------------ geometry

# (id, x shape, Cout, (KH, KW), conv kwargs). C1 ≤ 16 takes the flat (kh, kw, c) K loop,
# C1 > 16 the per-tap channel blocks (37 channels: one full and one partial 32-block);
# Cout 23 and odd pixel counts give partial tiles along both GEMM dims.
GEOMETRY = [
    ("1x3x7x9_3x3", (1, 3, 7, 9), 6, (3, 3), {"padding": 1}),
    ("1x3x7x9_1x1", (1, 3, 7, 9), 6, (1, 1), {}),
    ("2x5x13x11_3x3", (2, 5, 13, 11), 23, (3, 3), {"padding": 1}),
    ("2x5x13x11_s2", (2, 5, 13, 11), 23, (3, 3), {"padding": 1, "stride": 2}),
    ("1x1_blocked", (2, 37, 9, 11), 23, (1, 1), {}),
    ("3x3_blocked", (2, 37, 9, 11), 23, (3, 3), {"padding": 1}),
    ("3x3_nopad", (1, 19, 13, 11), 10, (3, 3), {}),
    ("3x3_dil2", (1, 37, 13, 11), 23, (3, 3), {"padding": 2, "dilation": 2}),
    ("3x3_s2_blocked", (2, 37, 13, 11), 23, (3, 3), {"padding": 1, "stride": 2}),
    ("7x7_s2_stem", (1, 3, 19, 23), 8, (7, 7), {"padding": 3, "stride": 2}),
    ("1x3", (1, 37, 7, 9), 23, (1, 3), {"padding": (0, 1)}),
    ("3x3_rect", (1, 19, 13, 17), 9, (3, 3), {"padding": (2, 1), "dilation": (2, 1), "stride": (1, 2)}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("xs", "cout", "k", "kw"), [g[1:] for g in GEOMETRY], ids=[g[0] for g in GEOMETRY]
)
def test_geometry_fp32(xs, cout, k, kw):
    x = _input(xs)
    w, ws = _qweight((cout, xs[1], *k))
    _check(x, w, _vec(cout), x_scale=_x_scale(x), w_scale=ws, default_out=True, **kw)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_activations(act):
    # pre-activation values span about ±10, a few pushed to ±300 through the residual
    x = _input((1, 19, 7, 9))
    w, ws = _qweight((21, 19, 3, 3))
    res = 3.0 * _input((1, 21, 7, 9))
    res[0, :3, 0, :4] = 300.0
    res[0, 3:6, 1, :4] = -300.0
    _check(x, w, _vec(21), x_scale=_x_scale(x), w_scale=ws, padding=1, act=act,
           act_param=0.2, residual=res)  # fmt: skip


@pytest.mark.parametrize("after", [False, True], ids=["before_act", "after_act"])
@pytest.mark.parametrize("res_layout", ["cl", "permuted"])
def test_residual(after, res_layout):
    x = _input((2, 19, 9, 11))
    w, ws = _qweight((23, 19, 3, 3))
    res = _input((2, 23, 5, 6), res_layout)
    ref = _check(x, w, _vec(23), x_scale=_x_scale(x), w_scale=ws, stride=2, padding=1,
                 act="relu", residual=res, residual_after_act=after)  # fmt: skip
    assert bool((ref < 0).any()) == after  # the two orders really differ here


def test_no_bias():
    x = _input((1, 19, 7, 9))
    w, ws = _qweight((12, 19, 3, 3))
    _check(x, w, None, x_scale=_x_scale(x), w_scale=ws, padding=1, act="leaky_relu")


LAYOUTS = [
    ("cl", "packed"),
    ("contig", "contig"),
    ("permuted", "sliced"),
    ("sliced", "packed"),
    ("cl", "nchw_packed"),
]


@pytest.mark.parametrize(("xl", "wl"), LAYOUTS, ids=[f"x_{a}-w_{b}" for a, b in LAYOUTS])
@pytest.mark.parametrize("c1", [5, 37], ids=["flat_k", "blocked"])
def test_layouts(xl, wl, c1):
    x = _input((2, c1, 9, 11), xl)
    w, ws = _qweight((23, c1, 3, 3), wl)
    _check(x, w, _vec(23), x_scale=_x_scale(x), w_scale=ws, padding=1, act="relu")


def test_pack_qconv_weight_layout():
    w = torch.randint(-127, 128, (6, 5, 3, 2), dtype=torch.int8)
    p = pack_qconv_weight(w)
    assert torch.equal(p, w)
    assert p.permute(0, 2, 3, 1).is_contiguous()  # memory [Cout, KH, KW, Cin]: K-major
    d = pack_qconv_weight(torch.randint(-127, 128, (7, 1, 3, 3), dtype=torch.int8))
    assert d.stride(0) == 1  # depthwise: each tap's channel vector contiguous


# ------------------------------------------------------------------------------ quantization


def _identity(c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1×1 int8 identity weight with unit scales: the conv returns q(x)·x_scale."""
    w = torch.eye(c, dtype=torch.int8, device=DEVICE)[:, :, None, None].contiguous()
    return w, torch.ones(c, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_rounding_ties_to_even_and_saturation(dtype):
    # x_scale a power of two: x / s and x · (1/s) are exact on every device, so every
    # (k + ½)·s is a true tie. Round half to even, clamp to [−128, 127], ±Inf saturate.
    s = 2.0**-3
    cases = [  # (x / x_scale, its int8)
        (0.5, 0), (1.5, 2), (2.5, 2), (-0.5, 0), (-1.5, -2), (-2.5, -2), (3.5, 4),
        (100.5, 100), (126.5, 126), (127.5, 127), (-127.5, -128), (-128.5, -128),
        (0.0, 0), (1.25, 1), (-1.75, -2), (64.0, 64), (200.0, 127), (-300.0, -128),
        (float("inf"), 127), (float("-inf"), -128),
    ]  # fmt: skip
    k = torch.tensor([a for a, _ in cases], dtype=torch.float64)
    expected = torch.tensor([b for _, b in cases], dtype=torch.float64)
    assert torch.equal(torch.round(k).clamp(-128, 127), expected)  # torch.round: ties to even
    c = k.numel()
    x = (k * s).to(dtype).reshape(1, c, 1, 1).expand(1, c, 3, 5).to(DEVICE)
    x = x.contiguous(memory_format=CL)
    w, ws = _identity(c)
    y = qconv2d(x, w, None, x_scale=s, w_scale=ws)
    assert torch.equal(y.double().cpu(), (expected * s).reshape(1, c, 1, 1).expand(1, c, 3, 5))
    # the same integers requantized at the same scale: the int8 output is the integers
    yq = qconv2d(x, w, None, x_scale=s, w_scale=ws, out_scale=s)
    assert yq.dtype == torch.int8
    assert torch.equal(yq.cpu(), expected.to(torch.int8).reshape(1, c, 1, 1).expand(1, c, 3, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_near_ties_quantize_as_the_composite(dtype):
    # An arbitrary scale: (k + ½)·s rounded to the dtype lands just beside the tie, and
    # the side depends on the device's arithmetic (CPU: x / s; CUDA: x · fp32(1/s)), the
    # quotient's rounding to the dtype, then half to even. The identity conv returns
    # q·s rounded to the dtype on both sides (the composite's other products are 0·q):
    # equal, not merely close.
    s = 0.0123456789
    k = torch.arange(-130, 130, dtype=torch.float64) + 0.5
    c = 65
    x = (k * s).to(dtype).reshape(1, c, 2, 2).to(DEVICE).contiguous(memory_format=CL)
    w, ws = _identity(c)
    got = qconv2d(x, w, None, x_scale=s, w_scale=ws)
    ref = _composite(x, w, None, x_scale=s, w_scale=ws)
    assert torch.equal(got.cpu(), ref.cpu())


def test_two_source_shares_one_scale():
    # x2's values reach the int8 range only with x's scale: a second scale would differ
    x = 0.1 * _input((1, 5, 6, 7))
    x2 = 4.0 * _input((1, 19, 3, 4))
    w, ws = _qweight((9, 24, 3, 3))
    _check(x, w, None, x_scale=_x_scale(x, x2), w_scale=ws, padding=1, x2=x2,
           x2_resize="nearest")  # fmt: skip


# ------------------------------------------------------------------------------ two sources

# (id, x shape, x2 shape, resize, align_corners, x2_scales, x2_first): non-integer
# ratios, exact ×2 with scales, a scale that disagrees with the sizes, a downscale; both
# concat orders; C1 = 5 takes x's flat-K loop, C1 = 37 its channel blocks.
TWO_SOURCE = [
    ("none", (2, 37, 9, 11), (2, 7, 9, 11), "none", False, None, False),
    ("none_first", (2, 5, 9, 11), (2, 7, 9, 11), "none", False, None, True),
    ("nearest_size", (1, 5, 15, 20), (1, 19, 7, 9), "nearest", False, None, False),
    ("nearest_size_first", (1, 37, 15, 20), (1, 6, 7, 9), "nearest", False, None, True),
    ("nearest_x2", (1, 6, 14, 18), (1, 7, 7, 9), "nearest", False, (2.0, 2.0), False),
    ("nearest_s1.7_first", (1, 6, 11, 15), (1, 7, 7, 9), "nearest", False, (1.7, 1.7), True),
    ("bilinear_size", (1, 5, 15, 20), (1, 19, 7, 9), "bilinear", False, None, False),
    ("bilinear_size_first", (1, 37, 15, 20), (1, 6, 7, 9), "bilinear", False, None, True),
    ("bilinear_size_ac", (1, 5, 15, 20), (1, 19, 7, 9), "bilinear", True, None, False),
    ("bilinear_x2", (1, 6, 14, 18), (1, 7, 7, 9), "bilinear", False, (2.0, 2.0), True),
    ("bilinear_s1.7", (1, 6, 11, 15), (1, 7, 7, 9), "bilinear", False, (1.7, 1.7), False),
    ("bilinear_down_first", (1, 6, 7, 9), (1, 5, 17, 19), "bilinear", False, None, True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("xs", "x2s", "mode", "ac", "scales", "first"),
    [t[1:] for t in TWO_SOURCE],
    ids=[t[0] for t in TWO_SOURCE],
)
def test_two_source(xs, x2s, mode, ac, scales, first):
    x = _input(xs)
    x2 = _input(x2s, "contig" if first else "cl")
    w, ws = _qweight((10, xs[1] + x2s[1], 3, 3))
    _check(
        x, w, _vec(10), x_scale=_x_scale(x, x2), w_scale=ws, padding=1, act="relu",
        x2=x2, x2_resize=mode, x2_align_corners=ac, x2_scales=scales, x2_first=first,
    )  # fmt: skip


def test_two_source_strided_conv():
    x = _input((1, 19, 15, 20), "sliced")
    x2 = _input((1, 6, 7, 9), "permuted")
    w, ws = _qweight((9, 25, 3, 3), "contig")
    _check(x, w, None, x_scale=_x_scale(x, x2), w_scale=ws, stride=2, padding=2, dilation=2,
           x2=x2, x2_resize="bilinear", x2_align_corners=True)  # fmt: skip


# ------------------------------------------------------------------------------ depthwise

DEPTHWISE = [
    ("3x3_s1", (1, 19, 13, 17), (3, 3), {"padding": 1}, "cl", "packed", False),
    ("3x3_s2", (2, 19, 13, 11), (3, 3), {"padding": 1, "stride": 2}, "contig", "contig", True),
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
    w, ws = _qweight((c, 1, *k), wl)
    ho = _composite(x, w, None, x_scale=1.0, w_scale=ws, groups=c, **kw).shape[-2:]
    res = _input((xs[0], c, *ho), "cl")
    _check(x, w, _vec(c), x_scale=_x_scale(x), w_scale=ws, groups=c, act="relu6",
           residual=res, residual_after_act=after, **kw)  # fmt: skip


# ------------------------------------------------------------------------------ fp16 / bf16

BF16_GPU = pytest.param(torch.bfloat16, marks=pytest.mark.gpu, id="bf16")
LOWP = [pytest.param(torch.float16, id="fp16"), BF16_GPU]


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("layout", ["cl", "contig"])
def test_lowp_gemm(dtype, layout):
    x = _input((2, 37, 9, 11), layout, dtype)
    w, ws = _qweight((23, 37, 3, 3))
    res = _input((2, 23, 9, 11), "permuted", dtype)
    _check(x, w, _vec(23, dtype), x_scale=_x_scale(x), w_scale=ws, padding=1, act="silu",
           residual=res)  # fmt: skip


@pytest.mark.parametrize("dtype", LOWP)
def test_lowp_stem(dtype):
    x = _input((1, 3, 19, 23), "contig", dtype)
    w, ws = _qweight((8, 3, 7, 7), "contig")
    _check(x, w, _vec(8, dtype), x_scale=_x_scale(x), w_scale=ws, padding=3, stride=2,
           act="relu")  # fmt: skip


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize(
    ("mode", "ac", "first"),
    [("bilinear", False, False), ("bilinear", True, True), ("nearest", False, True)],
)
def test_lowp_two_source(dtype, mode, ac, first):
    # bilinear: blended in fp32, rounded once to the dtype (the composite's materialised
    # up(x2)), then quantized
    x = _input((1, 19, 15, 20), "cl", dtype)
    x2 = _input((1, 17, 7, 9), "cl", dtype)
    w, ws = _qweight((10, 36, 3, 3))
    _check(x, w, _vec(10, dtype), x_scale=_x_scale(x, x2), w_scale=ws, padding=1, act="relu",
           x2=x2, x2_resize=mode, x2_align_corners=ac, x2_first=first)  # fmt: skip


@pytest.mark.parametrize("dtype", LOWP)
def test_lowp_depthwise(dtype):
    x = _input((2, 19, 13, 17), "sliced", dtype)
    w, ws = _qweight((19, 1, 3, 3))
    res = _input((2, 19, 7, 9), "cl", dtype)
    _check(x, w, _vec(19, dtype), x_scale=_x_scale(x), w_scale=ws, groups=19, padding=1,
           stride=2, act="relu6", residual=res)  # fmt: skip


def test_out_dtype_fp32_from_fp16():
    x = _input((1, 19, 7, 9), "cl", torch.float16)
    w, ws = _qweight((10, 19, 3, 3))
    kw = {"x_scale": _x_scale(x), "w_scale": ws, "padding": 1}
    got = qconv2d(x, w, None, out_dtype=torch.float32, **kw)
    assert got.dtype == torch.float32
    # fp32 store of the fp32 epilogue: the composite in fp16 is within its own rounding
    _assert_within(got, _composite(x, w, None, **kw), _bound(x, w, None, dtype=x.dtype, **kw))


# ------------------------------------------------------------------------------ int8 output


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("depthwise", [False, True], ids=["gemm", "depthwise"])
def test_int8_output(dtype, depthwise):
    # out_scale: the float result quantized for an int8 consumer. Exactly the kernel's
    # own float output quantized the composite's way (fake_quant: ties to even, clamped);
    # against the composite within one step (the float results differ by rounding).
    c = 19
    x = _input((2, c, 9, 11), "cl", dtype)
    w, ws = _qweight((c, 1, 3, 3) if depthwise else (23, c, 3, 3))
    cout = w.shape[0]
    res = _input((2, cout, 9, 11), "cl", dtype)
    kw = {"x_scale": _x_scale(x), "w_scale": ws, "padding": 1, "act": "relu6",
          "residual": res, "groups": c if depthwise else 1}  # fmt: skip
    bias = _vec(cout, dtype)
    yf = qconv2d(x, w, bias, **kw)
    out_scale = 0.8 * float(yf.float().abs().max()) / 127  # some values saturate
    out = poison(torch.empty(yf.shape, dtype=torch.int8, device=DEVICE).to(memory_format=CL))
    got = qconv2d(x, w, bias, out_scale=out_scale, out=out, **kw)
    assert got is out
    assert got.dtype == torch.int8
    own = (fake_quant(yf.cpu(), out_scale) / out_scale).round()
    assert torch.equal(got.cpu().to(own.dtype), own)
    ref = (fake_quant(_composite(x, w, bias, **kw).cpu(), out_scale) / out_scale).round()
    assert int((got.cpu().double() - ref.double()).abs().max()) <= 1
    assert float((got.cpu().double() == ref.double()).double().mean()) >= 0.99


# ------------------------------------------------------------------------------ out=


@pytest.mark.parametrize("depthwise", [False, True], ids=["gemm", "depthwise"])
def test_out_channel_slice(depthwise):
    x = _input((2, 12, 9, 11))
    cout, groups = (12, 12) if depthwise else (7, 1)
    w, ws = _qweight((cout, 1 if depthwise else 12, 3, 3))
    kw = {"x_scale": _x_scale(x), "w_scale": ws, "padding": 1, "groups": groups, "act": "relu"}
    buf = torch.randn(2, 30, 9, 11, device=DEVICE).to(memory_format=CL)
    before = buf.clone()
    out = poison(buf[:, 5 : 5 + cout])
    assert qconv2d(x, w, None, out=out, **kw).data_ptr() == out.data_ptr()
    _assert_within(buf[:, 5 : 5 + cout], _composite(x, w, None, **kw),
                   _bound(x, w, None, dtype=x.dtype, **kw))  # fmt: skip
    assert torch.equal(buf[:, :5], before[:, :5])
    assert torch.equal(buf[:, 5 + cout :], before[:, 5 + cout :])


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


def test_int64_offsets_and_variants(monkeypatch):
    gemm = _LaunchSpy(q_mod._qconv2d_kernel)
    dw = _LaunchSpy(q_mod._qdw_conv2d_kernel)
    monkeypatch.setattr(q_mod, "_qconv2d_kernel", gemm)
    monkeypatch.setattr(q_mod, "_qdw_conv2d_kernel", dw)
    x = _input((1, 5, 9, 11))
    w, ws = _qweight((6, 5, 3, 3))
    qconv2d(x, w, None, x_scale=0.1, w_scale=ws)
    x = _input((1, 17, 9, 11))
    w, ws = _qweight((6, 17, 3, 3))
    qconv2d(x, w, None, x_scale=0.1, w_scale=ws)
    assert [c["FLAT_K"] for c in gemm.calls] == [True, False]  # C1 ≤ 16: flat K
    assert not any(c["IDX64"] for c in gemm.calls)
    assert all(c["QUANT_CPU"] == (DEVICE == "cpu") for c in gemm.calls)
    # int64 offsets: real > 2**31-element tensors do not fit a test machine
    monkeypatch.setattr(q_mod, "_INT32_MAX", 0)
    x = _input((1, 19, 9, 11), "permuted")
    x2 = _input((1, 6, 5, 6), "sliced")
    w, ws = _qweight((10, 25, 3, 3))
    res = _input((1, 10, 9, 11), "contig")
    _check(x, w, _vec(10), x_scale=_x_scale(x, x2), w_scale=ws, padding=1, residual=res,
           x2=x2, x2_resize="bilinear")  # fmt: skip
    x = _input((1, 3, 9, 11), "contig")
    w, ws = _qweight((10, 3, 3, 3))
    _check(x, w, None, x_scale=_x_scale(x), w_scale=ws, padding=1)
    x = _input((1, 19, 9, 11), "contig")
    w, ws = _qweight((19, 1, 3, 3))
    _check(x, w, None, x_scale=_x_scale(x), w_scale=ws, groups=19)
    assert all(c["IDX64"] for c in gemm.calls[2:] + dw.calls)
    assert dw.calls


# ------------------------------------------------------------------------------ errors


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(device=DEVICE, dtype=dtype)


def _w(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8, device=DEVICE)


def _s(n):
    return torch.rand(n, device=DEVICE) + 0.01


ERRORS = [
    ("weight_float", lambda: ((_t(1, 4, 5, 5), _t(6, 4, 3, 3)), {"w_scale": _s(6)}), TypeError, "weight must be int8"),
    ("w_scale_shape", lambda: ((_t(1, 4, 5, 5), _w(6, 4, 3, 3)), {"w_scale": _s(4)}), ValueError, r"w_scale must be \[Cout\] = \(6,\), got \(4,\)"),
    ("w_scale_dtype", lambda: ((_t(1, 4, 5, 5), _w(6, 4, 3, 3)), {"w_scale": _s(6).half()}), TypeError, "w_scale must be a float32 tensor"),
    ("x_scale_zero", lambda: ((_t(1, 4, 5, 5), _w(6, 4, 3, 3)), {"w_scale": _s(6), "x_scale": 0.0}), ValueError, "x_scale must be a finite float > 0"),
    ("x_scale_tensor", lambda: ((_t(1, 4, 5, 5), _w(6, 4, 3, 3)), {"w_scale": _s(6), "x_scale": torch.tensor(0.1)}), TypeError, "x_scale must be a float"),
    ("out_scale_neg", lambda: ((_t(1, 4, 5, 5), _w(6, 4, 3, 3)), {"w_scale": _s(6), "out_scale": -1.0}), ValueError, "out_scale must be a finite float > 0"),
    ("out_int8_without_scale", lambda: ((_t(1, 4, 5, 5), _w(6, 4, 3, 3)), {"w_scale": _s(6), "out_dtype": torch.int8}), TypeError, "int8 needs out_scale"),
    ("out_float_with_scale", lambda: ((_t(1, 4, 5, 5), _w(6, 4, 3, 3)), {"w_scale": _s(6), "out_scale": 0.1, "out": _t(1, 6, 3, 3)}), TypeError, "out must be int8"),
    ("x_int", lambda: ((_w(1, 4, 5, 5), _w(6, 4, 3, 3)), {"w_scale": _s(6)}), TypeError, "x must be float32, float16 or bfloat16, got torch.int8"),
    ("groups2", lambda: ((_t(1, 4, 5, 5), _w(4, 2, 3, 3)), {"w_scale": _s(4), "groups": 2}), ValueError, "run as the composite"),
    ("cin_mismatch_x2", lambda: ((_t(1, 4, 5, 5), _w(4, 5, 3, 3)), {"w_scale": _s(4), "x2": _t(1, 2, 5, 5)}), ValueError, r"C1 \+ C2 = 4 \+ 2 = 6"),
    ("x2_dtype", lambda: ((_t(1, 4, 5, 5), _w(4, 6, 3, 3)), {"w_scale": _s(4), "x2": _t(1, 2, 5, 5, dtype=torch.float16)}), TypeError, "x2 must have x's dtype"),
    ("x2_first_without_x2", lambda: ((_t(1, 4, 5, 5), _w(4, 4, 3, 3)), {"w_scale": _s(4), "x2_first": True}), ValueError, "need x2"),
    ("bias_shape", lambda: ((_t(1, 4, 5, 5), _w(6, 4, 3, 3), _t(4)), {"w_scale": _s(6)}), ValueError, r"bias must be \[Cout\]"),
    ("residual_shape", lambda: ((_t(1, 4, 5, 5), _w(6, 4, 3, 3)), {"w_scale": _s(6), "residual": _t(1, 4, 3, 3)}), ValueError, "residual must be"),
    ("out_shape", lambda: ((_t(1, 4, 5, 5), _w(6, 4, 3, 3)), {"w_scale": _s(6), "out": _t(1, 6, 5, 5)}), ValueError, r"out must be \[N, Cout, Ho, Wo\] = \(1, 6, 3, 3\)"),
    ("act", lambda: ((_t(1, 4, 5, 5), _w(6, 4, 3, 3)), {"w_scale": _s(6), "act": "mish"}), ValueError, "activation must be one of"),
    ("too_small", lambda: ((_t(1, 4, 2, 2), _w(6, 4, 3, 3)), {"w_scale": _s(6)}), ValueError, "smaller than the dilated kernel"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "exc", "match"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_errors(make, exc, match):
    args, kwargs = make()
    kwargs.setdefault("x_scale", 0.05)
    with pytest.raises(exc, match=match):
        qconv2d(*args, **kwargs)


def test_error_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        qconv2d(torch.randn(1, 4, 5, 5), _w(4, 4, 3, 3).cpu(), x_scale=0.1, w_scale=_s(4).cpu())


# ------------------------------------------------------------------------------ GPU only

# (id, x shape, Cout, (KH, KW), kwargs, x2 shape or None, depthwise)
REALISTIC = [
    ("unet_3x3_64@256", (1, 64, 256, 256), 64, (3, 3), {"padding": 1}, None, False),
    ("unet_3x3_512@32", (1, 512, 32, 32), 512, (3, 3), {"padding": 1}, None, False),
    ("aspp_2048@32_rate12", (1, 2048, 32, 32), 256, (3, 3), {"padding": 12, "dilation": 12}, None, False),
    ("decoder_64@256+128@128", (1, 64, 256, 256), 64, (3, 3), {"padding": 1}, (1, 128, 128, 128), False),
    ("stem_3x3_s2", (2, 3, 512, 512), 32, (3, 3), {"padding": 1, "stride": 2}, None, False),
    ("head_1x1_21", (1, 256, 128, 128), 21, (1, 1), {}, None, False),
    ("mnv2_dw_144@128", (1, 144, 128, 128), 144, (3, 3), {"padding": 1}, None, True),
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"]
)
@pytest.mark.parametrize(
    ("xs", "cout", "k", "kw", "x2s", "dw"),
    [r[1:] for r in REALISTIC],
    ids=[r[0] for r in REALISTIC],
)
def test_realistic_gpu(xs, cout, k, kw, x2s, dw, dtype):
    # The composite on CUDA quantizes with CUDA's arithmetic (x · 1/s), as the kernel
    # does there; its fp32 sums of up to K = 18432 products err by up to ~√K ulps of the
    # summed magnitude (cuDNN's blocked reductions), hence the √K factor on the bound.
    x = _input(xs, "cl", dtype)
    x2 = _input(x2s, "cl", dtype) if x2s is not None else None
    cin = 1 if dw else xs[1] + (x2s[1] if x2s is not None else 0)
    w, ws = _qweight((cout, cin, *k))
    kw = {**kw, "act": "relu", "x_scale": _x_scale(x, x2), "w_scale": ws}
    if dw:
        kw["groups"] = cout
    if x2 is not None:
        kw.update(x2=x2, x2_resize="bilinear")
    bias = _vec(cout, dtype)
    ref = _composite(x, w, bias, **kw)
    out = poison(torch.empty(ref.shape, dtype=dtype, device=DEVICE).to(memory_format=CL))
    qconv2d(x, w, bias, out=out, **kw)
    reduction = cin * k[0] * k[1]
    _assert_within(out, ref, _bound(x, w, bias, dtype=dtype, **kw) * math.sqrt(reduction))
