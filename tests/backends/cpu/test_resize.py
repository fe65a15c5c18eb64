"""The logits resize kernels: NCHW logits and argmax masks against PyTorch's
upsample (and argmax), over sizes, scales, alignments, dtypes and layouts."""

from __future__ import annotations

import pytest
import torch

from segfast.backends.cpu import native
from segfast.backends.cpu.resize import NativeResize
from segfast.compiler import ops

lib = native.load()
pytestmark = pytest.mark.skipif(lib is None, reason=f"CPU kernels: {native.status()[1]}")

CASES = [
    ((2, 21, 16, 12), (64, 48), False, (None, None)),
    ((1, 3, 7, 9), (29, 31), False, (None, None)),
    ((1, 5, 7, 9), (29, 31), True, (None, None)),
    ((1, 2, 8, 8), (8, 8), False, (None, None)),  # same size: copy
    ((3, 19, 5, 6), (11, 13), False, (2.2, 2.3)),  # scale factors given
    ((1, 40, 1, 1), (5, 7), False, (None, None)),  # from a 1×1 map
    ((1, 1, 9, 4), (3, 2), False, (None, None)),  # downsampling
]


def _nhwc(shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("shape", "size", "align", "scales"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_nchw(shape, size, align, scales, dtype):
    x = _nhwc(shape, dtype)
    y = NativeResize(lib, align, scales).logits(x, size)
    ref = ops.resize_like_aten(x.float(), size, "bilinear", align, *scales)
    assert y.shape == ref.shape
    assert y.dtype == dtype
    assert y.is_contiguous()  # NCHW
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the result
    assert (y.float() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize(("shape", "size", "align", "scales"), CASES)
@pytest.mark.parametrize("mask_dtype", ["uint8", "int32", "int64"])
def test_argmax(shape, size, align, scales, mask_dtype):
    x = _nhwc(shape)
    m = NativeResize(lib, align, scales).argmax(x, size, mask_dtype)
    ref = ops.resize_like_aten(x, size, "bilinear", align, *scales).argmax(1)
    assert m.dtype == ops.MASK_DTYPES[mask_dtype]
    assert m.shape == ref.shape
    assert (m.long() == ref).float().mean().item() >= 0.999  # near-ties may differ in rounding


def test_argmax_ties_take_the_first_channel():
    x = torch.zeros(1, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    x[:, 2] = 1.0
    x[:, 3] = 1.0
    m = NativeResize(lib, False, (None, None)).argmax(x, (6, 6), "uint8")
    assert (m == 2).all()


def test_argmax_with_nan_follows_torch():
    x = _nhwc((1, 5, 4, 4))
    x[0, 3, 1, 1] = float("nan")
    m = NativeResize(lib, False, (None, None)).argmax(x, (8, 8), "int64")
    ref = ops.resize_like_aten(x, (8, 8), "bilinear", False, None, None).argmax(1)
    assert torch.equal(m, ref)


def test_any_layout_in():
    x = torch.randn(1, 7, 10, 12)  # NCHW contiguous
    y = NativeResize(lib, False, (None, None)).logits(x, (20, 24))
    ref = ops.resize_like_aten(x, (20, 24), "bilinear", False, None, None)
    assert torch.allclose(y, ref, atol=1e-5)
    sliced = torch.randn(1, 32, 6, 6).contiguous(memory_format=torch.channels_last)[:, :21]
    y = NativeResize(lib, False, (None, None)).logits(sliced, (12, 12))
    ref = ops.resize_like_aten(sliced, (12, 12), "bilinear", False, None, None)
    assert torch.allclose(y, ref, atol=1e-5)


def test_other_dtypes_use_pytorch():
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    y = NativeResize(lib, False, (None, None)).logits(x, (8, 8))
    assert y.dtype == torch.float64
    assert torch.allclose(y, ops.resize_like_aten(x, (8, 8), "bilinear", False, None, None))


# -- int8: the resize written as its int8 readers' uint8 --------------------------------


def _quantized_ref(x, size, align, scales, scale, zp):
    from segfast.backends.cpu.int8 import quantize_u8

    return quantize_u8(ops.resize_like_aten(x, size, "bilinear", align, *scales), scale, zp)


def _ties_only(q, ref):
    """Equal but for ±1 on rounding ties (v / scale exactly at .5 after the blend's
    fp32 rounding): a handful per million."""
    d = (q.int() - ref.int()).abs()
    assert int(d.max()) <= 1
    assert int((d > 0).sum()) <= max(1, d.numel() // 100_000)


@pytest.mark.parametrize(
    ("shape", "size", "align", "scales"),
    [*CASES, ((1, 256, 8, 8), (32, 32), False, (None, None)), ((2, 35, 6, 5), (24, 20), True,
                                                               (None, None))],
)  # fmt: skip
@pytest.mark.parametrize("zp", [128, 0])
def test_quantized_resize_is_the_quantized_pytorch_resize(shape, size, align, scales, zp):
    x = _nhwc(shape)
    if zp == 0:  # zero point 0 is for maps known to be >= 0
        x = x.relu()
    scale = float(ops.resize_like_aten(x, size, "bilinear", align, *scales).abs().amax()) / 100
    q = NativeResize(lib, align, scales).quantized(x, size, scale, zp)
    assert q.dtype == torch.uint8
    assert q.is_contiguous(memory_format=torch.channels_last)
    _ties_only(q, _quantized_ref(x, size, align, scales, scale, zp))


def test_quantized_resize_saturates_and_reads_any_layout():
    x = torch.randn(1, 20, 5, 7) * 50  # NCHW in: made NHWC first
    scale = 0.05  # most values saturate at -128 / 127
    q = NativeResize(lib, False, (None, None)).quantized(x, (9, 13), scale, 128)
    ref = _quantized_ref(x, (9, 13), False, (None, None), scale, 128)
    _ties_only(q, ref)
    assert int(q.min()) == 0 and int(q.max()) == 255  # noqa: PT018
    xb = x.bfloat16()  # not the kernel's dtype: PyTorch's resize, then quantized
    qb = NativeResize(lib, False, (None, None)).quantized(xb, (9, 13), scale, 128)
    _ties_only(qb, _quantized_ref(xb, (9, 13), False, (None, None), scale, 128))
