"""Fused conv2d vs PyTorch/cuDNN in channels_last fp16 on U-Net and DeepLab layer shapes.

Run on a GPU: ``pytest benchmarks/bench_conv2d.py --benchmark-only``. Each case records
ms (triton.testing.do_bench), TFLOP/s, GB/s and the device in extra_info.

(a) conv 3×3 + folded BatchNorm + ReLU, one segfast kernel vs F.conv2d + F.batch_norm
    + F.relu (cuDNN, ``cudnn.benchmark`` on): U-Net encoder levels and DeepLab ASPP
    atrous convs (output stride 16 of a 512² and of a 1024×2048 image).
(b) the U-Net decoder conv with its fused two-source prologue (skip ++ bilinear ×2 of the
    deeper map) vs F.interpolate + torch.cat + F.conv2d + F.batch_norm + F.relu.

FLOPs 2·N·Ho·Wo·Cout·Cin·KH·KW. Bytes are the fused op's compulsory traffic for both
implementations (the same work, so GB/s compares like with like): read every input
element once (x, and x2 at its own low resolution) and the weight, write the output once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segfast.bench.kernel_timing import measure_kernel as _measure
from segfast.kernels.conv2d import conv2d, pack_conv_weight

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")

CL = torch.channels_last
DTYPE = torch.float16

# (a) id -> (Cin, Cout, H, W, dilation); N = 1, 3×3, padding = dilation (same size)
CONV_BN_RELU = {
    "unet-64@512": (64, 64, 512, 512, 1),
    "unet-128@256": (128, 128, 256, 256, 1),
    "unet-256@128": (256, 256, 128, 128, 1),
    "unet-512@64": (512, 512, 64, 64, 1),
    "aspp-2048@32-r6": (2048, 256, 32, 32, 6),
    "aspp-2048@32-r12": (2048, 256, 32, 32, 12),
    "aspp-2048@32-r18": (2048, 256, 32, 32, 18),
    "aspp-2048@64x128-r6": (2048, 256, 64, 128, 6),
    "aspp-2048@64x128-r12": (2048, 256, 64, 128, 12),
    "aspp-2048@64x128-r18": (2048, 256, 64, 128, 18),
}

# (b) id -> (skip channels C, output size S): skip [1, C, S, S] ++ up×2([1, 2C, S/2, S/2]),
# conv 3×3 (3C → C) + BN + ReLU — segfast's U-Net decoder with up_mode="bilinear".
DECODER = {
    "dec-64@512": (64, 512),
    "dec-128@256": (128, 256),
    "dec-256@128": (256, 128),
    "dec-512@64": (512, 64),
}


@pytest.fixture(autouse=True, scope="module")
def _cudnn_benchmark():
    # Let cuDNN pick its fastest algorithm for every shape: the strongest baseline.
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    yield
    torch.backends.cudnn.benchmark = saved


def _bn(c: int):
    """Random eval-mode BatchNorm parameters and their folded scale/shift."""
    mean, var = torch.randn(c, device="cuda"), torch.rand(c, device="cuda") + 0.5
    gamma, beta = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
    scale = gamma / torch.sqrt(var + 1e-5)
    shift = beta - mean * scale
    return (mean, var, gamma, beta), scale, shift


def _act(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=DTYPE).to(memory_format=CL)


def _conv_weight(cout: int, cin: int) -> torch.Tensor:
    w = torch.randn(cout, cin, 3, 3, device="cuda") / (9 * cin) ** 0.5
    return w.to(DTYPE).to(memory_format=CL)


@pytest.mark.parametrize("impl", ["segfast", "torch"])
@pytest.mark.parametrize("case", list(CONV_BN_RELU))
def test_conv_bn_relu(benchmark, case, impl):
    cin, cout, h, w_, dil = CONV_BN_RELU[case]
    benchmark.group = f"conv3x3-bn-relu {case}"
    x = _act((1, cin, h, w_))
    w = _conv_weight(cout, cin)
    (mean, var, gamma, beta), scale, shift = _bn(cout)
    if impl == "segfast":
        wp = pack_conv_weight(w)  # once, as the compiler does at build time

        def fn():
            conv2d(x, wp, scale, shift, padding=dil, dilation=dil, act="relu")
    else:
        bn = [t.to(DTYPE) for t in (mean, var, gamma, beta)]

        def fn():
            y = F.conv2d(x, w, None, 1, dil, dil)
            F.relu(F.batch_norm(y, bn[0], bn[1], bn[2], bn[3], False, 0.0, 1e-5))

    flops = 2 * h * w_ * cout * cin * 9
    # read x + weight (+ 2·Cout fp32 scale/shift, negligible), write y
    bytes_moved = (x.numel() + w.numel() + h * w_ * cout) * x.element_size()
    _measure(benchmark, fn, flops=flops, bytes_moved=bytes_moved)


@pytest.mark.parametrize("impl", ["segfast", "torch"])
@pytest.mark.parametrize("case", list(DECODER))
def test_decoder_two_source(benchmark, case, impl):
    c, s = DECODER[case]
    benchmark.group = f"decoder-up-cat-conv-bn-relu {case}"
    skip = _act((1, c, s, s))
    deep = _act((1, 2 * c, s // 2, s // 2))
    w = _conv_weight(c, 3 * c)
    (mean, var, gamma, beta), scale, shift = _bn(c)
    if impl == "segfast":
        wp = pack_conv_weight(w)

        def fn():
            conv2d(
                skip, wp, scale, shift, padding=1, act="relu",
                x2=deep, x2_resize="bilinear", x2_scales=(2.0, 2.0),
            )  # fmt: skip
    else:
        bn = [t.to(DTYPE) for t in (mean, var, gamma, beta)]

        def fn():
            up = F.interpolate(deep, scale_factor=2, mode="bilinear", align_corners=False)
            y = F.conv2d(torch.cat([skip, up], 1), w, None, 1, 1)
            F.relu(F.batch_norm(y, bn[0], bn[1], bn[2], bn[3], False, 0.0, 1e-5))

    flops = 2 * s * s * c * 3 * c * 9
    # read skip + deep (at its own resolution) + weight, write y
    bytes_moved = (skip.numel() + deep.numel() + w.numel() + s * s * c) * skip.element_size()
    _measure(benchmark, fn, flops=flops, bytes_moved=bytes_moved)
