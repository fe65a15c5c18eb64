"""Channel statistics from the conv kernels' epilogues (``conv2d(..., stats=)``): each
64-pixel tile of one image writes, per output channel, the mean and M2 of the values it
stored; GroupNorm, the squeeze-excitation gate and global average pooling take them
instead of re-reading the map. Checked against statistics computed in float64 from the conv's own output, over
the dense, flat-K, depthwise and gated paths, odd sizes (tiles ending mid-row, images
that are not a whole number of tiles, one-pixel maps), batches, a channel-slice out=,
fp32 and fp16 (bf16 on a GPU only: the interpreter's bf16 arithmetic is wrong)."""

from __future__ import annotations

import pytest
import torch

from segfast.kernels._common import STATS_BLOCK
from segfast.kernels.conv2d import conv2d, pack_conv_weight, stats_buffer
from segfast.kernels.group_norm import group_norm, group_norm_reference
from segfast.kernels.pool import global_avg_pool2d
from segfast.kernels.squeeze_excite import se_gate
from segfast.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu, id="bf16"),  # interpreter: wrong
]

# (N, Cin, H, W, Cout, k, stride, groups, gated)
CONVS = [
    (3, 19, 13, 11, 23, 3, 1, 1, False),  # dense 3×3, 143 px per image: 3 tiles, last short
    (2, 3, 17, 9, 16, 3, 2, 1, False),  # flat-K stem (3 channels), stride 2
    (2, 24, 9, 10, 24, 3, 1, 24, False),  # depthwise
    (1, 40, 5, 3, 70, 1, 1, 1, True),  # gated 1×1 (the SE's project conv), 15 px
    (2, 16, 1, 1, 8, 1, 1, 1, False),  # one pixel
]
IDS = ["3x3", "flatk-s2", "depthwise", "gated-1x1", "1px"]


def _assert_stats(stats: torch.Tensor, y: torch.Tensor) -> None:
    """fp32 sums of 64 values: errors scale with the values' magnitude (a few ulps of
    max |y| for the mean, of the largest M2 for the M2s)."""
    mean, m2 = _tile_stats(y)  # of the stored (rounded) values the consumers read
    assert_close(stats[0], mean, atol=4e-7 * float(y.abs().max()), rtol=0)
    assert_close(stats[1], m2, atol=4e-6 * float(m2.max()) + 1e-12, rtol=0)


def _tile_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, T, C] means and M2s of each image's STATS_BLOCK-pixel tiles, in float64."""
    n, c = y.shape[:2]
    flat = y.double().reshape(n, c, -1)
    means, m2s = [], []
    for t0 in range(0, flat.shape[2], STATS_BLOCK):
        seg = flat[:, :, t0 : t0 + STATS_BLOCK]
        mean = seg.mean(-1)
        means.append(mean)
        m2s.append(((seg - mean[..., None]) ** 2).sum(-1))
    return torch.stack(means, 1), torch.stack(m2s, 1)


def _run(case, dtype, out=None, offset=50.0):
    n, cin, h, w, cout, k, stride, groups, gated = case
    g = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(n, cin, h, w, generator=g) + offset).to(DEVICE, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(cout, cin // groups, k, k, generator=g) * 0.1).to(DEVICE, dtype)
    bias = torch.randn(cout, generator=g).to(DEVICE, dtype)
    gate = torch.rand(n, cin, 1, 1, generator=g).to(DEVICE, dtype) if gated else None
    kw = dict(stride=stride, padding=k // 2, groups=groups, act="relu", gate=gate)
    ho, wo = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    stats = stats_buffer(n, ho * wo, cout, DEVICE)
    y = conv2d(x, pack_conv_weight(weight), None, bias, stats=stats, out=out, **kw)
    plain = conv2d(x, pack_conv_weight(weight), None, bias, **kw)
    return y, plain, stats


@pytest.mark.parametrize("case", CONVS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_writes_its_output_statistics(case, dtype):
    y, plain, stats = _run(case, dtype)
    # the same values as without statistics (only the pixel tiling differs): up to the
    # accumulation order, one rounding step of the storage dtype
    ulp = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert_close(y, plain, atol=ulp * float(plain.abs().max()), rtol=0)
    _assert_stats(stats, y)


def test_statistics_of_a_channel_slice_output():
    case = CONVS[0]
    n, _, h, w, cout = case[:5]
    buf = torch.zeros(n, cout + 10, h, w, device=DEVICE)
    buf = buf.contiguous(memory_format=torch.channels_last)
    view = buf[:, 4 : 4 + cout]
    y, _, stats = _run(case, torch.float32, out=view)
    assert y is view
    assert torch.count_nonzero(buf[:, :4]) == 0
    _assert_stats(stats, view)


# one group (LayerNorm-like) at a large mean beside a spread of ~3; InstanceNorm at 0
@pytest.mark.parametrize(("groups", "offset"), [(1, 100.0), (23, 0.0)])
def test_group_norm_from_conv_statistics(groups, offset):
    y, _, stats = _run(CONVS[0], torch.float32, offset=offset)
    weight, bias = (torch.rand(23) + 0.5).to(DEVICE), torch.randn(23).to(DEVICE)
    got = group_norm(y, groups, weight, bias, 1e-5, "hardswish", stats=stats)
    assert_close(got, group_norm_reference(y, groups, weight, bias, 1e-5, "hardswish"),
                 atol=2e-5, rtol=1e-5)  # fmt: skip
    assert_close(got, group_norm(y, groups, weight, bias, 1e-5, "hardswish"), atol=2e-5)


@pytest.mark.parametrize("case", [CONVS[2], CONVS[3]], ids=["depthwise", "gated-1x1"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_se_gate_from_conv_statistics(case, dtype):
    y, _, stats = _run(case, dtype)
    c = y.shape[1]
    g = torch.Generator().manual_seed(4)
    w1 = (torch.randn(8, c, generator=g) * 0.2).to(DEVICE, dtype)
    w2 = (torch.randn(c, 8, generator=g) * 0.2).to(DEVICE, dtype)
    b1 = torch.randn(8, generator=g).to(DEVICE, dtype)
    args = (w1, b1, "relu", 0.0, w2, None, "hardsigmoid", 0.0)
    # the same gate up to the summation order, then one rounding to the storage dtype
    ulp = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert_close(se_gate(y, *args, stats=stats), se_gate(y, *args), atol=ulp, rtol=0)


@pytest.mark.parametrize("case", [CONVS[0], CONVS[2], CONVS[4]], ids=["3x3", "dw", "1px"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_global_pool_from_conv_statistics(case, dtype):
    y, _, stats = _run(case, dtype)
    ref = y.double().mean((2, 3), keepdim=True)
    # fp32 sums (a few ulps of max |y|), then one rounding to the storage dtype
    ulp = {torch.float32: 0.0, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    tol = 4e-7 * float(y.abs().max()) + ulp * float(ref.abs().max())
    assert_close(global_avg_pool2d(y, stats=stats), ref, atol=tol, rtol=0)
    out = torch.empty(y.shape[0], y.shape[1], 1, 1, dtype=dtype, device=DEVICE)
    assert global_avg_pool2d(y, stats=stats, out=out) is out


def test_bad_statistics_buffers():
    case = CONVS[0]
    n, cin, h, w, cout = case[:5]
    x = torch.randn(n, cin, h, w, device=DEVICE)
    weight = torch.randn(cout, cin, 3, 3, device=DEVICE)
    good = stats_buffer(n, h * w, cout, DEVICE)
    wrong = [
        stats_buffer(n, h * w + STATS_BLOCK, cout, DEVICE),  # one tile too many
        stats_buffer(n, h * w, cout + 1, DEVICE),
        good.double(),
        torch.empty(2, n, cout, good.shape[2], device=DEVICE).transpose(2, 3),  # strided
    ]
    for stats in wrong:
        with pytest.raises(ValueError, match="stats must be"):
            conv2d(x, weight, padding=1, stats=stats)
    y = conv2d(x, weight, padding=1, stats=good)
    with pytest.raises(ValueError, match="stats must be"):
        group_norm(y, 1, stats=stats_buffer(n, h * w, cout - 1, DEVICE))
    with pytest.raises(ValueError, match="stats must be"):
        se_gate(y, torch.randn(4, cout, device=DEVICE), stats=good[:, :1])
    with pytest.raises(ValueError, match="stats must be"):
        global_avg_pool2d(y[:, 1:], stats=good)


def test_partial_counts_are_run_time_arguments():
    """The number of per-image partials (pixel splits, or statistics tiles: ⌈H·W/64⌉)
    changes with the map size; as a constexpr it made every resolution of a dynamic
    engine compile the reducers again (and unrolled loops over up to hundreds of tiles)."""
    import inspect

    from kernels import group_norm, squeeze_excite

    for fn in (squeeze_excite._pool_partial_kernel, squeeze_excite._se_fc_kernel,
               group_norm._channel_stats_kernel, group_norm._group_stats_kernel):  # fmt: skip
        params = inspect.signature(fn.fn).parameters  # JITFunction or the interpreter's
        assert "BLOCK_C" in params or "BLOCK" in params  # the constexprs are still there
        assert "constexpr" in str(
            params[next(k for k in params if k.startswith("BLOCK"))].annotation
        )
        assert "constexpr" not in str(params["S"].annotation), fn
