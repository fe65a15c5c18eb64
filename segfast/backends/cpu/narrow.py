"""A convolution with 17–24 output channels on segfast's CPU kernel
(``sf_conv_narrow``), fp32 NHWC: a segmentation network's class head (19
Cityscapes or 21 VOC classes).

oneDNN (and ONNX Runtime's MLAS) compute such a layer as 32 output channels —
two 16-lane vectors — and drop 11 of them: DeepLab v3+'s 3×3 256→21 head at
128×128 is 12 ms of a 100 ms frame on 2 Zen 4 cores. The kernel holds the 24
channels in one 16-lane and one 8-lane vector per pixel (a 12-pixel tile in
registers, summed over every tap and input channel), so the arithmetic is 24
lanes wide instead of 32. Stride 1, any kernel size, padding and dilation.

Reference: :func:`reference` (the composite convolution segfast's graph runs
elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from segfast.backends.cpu.depthwise import ACT_CODES, nhwc_strides
from segfast.backends.cpu.native import Native
from segfast.compiler import ops

MIN_CHANNELS, MAX_CHANNELS = 17, 24
LANES = 24
MAX_KERNEL_ROWS = 64  # MAX_KH in segfast_cpu.c
# Worth a kernel call where the layer is heavy (oneDNN's padding costs most there):
# multiply-adds per output channel and image, H·W·C_in·KH·KW.
MIN_WORK = 1 << 24


def applies(weight: Tensor, stride: Sequence[int], groups: int) -> bool:
    """A dense stride-1 fp32 convolution with 17–24 output channels."""
    return (
        weight.dtype == torch.float32
        and weight.dim() == 4
        and MIN_CHANNELS <= int(weight.shape[0]) <= MAX_CHANNELS
        and int(groups) == 1
        and [int(s) for s in stride] == [1, 1]
        and int(weight.shape[2]) <= MAX_KERNEL_ROWS
    )


def worthwhile(c_in: int, kh: int, kw: int, h: int | None, w: int | None) -> bool:
    """Whether the layer is heavy enough to leave oneDNN (``None``: a dynamic size)."""
    big = 1 << 20
    return (h or big) * (w or big) * c_in * kh * kw >= MIN_WORK


class NarrowConv2d:
    """``act(conv2d(x, weight) + bias)``, 17–24 output channels; called as ``conv(x)``."""

    def __init__(
        self,
        native: Native,
        weight: Tensor,
        bias: Tensor | None,
        padding: Sequence[int],
        dilation: Sequence[int],
        act: str,
        act_param: float,
    ) -> None:
        if not applies(weight, (1, 1), 1):
            raise ValueError(
                f"need an fp32 weight with {MIN_CHANNELS}–{MAX_CHANNELS} output channels "
                f"(at most {MAX_KERNEL_ROWS} rows), got {tuple(weight.shape)} {weight.dtype}"
            )
        if act not in ACT_CODES:
            raise ValueError(f"activation must be one of {sorted(ACT_CODES)}, got {act!r}")
        if bias is not None and bias.dtype != torch.float32:
            raise ValueError(f"bias must be fp32, got {bias.dtype}")
        k, c, kh, kw = (int(d) for d in weight.shape)
        self.native = native
        self.weight, self.bias = weight, bias
        self.k, self.c, self.kh, self.kw = k, c, kh, kw
        self.padding = [int(p) for p in padding]
        self.dilation = [int(d) for d in dilation]
        self.act, self.act_param = act, float(act_param)
        wt = torch.zeros(kh, kw, c, LANES)
        wt[..., :k] = weight.detach().permute(2, 3, 1, 0)
        self.wt = wt.contiguous()  # [KH][KW][C][24]
        b = torch.zeros(LANES)
        if bias is not None:
            b[:k] = bias.detach()
        self.b = b

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        return (
            ops._conv_out_size(h, self.kh, 1, self.padding[0], self.dilation[0]),
            ops._conv_out_size(w, self.kw, 1, self.padding[1], self.dilation[1]),
        )

    def _composite(self, x: Tensor) -> Tensor:
        return reference(x, self.weight, self.bias, self.padding, self.dilation, self.act,
                         self.act_param)  # fmt: skip

    def __call__(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or x.dim() != 4 or x.shape[1] != self.c or x.numel() == 0:
            return self._composite(x)
        n, _, h, w = x.shape
        ho, wo = self.out_size(h, w)
        if ho < 1 or wo < 1:
            return self._composite(x)
        x = ops.to_nhwc(x)
        y = torch.empty((n, self.k, ho, wo), dtype=x.dtype, memory_format=torch.channels_last)
        rc = self.native.conv_narrow(
            x.data_ptr(), n, h, w, self.c, *nhwc_strides(x),
            self.wt.data_ptr(), self.b.data_ptr(), self.kh, self.kw,
            self.padding[0], self.padding[1], self.dilation[0], self.dilation[1],
            ACT_CODES[self.act], self.act_param,
            y.data_ptr(), self.k, ho, wo, *nhwc_strides(y),
        )  # fmt: skip
        if rc == -1:
            raise MemoryError("sf_conv_narrow could not allocate its per-thread rows")
        if rc != 0:
            raise RuntimeError(f"sf_conv_narrow refused the call (code {rc})")
        return y


def reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    padding: Sequence[int],
    dilation: Sequence[int],
    act: str = "none",
    act_param: float = 0.0,
) -> Tensor:
    """What :class:`NarrowConv2d` computes, as the composite convolution."""
    return ops.conv2d_one_source(x, weight, bias, [1, 1], padding, dilation, 1, act, act_param)
