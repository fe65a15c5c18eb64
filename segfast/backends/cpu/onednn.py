"""Convolutions on oneDNN with weights packed once, at build time.

``torch.ops.mkldnn._convolution_pointwise`` takes a plain weight and reorders it
into oneDNN's blocked layout on every call; packed once with
``mkldnn._reorder_convolution_weight`` the weight is read in place. On a
512→512 3×3 layer at 16×16 that is 15.0 → 5.8 ms a call, on a 1280→256 1×1 at
32×32 3.6 → 3.4 ms (2 cores, AMD EPYC Zen 4, torch 2.13; the reorder costs most
where the weight is large next to the activations: U-Net's bottleneck,
DeepLab's ASPP). Transposed convolutions likewise (512→256 2×2 at 16×16:
3.4 → 1.8 ms) and gain their bias and activation as post-ops.

The two-source prologue of ``segfast.conv2d`` (``conv(cat([a, b]))``, U-Net's
skip connections) runs as two convolutions accumulating into one output:
``y = conv(a, W[:, :Ca]) + b``, then oneDNN's in-place binary post-op adds
``conv(b, W[:, Ca:])`` into ``y`` and applies the activation. The concat tensor
is never written (U-Net base 32 at 256²: 4 concats, 2–16 MB each); only the
summation order of the channel reduction changes.

Results are identical to the unpacked oneDNN call (same kernels, same order);
every wrapper falls back to the composite implementation
(:func:`segfast.compiler.ops.conv2d_impl`) for what oneDNN cannot take: other
dtypes, a weight computed in the graph, a residual that is not the output's
shape, an activation oneDNN has no post-op for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from segfast.compiler import ops

_PACK = torch.ops.mkldnn._reorder_convolution_weight.default
_PACK_T = torch.ops.mkldnn._reorder_convolution_transpose_weight.default
_CONV = torch.ops.mkldnn._convolution_pointwise.default
_CONV_BINARY = torch.ops.mkldnn._convolution_pointwise.binary
_CONV_BINARY_ = torch.ops.mkldnn._convolution_pointwise_.binary
_CONV_T = torch.ops.mkldnn._convolution_transpose_pointwise.default

DTYPES = (torch.float32, torch.bfloat16)


def unary_attr(act: str, act_param: float) -> tuple[str, list[float]] | None:
    """oneDNN's post-op name and scalars for a segfast epilogue activation."""
    if act == "leaky_relu":
        return "leaky_relu", [float(act_param)]
    return ops._MKLDNN_UNARY.get(act)


def post_op(act: str, act_param: float) -> tuple[str, list[float]]:
    """:func:`unary_attr`, for a layer that must have one."""
    attr = unary_attr(act, act_param)
    if attr is None:
        raise ValueError(f"oneDNN has no post-op for activation {act!r}")
    return attr


def _static_size(shape: Sequence[Any] | None) -> list[int] | None:
    """The example input's size as ints, or None where an axis is symbolic."""
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return [int(d) for d in shape]


class PackedConv2d:
    """``segfast.conv2d`` with its constant weight packed for oneDNN.

    Called as ``conv(x, residual, x2)``; everything else (stride, padding,
    activation, how x2 joins x) is fixed at build time.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
        act: str,
        act_param: float,
        residual_after_act: bool,
        x2_resize: str,
        x2_align_corners: bool,
        x2_scale_h: float | None,
        x2_scale_w: float | None,
        x2_first: bool,
        input_size: Sequence[Any] | None = None,
        x2_channels: int | None = None,
    ) -> None:
        self.weight, self.bias = weight, bias
        self.stride, self.dilation = list(stride), list(dilation)
        self.padding = list(padding)
        self.groups = int(groups)
        self.act, self.act_param = act, float(act_param)
        self.residual_after_act = bool(residual_after_act)
        self.x2_spec = (x2_resize, x2_align_corners, x2_scale_h, x2_scale_w, x2_first)
        self.unary, self.scalars = post_op(act, act_param)
        # after a binary add oneDNN fuses only relu; others run in place after it
        self.fused_after_add = self.unary in ops.MKLDNN_UNARY_AFTER_ADD
        fused = self.fused_after_add and self.unary != "none"
        self.after_add = self.unary if fused else None
        self.after_add_scalars = self.scalars if fused else []
        k, c_per_group = int(weight.shape[0]), int(weight.shape[1])
        depthwise = self.groups > 1 and self.groups == k and c_per_group == 1
        # oneDNN's depthwise kernels fall to a slow path at large paddings (atrous
        # rates >= 12 in ASPP): zero-pad first, convolve unpadded (see ops.py).
        self.prepad = depthwise and max(self.padding) > ops.dw_max_inline_pad()
        size = _static_size(input_size)
        conv_pad = [0, 0] if self.prepad else self.padding
        if self.prepad and size is not None:
            size = [size[0], size[1], size[2] + 2 * self.padding[0], size[3] + 2 * self.padding[1]]
        self.conv_pad = conv_pad
        self.split = x2_channels is not None and self.groups == 1
        if self.split:
            # cat([first, second]) → two convolutions over the weight's channel halves
            c_x = c_per_group - int(x2_channels)
            c_first = int(x2_channels) if x2_first else c_x
            w1, w2 = weight[:, :c_first].contiguous(), weight[:, c_first:].contiguous()
            s1 = s2 = None
            if size is not None:
                s1 = [size[0], c_first, size[2], size[3]]
                s2 = [size[0], c_per_group - c_first, size[2], size[3]]
            self.packed = self._pack(w1, s1)
            self.packed2 = self._pack(w2, s2)
        else:
            if size is not None and x2_channels is not None:  # joined input: all channels
                size = [size[0], c_per_group * self.groups, size[2], size[3]]
            self.packed = self._pack(weight, size)

    def _pack(self, w: Tensor, size: list[int] | None) -> Tensor:
        return _PACK(w, self.conv_pad, self.stride, self.dilation, self.groups, size)

    def _composite(self, x: Tensor, residual: Tensor | None, x2: Tensor | None) -> Tensor:
        resize, align, sh, sw, first = self.x2_spec
        return ops.conv2d_impl(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
            self.act, self.act_param, residual, self.residual_after_act, x2, resize, align,
            sh, sw, first,
        )  # fmt: skip

    def __call__(
        self, x: Tensor, residual: Tensor | None = None, x2: Tensor | None = None
    ) -> Tensor:
        if x.dtype != self.weight.dtype or (residual is not None and residual.dtype != x.dtype):
            return self._composite(x, residual, x2)
        x = ops.to_nhwc(x)
        if x2 is not None:
            if not self.split or residual is not None:
                return self._composite(x, residual, x2)
            resize, align, sh, sw, first = self.x2_spec
            if resize != "none":
                x2 = ops.resize_like_aten(x2, x.shape[-2:], resize, align, sh, sw)
            x2 = ops.to_nhwc(x2)
            a, b = (x2, x) if first else (x, x2)
            y = _CONV(a, self.packed, self.bias, self.padding, self.stride, self.dilation,
                      1, "none", [], "")  # fmt: skip
            y = _CONV_BINARY_(
                y, b, self.packed2, None, self.padding, self.stride, self.dilation, 1,
                "add", None, self.after_add, self.after_add_scalars, "",
            )  # fmt: skip
            return y if self.fused_after_add else ops.activation_(y, self.act, self.act_param)
        if self.prepad:
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph))
        if residual is None or self.residual_after_act:
            y = _CONV(x, self.packed, self.bias, self.conv_pad, self.stride, self.dilation,
                      self.groups, self.unary, self.scalars, "")  # fmt: skip
            if residual is not None:
                y = y.add_(residual)
            return y
        if residual.shape != (x.shape[0], self.weight.shape[0], *residual.shape[2:]):
            return self._composite(x, residual, x2)
        if x.shape[0] == 1 and residual.dim() == 4 and residual.stride()[2:] == (0, 0):
            # One image and a residual constant over the map (the broadcast_branch
            # pass's W_p·p): it is a bias.
            vec = residual[0, :, 0, 0]
            bias = vec if self.bias is None else vec + self.bias
            return _CONV(x, self.packed, bias.contiguous(), self.conv_pad, self.stride,
                         self.dilation, self.groups, self.unary, self.scalars, "")  # fmt: skip
        out_hw = [
            ops._conv_out_size(
                x.shape[2 + i],
                self.weight.shape[2 + i],
                self.stride[i],
                self.conv_pad[i],
                self.dilation[i],
            )
            for i in range(2)
        ]
        if list(residual.shape[2:]) != out_hw:
            return self._composite(x, residual, x2)
        y = _CONV_BINARY(
            x, ops.to_nhwc(residual), self.packed, self.bias, self.conv_pad, self.stride,
            self.dilation, self.groups, "add", None, self.after_add, self.after_add_scalars, "",
        )  # fmt: skip
        return y if self.fused_after_add else ops.activation_(y, self.act, self.act_param)


class PackedConvTranspose2d:
    """``segfast.conv_transpose2d`` with its constant weight packed for oneDNN;
    bias and activation as post-ops. Called as ``convT(x, residual)``."""

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        stride: Sequence[int],
        padding: Sequence[int],
        output_padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
        act: str,
        act_param: float,
        residual_after_act: bool,
        input_size: Sequence[Any] | None = None,
    ) -> None:
        self.weight, self.bias = weight, bias
        self.args = (list(stride), list(padding), list(output_padding), list(dilation), int(groups))
        self.act, self.act_param = act, float(act_param)
        self.residual_after_act = bool(residual_after_act)
        self.unary, self.scalars = post_op(act, act_param)
        st, pad, opad, dil, g = self.args
        self.packed = _PACK_T(weight, pad, opad, st, dil, g, _static_size(input_size))

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        st, pad, opad, dil, g = self.args
        if x.dtype != self.weight.dtype or (residual is not None and residual.dtype != x.dtype):
            return ops.conv_transpose2d_impl(
                x, self.weight, self.bias, st, pad, opad, dil, g, self.act, self.act_param,
                residual, self.residual_after_act,
            )  # fmt: skip
        x = ops.to_nhwc(x)
        if residual is not None and not self.residual_after_act:
            y = _CONV_T(x, self.packed, self.bias, pad, opad, st, dil, g, "none", [], "")
            return ops.activation(y.add_(residual), self.act, self.act_param)
        y = _CONV_T(x, self.packed, self.bias, pad, opad, st, dil, g, self.unary, self.scalars, "")
        return y if residual is None else y.add_(residual)
