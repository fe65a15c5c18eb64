"""Transposed convolution + folded BN + ReLU vs PyTorch's cuDNN
F.conv_transpose2d → batch_norm → relu, channels_last fp16.

Shapes: U-Net's 2×2/s2 up-convolutions (the deepest and the last decoder stage)
and DCGAN's 4×4/s2/p1 generator layer. Run on a GPU:
``pytest benchmarks/bench_conv_transpose2d.py --benchmark-only``. Each case
records ms (triton.testing.do_bench), TFLOP/s, GB/s and the device.
FLOPs = 2·N·H·W·Cin·Cout·KH·KW; bytes = x + weight + output (each once).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segfast.bench.kernel_timing import measure_kernel as _measure
from segfast.kernels.conv_transpose2d import conv_transpose2d, pack_weight

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")

# name: ((N, Cin, H, W), Cout, kernel, stride, padding)
CASES = {
    "unet-up1-1024to512": ((1, 1024, 32, 32), 512, 2, 2, 0),
    "unet-up4-128to64": ((1, 128, 256, 256), 64, 2, 2, 0),
    "dcgan-512to256": ((64, 512, 4, 4), 256, 4, 2, 1),
}


@pytest.mark.parametrize("impl", ["segfast", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_conv_transpose2d_bn_relu(benchmark, case, impl):
    (n, cin, h, w), cout, k, s, p = CASES[case]
    dev, dt = "cuda", torch.half
    x = torch.randn(n, cin, h, w, device=dev, dtype=dt).contiguous(
        memory_format=torch.channels_last
    )
    weight = (torch.randn(cin, cout, k, k, device=dev) / (cin * k * k) ** 0.5).to(dt)
    gamma, beta = torch.rand(cout, device=dev) + 0.5, torch.randn(cout, device=dev)
    mean, var = torch.randn(cout, device=dev), torch.rand(cout, device=dev) + 0.5
    if impl == "segfast":
        # BN folded into the epilogue once, as segfast's compiler does
        scale = gamma / torch.sqrt(var + 1e-5)
        shift = beta - mean * scale
        wp = pack_weight(weight)

        def fn():
            conv_transpose2d(x, wp, scale, shift, stride=s, padding=p, act="relu")
    else:
        g, b, m, v = (t.to(dt) for t in (gamma, beta, mean, var))

        def fn():
            y = F.conv_transpose2d(x, weight, None, s, p)
            torch.relu_(F.batch_norm(y, m, v, g, b, False, 0.0, 1e-5))

    ho = (h - 1) * s - 2 * p + k
    wo = (w - 1) * s - 2 * p + k
    flops = 2 * n * h * w * cin * cout * k * k
    bytes_moved = (x.numel() + weight.numel() + n * cout * ho * wo) * 2
    _measure(benchmark, fn, bytes_moved=bytes_moved, flops=flops)
