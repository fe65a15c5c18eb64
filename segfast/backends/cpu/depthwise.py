"""Depthwise convolution on segfast's CPU kernel (``sf_dwconv2d``), fp32 NHWC.

Used for the *dilated* depthwise convolutions of atrous pyramids (DeepLab v3+'s
separable ASPP at rates 12 and 18 on a 32×32 map): oneDNN's depthwise kernels
take a slow path at large paddings (1280 channels, rate 12: 4.3–5.5 ms) and
zero-padding the input first still costs 2.2 ms, where ONNX Runtime's MLAS
takes 1.1 ms. The kernel skips the taps that fall into the padding — at rate 18
on a 32×32 map most off-centre taps do — and is bound by reading the input and
writing the output once (2 × 5.2 MB there).

Work item: one output row × 64 channels, accumulated in a block the compiler
keeps in vector registers; the epilogue (bias, residual, and relu, relu6, leaky,
hardswish, hardsigmoid, silu or sigmoid) is applied before the single store. Reference: :func:`reference` (the
composite implementation segfast's graph runs elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from segfast.backends.cpu.native import Native
from segfast.compiler import ops

# Activation codes of segfast_cpu.c; others run after the kernel, in place.
ACT_CODES = {"none": 0, "relu": 1, "relu6": 2, "leaky_relu": 3, "hardswish": 4, "hardsigmoid": 5,
             "silu": 6, "sigmoid": 7}  # fmt: skip


def is_depthwise(weight: Tensor, groups: int) -> bool:
    return groups > 1 and weight.shape[1] == 1 and weight.shape[0] == groups


def vec8_worthwhile(
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    out_w: int | None,
) -> bool:
    """Whether ``sf_dwconv8`` beats oneDNN for this depthwise layer on a CPU without
    AVX-512 (``out_w``: the output width, None when dynamic).

    Measured on 2 cores of an AVX2 EPYC (torch 2.13, fp32, NHWC; oneDNN → sf_dwconv8):

    - 5×5 and 7×7, stride 1: 960 ch at 32² 1.6–2.1 → 1.2–1.3 ms, 672 ch 1.1–1.4 →
      0.8–0.9, 120 ch at 64² 0.38–0.68 → 0.34–0.59; 7×7 33 ch at 37² 0.14 → 0.07;
    - small maps (output ≤ 16 wide), stride 1: 1152 ch at 8² 5×5 0.14–0.25 → 0.08–0.16,
      3×3 0.10–0.19 → 0.07–0.14; 576 ch 3×3 at 16² 0.11 → 0.09;
    - atrous (dilation > 1, padding > 4) up to 64 wide: there oneDNN's depthwise kernel
      falls off a cliff and even zero-padding first costs a copy — 1280 ch at 32²,
      rate 6: 20.7 ms in DeepLab v3+ (34 alone, 2.1 padded first) → 1.6; rate 12/18
      (padded first) 2.9/4.0 → 1.6/1.3; 320 ch at 64², rate 12: 1.6 → 1.1.

    oneDNN stays faster on 3×3 layers over larger maps and at stride 2 (memory-bound:
    e.g. 72 ch at 128² 0.39–0.76 vs 0.7–1.1 ms; 64 ch 256² → 128² 0.55–0.93 vs 1.3–1.6),
    where this kernel's copy of the input rows costs more than its register tiling saves.
    """
    kh, kw = (int(k) for k in kernel)
    if max(int(d) for d in dilation) > 1:
        return max(int(p) for p in padding) > 4 and (out_w is None or out_w <= 64)
    if tuple(int(s) for s in stride) != (1, 1):
        return False
    return min(kh, kw) >= 5 or (out_w is not None and out_w <= 16)


def nhwc_strides(t: Tensor) -> tuple[int, int, int]:
    """(n, h, w) element strides of a 4-D tensor whose channel stride is 1."""
    sn, sc, sh, sw = t.stride()
    if sc != 1 and t.shape[1] != 1:
        raise ValueError(f"tensor is not NHWC (strides {t.stride()})")
    return sn, sh, sw


class NativeDepthwiseConv2d:
    """``segfast.conv2d`` for a depthwise fp32 layer; called as ``conv(x, residual)``.

    ``vec8``: run ``sf_dwconv8`` (8-lane vectors, register-tiled along the row: the
    kernel for CPUs without AVX-512) instead of ``sf_dwconv2d`` (16-lane blocks).
    ``pad_end``: (bottom, right) zero padding where it differs from ``padding`` (top,
    left) — a folded asymmetric ``F.pad`` ("same" padding at stride 2); the kernels read
    zeros past the map's end either way.
    """

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
        residual_after_act: bool,
        vec8: bool = False,
        pad_end: Sequence[int] | None = None,
    ) -> None:
        if weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
            raise ValueError(f"the depthwise kernel is fp32 only, got {weight.dtype}")
        c, one, kh, kw = weight.shape
        if one != 1:
            raise ValueError(f"depthwise weight must be [C, 1, KH, KW], got {tuple(weight.shape)}")
        self.native = native
        self.weight, self.bias = weight, bias
        self.c, self.kh, self.kw = int(c), int(kh), int(kw)
        self.vec8 = bool(vec8)
        # sf_dwconv2d's weights [KH, KW, C]; sf_dwconv8's below
        self.w = (
            None if self.vec8 else weight.detach().reshape(c, kh, kw).permute(1, 2, 0).contiguous()
        )
        self.b = None if bias is None else bias.detach().contiguous()
        self.stride, self.padding = [int(s) for s in stride], [int(p) for p in padding]
        self.pad_end = list(self.padding) if pad_end is None else [int(p) for p in pad_end]
        if min(self.padding + self.pad_end) < 0:
            raise ValueError(f"negative padding {self.padding} / {self.pad_end}")
        self.dilation = [int(d) for d in dilation]
        self.act, self.act_param = act, float(act_param)
        self.residual_after_act = bool(residual_after_act)
        if self.vec8:  # [ceil(C/8)][KH][KW][8] and bias [ceil(C/8)·8], zero past C
            cp = -(-self.c // 8) * 8
            wp = torch.zeros(cp, kh, kw)
            wp[: self.c] = weight.detach().reshape(c, kh, kw)
            self.w8 = wp.reshape(cp // 8, 8, kh, kw).permute(0, 2, 3, 1).contiguous()
            self.b8 = torch.zeros(cp)
            if bias is not None:
                self.b8[: self.c] = bias.detach()

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        k, s, d = (self.kh, self.kw), self.stride, self.dilation
        return tuple(  # type: ignore[return-value]
            (n + self.padding[i] + self.pad_end[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1
            for i, n in enumerate((h, w))
        )

    def _composite(self, x: Tensor, residual: Tensor | None) -> Tensor:
        padding = self.padding
        if self.pad_end != self.padding:
            (top, left), (bottom, right) = self.padding, self.pad_end
            x, padding = F.pad(x, (left, right, top, bottom)), [0, 0]
        return ops.conv2d_one_source(
            x, self.weight, self.bias, self.stride, padding, self.dilation, self.c,
            self.act, self.act_param, residual, self.residual_after_act,
        )  # fmt: skip

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if x.dtype != torch.float32 or x.dim() != 4 or x.shape[1] != self.c:
            return self._composite(x, residual)
        n, _, h, w = x.shape
        ho, wo = self.out_size(h, w)
        if ho < 1 or wo < 1:
            return self._composite(x, residual)
        x = ops.to_nhwc(x)
        if residual is not None:
            if residual.dtype != x.dtype or tuple(residual.shape) != (n, self.c, ho, wo):
                return self._composite(x, residual)
            residual = ops.to_nhwc(residual)
        in_kernel = self.act in ACT_CODES
        y = torch.empty((n, self.c, ho, wo), dtype=x.dtype, memory_format=torch.channels_last)
        res = residual if in_kernel else None
        weights = (
            (self.w8.data_ptr(), self.kh, self.kw, self.b8.data_ptr())
            if self.vec8
            else (self.w.data_ptr(), self.kh, self.kw, 0 if self.b is None else self.b.data_ptr())
        )
        args = (
            x.data_ptr(), n, h, w, self.c, *nhwc_strides(x), *weights,
            self.stride[0], self.stride[1], self.padding[0], self.padding[1],
            self.dilation[0], self.dilation[1],
            y.data_ptr(), ho, wo, *nhwc_strides(y),
            0 if res is None else res.data_ptr(), *(nhwc_strides(res) if res is not None else (0, 0, 0)),
            int(self.residual_after_act), ACT_CODES.get(self.act, 0), self.act_param,
        )  # fmt: skip
        if self.vec8:
            if self.native.dwconv8(*args) != 0:
                raise MemoryError("sf_dwconv8: out of memory for its row buffers")
        else:
            self.native.dwconv2d(*args)
        if in_kernel:
            return y
        return epilogue(y, residual, self.act, self.act_param, self.residual_after_act)


def epilogue(
    y: Tensor, residual: Tensor | None, act: str, act_param: float, residual_after_act: bool
) -> Tensor:
    """The residual and an activation segfast_cpu.c lacks (silu, sigmoid, tanh),
    applied in PyTorch to a kernel's output it owns."""
    if residual is not None and not residual_after_act:
        y.add_(residual)
    y = ops.activation(y, act, act_param)
    if residual is not None and residual_after_act:
        y = y + residual
    return ops.to_nhwc(y)


def reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    act: str = "none",
    act_param: float = 0.0,
    residual: Tensor | None = None,
    residual_after_act: bool = False,
) -> Tensor:
    """What :class:`NativeDepthwiseConv2d` computes, in plain PyTorch."""
    y = torch.nn.functional.conv2d(x, weight, bias, list(stride), list(padding), list(dilation),
                                   weight.shape[0])  # fmt: skip
    if residual is not None and not residual_after_act:
        y = y + residual
    y = ops.activation(y, act, act_param)
    if residual is not None and residual_after_act:
        y = y + residual
    return y
