"""Convolutions with few output channels on segfast's CPU kernels, fp32 NHWC: a
segmentation network's class head.

**17–24 output channels** (``sf_conv_narrow``; 19 Cityscapes or 21 VOC classes).

oneDNN (and ONNX Runtime's MLAS) compute such a layer as 32 output channels —
two 16-lane vectors — and drop 11 of them: DeepLab v3+'s 3×3 256→21 head at
128×128 is 12 ms of a 100 ms frame on 2 Zen 4 cores. The kernel holds the 24
channels in one 16-lane and one 8-lane vector per pixel (a 12-pixel tile in
registers, summed over every tap and input channel), so the arithmetic is 24
lanes wide instead of 32. Stride 1, any kernel size, padding and dilation.

**1–4 output channels** (``sf_conv_few``; a binary or few-class head, e.g.
segmentation_models_pytorch's 3×3 head on 16 channels at full resolution): oneDNN
computes a whole vector of output channels — 8 on AVX2 — for one, so a 16→1 3×3 conv
at 256² costs half a 16→16 one (1.1 ms against 2.1 on 2 AVX2 cores). The kernel runs
its vectors over the input channels instead (8 output pixels × 8 lanes, one
horizontal sum per 8 outputs), reading each input row once from a packed copy. Stride
1, dilation 1, any kernel size and padding. Used where AVX-512 is absent (measured
there: :func:`few_worthwhile`).

Reference: :func:`reference` (the composite convolution segfast's graph runs
elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def _common_fields(
    conv: Any,
    native: Native,
    weight: Tensor,
    bias: Tensor | None,
    padding: Sequence[int],
    act: str,
) -> tuple[int, int, int, int]:
    """Check the activation and bias both kernels take and set the fields they share;
    returns the weight's (K, C, KH, KW)."""
    if act not in ACT_CODES:
        raise ValueError(f"activation must be one of {sorted(ACT_CODES)}, got {act!r}")
    if bias is not None and bias.dtype != torch.float32:
        raise ValueError(f"bias must be fp32, got {bias.dtype}")
    k, c, kh, kw = (int(d) for d in weight.shape)
    conv.native = native
    conv.weight, conv.bias = weight, bias
    conv.k, conv.c, conv.kh, conv.kw = k, c, kh, kw
    conv.padding = [int(p) for p in padding]
    return k, c, kh, kw


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
        k, c, kh, kw = _common_fields(self, native, weight, bias, padding, act)
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


FEW_MAX_CHANNELS = 4


def few_applies(
    weight: Tensor, stride: Sequence[int], dilation: Sequence[int], groups: int
) -> bool:
    """A dense stride-1, dilation-1 fp32 convolution with 1–4 output channels."""
    return (
        weight.dtype == torch.float32
        and weight.dim() == 4
        and 1 <= int(weight.shape[0]) <= FEW_MAX_CHANNELS
        and int(groups) == 1
        and [int(s) for s in stride] == [1, 1]
        and [int(d) for d in dilation] == [1, 1]
    )


def few_worthwhile(c_in: int, kh: int, kw: int, w: int | None) -> bool:
    """Whether ``sf_conv_few`` should run the layer (``w``: the input width, None when
    dynamic): at least 8 input channels (one vector), and its packed input rows
    (C_in · KH · (W + KW) floats per thread) at most 1 MiB, to stay in L2.

    Measured on 2 AVX2 cores (fp32, NHWC; oneDNN → sf_conv_few): 3×3 at 256² from 16
    channels to 1/2/3/4 outputs 1.64/1.56/1.62/1.58 → 0.42/0.53/0.92/1.20 ms; 32→1 3×3
    at 512² 12.1 → 3.3; 64→1 and 128→1 3×3 at 128² 1.49/3.01 → 0.33/0.64; 1×1 32→1 and
    64→2 at 256² 0.42/1.09 → 0.27/0.80; 256→4 3×3 at 64² 1.33 → 0.86.
    """
    width = w if w is not None else 2048
    return c_in >= 8 and c_in * kh * (width + kw) * 4 <= (1 << 20)


class FewOutputConv2d:
    """``act(conv2d(x, weight) + bias)``, 1–4 output channels, stride 1; called as
    ``conv(x)``."""

    def __init__(
        self,
        native: Native,
        weight: Tensor,
        bias: Tensor | None,
        padding: Sequence[int],
        act: str,
        act_param: float,
    ) -> None:
        if not few_applies(weight, (1, 1), (1, 1), 1):
            raise ValueError(
                f"need an fp32 weight with 1–{FEW_MAX_CHANNELS} output channels, "
                f"got {tuple(weight.shape)} {weight.dtype}"
            )
        k, c, kh, kw = _common_fields(self, native, weight, bias, padding, act)
        self.act, self.act_param = act, float(act_param)
        cp = -(-c // 8) * 8
        wp = torch.zeros(k, kh, cp, kw)
        wp[:, :, :c] = weight.detach().permute(0, 2, 1, 3)
        # [K][KH][C/8][KW][8]
        self.wp = wp.reshape(k, kh, cp // 8, 8, kw).transpose(3, 4).contiguous()
        self.b = None if bias is None else bias.detach().float().contiguous()

    def _composite(self, x: Tensor) -> Tensor:
        return reference(x, self.weight, self.bias, self.padding, [1, 1], self.act, self.act_param)

    def __call__(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or x.dim() != 4 or x.shape[1] != self.c or x.numel() == 0:
            return self._composite(x)
        n, _, h, w = x.shape
        ho = ops._conv_out_size(h, self.kh, 1, self.padding[0], 1)
        wo = ops._conv_out_size(w, self.kw, 1, self.padding[1], 1)
        if ho < 1 or wo < 1:
            return self._composite(x)
        x = ops.to_nhwc(x)
        y = torch.empty((n, self.k, ho, wo), dtype=x.dtype, memory_format=torch.channels_last)
        rc = self.native.conv_few(
            x.data_ptr(), n, h, w, self.c, *nhwc_strides(x),
            self.wp.data_ptr(), self.kh, self.kw, self.k,
            0 if self.b is None else self.b.data_ptr(), self.padding[0], self.padding[1],
            y.data_ptr(), ho, wo, *nhwc_strides(y), ACT_CODES[self.act], self.act_param,
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("sf_conv_few could not allocate its per-thread rows")
        return y
