"""Resize vs F.interpolate (ATen) in channels_last fp16 on segmentation shapes.

Run on a GPU: ``pytest benchmarks/bench_resize.py --benchmark-only``. Each case
records ms (triton.testing.do_bench), GB/s and the device in extra_info.
Bytes: read N·C·H·W + write N·C·Ho·Wo elements (every input pixel is read once
from DRAM on upsampling; the 4-tap re-reads hit L2).
"""

from __future__ import annotations

import pytest
import torch

from segfast.bench.kernel_timing import measure_kernel as _measure
from segfast.kernels.resize import resize, resize_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")

# (N, C, H, W) -> (Ho, Wo)
CASES = {
    "logits-x4-21c": ((1, 21, 128, 256), (512, 1024)),  # DeepLab/FCN head, output stride 4
    "logits-x8-21c": ((1, 21, 64, 128), (512, 1024)),  # output stride 8
    "decoder-x2-256c": ((1, 256, 64, 64), (128, 128)),  # DeepLabV3+ decoder
}


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("impl", ["segfast", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_resize(benchmark, case, impl, mode):
    shape, size = CASES[case]
    x = torch.randn(*shape, device="cuda", dtype=torch.half)
    x = x.contiguous(memory_format=torch.channels_last)
    align = {"align_corners": False} if mode == "bilinear" else {}
    if impl == "segfast":
        out = torch.empty(
            (*shape[:2], *size), device="cuda", dtype=torch.half, memory_format=torch.channels_last
        )

        def fn():
            resize(x, size, mode, **align, out=out)
    else:

        def fn():
            resize_reference(x, size, mode, **align)

    n, c = shape[:2]
    elem = x.element_size()
    # read the input once, write the output once; 8 flops per bilinear output element
    bytes_moved = (x.numel() + n * c * size[0] * size[1]) * elem
    flops = 8 * n * c * size[0] * size[1] if mode == "bilinear" else 0
    _measure(benchmark, fn, bytes_moved=bytes_moved, flops=flops)
