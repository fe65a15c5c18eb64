"""segfast.kernels.squeeze_excite (the SE gate) and the gated input of
segfast.kernels.conv2d against their PyTorch references, over odd shapes, layouts,
one- and two-layer gates, every gate activation pair MobileNetV3 / EfficientNet /
LR-ASPP use, fp32 and fp16 (bf16 is tested on a GPU only: the interpreter's bf16
arithmetic is wrong)."""

from __future__ import annotations

import pytest
import torch

from segfast.kernels.conv2d import conv2d, conv2d_reference, pack_conv_weight
from segfast.kernels.squeeze_excite import MAX_HIDDEN, se_gate, se_gate_reference
from segfast.testing import assert_close, assert_low_precision_close

# (N, C, H, W, hidden, two layers, act1, act2)
GATES = [
    (2, 24, 7, 9, 8, True, "relu", "hardsigmoid"),  # MobileNetV3
    (1, 72, 13, 5, 18, True, "silu", "sigmoid"),  # EfficientNet
    (3, 40, 3, 3, 40, False, "sigmoid", "none"),  # LR-ASPP: one 1×1 + sigmoid
    (1, 5, 1, 1, 3, True, "relu", "hardsigmoid"),  # a 1×1 map
    (1, 130, 70, 3, 37, True, "relu6", "hardswish"),  # > one channel block, many pixels
]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nhwc":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "nchw":
        return x.contiguous()
    big = torch.zeros(x.shape[0], x.shape[1] + 3, x.shape[2], x.shape[3] * 2, dtype=x.dtype)
    view = big[:, 1 : 1 + x.shape[1], :, ::2]  # a strided channel slice
    view.copy_(x)
    return view


def _weights(c, hidden, two, dtype):
    g = torch.Generator().manual_seed(3)
    w1 = (torch.randn(hidden, c, 1, 1, generator=g) / c**0.5).to(dtype)
    b1 = torch.randn(hidden, generator=g).to(dtype)
    w2 = (torch.randn(c, hidden, 1, 1, generator=g) / hidden**0.5).to(dtype) if two else None
    b2 = torch.randn(c, generator=g).to(dtype) if two else None
    return w1, b1, w2, b2


@pytest.mark.parametrize("case", GATES, ids=[f"{g[1]}c-{g[6]}-{g[7]}" for g in GATES])
@pytest.mark.parametrize("layout", ["nhwc", "nchw", "strided"])
def test_gate_fp32(case, layout):
    n, c, h, w, hidden, two, a1, a2 = case
    p = _layout(torch.randn(n, c, h, w) * 2 + 0.5, layout)
    w1, b1, w2, b2 = _weights(c, hidden, two, torch.float32)
    got = se_gate(p, w1, b1, a1, 0.0, w2, b2, a2, 0.0)
    ref = se_gate_reference(p, w1, b1, a1, 0.0, w2, b2, a2, 0.0)
    assert got.shape == (n, c if two else hidden, 1, 1)
    assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", GATES[:3], ids=["v3", "effnet", "lraspp"])
def test_gate_fp16_no_worse_than_pytorch(case):
    n, c, h, w, hidden, two, a1, a2 = case
    p = torch.randn(n, c, h, w).half().contiguous(memory_format=torch.channels_last)
    w1, b1, w2, b2 = _weights(c, hidden, two, torch.float16)
    got = se_gate(p, w1, b1, a1, 0.0, w2, b2, a2, 0.0)
    assert got.dtype == torch.float16
    ref = se_gate_reference(p, w1, b1, a1, 0.0, w2, b2, a2, 0.0)
    # PyTorch in fp16: mean, 1×1 convs, activations, each rounded to fp16
    f = torch.nn.functional
    m = p.mean((2, 3), keepdim=True)
    acts = {"relu": f.relu, "silu": f.silu, "sigmoid": torch.sigmoid,
            "hardsigmoid": f.hardsigmoid, "none": lambda t: t}  # fmt: skip
    lowp = acts[a1](f.conv2d(m.float(), w1.float(), b1.float()).half())
    if two:
        lowp = acts[a2](f.conv2d(lowp.float(), w2.float(), b2.float()).half())
    assert_low_precision_close(got, ref, lowp)


def test_gate_rejects_bad_arguments():
    p = torch.randn(1, 8, 4, 4)
    w1, b1, _, b2 = _weights(8, 4, True, torch.float32)
    with pytest.raises(ValueError, match="w1 must be"):
        se_gate(p, torch.randn(4, 7, 1, 1), b1)
    with pytest.raises(ValueError, match="b1 must be"):
        se_gate(p, w1, torch.randn(5))
    with pytest.raises(ValueError, match="w2 must be"):
        se_gate(p, w1, b1, "relu", 0.0, torch.randn(8, 5, 1, 1), b2)
    with pytest.raises(ValueError, match="b2 without w2"):
        se_gate(p, w1, b1, "relu", 0.0, None, b2)
    with pytest.raises(ValueError, match="hidden width"):
        se_gate(p, torch.randn(MAX_HIDDEN + 1, 8, 1, 1))
    with pytest.raises(ValueError, match="activation must be one of"):
        se_gate(p, w1, b1, "mish")
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        se_gate(p[0], w1, b1)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        se_gate(p.double(), w1.double(), b1.double())


# (N, C1, H, W, Cout, k, stride, act): the 1×1 project conv of an SE block, a 3×3 one,
# the flat-K loop (C1 ≤ 8), a stride
CONVS = [
    (2, 24, 7, 9, 16, 1, 1, "none"),
    (1, 5, 6, 5, 7, 3, 1, "hardswish"),
    (3, 40, 5, 4, 9, 1, 1, "relu"),
    (1, 20, 11, 13, 12, 3, 2, "silu"),
]


@pytest.mark.parametrize("case", CONVS, ids=["1x1", "flatk-3x3", "1x1-batch3", "3x3-s2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gated_conv(case, dtype):
    n, c, h, w, co, k, s, act = case
    x = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(co, c, k, k) / (c * k * k) ** 0.5).to(dtype)
    g = torch.rand(n, c, 1, 1).to(dtype)
    ho, wo = (h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1
    r = torch.randn(n, co, ho, wo).to(dtype)
    kw = {"stride": s, "padding": k // 2, "act": act, "residual": r}
    got = conv2d(x, pack_conv_weight(wt), None, None, gate=g, **kw)
    ref = conv2d_reference(x, wt, gate=g, **kw)
    if dtype == torch.float32:
        assert_close(got, ref, atol=1e-4, rtol=1e-4)
    else:  # PyTorch in fp16: the gated input rounded to fp16, then the conv
        xg = (x.float() * g.float()).half()
        lowp = conv2d_reference(xg, wt, **kw)
        ref = conv2d_reference(x.float(), wt.float(), gate=g.float(),
                               **{**kw, "residual": r.float()})  # fmt: skip
        assert_low_precision_close(got, ref, lowp.float() if lowp.dtype != dtype else lowp)
    # a 2-D gate means the same
    assert_close(conv2d(x, wt, gate=g[:, :, 0, 0], **kw), got, atol=0, rtol=0)


def test_gated_conv_rejects_bad_gates():
    x = torch.randn(2, 6, 5, 5)
    w = torch.randn(4, 6, 1, 1)
    with pytest.raises(ValueError, match="gate must be"):
        conv2d(x, w, gate=torch.rand(2, 5))
    with pytest.raises(ValueError, match="gate must be"):
        conv2d(x, w, gate=torch.rand(1, 6))
    with pytest.raises(TypeError, match="gate must have x's dtype"):
        conv2d(x, w, gate=torch.rand(2, 6).double())
    with pytest.raises(ValueError, match="one-source dense conv"):
        conv2d(x, torch.randn(6, 1, 3, 3), groups=6, padding=1, gate=torch.rand(2, 6))
    with pytest.raises(ValueError, match="one-source dense conv"):
        conv2d(x, torch.randn(4, 9, 1, 1), x2=torch.randn(2, 3, 5, 5), gate=torch.rand(2, 6))
