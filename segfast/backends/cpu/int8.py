"""int8 convolutions of the CPU plan: oneDNN's quantized convolution (VNNI on CPUs
that have it), weights prepacked once.

``segfast.qconv2d`` (:func:`segfast.compiler.ops.qconv2d_impl` is its meaning) runs as

    u8 = quantize(x, x_scale) + zp                            one pass (segfast's C kernel)
    y  = onednn.qconv2d_pointwise(u8, packed int8 weight)      int8 × int8 → int32 → fp32,
                                                               bias and relu/relu6/silu/
                                                               hardswish post-ops fused

The input is quantized into uint8 (oneDNN's activation type) with zero point 128:
``u8 − 128`` is exactly the symmetric int8 value ``clamp(round(x / s), −128, 127)``.
Two-source convs quantize each source straight into its channel slice of one buffer
(the one shared scale covers both); a residual add and the activations oneDNN's
quantized convolution does not fuse (leaky relu, sigmoid, tanh) run in place after it.

**CPUs without VNNI** (AVX2 or AVX-512 without VNNI, e.g. AMD Zen 2/3): oneDNN's int8
kernels there multiply u8 × s8 pairs with ``vpmaddubsw``, whose int16 pair sums
saturate at 32767 — two products of 255 × 127 already do — so a full-range uint8 input
gives wrong sums, silently (oneDNN documents it; PyTorch's x86 quantizer answers with
7-bit activations, which would change the numbers). :func:`exact_u8_range` finds out by
running one conv whose sums would saturate. Where they would:

- a conv whose input is provably ≥ 0 (it comes out of a ReLU/ReLU6/sigmoid, through
  pools, resizes, concats and layout fixes: :func:`nonnegative`) is quantized with
  zero point 0 instead — ``u8`` in [0, 127], and a pair sum is at most
  2 × 127 × 127 = 32258, exact; its producer can store that uint8 directly (relu or
  relu6 clamped at 127 steps in oneDNN's post-op);
- any other dense conv runs oneDNN's int8 kernel at zero point 128 with **7-bit
  weights** (``"int8-w7"``, the torch backend's ``int8_w7`` option, on by default
  there): each output channel's int8 weight requantized to ±63
  (:func:`to_7bit`), so a pair sum is at most 2 × 255 × 63 = 32130, exact — 1.6–2.8×
  the fp32 conv below, at a coarser weight grid that the int8 contract judges like any
  other (the engine is built, then checked); an engine file keeps the choice, so a file
  judged with 7-bit weights runs them on any CPU (exact on VNNI too) and one judged
  with 8-bit weights keeps them;
- depthwise and grouped convs with such inputs, and every such conv with ``int8_w7``
  off, run fp32 on their input quantized and dequantized in one pass
  (:func:`fake_quant_into`) with the dequantized weight — the conv the fp32 plan would
  run for the layer (Winograd where it takes it), the same numbers to fp32 rounding,
  at fp32 speed.

``PackedQConv2d.mode`` says which.

``segfast.qconv_transpose2d`` has no oneDNN int8 kernel in PyTorch. Where its kernel
equals its stride (U-Net's 2×2 stride-2 up-convolution) it is a 1×1 int8 conv and a
depth-to-space copy (:class:`QConvTranspose2d`); any other runs oneDNN's fp32
transposed convolution on the dequantized weight after quantizing its input — the same
numbers, at fp32 speed.

**Requantize on store**: a conv whose every reader is an int8 conv at one scale and
zero point writes uint8 at that scale (:meth:`PackedQConv2d.store_quantized`; the plan
decides).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx

from segfast.backends.cpu import native as cpu_native
from segfast.backends.cpu.onednn import PackedConv2d, PackedConvTranspose2d, _static_size
from segfast.compiler import ops
from segfast.compiler.graph import is_call

_ZP = 128  # uint8 zero point: u8 = q + 128
# activations oneDNN's quantized convolution fuses, as (attr, scalars)
_POST_OPS: dict[str, tuple[str, list[float]]] = {
    "none": ("none", []),
    "relu": ("relu", []),
    "relu6": ("hardtanh", [0.0, 6.0]),
    "silu": ("swish", []),
}


INT8_MODES = ("int8", "int8-nonneg", "int8-w7")  # the modes that run oneDNN's int8 kernel


def available() -> bool:
    """PyTorch has oneDNN's quantized convolution here (x86 builds with oneDNN)."""
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qconv2d_pointwise")


@functools.cache
def exact_u8_range() -> bool:
    """Whether oneDNN's int8 convolution sums full-range uint8 × int8 products exactly
    on this CPU (VNNI, AMX), or saturates int16 pair sums (AVX2, AVX-512 without VNNI).

    Asked of oneDNN itself, not of the CPU flags: a 1×1 conv over 64 channels of
    u8 = 255 (q = 127) and weights 127 must give 64 · 127 · 127; a pair sum of
    255 · 127 · 2 = 64770 saturating at 32767 gives far less.
    """
    c = 64
    w = torch.full((1, c, 1, 1), 127, dtype=torch.int8)
    one = torch.ones(1)
    packed = torch.ops.onednn.qconv_prepack(w, one, 1.0, _ZP, [1, 1], [0, 0], [1, 1], 1, None)
    u8 = torch.full((1, c, 2, 2), 255, dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.ops.onednn.qconv2d_pointwise(
        u8, 1.0, _ZP, packed, one, torch.zeros(1, dtype=torch.int64), None, [1, 1], [0, 0],
        [1, 1], 1, 1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip
    return bool(torch.all(y == float(c * 127 * 127)))


# ops whose output is >= 0 whatever their input; and those that keep a >= 0 input >= 0
_NONNEG_ACTS = ("relu", "relu6", "sigmoid")
_KEEPS_SIGN = {
    torch.ops.aten.max_pool2d.default,
    torch.ops.aten.max_pool2d_with_indices.default,
    torch.ops.aten.avg_pool2d.default,
    torch.ops.aten._adaptive_avg_pool2d.default,
    torch.ops.aten.adaptive_avg_pool2d.default,
    torch.ops.aten.upsample_bilinear2d.vec,
    torch.ops.aten.upsample_bilinear2d.default,
    torch.ops.aten.upsample_nearest2d.vec,
    torch.ops.aten.upsample_nearest2d.default,
    torch.ops.aten.max_unpool2d.default,
    torch.ops.aten.clone.default,
    torch.ops.aten.contiguous.default,
    torch.ops.aten._to_copy.default,
    torch.ops.aten.mean.dim,
    torch.ops.aten.pad.default,
    torch.ops.aten.constant_pad_nd.default,
    ops.to_nhwc,  # the layout pass's layout fix
}


_SF = torch.ops.segfast
# segfast's fused convs: where (act, residual, residual_after_act) sit in their args
_CONV_EPILOGUE = {
    _SF.conv2d.default: (7, 9, 10),
    _SF.qconv2d.default: (7, 9, 10),
    _SF.conv_transpose2d.default: (8, 10, 11),
    _SF.qconv_transpose2d.default: (8, 10, 11),
}


def nonnegative(node: Any, depth: int = 0) -> bool:
    """Whether the value of graph ``node`` is ≥ 0 for every input (a proof from the ops,
    not from calibration data; False when unsure)."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or depth > 64:
        return False
    t = node.target
    a = node.args
    if is_call(node, torch.ops.aten.relu.default) or t in (
        torch.ops.aten.sigmoid.default,
        torch.ops.aten.relu6.default,
    ):
        return True
    if t is torch.ops.aten.hardtanh.default:
        return len(a) > 1 and float(a[1]) >= 0
    if t in (torch.ops.aten.clamp.default, torch.ops.aten.clamp_min.default):
        return len(a) > 1 and a[1] is not None and float(a[1]) >= 0
    conv_args = _CONV_EPILOGUE.get(t)
    if conv_args is not None:
        act, residual, after = (a[i] for i in conv_args)
        if act not in _NONNEG_ACTS:
            return False
        return residual is None or not after or nonnegative(residual, depth + 1)
    if t is operator.getitem:  # max_pool2d_with_indices()[0]
        return a[1] == 0 and nonnegative(a[0], depth + 1)
    if t is torch.ops.aten.cat.default:
        return all(nonnegative(x, depth + 1) for x in a[0])
    if t in _KEEPS_SIGN:
        return bool(a) and nonnegative(a[0], depth + 1)
    return False


def _pixel_rows(t: Tensor) -> int | None:
    """The stride between pixels of an NHWC (channels_last) 4-D tensor whose channels
    are contiguous and whose pixels are evenly spaced — a whole tensor or a channel
    slice of one — else None."""
    n, c, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if sc != 1 or (h > 1 and sh != w * sw) or (n > 1 and sn != h * sh) or sw < c:
        return None
    return sw


def quantize_into(x: Tensor, scale: float, out: Tensor, zp: int = _ZP) -> Tensor:
    """fp32 ``x`` (N×C×H×W) → ``out`` (uint8, same shape): ``clamp(round(x / scale),
    −128, 127) + zp`` — zp 128, or 0 for an ``x`` ≥ 0 (negative values would clamp to
    0); one pass in segfast's CPU kernel (``sf_quantize_u8``) when both are NHWC pixel
    rows (``out`` may be a channel slice of a joined input), else in PyTorch ops."""
    if zp not in (0, _ZP):
        raise ValueError(f"zero point must be 0 or {_ZP}, got {zp}")
    native = cpu_native.load()
    xs, os_ = _pixel_rows(x), _pixel_rows(out)
    if native is not None and x.dtype == torch.float32 and xs is not None and os_ is not None:
        n, c, h, w = x.shape
        native.quantize_u8(
            x.data_ptr(), n * h * w, c, xs, float(scale), int(zp), out.data_ptr(), os_
        )
        return out
    lo = ops.INT8_MIN if zp else 0
    q = torch.clamp(torch.round(x.float() / scale), lo, ops.INT8_MAX).add_(zp)
    return out.copy_(q)


def fake_quant_into(x: Tensor, scale: float, out: Tensor) -> Tensor:
    """fp32 ``x`` quantized to int8 at ``scale`` and back, into fp32 ``out`` (same
    shape; may be a channel slice): :func:`segfast.compiler.ops.fake_quant`,
    bit-identical, in one pass of segfast's CPU kernel (``sf_fake_quant``) when both
    are NHWC pixel rows, else in PyTorch ops."""
    native = cpu_native.load()
    xs, os_ = _pixel_rows(x), _pixel_rows(out)
    if (
        native is not None
        and x.dtype == torch.float32
        and out.dtype == torch.float32
        and xs is not None
        and os_ is not None
    ):
        n, c, h, w = x.shape
        native.fake_quant(x.data_ptr(), n * h * w, c, xs, float(scale), out.data_ptr(), os_)
        return out
    return out.copy_(ops.fake_quant(x.float(), scale))


def fake_quant_nhwc(x: Tensor, scale: float) -> Tensor:
    """A new channels_last fp32 tensor: ``x`` quantized at ``scale`` and back."""
    x = ops.to_nhwc(x.float())
    return fake_quant_into(x, scale, torch.empty_like(x, memory_format=torch.channels_last))


def quantize_u8(x: Tensor, scale: float, zp: int = _ZP) -> Tensor:
    """fp32 ``x`` → a new channels_last uint8 tensor (see :func:`quantize_into`)."""
    x = ops.to_nhwc(x.float())
    return quantize_into(x, scale, torch.empty_like(x, dtype=torch.uint8), zp)


W7_MAX = 63  # 7-bit weights: a u8 × s8 pair sum is at most 2 · 255 · 63 = 32130 < 2**15


def to_7bit(weight: Tensor, w_scale: Tensor) -> tuple[Tensor, Tensor]:
    """An int8 weight (±127, per output channel along axis 0, scales ``w_scale``) on
    a 7-bit grid: each channel whose largest |q| exceeds 63 is requantized to
    ``round(q / f)`` at scale ``w_scale · f``, ``f = max|q| / 63`` (ties to even);
    channels within ±63 are kept as they are. Returns (int8 weight, fp32 scales)."""
    dims = tuple(range(1, weight.dim()))
    amax = weight.to(torch.int32).abs().amax(dim=dims).float()
    f = torch.clamp(amax / W7_MAX, min=1.0)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    q = torch.clamp(torch.round(weight.float() / f.view(shape)), -W7_MAX, W7_MAX)
    return q.to(torch.int8), (w_scale.float() * f).contiguous()


def choose_mode(nonneg: bool, w7: bool = False) -> str:
    """How :class:`PackedQConv2d` runs a conv on this CPU: ``"int8"`` where oneDNN's
    int8 sums are exact over full-range inputs (:func:`exact_u8_range`), else
    ``"int8-nonneg"`` for an input proven ≥ 0 (``nonneg``), else ``"int8-w7"`` where
    7-bit weights are allowed (``w7``: dense convs of an engine built with them — then
    on every CPU, so that a file runs the numbers it was judged with), else ``"fp32"``.

    Depthwise convs were measured too (AVX2 EPYC, 2026-12-07): oneDNN's int8
    depthwise kernels are exact on full-range inputs there (one channel at a time, no
    pair sums), but with zero point 128 they are slower than its fp32 depthwise conv
    (96 ch 3×3 at 128²: 1.43 against 0.9–1.2 ms before the quantize pass; at zero
    point 0: 0.62), so a signed depthwise input takes ``"fp32"`` like any other."""
    if w7 and not nonneg:
        return "int8-w7"
    if exact_u8_range():
        return "int8"
    return "int8-nonneg" if nonneg else "fp32"


def _store_clamp(act: str, act_param: float, scale: float) -> tuple[str, list[float]]:
    """The post-op that makes a conv's uint8 output, at zero point 0, what its
    zero-point-0 readers' quantization would give: ``clamp(round(y / scale), 0, 127)``
    — the activation, then a clamp at 127 steps (oneDNN's uint8 store saturates at
    255, which those readers' int16 pair sums cannot take)."""
    top = 127.0 * scale
    if act == "relu6":
        top = min(top, 6.0)
    return "hardtanh", [0.0, top]


class PackedQConv2d:
    """``segfast.qconv2d`` on oneDNN; called as ``conv(x, residual, x2)``.

    ``mode``: ``"int8"`` (oneDNN's int8 convolution, zero point 128: exact on this CPU),
    ``"int8-nonneg"`` (zero point 0 for an input the graph proves ≥ 0: exact on CPUs
    whose int8 pair sums saturate), ``"int8-w7"`` (zero point 128 with the weight
    requantized to 7 bits, :func:`to_7bit`: exact on any CPU), ``"fp32"`` (an fp32
    convolution of the quantized input with the dequantized weight: where int8 would
    saturate). The plan passes
    ``nonneg`` (:func:`nonnegative`); :func:`choose_mode` decides the rest. In
    ``"fp32"`` mode each source is quantized and dequantized in one pass
    (:func:`fake_quant_into`) and ``fp32_conv`` runs — the plan passes the conv the
    fp32 engine would run for this layer (Winograd where it would take it), called as
    ``fp32_conv(x, residual, x2)`` with the sources already in order and resized;
    without one, oneDNN's fp32 convolution.
    """

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
        *,
        nonneg: bool = False,
        mode: str | None = None,
        fp32_conv: Any = None,
    ) -> None:
        if mode is None:
            mode = choose_mode(nonneg)
        if mode not in ("int8", "int8-nonneg", "int8-w7", "fp32"):
            raise ValueError(f"mode must be int8, int8-nonneg, int8-w7 or fp32, got {mode!r}")
        self.mode = mode
        if mode == "int8-w7":
            weight, w_scale = to_7bit(weight, w_scale)
        self.zp = 0 if mode == "int8-nonneg" else _ZP
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)
        self.groups = int(groups)
        self.act, self.act_param = act, float(act_param)
        self.residual_after_act = bool(residual_after_act)
        self.x2_spec = x2_spec
        self.x_scale = float(x_scale)
        self.w_scale = w_scale.float().contiguous()
        self.bias = None if bias is None else bias.float().contiguous()
        size = _static_size(input_size)
        if size is not None:  # the joined input's channels
            size = [size[0], int(weight.shape[1]) * self.groups, size[2], size[3]]
        if mode == "fp32":
            # the sources are resized and put in order here; the conv joins them
            if fp32_conv is None:  # oneDNN's fp32 conv (two sources: concatenated)
                fp32_conv = PackedConv2d(
                    ops.dequantize_weight(weight, self.w_scale, 0, torch.float32), self.bias,
                    stride, padding, dilation, groups, act, act_param, residual_after_act,
                    "none", False, None, None, False, input_size=size,
                )  # fmt: skip
            self.fp32 = fp32_conv
            return
        self.w_zp = torch.zeros(int(weight.shape[0]), dtype=torch.int64)
        self.packed = torch.ops.onednn.qconv_prepack(
            weight, self.w_scale, self.x_scale, self.zp, self.stride, self.padding,
            self.dilation, self.groups, size,
        )  # fmt: skip
        self.post = _POST_OPS.get(act)
        self.out_quant: tuple[float, int] | None = None

    @property
    def can_store_quantized(self) -> bool:
        """Whether this conv can write its output as uint8 (:meth:`store_quantized`)
        at all: oneDNN's int8 kernel and an activation it fuses (zero point 128 takes
        any such; zero point 0 fewer, see :meth:`can_store_at`)."""
        return self.can_store_at(_ZP)

    def can_store_at(self, zp: int) -> bool:
        """Whether this conv can store uint8 for readers quantizing at zero point
        ``zp``: 128 (readers on oneDNN's full-range int8) after any activation oneDNN
        fuses; 0 (readers taking [0, 127]: CPUs without VNNI) after relu or relu6
        only, clamped at 127 steps in the same post-op."""
        if self.mode not in INT8_MODES or self.post is None:
            return False
        return zp == _ZP or (zp == 0 and self.act in ("relu", "relu6"))

    def store_quantized(self, scale: float, zp: int) -> None:
        """Write the output as uint8 ``clamp(round(y / scale), −128, 127) + zp`` (zp
        128) or ``clamp(round(y / scale), 0, 127)`` (zp 0) — the quantization the
        consumer convs (all of them int8, at ``scale`` and ``zp``) would apply to it —
        in oneDNN's store, instead of fp32 that each consumer quantizes again. Only for
        a conv without a residual whose every reader is such a conv: the plan decides
        (:func:`segfast.backends.cpu.plan.lower`)."""
        if zp not in (0, _ZP):
            raise ValueError(f"uint8 outputs use zero point 0 or {_ZP}, got {zp}")
        if not self.can_store_at(zp):
            raise ValueError(
                f"a {self.mode} conv with act {self.act!r} cannot store uint8 at zero point {zp}"
            )
        self.out_quant = (float(scale), int(zp))
        assert self.post is not None  # can_store_at
        self.store_post = self.post if zp == _ZP else _store_clamp(self.act, self.act_param, scale)

    def _conv(
        self, u8: Tensor, attr: str, scalars: list[float], out: tuple[float, int] | None = None
    ) -> Tensor:
        out_scale, out_zp, out_dtype = (1.0, 0, torch.float32) if out is None else (*out, None)
        return torch.ops.onednn.qconv2d_pointwise(
            u8, self.x_scale, self.zp, self.packed, self.w_scale, self.w_zp, self.bias,
            self.stride, self.padding, self.dilation, self.groups, out_scale, out_zp, out_dtype,
            attr, scalars, "",
        )  # fmt: skip

    def _sources(self, x: Tensor, x2: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(first, second) of the joined input, NHWC (fp32, or uint8 where a producer
        stored it quantized), x2 resized to x."""
        if x2 is None:
            return x, None
        resize, align, sh, sw, first = self.x2_spec
        if resize != "none":
            if x2.dtype == torch.uint8:
                raise ValueError("a uint8 second source cannot be resized (the plan never asks)")
            x2 = ops.resize_like_aten(x2, x.shape[-2:], resize, align, sh, sw)
        x2 = ops.to_nhwc(x2 if x2.dtype == torch.uint8 else x2.float())
        return (x2, x) if first else (x, x2)

    def _into(self, src: Tensor, out: Tensor) -> None:
        """One source into its channel slice of the joined uint8 input."""
        if src.dtype == torch.uint8:  # stored quantized at this conv's scale already
            out.copy_(src)
        else:
            quantize_into(src.float(), self.x_scale, out, self.zp)

    def _quantized_input(self, x: Tensor, x2: Tensor | None) -> Tensor:
        """The (joined) input as uint8: a two-source conv's sources are quantized
        straight into their channel slices of one buffer (no float concat); a source
        its producer stored as uint8 (:meth:`store_quantized`) is taken as it is."""
        a, b = self._sources(x, x2)
        if b is None:
            return a if a.dtype == torch.uint8 else quantize_u8(a, self.x_scale, self.zp)
        n, _, h, w = a.shape
        # allocated channels_last (an NCHW buffer made channels_last is a byte-wise
        # transposing copy: 8 ms for DeepLab's 304 × 128² joined input)
        u8 = torch.empty(
            (n, a.shape[1] + b.shape[1], h, w), dtype=torch.uint8, memory_format=torch.channels_last
        )
        self._into(a, u8[:, : a.shape[1]])
        self._into(b, u8[:, a.shape[1] :])
        return u8

    def __call__(
        self, x: Tensor, residual: Tensor | None = None, x2: Tensor | None = None
    ) -> Tensor:
        x = ops.to_nhwc(x)
        if self.mode == "fp32":
            a, b = self._sources(x, x2)
            a = fake_quant_nhwc(a, self.x_scale)
            return self.fp32(a, residual, None if b is None else fake_quant_nhwc(b, self.x_scale))
        u8 = self._quantized_input(x, x2)
        if self.out_quant is not None:
            if residual is not None:
                raise ValueError("a conv that stores uint8 takes no residual")
            return self._conv(u8, *self.store_post, out=self.out_quant)
        if residual is None or self.residual_after_act:
            if self.post is not None:
                y = self._conv(u8, *self.post)
            else:
                y = ops.activation_(self._conv(u8, "none", []), self.act, self.act_param)
            return y if residual is None else y.add_(residual)
        y = self._conv(u8, "none", []).add_(residual)
        return ops.activation_(y, self.act, self.act_param)


class QConvTranspose2d:
    """``segfast.qconv_transpose2d`` with its input quantized.

    A transposed conv whose kernel equals its stride (no padding, no output padding,
    no dilation, groups 1 — U-Net's 2×2 stride-2 up-convolution) is a 1×1 conv to
    ``kh·kw·K`` channels and a depth-to-space: every output pixel takes exactly one
    input pixel's dot product. That runs as a :class:`PackedQConv2d` (oneDNN int8,
    bias and activation fused) plus one copy that scatters each pixel's ``kh × kw``
    blocks of ``K`` channels; it can store uint8 for int8 readers like any int8 conv
    (the scatter is a permutation: exact on uint8). Any other transposed conv has no
    oneDNN int8 kernel in PyTorch: it runs oneDNN's fp32 transposed convolution on the
    dequantized weight after quantizing its input — the same numbers, at fp32 speed.
    ``mode``: ``"int8"``/``"int8-nonneg"`` (the 1×1 form, as :class:`PackedQConv2d`) or
    ``"fp32"``.
    """

    def __init__(
        self,
        weight: Tensor,  # int8 [C, K/g, kh, kw]
        w_scale: Tensor,  # fp32 [K]
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
        *,
        nonneg: bool = False,
        mode: str | None = None,
    ) -> None:
        self.x_scale = float(x_scale)
        self.act, self.act_param = act, float(act_param)
        self.residual_after_act = bool(residual_after_act)
        c, k, kh, kw = (int(d) for d in weight.shape)
        self.kernel = (kh, kw)
        split = (
            [kh, kw] == [int(v) for v in stride]
            and not any(int(v) for v in (*padding, *output_padding))
            and all(int(v) == 1 for v in dilation)
            and int(groups) == 1
        )
        self.pointwise: PackedQConv2d | None = None
        if split and mode != "fp32":
            # 1×1 weight [(i·kw + j)·K + k, C]: out[n, k, h·kh + i, w·kw + j] = that channel
            w1 = weight.permute(2, 3, 1, 0).reshape(kh * kw * k, c, 1, 1).contiguous()
            b1 = None if bias is None else bias.float().repeat(kh * kw)
            size = _static_size(input_size)
            conv = PackedQConv2d(
                w1, w_scale.float().repeat(kh * kw), b1, [1, 1], [0, 0], [1, 1], 1,
                act, act_param, residual_after_act, ("none", False, None, None, False),
                x_scale, None if size is None else tuple(size), nonneg=nonneg, mode=mode,
            )  # fmt: skip
            if conv.mode != "fp32":  # oneDNN fp32 transposed conv is as fast as 1×1 + scatter
                self.pointwise = conv
        self.mode = "fp32" if self.pointwise is None else self.pointwise.mode
        self.zp = _ZP if self.pointwise is None else self.pointwise.zp
        if self.pointwise is None:
            w = ops.dequantize_weight(weight, w_scale, 1, torch.float32)
            self.conv = PackedConvTranspose2d(
                w, None if bias is None else bias.float(), stride, padding, output_padding,
                dilation, groups, act, act_param, residual_after_act, input_size=input_size,
            )  # fmt: skip

    @property
    def can_store_quantized(self) -> bool:
        """See :meth:`PackedQConv2d.can_store_quantized` (the 1×1 form only)."""
        return self.pointwise is not None and self.pointwise.can_store_quantized

    def can_store_at(self, zp: int) -> bool:
        """See :meth:`PackedQConv2d.can_store_at` (the 1×1 form only)."""
        return self.pointwise is not None and self.pointwise.can_store_at(zp)

    def store_quantized(self, scale: float, zp: int) -> None:
        """See :meth:`PackedQConv2d.store_quantized`."""
        if self.pointwise is None:
            raise ValueError("an overlapping int8 transposed conv cannot store uint8")
        self.pointwise.store_quantized(scale, zp)

    @property
    def out_quant(self) -> tuple[float, int] | None:
        return None if self.pointwise is None else self.pointwise.out_quant

    def _scatter(self, y: Tensor) -> Tensor:
        """[N, kh·kw·K, H, W] (NHWC) → [N, K, H·kh, W·kw] (NHWC): one copy."""
        n, _, h, w = y.shape
        kh, kw = self.kernel
        k = y.shape[1] // (kh * kw)
        out = torch.empty((n, k, h * kh, w * kw), dtype=y.dtype, memory_format=torch.channels_last)
        src = y.permute(0, 2, 3, 1).view(n, h, w, kh, kw, k)
        out.permute(0, 2, 3, 1).view(n, h, kh, w, kw, k).copy_(src.permute(0, 1, 3, 2, 4, 5))
        return out

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        x = ops.to_nhwc(x)
        if self.pointwise is None:
            return self.conv(fake_quant_nhwc(x, self.x_scale), residual)
        if residual is None or self.residual_after_act:
            y = self._scatter(self.pointwise(x))
            return y if residual is None else y.add_(residual)
        pw = self.pointwise
        u8 = pw._quantized_input(x, None)
        y = self._scatter(pw._conv(u8, "none", [])).add_(residual)
        return ops.activation_(y, self.act, self.act_param)
