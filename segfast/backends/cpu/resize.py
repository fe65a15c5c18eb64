"""Bilinear resize of the logits at the end of a network, on segfast's CPU
kernels (``sf_resize_nchw`` / ``sf_resize_argmax`` in segfast_cpu.c).

Segmentation networks that predict at a fraction of the input resolution
(FCN, PSPNet, DeepLab) end in a bilinear upsample of a few channels of logits
to the full frame. PyTorch's channels-last resize vectorises over channels,
which a 21-class classifier fills badly, and its bf16 path is slow (DeepLab v3+
at 512×512 on 2 Zen 4 cores: 4.3 ms fp32, 10.0 ms bf16). Here:

- ``output="logits"``: the resize writes the logits NCHW, one contiguous row per
  channel (the layout callers read logits in), vectorised along the row;
- ``output="mask"``: the argmax is taken on the resized logits as each pixel is
  computed, so the full-resolution logits are never written (the fused head of
  DESIGN.md, on the CPU) — 22 MB less traffic per DeepLab frame;
- in int8 engines, an upsample read only by int8 convs is written as their uint8
  input (``quantized``: the conv's own quantization of the fp32 resize, NHWC) —
  DeepLab v3+'s decoder upsample at 512²: 4 MB written instead of 16 MB, and no
  quantize pass reading those 16 MB back.

Index arithmetic is ATen's (fp32 source index, clamped at 0; align_corners; a
given scale factor used as 1/scale; a dimension of unchanged size copied);
blends are fp32 (bf16 logits are read and, for ``logits``, written back
rounded to nearest even). The argmax follows ``torch.argmax``: the first
maximum; logits holding a NaN (which torch takes as the maximum) go through
PyTorch's resize and argmax instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from segfast.backends.cpu.depthwise import nhwc_strides
from segfast.backends.cpu.native import Native
from segfast.backends.cpu.resize_dw import source_scale
from segfast.compiler import ops

DTYPES = (torch.float32, torch.bfloat16)
MASK_KINDS = {torch.uint8: 0, torch.int32: 1, torch.int64: 2}


class NativeResize:
    """Bilinear resize to a size, as ``logits(x, size)`` (NCHW out) or
    ``argmax(x, size, mask_dtype)`` (a mask)."""

    def __init__(
        self, native: Native, align_corners: bool, scales: tuple[float | None, float | None]
    ) -> None:
        self.native = native
        self.align = bool(align_corners)
        self.scales = scales

    def _args(self, x: Tensor, size: Sequence[int]) -> tuple:
        n, c, hx, wx = x.shape
        h, w = int(size[0]), int(size[1])
        return (
            x.data_ptr(), int(x.dtype == torch.bfloat16), n, hx, wx, c, *nhwc_strides(x),
        ), (h, w, source_scale(hx, h, self.align, self.scales[0]),
            source_scale(wx, w, self.align, self.scales[1]), int(self.align))  # fmt: skip

    def _usable(self, x: Tensor, size: Sequence[int]) -> bool:
        return (
            x.dtype in DTYPES
            and x.dim() == 4
            and min(x.shape) >= 1
            and int(size[0]) >= 1
            and int(size[1]) >= 1
        )

    def logits(self, x: Tensor, size: Sequence[int]) -> Tensor:
        if not self._usable(x, size):
            return ops.resize_like_aten(x, size, "bilinear", self.align, *self.scales)
        x = ops.to_nhwc(x)
        head, tail = self._args(x, size)
        y = torch.empty((x.shape[0], x.shape[1], tail[0], tail[1]), dtype=x.dtype)
        failed = self.native.resize_nchw(*head, y.data_ptr(), int(y.dtype == torch.bfloat16),
                                         *tail)  # fmt: skip
        if failed:
            raise MemoryError("segfast CPU kernel: could not allocate a resize buffer")
        return y

    def quantized(self, x: Tensor, size: Sequence[int], scale: float, zp: int) -> Tensor:
        """The resize as NHWC uint8 ``clamp(round(y / scale), −128, 127) + zp``
        (:func:`segfast.backends.cpu.int8.quantize_u8` of the fp32 resize ``y``)."""
        from segfast.backends.cpu.int8 import quantize_u8

        if not self._usable(x, size) or x.dtype != torch.float32:
            y = ops.resize_like_aten(x, size, "bilinear", self.align, *self.scales)
            return quantize_u8(y, scale, zp)
        x = ops.to_nhwc(x)
        head, tail = self._args(x, size)
        n, c = x.shape[:2]
        y = torch.empty(
            (n, c, tail[0], tail[1]), dtype=torch.uint8, memory_format=torch.channels_last
        )
        failed = self.native.resize_q8(
            head[0], *head[2:], y.data_ptr(), *nhwc_strides(y), float(scale), int(zp), *tail
        )
        if failed:
            raise MemoryError("segfast CPU kernel: could not allocate a resize buffer")
        return y

    def argmax(self, x: Tensor, size: Sequence[int], mask_dtype: str) -> Tensor:
        dtype = ops.MASK_DTYPES[mask_dtype]
        # torch.argmax takes a NaN as the maximum; the kernel does not look for NaN.
        if not self._usable(x, size) or dtype not in MASK_KINDS or bool(x.isnan().any()):
            y = ops.resize_like_aten(x, size, "bilinear", self.align, *self.scales)
            return y.argmax(dim=1).to(dtype)
        x = ops.to_nhwc(x)
        head, tail = self._args(x, size)
        y = torch.empty((x.shape[0], tail[0], tail[1]), dtype=dtype)
        failed = self.native.resize_argmax(*head, y.data_ptr(), MASK_KINDS[dtype], *tail)
        if failed:
            raise MemoryError("segfast CPU kernel: could not allocate a resize buffer")
        return y
