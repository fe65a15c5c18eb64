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
from segfast.backends.cpu.onednn import _CONV_BINARY_, _PACK, PackedConv2d, post_op
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
        return ops.conv2d_one_source(
            e, self.weight, self.bias, self.stride, self.padding, self.dilation, self.c,
            self.act, self.act_param,
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


class UpsampleSeparableConv2d:
    """``act(pw(dw(upsample(a))) [+ pw_b(b)] + bias)`` with the channel mixing at
    the low resolution (``sf_up_taps``): DeepLab v3+'s decoder (the ASPP output
    upsampled ×4, then a separable conv whose pointwise half also reads the
    low-level features).

    The depthwise taps and the pointwise weight fold into one weight per tap,
    ``W_t = W·diag(w_t)``; a 1×1 conv commutes with shifts and with the
    resize, so ``pw(dw(up(a))) = Σ_t shift_t(up(W_t·a))``. One GEMM computes all
    ``W_t·a`` at the source resolution (T·h·w·C·K multiply-adds instead of
    H·W·C·K: 9/16 of them for a ×4 upsample with a 3×3 depthwise conv), and the
    kernel sums the shifted, upsampled taps. Exact up to the reassociation of
    fp32 sums. A depthwise bias folds into the pointwise bias (``W·b_dw``).

    Called as ``conv(a, size)`` or ``conv(a, size, b)`` (``b``: the pointwise
    conv's other source, joined after ``a``'s channels unless ``a_first`` is false).
    """

    def __init__(
        self,
        native: Native,
        dw_weight: Tensor,
        dw_bias: Tensor | None,
        dw_padding: Sequence[int],
        dw_dilation: Sequence[int],
        pw_weight: Tensor,
        pw_bias: Tensor | None,
        a_channels: slice,
        act: str,
        act_param: float,
        align_corners: bool,
        scales: tuple[float | None, float | None],
        input_size: Sequence[int] | None = None,
    ) -> None:
        c, one, kh, kw = dw_weight.shape
        k = int(pw_weight.shape[0])
        if one != 1 or tuple(pw_weight.shape[2:]) != (1, 1):
            raise ValueError("need a depthwise weight [C, 1, KH, KW] and a 1×1 pointwise weight")
        if act not in ACT_CODES:
            raise ValueError(f"activation must be one of {sorted(ACT_CODES)}, got {act!r}")
        self.native = native
        self.k, self.kh, self.kw = k, int(kh), int(kw)
        self.padding, self.dilation = [int(p) for p in dw_padding], [int(d) for d in dw_dilation]
        self.act, self.act_param = act, float(act_param)
        self.align, self.scales = bool(align_corners), scales
        wp = pw_weight.detach().reshape(k, -1)
        wa = wp[:, a_channels].double()  # [K, C]
        taps = dw_weight.detach().reshape(c, kh * kw).double()  # [C, T]
        # fp32, or bf16 (then W_t·a and the output are bf16; the tap sums are fp32)
        self.dtype = pw_weight.dtype
        if self.dtype not in (torch.float32, torch.bfloat16) or dw_weight.dtype != self.dtype:
            raise ValueError(f"need fp32 or bf16 weights, got {dw_weight.dtype}, {self.dtype}")
        stacked = torch.einsum("kc,ct->tkc", wa, taps).reshape(-1, c, 1, 1).to(self.dtype)
        size = None if input_size is None else list(input_size)
        self.zconv = PackedConv2d(stacked.contiguous(), None, [1, 1], [0, 0], [1, 1], 1, "none",
                                  0.0, False, "none", False, None, None, False,
                                  input_size=size)  # fmt: skip
        bias = (
            pw_bias.detach().double()
            if pw_bias is not None
            else torch.zeros(k, dtype=torch.float64)
        )
        if dw_bias is not None:
            bias = bias + wa @ dw_bias.detach().double()
        self.bias = bias.float().contiguous()  # the kernel's (fp32)
        self.bias_io = self.bias.to(self.dtype)  # oneDNN's, in the engine's dtype
        rest = torch.ones(wp.shape[1], dtype=torch.bool)
        rest[a_channels] = False
        self.b_channels = int(rest.sum())
        self.unary, self.scalars = post_op(act, act_param)
        self.packed_b = None
        self.wb_t = None
        if self.b_channels:
            wb = wp[:, rest].reshape(k, self.b_channels, 1, 1).contiguous()
            if self.dtype == torch.float32:
                # fp32: the kernel mixes b into its accumulators ([Cb][K rounded to 64])
                kp = -(-k // BLOCK) * BLOCK
                wb_t = torch.zeros(self.b_channels, kp)
                wb_t[:, :k] = wb.reshape(k, self.b_channels).t()
                self.wb_t = wb_t.contiguous()
            else:  # bf16: oneDNN's bf16 1×1 conv adds b into the output
                self.packed_b = _PACK(wb, [0, 0], [1, 1], [1, 1], 1, None)

    def __call__(self, a: Tensor, size: Sequence[int], b: Tensor | None = None) -> Tensor:
        if (b is None) != (self.b_channels == 0) or a.dtype != self.dtype:
            raise ValueError("UpsampleSeparableConv2d got inputs it was not built for")
        if b is not None and b.dtype != self.dtype:
            raise ValueError("UpsampleSeparableConv2d got inputs it was not built for")
        h, w = int(size[0]), int(size[1])
        z = self.zconv(a)  # [N, T·K, h_in, w_in] channels_last
        n, _, hz, wz = z.shape
        y = torch.empty((n, self.k, h, w), dtype=self.dtype, memory_format=torch.channels_last)
        fold = b is not None and self.wb_t is not None  # b mixed inside the kernel
        if fold:
            b = ops.to_nhwc(b)
            if tuple(b.shape) != (n, self.b_channels, h, w):
                raise ValueError(f"the second source must be {(n, self.b_channels, h, w)}, "
                                 f"got {tuple(b.shape)}")  # fmt: skip
        last = b is None or fold
        failed = self.native.up_taps(
            z.data_ptr(), n, hz, wz, *nhwc_strides(z), self.k, self.kh, self.kw,
            self.padding[0], self.padding[1], self.dilation[0], self.dilation[1], h, w,
            source_scale(hz, h, self.align, self.scales[0]),
            source_scale(wz, w, self.align, self.scales[1]), int(self.align),
            self.bias.data_ptr() if last else 0, ACT_CODES[self.act] if last else 0,
            self.act_param, y.data_ptr(), *nhwc_strides(y),
            b.data_ptr() if fold else 0, self.b_channels if fold else 0,
            *(nhwc_strides(b) if fold else (0, 0, 0)),
            self.wb_t.data_ptr() if fold else 0, int(self.dtype == torch.bfloat16),
        )  # fmt: skip
        if failed:
            raise MemoryError("segfast CPU kernel: could not allocate index tables")
        if last:
            return y
        fused = self.unary in ops.MKLDNN_UNARY_AFTER_ADD  # oneDNN fuses only relu after the add
        y = _CONV_BINARY_(
            y, ops.to_nhwc(b), self.packed_b, self.bias_io, [0, 0], [1, 1], [1, 1], 1, "add", None,
            self.unary if fused and self.unary != "none" else None,
            self.scalars if fused else [], "",
        )  # fmt: skip
        return y if fused else ops.activation_(y, self.act, self.act_param)
