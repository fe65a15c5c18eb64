"""A 1×1 convolution of a channel concat of upsampled maps, with the upsamples moved
after the convolution — to the source resolution's side.

Multi-scale heads join feature maps of several resolutions by upsampling each to the
largest, concatenating and mixing the channels with a 1×1 conv: SegFormer's all-MLP
head (four 256-channel maps from 1/32 … 1/4 of the frame into a 1024→256 conv), HRNet's
head. A bilinear or nearest resize is linear in each channel (its weights sum to 1) and
a 1×1 conv is linear in each pixel, so they commute:

    conv1×1(cat([R₁(x₁), …, x_k]), W, b) = Σᵢ Rᵢ(Wᵢ·xᵢ) + Σⱼ Wⱼ·xⱼ + b

(``Wᵢ`` the weight's input channels of part ``i``). The upsampled parts' share is then
computed on their source pixels: SegFormer-B0's head at 512² multiplies 4.3 G times
through the concat, 1.4 G this way, and neither the upsampled 256-channel maps nor
the 1024-channel concat (16 + 64 MB) is written. Each upsampled part's conv runs on
oneDNN at its source resolution, is resized with the graph's own resize (same op,
size, mode and scales: :func:`segfast.compiler.ops.resize_like_aten`) and added into one
accumulator; the full-resolution parts take that sum as their conv's residual (bias
and activation in its epilogue). fp32 up to summation order; a bf16 engine adds the
resized parts in fp32 and rounds the sum once before the last conv.

Reference: the graph's own conv of the concat (:meth:`ResizedConcatConv1x1.reference`);
a call whose sizes do not line up (a resize to another size than the full-resolution
parts, an empty map) runs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from segfast.backends.cpu.onednn import DTYPES, PackedConv2d
from segfast.compiler import ops

# A part moves after the conv only where that saves work: at least this many channels
# (its conv's multiply-adds on the source pixels against one extra add pass over the
# output's channels) and a source of at most a quarter of the output's pixels.
MIN_CHANNELS = 32
MAX_SOURCE_SHARE = 0.25


@dataclass(frozen=True)
class Part:
    """One part of the concat: its channels and, for an upsampled one, the resize
    (``mode``, ``align_corners``, ``scales``); ``resize=False`` for a full-resolution
    part (read as it is)."""

    channels: int
    resize: bool
    mode: str = "none"
    align_corners: bool = False
    scale_h: float | None = None
    scale_w: float | None = None


def worthwhile(channels: int, source_pixels: int | None, out_pixels: int | None) -> bool:
    """Whether an upsampled part of ``channels`` channels, from ``source_pixels`` to
    ``out_pixels`` (None: symbolic), is worth moving after the conv."""
    if channels < MIN_CHANNELS:
        return False
    if source_pixels is None or out_pixels is None:
        return True  # dynamic: upsamples are taken as large
    return source_pixels <= MAX_SOURCE_SHARE * out_pixels


class ResizedConcatConv1x1:
    """``act(conv1×1(cat(parts)) + b)`` with the upsampled parts convolved at their
    source resolution. Called as ``conv(x₀, size₀, x₁, size₁, …)``: each part's
    source (the upsample's input for an upsampled part, the map itself otherwise) and
    the upsample's output size (None for a full-resolution part)."""

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        act: str,
        act_param: float,
        parts: Sequence[Part],
        input_sizes: Sequence[Sequence[Any] | None] | None = None,
    ) -> None:
        if weight.dtype not in DTYPES or weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1):
            raise ValueError(f"need an fp32 or bf16 1×1 weight, got {tuple(weight.shape)}")
        if sum(p.channels for p in parts) != int(weight.shape[1]):
            raise ValueError("the parts' channels do not add up to the weight's inputs")
        if not any(p.resize for p in parts):
            raise ValueError("no upsampled part: nothing to move")
        self.weight, self.bias, self.act, self.act_param = weight, bias, act, float(act_param)
        self.parts = list(parts)
        self.dtype = weight.dtype
        sizes = list(input_sizes) if input_sizes is not None else [None] * len(parts)
        full = [i for i, p in enumerate(parts) if not p.resize]
        self.convs: list[PackedConv2d] = []
        start = 0
        for i, p in enumerate(parts):
            w = weight[:, start : start + p.channels].contiguous()
            start += p.channels
            last = bool(full) and i == full[-1]
            self.convs.append(
                PackedConv2d(
                    w, bias if last else None, [1, 1], [0, 0], [1, 1], 1,
                    act if last else "none", act_param if last else 0.0, False, "none", False,
                    None, None, False, input_size=sizes[i],
                )
            )  # fmt: skip
        self.last = full[-1] if full else None

    def reference(self, *args: Any) -> Tensor:
        """The graph's own computation: the concat of the upsampled parts, then the conv."""
        joined = []
        for p, (x, size) in zip(self.parts, zip(args[::2], args[1::2], strict=True), strict=True):
            joined.append(
                ops.resize_like_aten(x, size, p.mode, p.align_corners, p.scale_h, p.scale_w)
                if p.resize
                else x
            )
        return ops.conv2d_impl(
            torch.cat(joined, 1), self.weight, self.bias, [1, 1], [0, 0], [1, 1], 1, self.act,
            self.act_param, None, False, None, "none", False, None, None, False,
        )  # fmt: skip

    def __call__(self, *args: Any) -> Tensor:
        xs, sizes = args[::2], args[1::2]
        if len(xs) != len(self.parts):
            raise ValueError(f"expected {len(self.parts)} parts, got {len(xs)}")
        n = int(xs[0].shape[0])
        out_hw = None
        for p, x, size in zip(self.parts, xs, sizes, strict=True):
            hw = (int(size[0]), int(size[1])) if p.resize else (int(x.shape[2]), int(x.shape[3]))
            if out_hw is None:
                out_hw = hw
            if (
                hw != out_hw
                or x.dtype != self.dtype
                or x.dim() != 4
                or int(x.shape[0]) != n
                or int(x.shape[1]) != p.channels
            ):
                return self.reference(*args)
        if n == 0 or 0 in out_hw or any(x.numel() == 0 for x in xs):
            return self.reference(*args)
        acc: Tensor | None = None
        for p, conv, x, size in zip(self.parts, self.convs, xs, sizes, strict=True):
            if not p.resize:
                continue
            z = conv(x)
            z = ops.resize_like_aten(z, size, p.mode, p.align_corners, p.scale_h, p.scale_w)
            z = z.float() if z.dtype != torch.float32 else z
            acc = z.contiguous(memory_format=torch.channels_last) if acc is None else acc.add_(z)
        assert acc is not None  # at least one part is upsampled (checked at build)
        for i, (p, conv, x) in enumerate(zip(self.parts, self.convs, xs, strict=True)):
            if p.resize or i == self.last:
                continue
            acc.add_(conv(x))  # a second full-resolution part: its share, no epilogue
        if self.last is not None:
            residual = acc.to(self.dtype) if acc.dtype != self.dtype else acc
            return self.convs[self.last](xs[self.last], residual)
        if self.bias is not None:
            acc.add_(self.bias.float().view(1, -1, 1, 1))
        y = ops.activation_(acc, self.act, self.act_param)
        return y.to(self.dtype) if y.dtype != self.dtype else y
