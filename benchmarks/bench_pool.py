"""Pooling vs F.max_pool2d / F.max_unpool2d / F.adaptive_avg_pool2d in
channels_last fp16: SegNet's 2×2 pool with indices and its unpool, the ResNet
stem's 3×3/s2/p1 pool, and PSPNet's pyramid bins on a ResNet-50 feature map.

Run on a GPU: ``pytest benchmarks/bench_pool.py --benchmark-only``. Each case
records ms (triton.testing.do_bench), GB/s and the device in extra_info.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from segfast.bench.kernel_timing import measure_kernel as _measure
from segfast.kernels.pool import (
    adaptive_avg_pool2d,
    adaptive_avg_pool2d_reference,
    max_pool2d,
    max_pool2d_reference,
    max_unpool2d,
    max_unpool2d_reference,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")

# SegNet encoder stages on a 360×480 CamVid frame (2×2/s2, ceil_mode, indices)
SEGNET = [(1, 64, 360, 480), (1, 128, 180, 240), (1, 256, 90, 120), (1, 512, 45, 60)]


def _x(shape):
    x = torch.randn(*shape, device="cuda", dtype=torch.half)
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", ["segfast", "torch"])
@pytest.mark.parametrize("shape", SEGNET, ids=lambda s: "x".join(map(str, s)))
def test_segnet_pool_with_indices(benchmark, shape, impl):
    x = _x(shape)
    op = max_pool2d if impl == "segfast" else max_pool2d_reference
    fn = partial(op, x, 2, 2, ceil_mode=True, return_indices=True)
    out = x.numel() // 4  # ≈ N·C·⌈H/2⌉·⌈W/2⌉
    # read x; write fp16 values + int64 indices
    _measure(benchmark, fn, bytes_moved=x.numel() * 2 + out * (2 + 8))


@pytest.mark.parametrize("impl", ["segfast", "torch"])
@pytest.mark.parametrize("shape", SEGNET, ids=lambda s: "x".join(map(str, s)))
def test_segnet_unpool(benchmark, shape, impl):
    v, i = max_pool2d_reference(_x(shape), 2, 2, ceil_mode=True, return_indices=True)
    size = shape[-2:]
    op = max_unpool2d if impl == "segfast" else max_unpool2d_reference
    fn = partial(op, v, i, size)
    # write the zero-filled output, read values + indices, scatter values
    n_out = shape[0] * shape[1] * size[0] * size[1]
    _measure(benchmark, fn, bytes_moved=n_out * 2 + v.numel() * (2 + 8 + 2))


@pytest.mark.parametrize("impl", ["segfast", "torch"])
@pytest.mark.parametrize(
    "shape", [(1, 64, 512, 1024), (8, 64, 256, 256)], ids=["1024x2048", "b8-512"]
)
def test_resnet_stem_pool(benchmark, shape, impl):
    x = _x(shape)
    op = max_pool2d if impl == "segfast" else max_pool2d_reference
    fn = partial(op, x, 3, 2, 1)
    _measure(benchmark, fn, bytes_moved=x.numel() * 2 + x.numel() // 4 * 2)


@pytest.mark.parametrize("impl", ["segfast", "torch"])
@pytest.mark.parametrize("bins", [1, 2, 3, 6])
def test_pspnet_adaptive_pool(benchmark, bins, impl):
    x = _x((1, 2048, 64, 64))  # ResNet-50 layer4 at output stride 8 on 512×512
    op = adaptive_avg_pool2d if impl == "segfast" else adaptive_avg_pool2d_reference
    fn = partial(op, x, bins)
    # read x once (bins tile the plane; overlaps are re-reads from L2)
    _measure(benchmark, fn, bytes_moved=x.numel() * 2 + 2048 * bins * bins * 2)
