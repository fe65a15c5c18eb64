"""segfast.kernels.conv_transpose2d against F.conv_transpose2d + the epilogue.

Geometries: U-Net's 2×2/s2 up-convolution, DCGAN's 4×4/s2/p1 and its first layer
(4×4/s1/p0 on a 1×1 input), 3×3/s2/p1 with output_padding, dilation, asymmetric
kernels and strides, and a stride larger than the kernel (outputs no tap reaches).
Accumulation runs over at most KH·KW·Cin = 16·19 products of N(0, 1) values, so
the fp32 elementwise tolerance (1e-4) is fair.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segfast.kernels._common import ACTIVATIONS, apply_activation_reference
from segfast.kernels.conv_transpose2d import (
    _prune_configs,
    conv_transpose2d,
    conv_transpose2d_reference,
    pack_weight,
)
from segfast.testing import assert_close, assert_low_precision_close, assert_rel_l2, poison

# name: (N, Cin, H, W, Cout, kernel, stride, padding, output_padding, dilation)
GEOMETRIES = {
    "unet-2s2": (2, 19, 7, 9, 6, 2, 2, 0, 0, 1),
    "dcgan-4s2p1": (2, 5, 4, 5, 7, 4, 2, 1, 0, 1),
    "dcgan-first-1x1": (3, 10, 1, 1, 7, 4, 1, 0, 0, 1),
    "3s2p1op1": (1, 5, 5, 7, 6, 3, 2, 1, 1, 1),
    "3s2p1op1-d2": (1, 5, 5, 7, 6, 3, 2, 1, 1, 2),
    "asym": (2, 5, 5, 6, 3, (3, 2), (2, 3), (1, 0), (1, 2), 1),
    "k2s3-gaps": (1, 4, 4, 5, 5, 2, 3, 0, 2, 1),
    "3s1p1-d3": (1, 6, 6, 5, 4, 3, 1, 1, 0, 3),
}


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _make(name: str, dtype=torch.float32):
    n, cin, h, w, cout, k, s, p, op, d = GEOMETRIES[name]
    kh, kw = _pair(k)
    x = torch.randn(n, cin, h, w).to(dtype)
    weight = (torch.randn(cin, cout, kh, kw) / (cin * kh * kw) ** 0.5).to(dtype)
    geo = {"stride": s, "padding": p, "output_padding": op, "dilation": d}
    return x, weight, geo


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    big = torch.zeros(n, 2 * c, w, h, dtype=x.dtype).transpose(2, 3)
    view = big[:, ::2]
    view.copy_(x)
    assert not view.is_contiguous()
    assert not view.is_contiguous(memory_format=torch.channels_last)
    return view


def _out_like(ref: torch.Tensor) -> torch.Tensor:
    return poison(torch.empty(ref.shape, dtype=ref.dtype, memory_format=torch.channels_last))


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometry(name):
    x, w, geo = _make(name)
    cout = w.shape[1]
    scale, shift = torch.rand(cout) + 0.5, torch.randn(cout)
    ref = conv_transpose2d_reference(x, w, scale, shift, act="relu", **geo)
    out = _out_like(ref)
    y = conv_transpose2d(
        x.contiguous(memory_format=torch.channels_last),
        pack_weight(w),
        scale,
        shift,
        act="relu",
        out=out,
        **geo,
    )
    assert y is out
    assert_close(y, ref)
    # the reference is F.conv_transpose2d with a bias where scale is 1
    bias_ref = F.conv_transpose2d(x, w, shift, **geo, groups=1)
    assert_close(
        conv_transpose2d_reference(x, w, None, shift, **geo), bias_ref, atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("residual", [None, "before", "after"])
def test_epilogue(act, residual):
    x, w, geo = _make("dcgan-4s2p1")
    cout = w.shape[1]
    scale, shift = torch.rand(cout) + 0.5, torch.randn(cout)
    res_shape = conv_transpose2d_reference(x, w, **geo).shape
    res = None if residual is None else torch.randn(res_shape)
    after = residual == "after"
    kw = {"act": act, "act_param": 0.2, "residual": res, "residual_after_act": after}
    ref = conv_transpose2d_reference(x, w, scale, shift, **geo, **kw)
    y = conv_transpose2d(x, w, scale, shift, **geo, **kw, out=_out_like(ref))
    assert_close(y, ref)
    # the reference epilogue, spelled out
    z = F.conv_transpose2d(x, w, **geo) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    if res is not None and not after:
        z = z + res
    z = apply_activation_reference(z, act, 0.2)
    if res is not None and after:
        z = z + res
    assert_close(ref, z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("has_scale", "has_shift"), [(False, False), (True, False), (False, True)])
def test_optional_scale_shift(has_scale, has_shift):
    x, w, geo = _make("3s2p1op1")
    cout = w.shape[1]
    scale = torch.rand(cout) + 0.5 if has_scale else None
    shift = torch.randn(cout) if has_shift else None
    ref = conv_transpose2d_reference(x, w, scale, shift, **geo)
    assert_close(conv_transpose2d(x, w, scale, shift, **geo), ref)


@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("w_layout", ["pytorch", "packed", "noncontiguous"])
def test_layouts(x_layout, w_layout):
    x, w, geo = _make("unet-2s2")
    if w_layout == "packed":
        wl = pack_weight(w)
        assert wl.stride(1) == 1
        assert torch.equal(wl, w)
    elif w_layout == "noncontiguous":
        wl = torch.zeros(w.shape[0], 2 * w.shape[1], *w.shape[2:])[:, ::2]
        wl.copy_(w)
    else:
        wl = w
    res = torch.randn(2, 6, 14, 18)
    ref = conv_transpose2d_reference(x, w, residual=res, act="silu", **geo)
    y = conv_transpose2d(
        _layout(x, x_layout), wl, residual=_layout(res, x_layout), act="silu", **geo
    )
    assert y.is_contiguous(memory_format=torch.channels_last)  # default allocation
    assert_close(y, ref)


def test_out_channel_slice():
    """The U-Net decoder: the up-convolution writes its half of the concat buffer."""
    x, w, geo = _make("unet-2s2")
    shift = torch.randn(6)
    buf = poison(torch.empty(2, 10, 14, 18, memory_format=torch.channels_last))
    conv_transpose2d(x, pack_weight(w), None, shift, act="relu", out=buf[:, 4:], **geo)
    assert_close(buf[:, 4:], conv_transpose2d_reference(x, w, None, shift, act="relu", **geo))
    assert buf[:, :4].isnan().all()


def _torch_fp16(x, w, scale, shift, geo, act, res, after):
    """PyTorch's own fp16 computation of the same layer."""
    y = F.conv_transpose2d(x, w, **geo) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    if res is not None and not after:
        y = y + res
    y = apply_activation_reference(y, act, 0.01)
    return y + res if res is not None and after else y


@pytest.mark.parametrize("name", ["unet-2s2", "dcgan-4s2p1", "dcgan-first-1x1", "3s2p1op1"])
@pytest.mark.parametrize(("act", "residual"), [("relu", None), ("tanh", "after")])
def test_fp16(name, act, residual):
    x, w, geo = _make(name, torch.half)
    cout = w.shape[1]
    scale, shift = (torch.rand(cout) + 0.5).half(), torch.randn(cout).half()
    res_shape = conv_transpose2d_reference(x, w, **geo).shape
    res = torch.randn(res_shape).half() if residual else None
    kw = {"act": act, "residual": res, "residual_after_act": residual == "after"}
    res32 = res.float() if res is not None else None
    ref32 = conv_transpose2d_reference(
        x.float(), w.float(), scale.float(), shift.float(), **geo, **{**kw, "residual": res32}
    )
    out = poison(torch.empty(ref32.shape, dtype=torch.half, memory_format=torch.channels_last))
    xl = x.contiguous(memory_format=torch.channels_last)
    y = conv_transpose2d(xl, pack_weight(w), scale, shift, **geo, **kw, out=out)
    lowp = _torch_fp16(x, w, scale, shift, geo, act, res, residual == "after")
    assert_low_precision_close(y, ref32, lowp)


def test_fp16_fp32_out():
    """fp16 operands, fp32 output: only the products' inputs are rounded."""
    x, w, geo = _make("dcgan-4s2p1", torch.half)
    y = conv_transpose2d(x, w, **geo, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    assert_close(y, conv_transpose2d_reference(x.float(), w.float(), **geo))


def test_prune_configs():
    import triton

    cfgs = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": bn, "BLOCK_K": bk})
        for bn in (64, 128)
        for bk in (32, 64)
    ]
    kept = _prune_configs(cfgs, {"Cout": 3, "Cin": 5})
    assert [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in kept] == [(64, 32)]
    assert len(_prune_configs(cfgs, {"Cout": 512, "Cin": 1024})) == 4
    kept = _prune_configs(cfgs[3:], {"Cout": 3, "Cin": 5})  # nothing fits: keep the smallest
    assert [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in kept] == [(128, 64)]


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_bf16_gpu(name):
    x, w, geo = _make(name)
    x, w = x.cuda().bfloat16(), w.cuda().bfloat16()
    cout = w.shape[1]
    scale, shift = torch.rand(cout, device="cuda") + 0.5, torch.randn(cout, device="cuda")
    y = conv_transpose2d(x, pack_weight(w), scale, shift, act="relu", **geo)
    ref32 = conv_transpose2d_reference(x.float(), w.float(), scale, shift, act="relu", **geo)
    lowp = torch.relu(
        F.conv_transpose2d(x, w, **geo) * scale.bfloat16().view(1, -1, 1, 1)
        + shift.bfloat16().view(1, -1, 1, 1)
    )
    assert_low_precision_close(y, ref32, lowp)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("shape", "cout", "k", "s", "p"),
    [
        ((1, 1024, 32, 32), 512, 2, 2, 0),  # U-Net up 1
        ((1, 128, 256, 256), 64, 2, 2, 0),  # U-Net up 4
        ((2, 256, 37, 45), 128, 2, 2, 0),  # odd sizes
        ((64, 512, 4, 4), 256, 4, 2, 1),  # DCGAN
        ((64, 100, 1, 1), 512, 4, 1, 0),  # DCGAN first layer
    ],
)
def test_realistic_gpu(dtype, shape, cout, k, s, p):
    """Long reductions (K up to 4·1024): rel-L2, the accumulation-fair metric."""
    x = torch.randn(*shape, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(shape[1], cout, k, k, device="cuda") / (shape[1] * k * k) ** 0.5).to(dtype)
    scale, shift = torch.rand(cout, device="cuda") + 0.5, torch.randn(cout, device="cuda")
    geo = {"stride": s, "padding": p}
    y = conv_transpose2d(x, pack_weight(w), scale, shift, act="relu", **geo)
    ref32 = conv_transpose2d_reference(
        x, w, scale, shift, act="relu", out_dtype=torch.float32, **geo
    )
    if dtype == torch.float32:
        assert_rel_l2(y, ref32, 1e-4)
    else:
        lowp = torch.relu(
            F.conv_transpose2d(x, w, **geo) * scale.to(dtype).view(1, -1, 1, 1)
            + shift.to(dtype).view(1, -1, 1, 1)
        )
        assert_low_precision_close(y, ref32, lowp)


# ----------------------------------------------------------------------------- errors


def _errors():
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(4, 3, 2, 2)
    return [
        (lambda: conv_transpose2d(x[0], w), ValueError, "x must be 4-D"),
        (lambda: conv_transpose2d(x, w[0]), ValueError, "weight must be 4-D"),
        (lambda: conv_transpose2d(x, torch.randn(3, 3, 2, 2)), ValueError, "Cin=4"),
        (lambda: conv_transpose2d(x, w.half()), TypeError, "weight must have x's dtype"),
        (lambda: conv_transpose2d(x.long(), w), TypeError, "x must be float32"),
        (lambda: conv_transpose2d(x, w, torch.ones(4)), ValueError, "scale must be 1-D"),
        (lambda: conv_transpose2d(x, w, None, torch.ones(3, 1)), ValueError, "shift must be 1-D"),
        (lambda: conv_transpose2d(x, w, act="mish"), ValueError, "activation must be one of"),
        (lambda: conv_transpose2d(x, w, stride=2, output_padding=2), ValueError, "output_padding"),
        (lambda: conv_transpose2d(x, w, stride=0), ValueError, "stride and dilation must"),
        (lambda: conv_transpose2d(x, w, padding=(1, 2, 3)), ValueError, "padding must be"),
        (lambda: conv_transpose2d(x, w, padding=5), ValueError, "output size"),
        (
            lambda: conv_transpose2d(x, w, residual=torch.randn(1, 3, 5, 5)),
            ValueError,
            "residual must have shape",
        ),
        (
            lambda: conv_transpose2d(x, w, out=torch.empty(1, 3, 5, 5)),
            ValueError,
            "out must have shape",
        ),
        (
            lambda: conv_transpose2d(x, w, out=torch.empty(1, 3, 6, 6), out_dtype=torch.half),
            TypeError,
            "disagrees",
        ),
    ]


@pytest.mark.parametrize("case", range(len(_errors())))
def test_errors(case):
    call, exc, match = _errors()[case]
    with pytest.raises(exc, match=match):
        call()


def test_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        conv_transpose2d(torch.randn(1, 4, 5, 5), torch.randn(4, 3, 2, 2))
