"""An engine's entry layout conversion on segfast's CPU kernels (``sf_to_nhwc``).

Every engine on the CPU plan runs channels-last; its graph begins with
``aten._to_copy(x, memory_format=channels_last)`` — with ``dtype=bfloat16`` in a bf16
engine — of the caller's NCHW frame. PyTorch does that as a strided copy, one
element at a time through its iterator: a 3-channel 512² fp32 frame takes 0.3 ms on 2
cores of a Zen 4 EPYC, 0.55 ms when the bf16 cast is in the same copy, and grows
faster than the frame (1024²: 2–8 ms). ``sf_to_nhwc`` writes a row of pixels at a time
with the channels innermost: 0.09 ms fp32 and 0.05 ms bf16 at 512², 0.45 / 0.23 ms at
1024² (same machine, measured against ``_to_copy`` in one process).

Reference: ``aten._to_copy`` itself — the result is bit-identical (bf16 rounded to
nearest even) but for NaN payloads (a NaN stays a quiet NaN; PyTorch's own paths
disagree on its sign bit). Anything the kernel does not take (an input that
is not fp32 or not 4-D, an empty one) runs ``_to_copy``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from segfast.backends.cpu.native import Native

aten = torch.ops.aten
DTYPES = (torch.float32, torch.bfloat16)


def applies(kwargs: dict[str, Any], out_dtype: torch.dtype, out_dim: int) -> bool:
    """Whether a ``_to_copy`` with these keyword arguments, making a tensor of
    ``out_dtype`` and ``out_dim`` dimensions, is a conversion to NHWC this kernel makes."""
    return (
        set(kwargs) == {"dtype", "memory_format"}
        and kwargs["memory_format"] is torch.channels_last
        and kwargs["dtype"] == out_dtype
        and out_dtype in DTYPES
        and out_dim == 4
    )


class NativeToNHWC:
    """``aten._to_copy(x, dtype=dtype, memory_format=torch.channels_last)`` of a 4-D
    fp32 tensor (any strides) on ``sf_to_nhwc``."""

    def __init__(self, native: Native, dtype: torch.dtype) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"sf_to_nhwc writes fp32 or bf16, not {dtype}")
        self.native, self.dtype = native, dtype

    def __call__(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or x.dim() != 4 or x.numel() == 0 or x.device.type != "cpu":
            return aten._to_copy.default(x, dtype=self.dtype, memory_format=torch.channels_last)
        n, c, h, w = x.shape
        y = torch.empty((n, c, h, w), dtype=self.dtype, memory_format=torch.channels_last)
        self.native.to_nhwc(
            x.data_ptr(), n, c, h, w, *x.stride(), y.data_ptr(), int(self.dtype == torch.bfloat16)
        )
        return y
