"""Fused segmentation head vs the PyTorch chain, channels_last fp16, on a GPU.

Run: ``pytest benchmarks/bench_head.py --benchmark-only``. Each case records ms
(triton.testing.do_bench), effective GB/s and the device in extra_info. Bytes are the
op's unavoidable traffic, the same for both implementations so GB/s compare directly:
read the input (logits or features) once, write the mask once. The PyTorch chain also
writes and reads the full-resolution logits (e.g. 2 × 88 MB for 21 classes at 1024×2048)
and an int64 index before the uint8 cast.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segfast.bench.kernel_timing import measure_kernel as _measure
from segfast.kernels.head import seg_head

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")

CL = torch.channels_last

# name: (logits [N, K, h, w], output (H, W)) — FCN / DeepLab heads at output stride 8
UPSAMPLE_CASES = {
    "voc21-x8-512x512": ((1, 21, 64, 64), (512, 512)),
    "voc21-x8-1024x2048": ((1, 21, 128, 256), (1024, 2048)),
}
# name: (features [N, C, H, W], K) — U-Net's final 1×1 conv
CONV_CASES = {"unet-c64-k2-512x512": ((1, 64, 512, 512), 2)}


@pytest.mark.parametrize("impl", ["segfast", "torch"])
@pytest.mark.parametrize("case", list(UPSAMPLE_CASES))
def test_upsample_argmax(benchmark, case, impl):
    shape, size = UPSAMPLE_CASES[case]
    x = torch.randn(shape, device="cuda", dtype=torch.half).contiguous(memory_format=CL)
    mask = torch.empty((shape[0], *size), device="cuda", dtype=torch.uint8)
    if impl == "segfast":

        def fn():
            seg_head(x, out_size=size, mode="argmax", out=mask)
    else:

        def fn():
            F.interpolate(x, size=size, mode="bilinear", align_corners=False).argmax(1)

    # read N·K·h·w fp16 logits, write N·H·W uint8; 8 flops per blended logit
    bytes_moved = x.numel() * 2 + mask.numel()
    flops = 8 * mask.numel() * shape[1]
    _measure(benchmark, fn, bytes_moved=bytes_moved, flops=flops)


@pytest.mark.parametrize("impl", ["segfast", "torch"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_argmax(benchmark, case, impl):
    shape, K = CONV_CASES[case]
    N, C, H, W = shape
    x = torch.randn(shape, device="cuda", dtype=torch.half).contiguous(memory_format=CL)
    w = torch.randn(K, C, 1, 1, device="cuda", dtype=torch.half) / C**0.5
    b = torch.randn(K, device="cuda", dtype=torch.half)
    mask = torch.empty((N, H, W), device="cuda", dtype=torch.uint8)
    if impl == "segfast":

        def fn():
            seg_head(x, w, b, mode="argmax", out=mask)
    else:

        def fn():
            F.conv2d(x, w, b).argmax(1)

    # read N·C·H·W fp16 features, write N·H·W uint8; 2·C·K flops per pixel
    bytes_moved = x.numel() * 2 + mask.numel()
    _measure(benchmark, fn, bytes_moved=bytes_moved, flops=2 * N * H * W * C * K)
