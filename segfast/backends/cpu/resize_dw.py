"""A depthwise convolution of a bilinear upsample, the upsample computed band by
band inside the kernel (``sf_resize_dw`` in segfast_cpu.c), fp32 NHWC.

DeepLab v3+'s decoder upsamples the ASPP output ×4 (256 channels to 128×128 at
a 512×512 input: 16 MB) and, after the ``concat_depthwise`` pass, feeds it
straight to a depthwise 3×3 convolution. Unfused that is a resize writing 16 MB
and a depthwise conv reading it back (1.7 + 4.1 ms on 2 Zen 4 cores); fused,
each thread resizes only the rows one band of outputs reads, 64 channels at a
time, into a 256 kB scratch buffer (3.2 ms). The resize's index arithmetic is
ATen's (fp32 source index, clamped at 0; align_corners; a given scale factor
used as 1/scale; a dimension of unchanged size copied), so the values are the
upsample's up to fp32 rounding of the blend.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from segfast.backends.cpu.depthwise import ACT_CODES, nhwc_strides
from segfast.backends.cpu.native import Native
from segfast.compiler import ops

BLOCK = 64  # channels per work item (four 16-lane vectors)
# Scratch per thread: the resized rows one band reads, 64 channels each. 256 kB
# leaves room in a 1 MB L2 for the source rows and the output; 768 kB measured
# no better.
SCRATCH_BYTES = 256 << 10
# Fused only where the upsampled tensor would leave the caches.
MIN_BYTES = 2 << 20


def _pack_blocks(t: Tensor, c: int) -> Tensor:
    """[..., C] → [ceil(C/64), ..., 64], zero-padded, fp32 contiguous."""
    ncb = -(-c // BLOCK)
    t = torch.nn.functional.pad(t.to(torch.float32), (0, ncb * BLOCK - c))
    return t.reshape(*t.shape[:-1], ncb, BLOCK).movedim(-2, 0).contiguous()


def source_scale(in_size: int, out_size: int, align_corners: bool, scale: float | None) -> float:
    """ATen's ``area_pixel_compute_scale`` in fp32: the source step per output pixel."""
    if align_corners:
        return float(np.float32(in_size - 1) / np.float32(out_size - 1)) if out_size > 1 else 0.0
    if scale is not None and scale > 0:
        return float(np.float32(1.0 / scale))
    return float(np.float32(in_size) / np.float32(out_size))


class ResizeDepthwiseConv2d:
    """``dw(upsample_bilinear(x, size))``; called as ``conv(x, size)``."""

    def __init__(
        self,
        native: Native,
        weight: Tensor,
        bias: Tensor | None,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        act: str,
        act_param: float,
        align_corners: bool,
        scales: tuple[float | None, float | None],
    ) -> None:
        c, one, kh, kw = weight.shape
        if one != 1 or weight.dtype != torch.float32:
            raise ValueError(
                f"need an fp32 depthwise weight [C, 1, KH, KW], got "
                f"{tuple(weight.shape)} {weight.dtype}"
            )
        if act not in ACT_CODES:
            raise ValueError(f"activation must be one of {sorted(ACT_CODES)}, got {act!r}")
        self.native = native
        self.weight, self.bias = weight, bias
        self.c, self.kh, self.kw = int(c), int(kh), int(kw)
        self.stride, self.padding = [int(s) for s in stride], [int(p) for p in padding]
        self.dilation = [int(d) for d in dilation]
        self.act, self.act_param = act, float(act_param)
        self.align, self.scales = bool(align_corners), scales
        self.wdp = _pack_blocks(weight.detach().reshape(c, kh * kw).t(), self.c)  # [ncb, KH·KW, 64]
        b = bias.detach() if bias is not None else torch.zeros(c)
        self.bp = _pack_blocks(b, self.c)  # [ncb, 64]

    def _unfused(self, x: Tensor, size: Sequence[int]) -> Tensor:
        e = ops.resize_like_aten(x, size, "bilinear", self.align, *self.scales)
        return ops.conv2d_impl(
            e, self.weight, self.bias, self.stride, self.padding, self.dilation, self.c,
            self.act, self.act_param, None, False, None, "none", False, None, None, False,
        )  # fmt: skip

    def __call__(self, x: Tensor, size: Sequence[int]) -> Tensor:
        h, w = int(size[0]), int(size[1])
        if x.dtype != torch.float32 or x.dim() != 4 or x.shape[1] != self.c or min(h, w) < 1:
            return self._unfused(x, size)
        n, _, hx, wx = x.shape
        ho = ops._conv_out_size(h, self.kh, self.stride[0], self.padding[0], self.dilation[0])
        wo = ops._conv_out_size(w, self.kw, self.stride[1], self.padding[1], self.dilation[1])
        if ho < 1 or wo < 1 or hx < 1 or wx < 1:
            return self._unfused(x, size)
        x = ops.to_nhwc(x)
        y = torch.empty((n, self.c, ho, wo), dtype=torch.float32, memory_format=torch.channels_last)
        rows = max(1, SCRATCH_BYTES // (w * BLOCK * 4))
        band = max(1, (rows - (self.kh - 1) * self.dilation[0] - 1) // self.stride[0] + 1)
        failed = self.native.resize_dw(
            x.data_ptr(), n, hx, wx, *nhwc_strides(x), h, w, self.c,
            source_scale(hx, h, self.align, self.scales[0]),
            source_scale(wx, w, self.align, self.scales[1]), int(self.align),
            self.wdp.data_ptr(), self.bp.data_ptr(), self.kh, self.kw,
            self.stride[0], self.stride[1], self.padding[0], self.padding[1],
            self.dilation[0], self.dilation[1], ACT_CODES[self.act], self.act_param,
            y.data_ptr(), ho, wo, *nhwc_strides(y), min(band, ho),
        )  # fmt: skip
        if failed:
            raise MemoryError("segfast CPU kernel: could not allocate a thread's scratch buffer")
        return y
