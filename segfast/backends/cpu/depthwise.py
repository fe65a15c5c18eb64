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
from torch import Tensor

from segfast.backends.cpu.native import Native
from segfast.compiler import ops

# Activation codes of segfast_cpu.c; others run after the kernel, in place.
ACT_CODES = {"none": 0, "relu": 1, "relu6": 2, "leaky_relu": 3, "hardswish": 4, "hardsigmoid": 5,
             "silu": 6, "sigmoid": 7}  # fmt: skip


def is_depthwise(weight: Tensor, groups: int) -> bool:
    return groups > 1 and weight.shape[1] == 1 and weight.shape[0] == groups


def nhwc_strides(t: Tensor) -> tuple[int, int, int]:
    """(n, h, w) element strides of a 4-D tensor whose channel stride is 1."""
    sn, sc, sh, sw = t.stride()
    if sc != 1 and t.shape[1] != 1:
        raise ValueError(f"tensor is not NHWC (strides {t.stride()})")
    return sn, sh, sw


class NativeDepthwiseConv2d:
    """``segfast.conv2d`` for a depthwise fp32 layer; called as ``conv(x, residual)``."""

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
    ) -> None:
        if weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
            raise ValueError(f"the depthwise kernel is fp32 only, got {weight.dtype}")
        c, one, kh, kw = weight.shape
        if one != 1:
            raise ValueError(f"depthwise weight must be [C, 1, KH, KW], got {tuple(weight.shape)}")
        self.native = native
        self.weight, self.bias = weight, bias
        self.c, self.kh, self.kw = int(c), int(kh), int(kw)
        self.w = weight.detach().reshape(c, kh, kw).permute(1, 2, 0).contiguous()  # [KH, KW, C]
        self.b = None if bias is None else bias.detach().contiguous()
        self.stride, self.padding = [int(s) for s in stride], [int(p) for p in padding]
        self.dilation = [int(d) for d in dilation]
        self.act, self.act_param = act, float(act_param)
        self.residual_after_act = bool(residual_after_act)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        return (
            ops._conv_out_size(h, self.kh, self.stride[0], self.padding[0], self.dilation[0]),
            ops._conv_out_size(w, self.kw, self.stride[1], self.padding[1], self.dilation[1]),
        )

    def _composite(self, x: Tensor, residual: Tensor | None) -> Tensor:
        return ops.conv2d_one_source(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.c,
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
        self.native.dwconv2d(
            x.data_ptr(), n, h, w, self.c, *nhwc_strides(x),
            self.w.data_ptr(), self.kh, self.kw, 0 if self.b is None else self.b.data_ptr(),
            self.stride[0], self.stride[1], self.padding[0], self.padding[1],
            self.dilation[0], self.dilation[1],
            y.data_ptr(), ho, wo, *nhwc_strides(y),
            0 if res is None else res.data_ptr(), *(nhwc_strides(res) if res is not None else (0, 0, 0)),
            int(self.residual_after_act), ACT_CODES.get(self.act, 0), self.act_param,
        )  # fmt: skip
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
