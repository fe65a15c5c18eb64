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


def _pixel_rows(t: Tensor) -> int | None:
    """The stride between pixels of an NHWC (channels_last) 4-D tensor whose channels
    are contiguous and whose pixels are evenly spaced — a whole tensor or a channel
    slice of one — else None."""
    n, c, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if sc != 1 or (h > 1 and sh != w * sw) or (n > 1 and sn != h * sh) or sw < c:
        return None
    return sw


def quantize_into(x: Tensor, scale: float, out: Tensor) -> Tensor:
    """fp32 ``x`` (N×C×H×W) → ``out`` (uint8, same shape): ``clamp(round(x / scale),
    −128, 127) + 128``; one pass in segfast's CPU kernel (``sf_quantize_u8``) when both
    are NHWC pixel rows (``out`` may be a channel slice of a joined input), else in
    PyTorch ops."""
    native = cpu_native.load()
    xs, os_ = _pixel_rows(x), _pixel_rows(out)
    if native is not None and x.dtype == torch.float32 and xs is not None and os_ is not None:
        n, c, h, w = x.shape
        native.quantize_u8(x.data_ptr(), n * h * w, c, xs, float(scale), out.data_ptr(), os_)
        return out
    q = torch.clamp(torch.round(x.float() / scale), ops.INT8_MIN, ops.INT8_MAX).add_(_ZP)
    return out.copy_(q)


def quantize_u8(x: Tensor, scale: float) -> Tensor:
    """fp32 ``x`` → a new channels_last uint8 tensor (see :func:`quantize_into`)."""
    x = ops.to_nhwc(x.float())
    return quantize_into(x, scale, torch.empty_like(x, dtype=torch.uint8))


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

    def _quantized_input(self, x: Tensor, x2: Tensor | None) -> Tensor:
        """The (joined) input as uint8: a two-source conv's sources are quantized
        straight into their channel slices of one buffer (no float concat)."""
        if x2 is None:
            return quantize_u8(x, self.x_scale)
        resize, align, sh, sw, first = self.x2_spec
        if resize != "none":
            x2 = ops.resize_like_aten(x2, x.shape[-2:], resize, align, sh, sw)
        x2 = ops.to_nhwc(x2.float())
        a, b = (x2, x) if first else (x, x2)
        n, _, h, w = x.shape
        u8 = torch.empty((n, a.shape[1] + b.shape[1], h, w), dtype=torch.uint8)
        u8 = u8.contiguous(memory_format=torch.channels_last)
        quantize_into(a.float(), self.x_scale, u8[:, : a.shape[1]])
        quantize_into(b.float(), self.x_scale, u8[:, a.shape[1] :])
        return u8

    def __call__(
        self, x: Tensor, residual: Tensor | None = None, x2: Tensor | None = None
    ) -> Tensor:
        u8 = self._quantized_input(ops.to_nhwc(x), x2)
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
