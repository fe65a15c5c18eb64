"""int8 convolutions of the CPU plan: oneDNN's quantized convolution (VNNI on CPUs
that have it), weights prepacked once.

``segfast.qconv2d`` (:func:`segfast.compiler.ops.qconv2d_impl` is its meaning) runs as

    u8 = quantize(x, x_scale) + 128                           one pass (segfast's C kernel)
    y  = onednn.qconv2d_pointwise(u8, packed int8 weight)      int8 × int8 → int32 → fp32,
                                                               bias and relu/relu6/silu/
                                                               hardswish post-ops fused

The input is quantized with zero point 128 into uint8 (oneDNN's activation type):
``u8 − 128`` is exactly the symmetric int8 value ``clamp(round(x / s), −128, 127)``.
Two-source convs join their sources first (the one shared scale covers both); a
residual add and the activations oneDNN's quantized convolution does not fuse
(leaky relu, sigmoid, tanh) run in place after it. ``segfast.qconv_transpose2d``
has no oneDNN int8 kernel in PyTorch: it runs oneDNN's fp32 transposed convolution
on the dequantized weight after quantizing its input — the same numbers, at fp32 speed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from segfast.backends.cpu import native as cpu_native
from segfast.backends.cpu.onednn import PackedConvTranspose2d, _static_size
from segfast.compiler import ops

_ZP = 128  # uint8 zero point: u8 = q + 128
# activations oneDNN's quantized convolution fuses, as (attr, scalars)
_POST_OPS: dict[str, tuple[str, list[float]]] = {
    "none": ("none", []),
    "relu": ("relu", []),
    "relu6": ("hardtanh", [0.0, 6.0]),
    "silu": ("swish", []),
}


def available() -> bool:
    """PyTorch has oneDNN's quantized convolution here (x86 builds with oneDNN)."""
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qconv2d_pointwise")


def quantize_u8(x: Tensor, scale: float) -> Tensor:
    """fp32 ``x`` → uint8 ``clamp(round(x / scale), −128, 127) + 128``, channels_last:
    one pass in segfast's CPU kernel (``sf_quantize_u8``), else in PyTorch ops."""
    x = ops.to_nhwc(x.float())
    native = cpu_native.load()
    if native is not None and x.is_contiguous(memory_format=torch.channels_last):
        out = torch.empty_like(x, dtype=torch.uint8)
        native.quantize_u8(x.data_ptr(), x.numel(), float(scale), out.data_ptr())
        return out
    q = torch.clamp(torch.round(x / scale), ops.INT8_MIN, ops.INT8_MAX).add_(_ZP)
    return q.to(torch.uint8)


class PackedQConv2d:
    """``segfast.qconv2d`` on oneDNN's int8 convolution; called as ``conv(x, residual, x2)``."""

    def __init__(
        self,
        weight: Tensor,  # int8 [K, C/g, kh, kw]
        w_scale: Tensor,  # fp32 [K]
        bias: Tensor | None,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
        act: str,
        act_param: float,
        residual_after_act: bool,
        x2_spec: tuple[Any, ...],
        x_scale: float,
        input_size: Sequence[Any] | None = None,
    ) -> None:
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)
        self.groups = int(groups)
        self.act, self.act_param = act, float(act_param)
        self.residual_after_act = bool(residual_after_act)
        self.x2_spec = x2_spec
        self.x_scale = float(x_scale)
        self.w_scale = w_scale.float().contiguous()
        self.w_zp = torch.zeros(int(weight.shape[0]), dtype=torch.int64)
        self.bias = None if bias is None else bias.float().contiguous()
        size = _static_size(input_size)
        if size is not None:  # the joined input's channels
            size = [size[0], int(weight.shape[1]) * self.groups, size[2], size[3]]
        self.packed = torch.ops.onednn.qconv_prepack(
            weight, self.w_scale, self.x_scale, _ZP, self.stride, self.padding,
            self.dilation, self.groups, size,
        )  # fmt: skip
        self.post = _POST_OPS.get(act)

    def _conv(self, u8: Tensor, attr: str, scalars: list[float]) -> Tensor:
        return torch.ops.onednn.qconv2d_pointwise(
            u8, self.x_scale, _ZP, self.packed, self.w_scale, self.w_zp, self.bias,
            self.stride, self.padding, self.dilation, self.groups, 1.0, 0, torch.float32,
            attr, scalars, "",
        )  # fmt: skip

    def __call__(
        self, x: Tensor, residual: Tensor | None = None, x2: Tensor | None = None
    ) -> Tensor:
        resize, align, sh, sw, first = self.x2_spec
        inp = ops.join_sources(ops.to_nhwc(x), x2, resize, align, sh, sw, first)
        u8 = quantize_u8(inp, self.x_scale)
        if residual is None or self.residual_after_act:
            if self.post is not None:
                y = self._conv(u8, *self.post)
            else:
                y = ops.activation_(self._conv(u8, "none", []), self.act, self.act_param)
            return y if residual is None else y.add_(residual)
        y = self._conv(u8, "none", []).add_(residual)
        return ops.activation_(y, self.act, self.act_param)


class QConvTranspose2d:
    """``segfast.qconv_transpose2d``: input quantized, dequantized weight on oneDNN's fp32
    transposed convolution (no int8 transposed convolution in PyTorch's oneDNN ops)."""

    def __init__(
        self,
        weight: Tensor,
        w_scale: Tensor,
        bias: Tensor | None,
        stride: Sequence[int],
        padding: Sequence[int],
        output_padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
        act: str,
        act_param: float,
        residual_after_act: bool,
        x_scale: float,
        input_size: Sequence[Any] | None = None,
    ) -> None:
        w = ops.dequantize_weight(weight, w_scale, 1, torch.float32)
        self.x_scale = float(x_scale)
        self.conv = PackedConvTranspose2d(
            w, None if bias is None else bias.float(), stride, padding, output_padding,
            dilation, groups, act, act_param, residual_after_act, input_size=input_size,
        )  # fmt: skip

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return self.conv(ops.fake_quant(ops.to_nhwc(x.float()), self.x_scale), residual)
