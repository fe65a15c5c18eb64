"""segfast's fused ops, registered with ``torch.library`` as ``torch.ops.segfast.*``.

Each op has a composite PyTorch implementation that runs on any device (the
``torch`` backend and every reference check use it), a Triton implementation
registered for CUDA tensors (:mod:`segfast.backends.triton_backend`, which also
points a lowered graph's nodes straight at the Triton launchers of
:mod:`segfast.kernels`), and a fake (meta) implementation for shape
propagation, export and ``torch.compile``.

Ops:

- ``segfast::conv2d``: convolution (groups 1 or depthwise) with a bias, an
  activation, an optional residual add, and an optional second input source
  joined on channels (``cat([x, up(x2)])`` or ``cat([up(x2), x])`` with ``up``
  a nearest/bilinear resize to x's size computed on the fly);
- ``segfast::conv_transpose2d``: transposed convolution with the same epilogue;
- ``segfast::head``: optional 1×1 conv to class logits, optional bilinear
  resize of the logits, then argmax / softmax / sigmoid / threshold, without
  materialising full-resolution logits in the Triton implementation;
- ``segfast::se_gate``: a squeeze-excitation gate (global mean → 1×1 → act →
  [1×1 → act]) as one op, [N, C, 1, 1];
- ``segfast::conv2d_gated``: ``segfast::conv2d`` (one source) of ``x · gate``
  with the per-image, per-channel gate applied as the input is read;
- ``segfast::group_norm``: GroupNorm / InstanceNorm + affine + activation.

Everything numerical stays in PyTorch's logical N×C×H×W shapes; the composite
implementations keep the memory format of their main input.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("none", "relu", "relu6", "leaky_relu", "silu", "sigmoid", "tanh", "hardswish",
               "hardsigmoid", "gelu")  # fmt: skip
HEAD_MODES = ("argmax", "softmax", "sigmoid", "threshold", "logits")
MASK_DTYPES = {"uint8": torch.uint8, "int32": torch.int32, "int64": torch.int64}


def activation(y: Tensor, act: str, act_param: float) -> Tensor:
    """Apply an epilogue activation (out of place)."""
    if act == "none":
        return y
    if act == "relu":
        return torch.relu(y)
    if act == "relu6":
        return torch.clamp(y, 0.0, 6.0)
    if act == "leaky_relu":
        return F.leaky_relu(y, act_param)
    if act == "silu":
        return F.silu(y)
    if act == "sigmoid":
        return torch.sigmoid(y)
    if act == "tanh":
        return torch.tanh(y)
    if act == "hardswish":
        return F.hardswish(y)
    if act == "hardsigmoid":
        return F.hardsigmoid(y)
    if act == "gelu":  # act_param 0: exact, else the tanh approximation
        return F.gelu(y, approximate="tanh" if act_param else "none")
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {act!r}")


def activation_(y: Tensor, act: str, act_param: float) -> Tensor:
    """:func:`activation` in place, on a tensor the caller owns."""
    if act == "none":
        return y
    if act == "relu":
        return y.relu_()
    if act == "relu6":
        return y.clamp_(0.0, 6.0)
    if act == "leaky_relu":
        return F.leaky_relu_(y, act_param)
    if act == "silu":
        return F.silu(y, inplace=True)
    if act == "sigmoid":
        return y.sigmoid_()
    if act == "tanh":
        return y.tanh_()
    if act == "hardswish":
        return F.hardswish(y, inplace=True)
    if act == "hardsigmoid":
        return F.hardsigmoid(y, inplace=True)
    if act == "gelu":
        return y.copy_(F.gelu(y, approximate="tanh" if act_param else "none"))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {act!r}")


def _layout(x: Tensor) -> torch.memory_format:
    """segfast ops return NHWC (channels_last) whatever their input's layout: the
    compiler runs NHWC end to end, and one op that slips to NCHW (e.g. PyTorch's
    upsample of a 1×1 map, whose layout is ambiguous) would otherwise drag every
    op after it to NCHW."""
    return torch.channels_last if x.dim() == 4 else torch.contiguous_format


def to_nhwc(x: Tensor) -> Tensor:
    """``x`` in channels_last memory (``x`` itself when it already is).

    A plain function, not a custom op (it may return its input): the layout pass
    puts it after PyTorch ops that can drop NHWC, in graphs run as GraphModules.
    """
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def canonical_strides(x: Any) -> Any:
    """A 4-D view that is channels_last- (or NCHW-) contiguous, with the canonical
    strides of that layout on its size-1 dims too; anything else as it is.

    A size-1 dim's stride is free (no element moves), and views leave it whatever
    the view made it: tokens ``[1, H·W, C]`` permuted and reshaped to ``[1, C, H, W]``
    (SegFormer's and other transformers' heads) have strides ``(C, 1, W·C, C)``, which
    ``is_contiguous(memory_format=channels_last)`` accepts but PyTorch's own kernels do
    not: ``upsample_bilinear2d`` takes its strided NCHW path and writes NCHW (256
    channels to 128² on 2 Zen 4 cores: 16–18 ms against 1.1–1.7 ms with these strides),
    and the NHWC conversion after it is another 9 ms. Zero-copy (``as_strided`` on the
    same elements)."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        return x
    _, c, h, w = x.shape
    cl = x.is_contiguous(memory_format=torch.channels_last)
    if cl == x.is_contiguous():  # neither, or both (ambiguous: C = 1 or H = W = 1)
        return x
    want = (h * w * c, 1, w * c, c) if cl else (c * h * w, h * w, w, 1)
    return x if x.stride() == want else x.as_strided(x.shape, want)


def resize_like_aten(
    x: Tensor,
    size: tuple[int, int] | list[int],
    mode: str,
    align_corners: bool,
    scale_h: float | None,
    scale_w: float | None,
) -> Tensor:
    """ATen's upsample ops with explicit output size and scales (exact graph semantics)."""
    size = [int(size[0]), int(size[1])]
    if mode == "bilinear":
        return torch.ops.aten.upsample_bilinear2d.default(x, size, align_corners, scale_h, scale_w)
    if mode == "nearest":
        return torch.ops.aten.upsample_nearest2d.default(x, size, scale_h, scale_w)
    if mode == "nearest-exact":
        return torch.ops.aten._upsample_nearest_exact2d.default(x, size, scale_h, scale_w)
    raise ValueError(f"resize mode must be bilinear, nearest or nearest-exact, got {mode!r}")


def join_sources(
    x: Tensor,
    x2: Tensor | None,
    x2_resize: str,
    x2_align_corners: bool,
    x2_scale_h: float | None,
    x2_scale_w: float | None,
    x2_first: bool,
) -> Tensor:
    """The materialised two-source input ``cat([x, up(x2)])`` (or the reverse)."""
    if x2 is None:
        return x
    if x2_resize != "none":
        x2 = resize_like_aten(x2, x.shape[-2:], x2_resize, x2_align_corners, x2_scale_h, x2_scale_w)
    parts = [x2, x] if x2_first else [x, x2]
    return torch.cat(parts, dim=1)


# -- CPU fast path: oneDNN convolution with fused unary / binary post-ops. -------------

# Largest depthwise padding oneDNN handles on its fast path: on AVX-512 rate 6 is fast
# and 12 slow; on AVX2 the cliff is between 4 and 5 (256 channels at 32×32, 3×3: pad 4
# 0.15 ms, pad 5 6.2 ms; 96 channels at 128×128, pad 5: 30.7 ms, zero-padded first
# 1.1 ms — measured on a 2-core AVX2 EPYC, torch 2.13).
_DW_MAX_INLINE_PAD = 8


def dw_max_inline_pad() -> int:
    """The largest depthwise padding oneDNN takes inline on this CPU; above it the
    input is zero-padded first (see ``_DW_MAX_INLINE_PAD``). 4 on x86 CPUs without
    AVX-512 (measured); elsewhere (AVX-512, other architectures: not measured without
    AVX-512) 8."""
    if _cpu_capability() in ("AVX2", "DEFAULT") and platform.machine().lower() in (
        "x86_64",
        "amd64",
        "i686",
        "i386",
    ):
        return 4
    return _DW_MAX_INLINE_PAD


@functools.cache
def _cpu_capability() -> str:
    return str(torch.backends.cpu.get_cpu_capability())


# The unary post-ops oneDNN's convolution takes after a binary "add" (PyTorch's
# mkldnn op raises "Unary Fusion behavior undefined" for the others): any other
# activation runs in place after the fused add.
MKLDNN_UNARY_AFTER_ADD = ("none", "relu")

_MKLDNN_UNARY = {
    "none": ("none", []),
    "relu": ("relu", []),
    "relu6": ("hardtanh", [0.0, 6.0]),
    "silu": ("swish", []),
    "sigmoid": ("sigmoid", []),
    "tanh": ("tanh", []),
    "hardswish": ("hardswish", []),
    "hardsigmoid": ("hardsigmoid", []),
}


@functools.cache
def _mkldnn_ok(dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN's fused convolution op exists and computes what it should here, in
    ``dtype`` (bf16 needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT: on AVX2-only CPUs oneDNN
    refuses it, and bf16 runs as plain PyTorch ops)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops, "mkldnn")):
        return False
    try:
        op = torch.ops.mkldnn._convolution_pointwise
        # channels_last, the layout segfast's graphs and CPU plan run in (with an NCHW
        # input and weight, PyTorch 2.13 sends a bf16 add + relu to an ATen kernel
        # that has no bf16: _conv_cpu_fused does not fuse that case)
        cl = torch.channels_last
        x = torch.randn(1, 4, 5, 6).to(dtype).contiguous(memory_format=cl)
        w = torch.randn(3, 4, 3, 3).to(dtype).contiguous(memory_format=cl)
        b = torch.randn(3).to(dtype)
        r = torch.randn(1, 3, 5, 6).to(dtype).contiguous(memory_format=cl)
        y = op.default(x, w, b, [1, 1], [1, 1], [1, 1], 1, "relu", [], "").float()
        z = op.binary(x, r, w, b, [1, 1], [1, 1], [1, 1], 1, "add", None, "relu", [], "")
        ref = F.conv2d(x.float(), w.float(), b.float(), padding=1)
        tol = 1e-5 if dtype == torch.float32 else 0.1
        return bool(
            torch.allclose(y, ref.relu(), atol=tol)
            and torch.allclose(z.float(), (ref + r.float()).relu(), atol=tol)
        )
    except (RuntimeError, AttributeError):
        return False


def _plainly_channels_last(t: Tensor) -> bool:
    """Channels-last strides that are not also NCHW strides. A tensor whose strides
    fit both (1×1 weights, one channel, 1×1 maps) PyTorch's oneDNN conv takes as NCHW,
    and an NCHW bf16 conv with an add + activation goes to an ATen kernel without
    bf16."""
    return (
        t.dim() == 4
        and t.is_contiguous(memory_format=torch.channels_last)
        and not t.is_contiguous()
    )


def _conv_cpu_fused(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    act: str,
    act_param: float,
    residual: Tensor | None,
    residual_after_act: bool,
) -> Tensor | None:
    """oneDNN conv + post-ops for float32/bfloat16 CPU tensors; None when not applicable."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    if groups > 1 and groups == x.shape[1] and max(padding) > dw_max_inline_pad():
        # oneDNN's depthwise kernels fall to a slow path at large paddings (atrous
        # rates ≥ 12 in ASPP): 1280 ch at 32×32, rate 12 took 3.25 ms, zero-padding
        # first then convolving unpadded 1.19 ms (2 cores, measured here).
        ph, pw = padding
        x = F.pad(x, (pw, pw, ph, ph))
        padding = [0, 0]
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return None
    if not _mkldnn_ok(x.dtype):
        return None
    op = torch.ops.mkldnn._convolution_pointwise
    if act == "leaky_relu":
        unary, scalars = "leaky_relu", [act_param]
    elif act in _MKLDNN_UNARY:
        unary, scalars = _MKLDNN_UNARY[act]
    else:
        return None
    if residual is None:
        return op.default(x, weight, bias, padding, stride, dilation, groups, unary, scalars, "")
    out_hw = tuple(
        _conv_out_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i])
        for i in range(2)
    )
    if residual_after_act or tuple(residual.shape) != (x.shape[0], weight.shape[0], *out_hw):
        return None  # oneDNN's binary add would read a residual of another shape unchecked
    if residual.dtype != x.dtype:
        return None
    fused = unary in MKLDNN_UNARY_AFTER_ADD and (
        x.dtype == torch.float32 or _plainly_channels_last(x) or _plainly_channels_last(weight)
    )  # NCHW bf16 add + activation goes to an ATen kernel without bf16 (PyTorch 2.13)
    y = op.binary(
        x,
        residual,
        weight,
        bias,
        padding,
        stride,
        dilation,
        groups,
        "add",
        None,
        unary if fused and unary != "none" else None,
        scalars if fused else [],
        "",
    )
    return y if fused else activation_(y, act, act_param)


# -- segfast::conv2d ------------------------------------------------------------------


def conv2d_impl(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    act: str,
    act_param: float,
    residual: Tensor | None,
    residual_after_act: bool,
    x2: Tensor | None,
    x2_resize: str,
    x2_align_corners: bool,
    x2_scale_h: float | None,
    x2_scale_w: float | None,
    x2_first: bool,
) -> Tensor:
    """Fused convolution; see the module docstring. Composite PyTorch implementation.

    Plain function: the ``torch`` backend calls it directly (a custom-op dispatch
    costs ~40 µs a call on the CPU, ~3 ms per DeepLab v3+ run); ``segfast::conv2d``
    wraps it for export and shape propagation.
    """
    layout = _layout(x)
    inp = join_sources(x, x2, x2_resize, x2_align_corners, x2_scale_h, x2_scale_w, x2_first)
    inp = inp.contiguous(memory_format=layout)  # a no-op when it already is
    y = _conv_cpu_fused(
        inp,
        weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        act,
        act_param,
        residual,
        residual_after_act,
    )
    if y is None:
        y = F.conv2d(inp, weight, bias, stride, padding, dilation, groups)
        if residual is not None and not residual_after_act:
            y = y + residual
        y = activation(y, act, act_param)
        if residual is not None and residual_after_act:
            y = y + residual
    return y.contiguous(memory_format=layout)


def conv2d_one_source(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    act: str = "none",
    act_param: float = 0.0,
    residual: Tensor | None = None,
    residual_after_act: bool = False,
) -> Tensor:
    """:func:`conv2d_impl` without a second source: the composite path the CPU
    kernels fall back to and are tested against."""
    return conv2d_impl(
        x, weight, bias, list(stride), list(padding), list(dilation), groups, act, act_param,
        residual, residual_after_act, None, "none", False, None, None, False,
    )  # fmt: skip


# The op is the composite implementation itself, registered (the function object
# stays a plain Python function the torch backend calls directly).
conv2d = torch.library.custom_op("segfast::conv2d", mutates_args=())(conv2d_impl)


def _conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_fake(x: Tensor, weight: Tensor, stride, padding, dilation) -> Tensor:
    """The empty output of a convolution (fake implementations, shape propagation)."""
    h = _conv_out_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    w = _conv_out_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    out = x.new_empty((x.shape[0], weight.shape[0], h, w))
    return out.contiguous(memory_format=_layout(x))


@conv2d.register_fake
def _(
    x,
    weight,
    bias,
    stride,
    padding,
    dilation,
    groups,
    act,
    act_param,
    residual,
    residual_after_act,
    x2,
    x2_resize,
    x2_align_corners,
    x2_scale_h,
    x2_scale_w,
    x2_first,
):
    return _conv_fake(x, weight, stride, padding, dilation)


# -- segfast::se_gate, segfast::conv2d_gated: squeeze-excitation ------------------------
#
# A squeeze-excitation block  x · act2(W2 · act1(W1 · mean_hw(p) + b1) + b2)  becomes
# two ops: ``se_gate`` (the pooled mean and both tiny matrix-vector products; one
# reduction pass over p and one small kernel in the Triton implementation) and
# ``conv2d_gated`` (the conv that reads the gated tensor, with the per-image,
# per-channel gate applied to its input as it is read — the gated tensor is never
# written). ``p`` is usually ``x`` itself (MobileNetV3, EfficientNet); LR-ASPP gates
# one branch by the pooled other.


def _flat_weight(w: Tensor) -> Tensor:
    return w.reshape(w.shape[0], -1)


def se_gate_impl(
    p: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    act1: str,
    act1_param: float,
    w2: Tensor | None,
    b2: Tensor | None,
    act2: str,
    act2_param: float,
) -> Tensor:
    """The gate [N, C, 1, 1] of a squeeze-excitation block, in ``p``'s dtype: the mean of
    ``p`` over H×W → 1×1 conv (``w1`` [C1, C, 1, 1], ``b1``) → ``act1`` → optionally a
    second 1×1 conv (``w2`` [C2, C1, 1, 1], ``b2``) → ``act2`` (``w2`` None: act2 unused).
    Composite PyTorch implementation."""
    h = p.mean((2, 3))
    h = activation(F.linear(h, _flat_weight(w1), b1), act1, act1_param)
    if w2 is not None:
        h = activation(F.linear(h, _flat_weight(w2), b2), act2, act2_param)
    return h[:, :, None, None]


se_gate = torch.library.custom_op("segfast::se_gate", mutates_args=())(se_gate_impl)


@se_gate.register_fake
def _(p, w1, b1, act1, act1_param, w2, b2, act2, act2_param):
    c = (w2 if w2 is not None else w1).shape[0]
    return p.new_empty((p.shape[0], c, 1, 1))


def conv2d_gated_impl(
    x: Tensor,
    gate: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    act: str,
    act_param: float,
    residual: Tensor | None,
    residual_after_act: bool,
) -> Tensor:
    """``segfast::conv2d`` of ``x · gate`` (``gate`` [N, Cin, 1, 1], one scale per image
    and input channel). Composite implementation: the product, as the eager model forms
    it (the Triton kernel applies the gate as it reads x instead)."""
    return conv2d_one_source(
        x * gate, weight, bias, stride, padding, dilation, groups, act, act_param,
        residual, residual_after_act,
    )  # fmt: skip


conv2d_gated = torch.library.custom_op("segfast::conv2d_gated", mutates_args=())(conv2d_gated_impl)


@conv2d_gated.register_fake
def _(
    x, gate, weight, bias, stride, padding, dilation, groups, act, act_param, residual,
    residual_after_act,
):  # fmt: skip
    return _conv_fake(x, weight, stride, padding, dilation)


# -- segfast::group_norm: GroupNorm / InstanceNorm + activation -------------------------


def group_norm_impl(
    x: Tensor,
    groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    act: str,
    act_param: float,
) -> Tensor:
    """GroupNorm of ``x`` over ``groups`` channel groups (InstanceNorm: ``groups`` = C),
    the per-channel affine, then ``act``. Composite implementation."""
    y = F.group_norm(x, groups, weight, bias, eps)
    return activation_(y, act, act_param).contiguous(memory_format=_layout(x))


group_norm = torch.library.custom_op("segfast::group_norm", mutates_args=())(group_norm_impl)


@group_norm.register_fake
def _(x, groups, weight, bias, eps, act, act_param):
    return torch.empty_like(x, memory_format=_layout(x))


# -- segfast::conv_transpose2d ----------------------------------------------------------


def conv_transpose2d_impl(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    output_padding: list[int],
    dilation: list[int],
    groups: int,
    act: str,
    act_param: float,
    residual: Tensor | None,
    residual_after_act: bool,
) -> Tensor:
    """Fused transposed convolution. Composite PyTorch implementation."""
    layout = _layout(x)
    y = F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation)
    if residual is not None and not residual_after_act:
        y = y + residual
    y = activation(y, act, act_param)
    if residual is not None and residual_after_act:
        y = y + residual
    return y.contiguous(memory_format=layout)


conv_transpose2d = torch.library.custom_op("segfast::conv_transpose2d", mutates_args=())(
    conv_transpose2d_impl
)


@conv_transpose2d.register_fake
def _(
    x,
    weight,
    bias,
    stride,
    padding,
    output_padding,
    dilation,
    groups,
    act,
    act_param,
    residual,
    residual_after_act,
):
    def size(i: int) -> int:
        k = weight.shape[2 + i]
        return (
            (x.shape[2 + i] - 1) * stride[i]
            - 2 * padding[i]
            + dilation[i] * (k - 1)
            + output_padding[i]
            + 1
        )

    out = x.new_empty((x.shape[0], weight.shape[1] * groups, size(0), size(1)))
    return out.contiguous(memory_format=_layout(x))


# -- segfast::head ---------------------------------------------------------------------


def head_impl(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    out_h: int,
    out_w: int,
    resize: bool,
    align_corners: bool,
    scale_h: float | None,
    scale_w: float | None,
    mode: str,
    threshold: float,
    mask_dtype: str,
) -> Tensor:
    """Segmentation head: [1×1 conv] → [bilinear resize to out_h×out_w] → reduction.

    ``out_h``/``out_w`` are read only when ``resize`` is true.

    ``mode``: "argmax" → mask [N, H, W] of ``mask_dtype``; "softmax" / "sigmoid" →
    probabilities [N, K, H, W]; "threshold" → binary mask (K == 1: sigmoid > t;
    K == 2: softmax[:, 1] > t); "logits" → the logits themselves.
    """
    y = x
    if weight is not None:
        w = weight if weight.dim() == 4 else weight[:, :, None, None]
        y = F.conv2d(y, w, bias)
    if resize:
        y = resize_like_aten(y, (out_h, out_w), "bilinear", align_corners, scale_h, scale_w)
    return _reduce(y, mode, threshold, mask_dtype)


head = torch.library.custom_op("segfast::head", mutates_args=())(head_impl)


def _reduce(y: Tensor, mode: str, threshold: float, mask_dtype: str) -> Tensor:
    if mode == "argmax":
        return y.argmax(dim=1).to(MASK_DTYPES[mask_dtype])
    if mode == "softmax":
        return torch.softmax(y, dim=1)
    if mode == "sigmoid":
        return torch.sigmoid(y)
    if mode == "logits":
        return y.clone()
    if mode == "threshold":
        if y.shape[1] == 1:
            p = torch.sigmoid(y[:, 0].float())
        elif y.shape[1] == 2:
            p = torch.softmax(y.float(), dim=1)[:, 1]
        else:
            raise ValueError(f"threshold needs 1 or 2 classes, got {y.shape[1]}")
        return (p > threshold).to(MASK_DTYPES[mask_dtype])
    raise ValueError(f"head mode must be one of {HEAD_MODES}, got {mode!r}")


@head.register_fake
def _(
    x,
    weight,
    bias,
    out_h,
    out_w,
    resize,
    align_corners,
    scale_h,
    scale_w,
    mode,
    threshold,
    mask_dtype,
):
    k = weight.shape[0] if weight is not None else x.shape[1]
    h, w = (out_h, out_w) if resize else (x.shape[2], x.shape[3])
    if mode in ("argmax", "threshold"):
        return x.new_empty((x.shape[0], h, w), dtype=MASK_DTYPES[mask_dtype])
    return x.new_empty((x.shape[0], k, h, w))


# -- int8: segfast::qconv2d, segfast::qconv_transpose2d ---------------------------------
#
# The quantized convolutions of an int8 engine (segfast.compiler.quant): the same
# arguments as their float ops, the weight as int8 with one scale per output channel
# (``w_scale``), and the input quantized per tensor, symmetrically, at ``x_scale``:
#     conv(q(x), q(w)),   q(x) = x_scale · clamp(round(x / x_scale), −128, 127)
# (scale = amax / 127, zero point 0, the int8 range of ONNX's QuantizeLinear,
# TensorRT's and oneDNN's: −128 is reached only below the calibrated range)
# The composite implementations compute exactly that in floating point ("fake
# quantization", the semantics of a Q/DQ graph); the CPU plan runs them on oneDNN's
# int8 convolutions and the Triton backend on its int8 kernel.

INT8_MAX = 127
INT8_MIN = -128


def fake_quant(x: Tensor, scale: float) -> Tensor:
    """``x`` quantized to int8 at ``scale`` (zero point 0, round half to even) and back."""
    return torch.clamp(torch.round(x / scale), INT8_MIN, INT8_MAX) * scale


def dequantize_weight(weight: Tensor, w_scale: Tensor, axis: int, dtype: torch.dtype) -> Tensor:
    """int8 ``weight`` × its per-channel ``w_scale`` along ``axis``, as ``dtype``."""
    shape = [1] * weight.dim()
    shape[axis] = -1
    return (weight.to(torch.float32) * w_scale.to(torch.float32).view(shape)).to(dtype)


def qconv2d_impl(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    act: str,
    act_param: float,
    residual: Tensor | None,
    residual_after_act: bool,
    x2: Tensor | None,
    x2_resize: str,
    x2_align_corners: bool,
    x2_scale_h: float | None,
    x2_scale_w: float | None,
    x2_first: bool,
    x_scale: float,
    w_scale: Tensor,
) -> Tensor:
    """``segfast::conv2d`` on int8: the (joined) input quantized at ``x_scale``, the int8
    weight dequantized by ``w_scale``; bias, activation and residual in floating point."""
    inp = join_sources(x, x2, x2_resize, x2_align_corners, x2_scale_h, x2_scale_w, x2_first)
    inp = fake_quant(inp, x_scale)
    w = dequantize_weight(weight, w_scale, 0, inp.dtype)
    return conv2d_impl(
        inp, w, bias, stride, padding, dilation, groups, act, act_param, residual,
        residual_after_act, None, "none", False, None, None, False,
    )  # fmt: skip


qconv2d = torch.library.custom_op("segfast::qconv2d", mutates_args=())(qconv2d_impl)


@qconv2d.register_fake
def _(
    x,
    weight,
    bias,
    stride,
    padding,
    dilation,
    groups,
    act,
    act_param,
    residual,
    residual_after_act,
    x2,
    x2_resize,
    x2_align_corners,
    x2_scale_h,
    x2_scale_w,
    x2_first,
    x_scale,
    w_scale,
):
    return _conv_fake(x, weight, stride, padding, dilation)


def qconv_transpose2d_impl(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    output_padding: list[int],
    dilation: list[int],
    groups: int,
    act: str,
    act_param: float,
    residual: Tensor | None,
    residual_after_act: bool,
    x_scale: float,
    w_scale: Tensor,
) -> Tensor:
    """``segfast::conv_transpose2d`` on int8 (groups 1: output channels on the weight's
    axis 1); see :func:`qconv2d_impl`."""
    xq = fake_quant(x, x_scale)
    w = dequantize_weight(weight, w_scale, 1, xq.dtype)
    return conv_transpose2d_impl(
        xq, w, bias, stride, padding, output_padding, dilation, groups, act, act_param,
        residual, residual_after_act,
    )  # fmt: skip


qconv_transpose2d = torch.library.custom_op("segfast::qconv_transpose2d", mutates_args=())(
    qconv_transpose2d_impl
)


@qconv_transpose2d.register_fake
def _(
    x,
    weight,
    bias,
    stride,
    padding,
    output_padding,
    dilation,
    groups,
    act,
    act_param,
    residual,
    residual_after_act,
    x_scale,
    w_scale,
):
    def size(i: int) -> int:
        k = weight.shape[2 + i]
        return (
            (x.shape[2 + i] - 1) * stride[i]
            - 2 * padding[i]
            + dilation[i] * (k - 1)
            + output_padding[i]
            + 1
        )

    out = x.new_empty((x.shape[0], weight.shape[1] * groups, size(0), size(1)))
    return out.contiguous(memory_format=_layout(x))
