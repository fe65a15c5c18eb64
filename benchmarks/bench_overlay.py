"""Fused mask overlay vs the PyTorch chain (overlay_reference), on a GPU.

Run: ``pytest benchmarks/bench_overlay.py --benchmark-only``. Each case records ms
(triton.testing.do_bench), effective GB/s and the device in extra_info. Bytes are the op's
unavoidable traffic, the same for both implementations: read the frame and the mask once,
write the frame once (the palette is 63 bytes).
"""

from __future__ import annotations

import pytest
import torch

from segfast.bench.kernel_timing import measure_kernel as _measure
from segfast.kernels.overlay import default_palette, overlay, overlay_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")

# name: (N, H, W, mask dtype)
CASES = {
    "1080p-uint8-mask": (1, 1080, 1920, torch.uint8),
    "1080p-int64-mask": (1, 1080, 1920, torch.int64),
    "1080p-x4-uint8-mask": (4, 1080, 1920, torch.uint8),
}


@pytest.mark.parametrize("impl", ["segfast", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_overlay(benchmark, case, impl):
    N, H, W, mask_dtype = CASES[case]
    frames = torch.randint(0, 256, (N, H, W, 3), device="cuda", dtype=torch.uint8)
    mask = torch.randint(0, 21, (N, H, W), device="cuda").to(mask_dtype)
    palette = default_palette(21, "bgr").cuda()
    out = torch.empty_like(frames)
    if impl == "segfast":

        def fn():
            overlay(frames, mask, palette, alpha=0.5, out=out)
    else:

        def fn():
            overlay_reference(frames, mask, palette, alpha=0.5)

    # read N·H·W·3 frame bytes + the mask, write N·H·W·3 bytes
    _measure(benchmark, fn, bytes_moved=2 * frames.numel() + mask.numel() * mask.element_size())
