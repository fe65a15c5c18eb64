"""Prepacked oneDNN convolutions against segfast's composite implementations."""

from __future__ import annotations

import pytest
import torch

from segfast.backends.cpu.onednn import PackedConv2d, PackedConvTranspose2d
from segfast.compiler import ops

needs_onednn_bf16 = pytest.mark.skipif(
    not ops._mkldnn_ok(torch.bfloat16),
    reason="oneDNN has no bf16 convolutions on this CPU (needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)",
)

pytestmark = pytest.mark.skipif(not ops._mkldnn_ok(), reason="oneDNN is not usable here")


def _conv(w, b, stride=1, pad=1, dil=1, groups=1, act="relu", res_after=False, x2=None,
          x2_resize="none", x2_first=False, size=None):  # fmt: skip
    return PackedConv2d(
        w, b, [stride] * 2, [pad] * 2, [dil] * 2, groups, act, 0.1, res_after, x2_resize, False,
        None, None, x2_first, input_size=size, x2_channels=x2,
    )  # fmt: skip


def _composite(x, w, b, stride=1, pad=1, dil=1, groups=1, act="relu", res=None, res_after=False,
               x2=None, x2_resize="none", x2_first=False):  # fmt: skip
    return ops.conv2d_impl(x, w, b, [stride] * 2, [pad] * 2, [dil] * 2, groups, act, 0.1, res,
                           res_after, x2, x2_resize, False, None, None, x2_first)  # fmt: skip


def _nhwc(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("act", ["none", "relu", "relu6", "leaky_relu", "silu", "sigmoid", "tanh"])
def test_packed_equals_unpacked(act):
    x, w, b = _nhwc(2, 13, 11, 9), torch.randn(17, 13, 3, 3), torch.randn(17)
    y = _conv(w, b, act=act, size=x.shape)(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y, _composite(x, w, b, act=act), atol=1e-5)


def test_packed_for_one_size_runs_at_another():
    w, b = torch.randn(8, 5, 3, 3), torch.randn(8)
    conv = _conv(w, b, size=(1, 5, 64, 64))
    x = _nhwc(3, 5, 7, 13)
    assert torch.allclose(conv(x), _composite(x, w, b), atol=1e-5)


@pytest.mark.parametrize("res_after", [False, True])
def test_residual(res_after):
    x, w, b = _nhwc(1, 8, 10, 10), torch.randn(8, 8, 3, 3), torch.randn(8)
    r = _nhwc(1, 8, 10, 10)
    y = _conv(w, b, res_after=res_after, size=x.shape)(x, r)
    assert torch.allclose(y, _composite(x, w, b, res=r, res_after=res_after), atol=1e-5)
    rb = torch.randn(1, 8, 1, 1)  # broadcast: composite path, same answer
    y = _conv(w, b, res_after=res_after)(x, rb)
    assert torch.allclose(y, _composite(x, w, b, res=rb, res_after=res_after), atol=1e-5)


def test_depthwise_with_atrous_padding_is_prepadded():
    c = 24
    x, w = _nhwc(1, c, 16, 16), torch.randn(c, 1, 3, 3)
    conv = _conv(w, None, pad=12, dil=12, groups=c, act="none", size=x.shape)
    assert conv.prepad
    assert torch.allclose(conv(x), _composite(x, w, None, pad=12, dil=12, groups=c, act="none"),
                          atol=1e-5)  # fmt: skip


@pytest.mark.parametrize(
    ("capability", "machine", "inline"),
    [("AVX512", "x86_64", 8), ("AVX2", "x86_64", 4), ("DEFAULT", "x86_64", 4),
     ("DEFAULT", "aarch64", 8)],  # not measured off x86: the limit found on AVX-512
)  # fmt: skip
def test_depthwise_padding_oneDNN_takes_inline_depends_on_the_cpu(
    monkeypatch, capability, machine, inline
):
    """oneDNN's AVX2 depthwise kernels fall off a cliff above padding 4 (AVX-512: 8):
    above the CPU's limit the input is zero-padded first, with the same result."""
    monkeypatch.setattr(ops, "_cpu_capability", lambda: capability)
    monkeypatch.setattr(ops.platform, "machine", lambda: machine)
    assert ops.dw_max_inline_pad() == inline
    c = 16
    x, w = _nhwc(1, c, 12, 12), torch.randn(c, 1, 3, 3)
    for pad in (4, 5, 6, 8):
        conv = _conv(w, None, pad=pad, dil=pad, groups=c, act="none", size=x.shape)
        assert conv.prepad == (pad > inline)
        ref = _composite(x, w, None, pad=pad, dil=pad, groups=c, act="none")
        assert torch.allclose(conv(x), ref, atol=1e-5)


@pytest.mark.parametrize("x2_first", [False, True])
@pytest.mark.parametrize("resize", ["none", "bilinear", "nearest"])
def test_two_sources_as_split_k(x2_first, resize):
    x = _nhwc(2, 6, 12, 10)
    x2 = torch.randn(2, 10, 6, 5) if resize != "none" else torch.randn(2, 10, 12, 10)
    w, b = torch.randn(9, 16, 3, 3), torch.randn(9)
    conv = _conv(w, b, x2=10, x2_resize=resize, x2_first=x2_first, size=x.shape)
    assert conv.split
    y = conv(x, None, x2)
    ref = _composite(x, w, b, x2=x2, x2_resize=resize, x2_first=x2_first)
    assert torch.allclose(y, ref, atol=1e-5)


@needs_onednn_bf16
def test_bf16():
    x = _nhwc(1, 16, 9, 9, dtype=torch.bfloat16)
    w, b = torch.randn(8, 16, 3, 3).bfloat16(), torch.randn(8).bfloat16()
    y = _conv(w, b, size=x.shape)(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, _composite(x, w, b))


def test_unsupported_activation_is_refused():
    with pytest.raises(ValueError, match="no post-op"):
        _conv(torch.randn(4, 4, 3, 3), None, act="gelu")


@pytest.mark.parametrize("act", ["none", "relu", "tanh"])
@pytest.mark.parametrize("res", [None, "before", "after"])
def test_conv_transpose(act, res):
    x = _nhwc(2, 12, 7, 9)
    w, b = torch.randn(12, 6, 2, 2), torch.randn(6)
    r = None if res is None else _nhwc(2, 6, 14, 18)
    after = res == "after"
    conv = PackedConvTranspose2d(w, b, [2, 2], [0, 0], [0, 0], [1, 1], 1, act, 0.0, after,
                                 input_size=x.shape)  # fmt: skip
    ref = ops.conv_transpose2d_impl(x, w, b, [2, 2], [0, 0], [0, 0], [1, 1], 1, act, 0.0, r, after)
    y = conv(x, r)
    assert y.shape == ref.shape
    assert torch.allclose(y, ref, atol=1e-5)


def test_conv_transpose_odd_geometry():
    x = _nhwc(1, 5, 6, 7)
    w, b = torch.randn(5, 3, 3, 3), torch.randn(3)
    conv = PackedConvTranspose2d(w, b, [2, 3], [1, 0], [1, 2], [1, 1], 1, "relu", 0.0, False)
    ref = ops.conv_transpose2d_impl(x, w, b, [2, 3], [1, 0], [1, 2], [1, 1], 1, "relu", 0.0,
                                    None, False)  # fmt: skip
    assert torch.allclose(conv(x), ref, atol=1e-5)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.skipif(
    not {"avx512_bf16", "avx512bw", "avx512vl"} <= _cpu_flags(),
    reason="needs a CPU with AVX-512 BF16 (where oneDNN has bf16 convolutions)",
)
def test_bf16_probe_finds_onednn_bf16_where_the_cpu_has_it():
    # the probe once ran NCHW tensors, where PyTorch sends a bf16 add + relu to an ATen
    # kernel without bf16: bf16 engines then ran plain PyTorch ops on a Zen 4
    assert ops._mkldnn_ok(torch.bfloat16)


@pytest.mark.parametrize(
    ("x_shape", "k", "layout"),
    [
        ((1, 4, 5, 6), 3, "nchw"),  # NCHW, as an unlaid-out graph has
        ((1, 4, 5, 6), 1, "nchw"),  # 1×1 weights: strides fit both layouts
        ((1, 4, 5, 6), 1, "cl"),  # channels_last map, 1×1 weight
        ((2, 1, 5, 6), 3, "nchw"),  # one channel: strides fit both layouts
        ((2, 8, 1, 1), 1, "nchw"),  # a pooled 1×1 map (mean → 1×1 conv)
        ((2, 8, 1, 1), 1, "cl"),
        ((1, 4, 5, 6), 3, "cl"),
    ],
)
def test_bf16_residual_relu_runs_in_any_layout(x_shape, k, layout):
    if not ops._mkldnn_ok(torch.bfloat16):
        pytest.skip("oneDNN has no bf16 convolutions on this CPU")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*x_shape, generator=g).bfloat16()
    n, c, h, w_ = x_shape
    w = torch.randn(3, c, k, k, generator=g).bfloat16()
    b = torch.randn(3, generator=g).bfloat16()
    r = torch.randn(n, 3, h, w_, generator=g).bfloat16()
    if layout == "cl":
        x, w, r = (t.contiguous(memory_format=torch.channels_last) for t in (x, w, r))
    pad = [k // 2] * 2
    y = ops._conv_cpu_fused(x, w, b, [1, 1], pad, [1, 1], 1, "relu", 0.0, r, False)
    ref = torch.nn.functional.conv2d(x.float(), w.float(), b.float(), padding=k // 2)
    ref = (ref + r.float()).relu()
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.02)
