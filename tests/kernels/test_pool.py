"""segfast.kernels.pool against F.max_pool2d / max_unpool2d / adaptive_avg_pool2d.

Max pooling and unpooling move values without arithmetic, so values and int64
indices must be bitwise equal to PyTorch's. Ties are produced on purpose with
small integer-valued inputs (PyTorch keeps the first max in scan order); NaNs
and all −inf windows check the other two ATen rules. Average pooling is an fp32
mean, held to the fp32 tolerance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segfast.kernels.pool import (
    adaptive_avg_pool2d,
    adaptive_avg_pool2d_reference,
    global_avg_pool2d,
    global_avg_pool2d_reference,
    max_pool2d,
    max_pool2d_reference,
    max_unpool2d,
    max_unpool2d_reference,
)
from segfast.testing import assert_close, assert_low_precision_close, poison

# (kernel_size, stride, padding, dilation, ceil_mode)
POOLS = [
    (2, 2, 0, 1, False),  # SegNet / U-Net encoder
    (2, 2, 0, 1, True),  # SegNet's Caffe rounding on odd sizes
    (3, 2, 1, 1, False),  # ResNet stem
    (3, 2, 1, 1, True),
    (3, 1, 1, 1, False),  # overlapping windows
    ((3, 2), (2, 1), (1, 1), (2, 1), True),  # asymmetric + dilation
    (2, None, 1, 3, False),  # stride defaults to the kernel, dilated
]
POOL_IDS = ["2s2", "2s2-ceil", "3s2p1", "3s2p1-ceil", "3s1p1", "asym-dil-ceil", "2p1d3"]


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


def _ties(*shape: int) -> torch.Tensor:
    """Integer values in [-2, 2]: most windows hold their max more than once."""
    return torch.randint(-2, 3, shape).float()


# ----------------------------------------------------------------------------- max pool


@pytest.mark.parametrize("args", POOLS, ids=POOL_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
def test_max_pool_ties(args, layout):
    x = _ties(2, 5, 7, 9)
    ref_v, ref_i = max_pool2d_reference(x, *args, return_indices=True)
    out = poison(torch.empty(ref_v.shape, memory_format=torch.channels_last))
    out_i = poison(torch.empty(ref_v.shape, dtype=torch.int64, memory_format=torch.channels_last))
    v, i = max_pool2d(_layout(x, layout), *args, return_indices=True, out=(out, out_i))
    assert v is out
    assert i is out_i
    assert torch.equal(v, ref_v)
    assert torch.equal(i, ref_i)


@pytest.mark.parametrize("args", POOLS[:4], ids=POOL_IDS[:4])
def test_max_pool_random_odd(args):
    """Random values on a larger odd plane; the default (channels_last) allocation."""
    x = torch.randn(1, 19, 33, 47).contiguous(memory_format=torch.channels_last)
    v, i = max_pool2d(x, *args, return_indices=True)
    ref_v, ref_i = max_pool2d_reference(x, *args, return_indices=True)
    assert v.is_contiguous(memory_format=torch.channels_last)
    assert i.dtype == torch.int64
    assert torch.equal(v, ref_v)
    assert torch.equal(i, ref_i)
    assert torch.equal(max_pool2d(x, *args), ref_v)  # without indices


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_max_pool_nan_and_inf(layout):
    """NaN is the max and the LAST NaN scanned wins; an all −inf window (its
    padding is −inf too) keeps the first in-bounds tap's index."""
    x = torch.randn(1, 3, 7, 9)
    x[0, 0, 1:3, 1:3] = float("nan")  # several NaNs in one window
    x[0, 1, 0, 4] = float("nan")
    x[0, 2] = float("-inf")
    x[0, 1, 4:, 6:] = float("-inf")
    for args in [(3, 2, 1, 1, False), (2, 2, 0, 1, True), (3, 1, 1, 2, False)]:
        ref_v, ref_i = max_pool2d_reference(x, *args, return_indices=True)
        v, i = max_pool2d(_layout(x, layout), *args, return_indices=True)
        assert torch.equal(v.isnan(), ref_v.isnan())
        assert ref_v.isnan().any()
        assert ref_v.isneginf().any()
        assert torch.equal(torch.nan_to_num(v), torch.nan_to_num(ref_v))
        assert torch.equal(i, ref_i)


def test_max_pool_out_channel_slice():
    x = torch.randn(2, 3, 7, 9)
    buf = poison(torch.empty(2, 8, 4, 5, memory_format=torch.channels_last))
    v = max_pool2d(x, 2, 2, ceil_mode=True, out=buf[:, 3:6])
    assert torch.equal(buf[:, 3:6], max_pool2d_reference(x, 2, 2, ceil_mode=True))
    assert torch.equal(v, buf[:, 3:6])
    assert buf[:, :3].isnan().all()
    assert buf[:, 6:].isnan().all()


@pytest.mark.parametrize("args", POOLS[:4], ids=POOL_IDS[:4])
def test_max_pool_fp16(args):
    """The max of fp16 values is one of them: exact, indices included."""
    x = _ties(2, 5, 7, 9).half().contiguous(memory_format=torch.channels_last)
    v, i = max_pool2d(x, *args, return_indices=True)
    ref_v, ref_i = max_pool2d_reference(x, *args, return_indices=True)
    assert v.dtype == torch.half
    assert torch.equal(v, ref_v)
    assert torch.equal(i, ref_i)


# ----------------------------------------------------------------------------- max unpool


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("hw", [(7, 9), (8, 6)])
def test_unpool_segnet_roundtrip(layout, hw):
    """SegNet: 2×2/s2 pool (ceil_mode) then unpool to the pre-pool size."""
    x = torch.randn(2, 5, *hw)
    v, i = max_pool2d_reference(x, 2, 2, ceil_mode=True, return_indices=True)
    out = poison(torch.empty(2, 5, *hw, memory_format=torch.channels_last))
    y = max_unpool2d(_layout(v, layout), _layout(i, layout), hw, out=out)
    ref = max_unpool2d_reference(v, i, hw)
    assert torch.equal(y, ref)
    assert torch.equal(ref, F.max_unpool2d(v, i, 2, 2, output_size=hw))
    assert (y != 0).sum() == v.numel()  # nothing lost, the rest is zero


def test_unpool_overlapping_windows():
    """3×3/s1 windows share argmaxes; colliding indices carry the same value, so the
    result is still defined."""
    x = torch.randn(1, 4, 7, 9).contiguous(memory_format=torch.channels_last)
    v, i = max_pool2d(x, 3, 1, 1, return_indices=True)
    assert torch.equal(max_unpool2d(v, i, (7, 9)), max_unpool2d_reference(v, i, (7, 9)))


def test_unpool_out_channel_slice_and_fp16():
    x = torch.randn(1, 3, 7, 9).half()
    v, i = max_pool2d(x, 2, 2, return_indices=True)
    buf = poison(torch.empty(1, 7, 7, 9, dtype=torch.half, memory_format=torch.channels_last))
    max_unpool2d(v, i, (7, 9), out=buf[:, 1:4])
    assert torch.equal(buf[:, 1:4], max_unpool2d_reference(v, i, (7, 9)))
    assert buf[:, :1].isnan().all()
    assert buf[:, 4:].isnan().all()


def test_unpool_skips_out_of_range_indices():
    v = torch.ones(1, 1, 2, 2)
    i = torch.tensor([[[[0, 5], [-1, 20]]]])  # 2 valid, 2 outside the 4×5 plane
    y = max_unpool2d(v, i, (4, 5))
    expect = torch.zeros(1, 1, 4, 5)
    expect.view(-1)[[0, 5]] = 1.0
    assert torch.equal(y, expect)


# ----------------------------------------------------------------------------- average pools


@pytest.mark.parametrize("bins", [1, 2, 3, 6, (4, 5), (9, 11), (None, 4)])
@pytest.mark.parametrize("hw", [(7, 9), (33, 47)])
def test_adaptive_avg_pool(bins, hw):
    """PSPNet's bins (and more bins than pixels) on odd feature sizes."""
    x = torch.randn(2, 19, *hw).contiguous(memory_format=torch.channels_last)
    ref = adaptive_avg_pool2d_reference(x, bins)
    out = poison(torch.empty(ref.shape, memory_format=torch.channels_last))
    y = adaptive_avg_pool2d(x, bins, out=out)
    assert y is out
    assert_close(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
@pytest.mark.parametrize("bins", [1, 3])
def test_adaptive_avg_pool_layouts(layout, bins):
    x = torch.randn(2, 3, 7, 9)
    y = adaptive_avg_pool2d(_layout(x, layout), bins)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, adaptive_avg_pool2d_reference(x, bins), atol=1e-5, rtol=1e-5)


def test_adaptive_avg_pool_out_slice_and_global():
    x = torch.randn(2, 5, 33, 47).contiguous(memory_format=torch.channels_last)
    buf = poison(torch.empty(2, 9, 6, 6, memory_format=torch.channels_last))
    adaptive_avg_pool2d(x, 6, out=buf[:, 4:])
    assert_close(buf[:, 4:], adaptive_avg_pool2d_reference(x, 6), atol=1e-5, rtol=1e-5)
    assert buf[:, :4].isnan().all()
    g = global_avg_pool2d(x)
    assert g.shape == (2, 5, 1, 1)
    assert_close(g, global_avg_pool2d_reference(x), atol=1e-5, rtol=1e-5)
    assert_close(global_avg_pool2d_reference(x), x.mean((2, 3), keepdim=True), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bins", [1, 2, 3, 6])
def test_adaptive_avg_pool_fp16(bins):
    x = (torch.randn(2, 19, 33, 47) + 3.0).half().contiguous(memory_format=torch.channels_last)
    y = adaptive_avg_pool2d(x, bins)
    assert y.dtype == torch.half
    ref32 = adaptive_avg_pool2d_reference(x.float(), bins)
    assert_low_precision_close(y, ref32, adaptive_avg_pool2d_reference(x, bins))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("args", POOLS, ids=POOL_IDS)
def test_max_pool_bf16_gpu(args):
    x = _ties(2, 24, 33, 47).cuda().bfloat16().contiguous(memory_format=torch.channels_last)
    v, i = max_pool2d(x, *args, return_indices=True)
    ref_v, ref_i = max_pool2d_reference(x, *args, return_indices=True)
    assert torch.equal(v, ref_v)
    assert torch.equal(i, ref_i)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("shape", "args"),
    [
        ((1, 64, 360, 480), (2, 2, 0, 1, True)),  # SegNet stage 1 (CamVid)
        ((1, 512, 45, 60), (2, 2, 0, 1, True)),  # SegNet stage 4
        ((4, 64, 257, 513), (3, 2, 1, 1, False)),  # ResNet stem, odd
    ],
)
def test_max_pool_realistic_gpu(shape, args):
    x = torch.randn(*shape, device="cuda").half().contiguous(memory_format=torch.channels_last)
    v, i = max_pool2d(x, *args, return_indices=True)
    ref_v, ref_i = max_pool2d_reference(x, *args, return_indices=True)
    assert torch.equal(v, ref_v)
    assert torch.equal(i, ref_i)
    y = max_unpool2d(v, i, shape[-2:])
    assert torch.equal(y, max_unpool2d_reference(v, i, shape[-2:]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bins", [1, 2, 3, 6])
def test_adaptive_avg_pool_realistic_gpu(dtype, bins):
    x = torch.randn(1, 2048, 65, 65, device="cuda").to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    y = adaptive_avg_pool2d(x, bins)
    ref32 = adaptive_avg_pool2d_reference(x.float(), bins)
    if dtype == torch.float32:
        assert_close(y, ref32)
    else:
        assert_low_precision_close(y, ref32, adaptive_avg_pool2d_reference(x, bins))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda x: max_pool2d(x[0], 2), ValueError, "4-D"),
        (lambda x: max_pool2d(x.long(), 2), TypeError, "float32"),
        (lambda x: max_pool2d(x, 3, 2, 2), ValueError, "padding must be between"),
        (lambda x: max_pool2d(x, 0), ValueError, "must be positive"),
        (lambda x: max_pool2d(x, (2, 2, 2)), ValueError, "kernel_size must be"),
        (lambda x: max_pool2d(x, 7), ValueError, "too small"),
        (lambda x: max_pool2d(x, 2, out=torch.empty(1, 2, 3, 3)), ValueError, "out must have"),
        (
            lambda x: max_pool2d(x, 2, out=torch.empty(1, 2, 2, 2, dtype=torch.half)),
            TypeError,
            "out must have dtype",
        ),
        (
            lambda x: max_pool2d(x, 2, out=(torch.empty(1, 2, 2, 2), torch.empty(1, 2, 2, 2))),
            ValueError,
            "only with return_indices",
        ),
        (
            lambda x: max_unpool2d(x, torch.zeros(1, 2, 5, 5, dtype=torch.int32), (10, 10)),
            TypeError,
            "indices must be int64",
        ),
        (
            lambda x: max_unpool2d(x, torch.zeros(1, 2, 5, 4, dtype=torch.int64), (10, 10)),
            ValueError,
            "indices must have",
        ),
        (
            lambda x: max_unpool2d(x, torch.zeros(1, 2, 5, 5, dtype=torch.int64), (0, 10)),
            ValueError,
            "output_size must be positive",
        ),
        (lambda x: adaptive_avg_pool2d(x, 0), ValueError, "output_size must be positive"),
        (lambda x: adaptive_avg_pool2d(x, "6"), ValueError, "output_size must be"),
        (lambda x: global_avg_pool2d(x[:, :, :0]), ValueError, "non-empty"),
    ],
    ids=[
        "rank",
        "dtype",
        "pad",
        "kernel0",
        "kernel-len",
        "too-small",
        "out-shape",
        "out-dtype",
        "out-pair",
        "idx-dtype",
        "idx-shape",
        "unpool-size",
        "adaptive-size",
        "adaptive-type",
        "empty",
    ],
)
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(1, 2, 5, 5))


def test_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        max_pool2d(torch.randn(1, 2, 5, 5), 2)
