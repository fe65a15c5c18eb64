"""Fused preprocessing vs the PyTorch chain (preprocess_reference), on a GPU.

Run: ``pytest benchmarks/bench_preprocess.py --benchmark-only``. Each case records ms
(triton.testing.do_bench), effective GB/s and the device in extra_info. Bytes are the op's
unavoidable traffic, the same for both implementations: read the uint8 frame once, write
the output once (the chain also writes and re-reads fp32 intermediates).
"""

from __future__ import annotations

import pytest
import torch

from segfast.bench.kernel_timing import measure_kernel as _measure
from segfast.kernels.preprocess import preprocess, preprocess_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")

# name: (frames [N, H, W, 3] BGR uint8, output size or None, layout)
CASES = {
    "1080p-to-512x512-nchw": ((1, 1080, 1920, 3), (512, 512), "nchw"),
    "1080p-to-512x512-nhwc": ((1, 1080, 1920, 3), (512, 512), "nhwc"),
    "1080p-x4-to-512x1024-nchw": ((4, 1080, 1920, 3), (512, 1024), "nchw"),
    "1080p-full-nhwc": ((1, 1080, 1920, 3), None, "nhwc"),
}


@pytest.mark.parametrize("impl", ["segfast", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_preprocess(benchmark, case, impl):
    shape, size, layout = CASES[case]
    frames = torch.randint(0, 256, shape, device="cuda", dtype=torch.uint8)
    kw = {"input_order": "bgr", "layout": layout, "dtype": torch.half}
    out = preprocess_reference(frames, size, **kw)  # also allocates the right layout
    if impl == "segfast":

        def fn():
            preprocess(frames, size, out=out, **kw)
    else:

        def fn():
            preprocess_reference(frames, size, **kw)

    # read N·H·W·3 bytes, write N·3·h·w fp16
    _measure(benchmark, fn, bytes_moved=frames.numel() + out.numel() * 2)
