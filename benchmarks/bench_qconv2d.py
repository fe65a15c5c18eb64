"""int8 conv2d (segfast.kernels.qconv2d) vs segfast's fp16 conv2d kernel and cuDNN fp16.

Run on a GPU: ``pytest benchmarks/bench_qconv2d.py --benchmark-only``. Each case records
ms (triton.testing.do_bench), TFLOP/s (int8 ops for qconv2d: 2·N·Ho·Wo·Cout·Cin·KH·KW,
the same count as the fp16 FLOPs), GB/s and the device in extra_info.

Layers: U-Net encoder levels (conv 3×3 + bias + ReLU, same size) and the U-Net decoder
conv with its two-source prologue (skip ++ bilinear ×2 of the deeper map). Implementations:

- ``int8-fp32in`` / ``int8-fp16in``: qconv2d on an fp32 (what an int8 engine runs:
  its activations are fp32) or fp16 input, quantized on load, int8 × int8 → int32;
- ``fp16``: segfast's fp16 conv2d kernel with the same epilogue;
- ``cudnn-fp16``: F.conv2d(bias) + F.relu (cuDNN, ``cudnn.benchmark`` on; decoder:
  F.interpolate + torch.cat first).

Bytes are each implementation's compulsory traffic: read every input element once in
its own dtype (x2 at its own resolution), the weight (1 B per int8 weight, 2 B fp16),
write the output once in the input's dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segfast.bench.kernel_timing import measure_kernel as _measure
from segfast.kernels.conv2d import conv2d, pack_conv_weight
from segfast.kernels.qconv2d import pack_qconv_weight, qconv2d

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")

CL = torch.channels_last
IMPLS = ["int8-fp32in", "int8-fp16in", "fp16", "cudnn-fp16"]

# id -> (Cin, Cout, H, W); N = 1, 3×3, padding 1
UNET = {
    "unet-64@512": (64, 64, 512, 512),
    "unet-128@256": (128, 128, 256, 256),
    "unet-256@128": (256, 256, 128, 128),
    "unet-512@64": (512, 512, 64, 64),
}
# id -> (skip channels C, output size S): skip [1, C, S, S] ++ up×2([1, 2C, S/2, S/2]) → C
DECODER = {
    "dec-64@512": (64, 512),
    "dec-256@128": (256, 128),
}


@pytest.fixture(autouse=True, scope="module")
def _cudnn_benchmark():
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    yield
    torch.backends.cudnn.benchmark = saved


def _act(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=dtype).to(memory_format=CL)


def _weights(cout: int, cin: int):
    """(fp16 weight, int8 weight, fp32 per-channel scale) of one random 3×3 layer."""
    w = torch.randn(cout, cin, 3, 3, device="cuda") / (9 * cin) ** 0.5
    s = w.abs().amax(dim=(1, 2, 3)) / 127
    q = torch.clamp(torch.round(w / s[:, None, None, None]), -127, 127).to(torch.int8)
    return w.half(), q, s


def _run(impl, x, x2, w16, q, s, bias):
    """The callable for ``impl`` (weights packed once, outside it, as at build time)."""
    kw = {} if x2 is None else {"x2": x2, "x2_resize": "bilinear", "x2_scales": (2.0, 2.0)}
    if impl.startswith("int8"):
        qp = pack_qconv_weight(q)
        x_scale = 4.0 / 127  # |x| ≤ 4σ of N(0, 1)
        return lambda: qconv2d(x, qp, bias, x_scale=x_scale, w_scale=s, padding=1, act="relu",
                               **kw)  # fmt: skip
    if impl == "fp16":
        wp = pack_conv_weight(w16)
        return lambda: conv2d(x, wp, None, bias, padding=1, act="relu", **kw)

    def cudnn():
        inp = x
        if x2 is not None:
            up = F.interpolate(x2, scale_factor=2, mode="bilinear", align_corners=False)
            inp = torch.cat([x, up], 1)
        F.relu(F.conv2d(inp, w16.to(memory_format=CL), bias, 1, 1))

    return cudnn


def _dtype(impl: str) -> torch.dtype:
    return torch.float32 if impl == "int8-fp32in" else torch.float16


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(UNET))
def test_unet_conv3x3(benchmark, case, impl):
    cin, cout, h, w = UNET[case]
    benchmark.group = f"conv3x3-bias-relu {case}"
    dt = _dtype(impl)
    x = _act((1, cin, h, w), dt)
    w16, q, s = _weights(cout, cin)
    bias = torch.randn(cout, device="cuda", dtype=dt)
    fn = _run(impl, x, None, w16, q, s, bias)
    flops = 2 * h * w * cout * cin * 9
    wbytes = q.numel() if impl.startswith("int8") else 2 * w16.numel()
    # read x + weight, write y (in x's dtype)
    bytes_moved = (x.numel() + h * w * cout) * x.element_size() + wbytes
    _measure(benchmark, fn, flops=flops, bytes_moved=bytes_moved)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(DECODER))
def test_decoder_two_source(benchmark, case, impl):
    c, size = DECODER[case]
    benchmark.group = f"decoder-up-cat-conv-relu {case}"
    dt = _dtype(impl)
    skip = _act((1, c, size, size), dt)
    deep = _act((1, 2 * c, size // 2, size // 2), dt)
    w16, q, s = _weights(c, 3 * c)
    bias = torch.randn(c, device="cuda", dtype=dt)
    fn = _run(impl, skip, deep, w16, q, s, bias)
    flops = 2 * size * size * c * 3 * c * 9
    wbytes = q.numel() if impl.startswith("int8") else 2 * w16.numel()
    # read skip + deep (at its own resolution) + weight, write y
    bytes_moved = (skip.numel() + deep.numel() + size * size * c) * skip.element_size() + wbytes
    _measure(benchmark, fn, flops=flops, bytes_moved=bytes_moved)
