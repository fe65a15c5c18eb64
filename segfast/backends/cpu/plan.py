"""The fused graph lowered to a flat plan for the CPU, and the loop that runs it.

Lowering walks the fused ``GraphModule`` once, in order:

- ``segfast.conv2d`` / ``segfast.conv_transpose2d`` with a constant weight in a
  dtype oneDNN takes (fp32, bf16) become :class:`~.onednn.PackedConv2d` /
  :class:`~.onednn.PackedConvTranspose2d` calls, packed for the example
  input's size (other sizes run too: oneDNN reorders when its choice differs);
- with segfast's CPU kernels loaded (:mod:`.native`), fp32 only: 3×3 stride-1
  dense convolutions with enough channels run by Winograd F(4×4, 3×3)
  (:mod:`.winograd`), heavy convolutions with 17–24 output channels (a class
  head) compute 24 lanes instead of oneDNN's 32 (:mod:`.narrow`), MobileNetV2's ``[1×1 expand →] depthwise → 1×1 project
  (+ residual)`` blocks with a large, narrow expanded tensor run as one kernel
  that never writes it (:mod:`.invres`; with AVX-512 and on AVX2), depthwise convolutions with atrous paddings oneDNN
  handles slowly run on :mod:`.depthwise`, and a depthwise convolution whose
  input is a large bilinear upsample read by nothing else computes the upsample
  band by band (:mod:`.resize_dw`) instead of reading it from memory — and
  when a pointwise conv reads that depthwise conv and the upsample is ≥ ×4 in
  area, the channel mixing moves to the source resolution (per-tap weights,
  :class:`~.resize_dw.UpsampleSeparableConv2d`); a bilinear
  upsample of the logits that ends the graph writes them NCHW, and the
  ``segfast.head`` argmax takes the mask from the (resized) logits without
  writing full-resolution logits (:mod:`.resize`); on CPUs without AVX-512, dense 1×1
  convs (and gated ones, the gate folded into the weight) run as one MKL GEMM over the
  pixel rows (:mod:`.gemm1x1`), faster than oneDNN's 1×1 kernels there;
- ``max_pool2d_with_indices`` whose indices nobody reads becomes
  ``max_pool2d`` (the indices are a second full-size int64 write);
- ``segfast.head`` calls its composite implementation directly (no custom-op
  dispatch, ~40 µs a call), and so do ``segfast.se_gate`` and
  ``segfast.group_norm``; ``segfast.conv2d_gated`` becomes ``conv(x · gate)`` on a
  packed oneDNN conv (:class:`GatedPackedConv2d`: on the CPU the product beats
  re-packing a gate-scaled weight per call);
- every other node calls its target as the graph does.

Running the plan is a loop over steps with a list of value slots; each slot is
released after its last reader, so a buffer's memory goes back to the
allocator as soon as possible and the next allocation of that size reuses
cache-warm memory.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from segfast.backends.cpu import (
    entry,
    gemm1x1,
    int8,
    invres,
    narrow,
    resized_concat,
    se_gate,
    subpixel,
    winograd,
)
from segfast.backends.cpu.depthwise import (
    ACT_CODES,
    NativeDepthwiseConv2d,
    is_depthwise,
    vec8_worthwhile,
)
from segfast.backends.cpu.native import Native
from segfast.backends.cpu.onednn import DTYPES, PackedConv2d, PackedConvTranspose2d, unary_attr
from segfast.backends.cpu.resize import NativeResize
from segfast.backends.cpu.resize_dw import MIN_BYTES, ResizeDepthwiseConv2d, UpsampleSeparableConv2d
from segfast.compiler import ops
from segfast.compiler.graph import get_tensor, is_call, val
from segfast.compiler.patterns import Resample, channel_concat, resample_of, zero_pad_sides

aten = torch.ops.aten
segfast_ops = torch.ops.segfast


class _Slot:
    """A reference to a value slot inside step arguments."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"%{self.index}"


def _resolver(template: Any) -> Callable[[list[Any]], Any]:
    """A function that builds the real argument(s) from the slot list."""
    if isinstance(template, _Slot):
        i = template.index
        return lambda env: env[i]
    if isinstance(template, dict) and _has_slot(template):
        items = [(k, _resolver(v)) for k, v in template.items()]
        return lambda env: {k: r(env) for k, r in items}
    if isinstance(template, list | tuple) and _has_slot(template):
        parts = [_resolver(t) for t in template]
        kind = type(template)
        return lambda env: kind(p(env) for p in parts)
    return lambda env: template


def _has_slot(template: Any) -> bool:
    if isinstance(template, _Slot):
        return True
    if isinstance(template, dict):
        return any(_has_slot(t) for t in template.values())
    if isinstance(template, list | tuple):
        return any(_has_slot(t) for t in template)
    return False


@dataclass
class Step:
    fn: Callable[..., Any]
    args: Callable[[list[Any]], tuple[Any, ...]]
    kwargs: Callable[[list[Any]], dict[str, Any]]
    out: int
    free: tuple[int, ...]
    name: str


class Plan:
    """The lowered graph: ``plan(*inputs)`` runs it."""

    def __init__(
        self, steps: list[Step], inputs: list[int], output: Any, n_slots: int, lowered: Counter
    ) -> None:
        self.steps = steps
        self.inputs = inputs
        self.output = _resolver(output)
        self.n_slots = n_slots
        self.lowered = lowered

    def __call__(self, *inputs: torch.Tensor) -> Any:
        env: list[Any] = [None] * self.n_slots
        for i, t in zip(self.inputs, inputs, strict=True):
            env[i] = t
        for step in self.steps:
            env[step.out] = step.fn(*step.args(env), **step.kwargs(env))
            for i in step.free:
                env[i] = None
        return self.output(env)


def _method(name: str) -> Callable[..., Any]:
    """A ``call_method`` node's call: the method of its first argument."""
    return lambda obj, *args, **kwargs: getattr(obj, name)(*args, **kwargs)


def _pool_no_indices(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    """``max_pool2d_with_indices`` for a graph that reads only the values."""
    out = torch.nn.functional.max_pool2d(x, kernel_size, stride or None, padding, dilation,
                                         ceil_mode)  # fmt: skip
    return out, None


def _only_values_read(node: fx.Node) -> bool:
    return all(is_call(u, operator.getitem) and u.args[1] == 0 for u in node.users)


def _onednn_constants(
    gm: fx.GraphModule, w: Any, b: Any, act: str, act_param: float
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A conv's weight and bias, when both are CPU constants in a dtype oneDNN
    takes and its activation is a oneDNN post-op; else None."""
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return None
    if b is not None and (not isinstance(b, fx.Node) or b.op != "get_attr"):
        return None
    weight = get_tensor(gm, w)
    bias = None if b is None else get_tensor(gm, b)
    if weight.dtype not in DTYPES or (bias is not None and bias.dtype != weight.dtype):
        return None
    if weight.device.type != "cpu" or unary_attr(act, act_param) is None:
        return None
    return weight, bias


def _static_dims(v: Any) -> tuple[int | None, int | None, int | None]:
    """(N, H, W) of a 4-D value, None for each symbolic one."""
    return tuple(d if isinstance(d, int) else None for d in (v.shape[0], *v.shape[2:]))  # type: ignore[return-value]


def _gemm_1x1(
    native: Native | None, use_avx2: bool, weight: torch.Tensor, stride: Any, padding: Any,
    dilation: Any, groups: int, x_value: Any,
) -> bool:  # fmt: skip
    """Whether a conv of ``weight`` over ``x_value`` (its fake tensor) runs as one MKL
    GEMM (:mod:`.gemm1x1`): a dense 1×1 with a static output that is small (no AVX-512:
    up to 2 MB; with AVX-512: a small layer, :func:`.gemm1x1.small`)."""
    if not (
        native is not None
        and use_avx2
        and gemm1x1.available()
        and gemm1x1.applies(weight, stride, padding, dilation, groups)
    ):
        return False
    n, h, w = _static_dims(x_value)
    k, c = int(weight.shape[0]), int(weight.shape[1])
    if _eight_lane(native, use_avx2):
        return gemm1x1.worthwhile(n, h, w, k)
    return native.wide_vectors and gemm1x1.small(n, h, w, c, k)


def _static_width(node: Any) -> int | None:
    """A node's width (last axis), or None where it is symbolic."""
    w = val(node).shape[-1]
    return w if isinstance(w, int) else None


def _eight_lane(native: Native | None, use_avx2: bool) -> bool:
    """Whether the 8-lane depthwise kernel (sf_dwconv8) may run: no AVX-512 (there
    oneDNN's depthwise kernels beat it 1.0–4×: measured on a Zen 4), AVX2 and FMA, and
    not turned off (``avx2_kernels``)."""
    return _few_output(native, use_avx2) and not native.wide_vectors


def _few_output(native: Native | None, use_avx2: bool) -> bool:
    """Whether sf_conv_few (1–4 output channels, 8-lane) may run: AVX2 and FMA, with or
    without AVX-512 — oneDNN has no good kernel for so few outputs on either (2 cores
    of a Zen 4 with AVX-512: 16→1 3×3 at 256² 1.56 → 0.32 ms, 32→1 3×3 at 512² 13.7 →
    3.8, 256→4 3×3 at 64² 1.48 → 0.73, 64→2 1×1 at 256² 1.94 → 1.21) — and not turned
    off (``avx2_kernels``)."""
    return native is not None and use_avx2 and native.avx2


def _pads_into_depthwise(
    gm: fx.GraphModule, native: Native | None, use_avx2: bool
) -> dict[fx.Node, tuple[fx.Node, tuple[int, int, int, int]]]:
    """Zero pads (asymmetric ones: the compiler folded the symmetric) read only by fp32
    depthwise convs, as their one input: {conv: (the pad's input, (top, bottom, left,
    right))}. Where ``sf_dwconv8`` runs (no AVX-512, AVX2) those convs take the pad as
    their padding — it reads zeros past the map anyway — and the padded copy (e.g.
    efficientnet-pytorch's "same" padding before each stride-2 depthwise conv: 96
    channels at 128² is 6 MB) is never written. Measured on 2 AVX2 cores, pad + oneDNN
    → folded: 96 ch 3×3 s2 at 128² 1.03 → 0.73 ms, 144 ch 5×5 s2 at 64² 0.61 → 0.36,
    672 ch 5×5 s2 at 16² 0.27 → 0.13."""
    if not _eight_lane(native, use_avx2):
        return {}
    found = {}
    for pad in gm.graph.nodes:
        sides = zero_pad_sides(pad)
        users = list(pad.users)
        if sides is None or not users:
            continue
        if all(_plain_depthwise_of(gm, c, pad) for c in users):
            for c in users:
                found[c] = (pad.args[0], sides)
    return found


def _plain_depthwise_of(gm: fx.GraphModule, conv: fx.Node, x: fx.Node) -> bool:
    """``conv`` is an fp32 depthwise ``segfast.conv2d`` reading ``x`` as its one source."""
    if not is_call(conv, segfast_ops.conv2d.default, ops.conv2d_impl):
        return False
    a = conv.args
    if a[0] is not x or a[11] is not None or x in a[1:]:
        return False
    w = _const(gm, a[1])
    b_ok = a[2] is None or _const(gm, a[2]) is not None
    return w is not None and b_ok and is_depthwise(w, a[6])


_SUBPIXEL = "conv2d 3×3 of a ×2 nearest upsample, at the source resolution (segfast kernel)"


def _pixels(v: Any) -> int | None:
    """H·W of a 4-D value, None where either is symbolic."""
    h, w = v.shape[2:]
    return h * w if isinstance(h, int) and isinstance(w, int) else None


def _twice(low: Any, full: Any) -> bool:
    """Whether ``full``'s H×W can be ``low``'s ×2 (static sizes must be; symbolic
    ones are checked on every call)."""
    for a, b in zip(low.shape[2:], full.shape[2:], strict=True):
        if isinstance(a, int) and isinstance(b, int) and b != 2 * a:
            return False
    return True


def _takes_few(
    native: Native, use_avx2: bool, weight: torch.Tensor, stride: Any, dilation: Any,
    groups: int, act: str, x_value: Any,
) -> bool:  # fmt: skip
    """Whether ``sf_conv_few`` (1–4 outputs) runs a single-source conv without a
    residual over ``x_value`` (its fake tensor)."""
    width = x_value.shape[-1]
    return (
        _few_output(native, use_avx2)
        and act in ACT_CODES
        and narrow.few_applies(weight, stride, dilation, groups)
        and narrow.few_worthwhile(int(weight.shape[1]), int(weight.shape[2]),
                                  int(weight.shape[3]), width if isinstance(width, int) else None)
    )  # fmt: skip


def _takes_narrow(
    native: Native, weight: torch.Tensor, stride: Any, groups: int, act: str, x_value: Any
) -> bool:
    """Whether ``sf_conv_narrow`` (17–24 outputs, AVX-512) runs a single-source conv
    without a residual over ``x_value``."""
    return (
        native.wide_vectors
        and act in ACT_CODES
        and narrow.applies(weight, stride, groups)
        and narrow.worthwhile(int(weight.shape[1]), int(weight.shape[2]), int(weight.shape[3]),
                              *(d if isinstance(d, int) else None for d in x_value.shape[2:]))
    )  # fmt: skip


def _takes_winograd(
    native: Native, use_winograd: bool, weight: torch.Tensor, stride: Any, dilation: Any,
    groups: int, x_value: Any,
) -> bool:  # fmt: skip
    """Whether a conv over ``x_value`` takes Winograd F(4×4, 3×3) (symbolic sizes count
    as large, a dynamic batch as 1)."""
    h, w = (d if isinstance(d, int) else 1 << 30 for d in x_value.shape[2:])
    n = x_value.shape[0] if isinstance(x_value.shape[0], int) else 1
    return (
        use_winograd
        and winograd.applies(weight, stride, dilation, groups)
        and winograd.worthwhile(int(weight.shape[1]), int(weight.shape[0]), h, w,
                                native.wide_vectors, n)
    )  # fmt: skip


def _through_layout_fix(node: Any) -> tuple[Any, list[fx.Node]]:
    """What ``node`` converts where it is the layout pass's ``to_nhwc`` read once, with
    ``[node]`` (a fusion that reads past it absorbs it); else ``(node, [])``."""
    if isinstance(node, fx.Node) and is_call(node, ops.to_nhwc) and len(node.users) == 1:
        return node.args[0], [node]
    return node, []


def _nearest_up_convs(
    gm: fx.GraphModule, native: Native | None, use_winograd: bool, use_avx2: bool
) -> dict[fx.Node, tuple[Resample, list[fx.Node]]]:
    """Single-source convs that read a ×2 nearest upsample alone and take
    :mod:`.subpixel` (smp U-Net's last decoder block): conv → (the upsample, and the
    upsample node with its layout fix, which the conv absorbs). A conv that
    ``sf_conv_few`` (1–4 outputs) or ``sf_conv_narrow`` (17–24, AVX-512) would take
    keeps that kernel: not measured against this."""
    found: dict[fx.Node, tuple[Resample, list[fx.Node]]] = {}
    if native is None:
        return found
    for node in gm.graph.nodes:
        if not (is_call(node, segfast_ops.conv2d.default) or is_call(node, ops.conv2d_impl)):
            continue
        (x, w, b, stride, padding, dilation, groups, act, act_param, residual, _, x2,
         *_) = node.args  # fmt: skip
        if x2 is not None or residual is not None or not isinstance(x, fx.Node):
            continue
        up, absorbed = _through_layout_fix(x)
        rs = resample_of(up) if isinstance(up, fx.Node) else None
        if rs is None or len(up.users) != 1 or not isinstance(rs.input, fx.Node):
            continue
        constants = _onednn_constants(gm, w, b, act, act_param)
        if constants is None:
            continue
        weight = constants[0]
        if not subpixel.applies(weight, stride, padding, dilation, groups, rs.mode,
                                (rs.scale_h, rs.scale_w), act):  # fmt: skip
            continue
        low, full = val(rs.input), val(up)
        # the size must follow from the input: scale factors 2, or static sizes ×2
        scaled = rs.scale_h is not None and rs.scale_w is not None
        static = all(isinstance(d, int) for d in (*low.shape[2:], *full.shape[2:]))
        if not (scaled or static) or not _twice(low, full):
            continue
        if _takes_few(native, use_avx2, weight, stride, dilation, groups, act, full) or (
            _takes_narrow(native, weight, stride, groups, act, full)
        ):
            continue  # their own kernels: not measured against this
        wino = _takes_winograd(native, use_winograd, weight, stride, dilation, groups, full)
        if subpixel.preferred(int(weight.shape[1]), 0, int(weight.shape[0]), wino, _pixels(low)):
            found[node] = (rs, [up, *absorbed])
    return found


def _resized_concats(
    gm: fx.GraphModule,
) -> dict[fx.Node, tuple[list[Any], list[Any], list[resized_concat.Part], list[fx.Node]]]:
    """1×1 convs of a channel concat with upsampled parts worth convolving at their
    source resolution (:mod:`.resized_concat`): {conv: (each part's source, each
    upsampled part's output size or None, the parts, the nodes the step absorbs — the
    concat, the upsamples and their layout fixes)}. Every absorbed node has that one
    reader."""
    found = {}
    for node in gm.graph.nodes:
        if not is_call(node, segfast_ops.conv2d.default, ops.conv2d_impl):
            continue
        (x, w, b, stride, padding, dilation, groups, act, act_param, residual, _, x2,
         *_) = node.args  # fmt: skip
        if x2 is not None or residual is not None or not isinstance(x, fx.Node):
            continue
        constants = _onednn_constants(gm, w, b, act, act_param)
        if constants is None:
            continue
        weight = constants[0]
        if (
            weight.dtype not in resized_concat.DTYPES
            or tuple(weight.shape[2:]) != (1, 1)
            or int(groups) != 1
            or [int(v) for v in (*stride, *padding, *dilation)] != [1, 1, 0, 0, 1, 1]
        ):
            continue
        cat, absorbed = _through_layout_fix(x)
        parts = channel_concat(cat) if isinstance(cat, fx.Node) else None
        if parts is None or len(cat.users) != 1 or not all(isinstance(p, fx.Node) for p in parts):
            continue
        absorbed.append(cat)
        out_pixels = _pixels(val(cat))
        sources, sizes, specs = [], [], []
        for p in parts:
            up, chain = _through_layout_fix(p)
            rs = resample_of(up) if isinstance(up, fx.Node) else None
            size = rs.size_for_graph() if rs is not None else None
            c = int(val(p).shape[1])
            if (
                rs is not None
                and size is not None
                and len(up.users) == 1
                and isinstance(rs.input, fx.Node)
                and resized_concat.worthwhile(c, _pixels(val(rs.input)), out_pixels)
            ):
                specs.append(resized_concat.Part(c, True, rs.mode, rs.align_corners,
                                                 rs.scale_h, rs.scale_w))  # fmt: skip
                sources.append(rs.input)
                sizes.append(list(size))
                absorbed += [up, *chain]
            else:
                specs.append(resized_concat.Part(c, False))
                sources.append(p)
                sizes.append(None)
        if any(spec.resize for spec in specs) and len(set(absorbed)) == len(absorbed):
            found[node] = (sources, sizes, specs, absorbed)
    return found


def _resized_concat_step(
    gm: fx.GraphModule, node: fx.Node, spec: tuple[list[Any], list[Any], list[Any], list[Any]]
) -> tuple[Callable, tuple]:
    sources, sizes, parts, _ = spec
    (_, w, b, _, _, _, _, act, act_param, *_) = node.args
    weight, bias = _onednn_constants(gm, w, b, act, act_param)  # type: ignore[misc]
    conv = resized_concat.ResizedConcatConv1x1(
        weight, bias, act, act_param, parts, [tuple(val(s).shape) for s in sources]
    )
    args: list[Any] = []
    for src, size in zip(sources, sizes, strict=True):
        args += [src, size]
    return conv, tuple(args)


_RESIZED_CONCAT = "conv2d 1×1 of a concat of upsamples, at the sources' resolutions"


def _subpixel_step(
    gm: fx.GraphModule, native: Native, node: fx.Node, rs: Resample
) -> tuple[Callable, tuple]:
    (_, w, b, _, _, _, _, act, act_param, *_) = node.args
    weight, bias = _onednn_constants(gm, w, b, act, act_param)  # type: ignore[misc]
    conv = subpixel.NearestUpConv3x3(
        native, weight, bias, act, act_param, int(weight.shape[1]), True, rs.mode,
        (rs.scale_h, rs.scale_w), up_size=tuple(val(rs.input).shape),
    )  # fmt: skip
    return conv, (None, None, rs.input)


def _conv2d_step(
    gm: fx.GraphModule,
    node: fx.Node,
    native: Native | None,
    use_winograd: bool,
    use_avx2: bool = True,
    folded_pad: tuple[fx.Node, tuple[int, int, int, int]] | None = None,
    use_subpixel: bool = True,
) -> tuple[Callable, tuple, str] | None:
    (x, w, b, stride, padding, dilation, groups, act, act_param, residual, residual_after_act,
     x2, x2_resize, x2_align, x2_sh, x2_sw, x2_first) = node.args  # fmt: skip
    if folded_pad is not None and native is not None:  # see _pads_into_depthwise
        weight = get_tensor(gm, w)
        bias = None if b is None else get_tensor(gm, b)
        src, (top, bottom, left, right) = folded_pad
        ph, pw = (int(p) for p in padding)
        conv = NativeDepthwiseConv2d(
            native, weight, bias, stride, [ph + top, pw + left], dilation, act, act_param,
            residual_after_act, vec8=True, pad_end=[ph + bottom, pw + right],
        )  # fmt: skip
        return conv, (src, residual), "depthwise conv2d (segfast kernel, 8-lane, pad folded)"
    constants = _onednn_constants(gm, w, b, act, act_param)
    if constants is None:
        return None
    weight, bias = constants
    xv = val(x)
    x2_channels = None if x2 is None else int(val(x2).shape[1])
    if native is not None and weight.dtype == torch.float32:
        direct = native.wide_vectors  # see Native.wide_vectors
        if (
            direct
            and x2 is None
            and is_depthwise(weight, groups)
            and max(padding) > ops.dw_max_inline_pad()
        ):
            conv = NativeDepthwiseConv2d(native, weight, bias, stride, padding, dilation, act,
                                         act_param, residual_after_act)  # fmt: skip
            return conv, (x, residual), "depthwise conv2d (segfast kernel, atrous)"
        if (
            _eight_lane(native, use_avx2)
            and x2 is None
            and is_depthwise(weight, groups)
            and vec8_worthwhile(weight.shape[2:], stride, padding, dilation, _static_width(node))
        ):
            conv = NativeDepthwiseConv2d(native, weight, bias, stride, padding, dilation, act,
                                         act_param, residual_after_act, vec8=True)  # fmt: skip
            return conv, (x, residual), "depthwise conv2d (segfast kernel, 8-lane)"
        if (
            x2 is None
            and residual is None
            and _takes_few(native, use_avx2, weight, stride, dilation, groups, act, xv)
        ):
            conv = narrow.FewOutputConv2d(native, weight, bias, padding, act, act_param)
            return conv, (x,), "conv2d with 1–4 output channels (segfast kernel)"
        if x2 is None and _gemm_1x1(
            native, use_avx2, weight, stride, padding, dilation, groups, xv
        ):
            conv = gemm1x1.GemmConv1x1(weight, bias, act, act_param, residual_after_act)
            return conv, (x, residual), _GEMM_1X1
        if (
            x2 is None
            and residual is None
            and _takes_narrow(native, weight, stride, groups, act, xv)
        ):
            conv = narrow.NarrowConv2d(native, weight, bias, padding, dilation, act, act_param)
            return conv, (x,), "conv2d with 17–24 output channels (segfast kernel)"
    if native is not None and weight.dtype in subpixel.DTYPES:  # fp32 from above, or bf16
        c_in = int(weight.shape[1])
        wino = weight.dtype == torch.float32 and _takes_winograd(
            native, use_winograd, weight, stride, dilation, groups, xv
        )
        if (
            use_subpixel
            and x2 is not None
            and residual is None
            and c_in > int(x2_channels)
            and subpixel.applies(weight, stride, padding, dilation, groups, x2_resize,
                                 (x2_sh, x2_sw), act)
            and _twice(val(x2), xv)
            and subpixel.preferred(int(x2_channels), c_in - int(x2_channels),
                                   int(weight.shape[0]), wino, _pixels(val(x2)))
        ):  # fmt: skip
            conv = subpixel.NearestUpConv3x3(
                native, weight, bias, act, act_param, int(x2_channels), bool(x2_first),
                x2_resize, (x2_sh, x2_sw), up_size=tuple(val(x2).shape), skip_size=tuple(xv.shape),
            )  # fmt: skip
            return conv, (x, residual, x2), _SUBPIXEL + " two-source"
        if wino:
            conv = winograd.WinogradConv2d(
                native, weight, bias, padding, act, act_param, residual_after_act,
                x2_resize, x2_align, x2_sh, x2_sw, x2_first,
            )  # fmt: skip
            kind = "conv2d 3×3 Winograd F(4×4,3×3)" + (" two-source" if x2 is not None else "")
            return conv, (x, residual, x2), kind
    # Packed for the example's size; the two-source halves for x's H×W.
    conv = PackedConv2d(
        weight, bias, stride, padding, dilation, groups, act, act_param, residual_after_act,
        x2_resize, x2_align, x2_sh, x2_sw, x2_first,
        input_size=tuple(xv.shape), x2_channels=x2_channels,
    )  # fmt: skip
    kind = "conv2d (two-source, split-K)" if x2 is not None else "conv2d"
    return conv, (x, residual, x2), kind


class GatedPackedConv2d:
    """``segfast.conv2d_gated`` on a packed oneDNN conv: ``conv(x · gate)``.

    On the CPU the product is the cheaper form: the gated tensor of an SE block
    (e.g. 960×32×32, 3.9 MB) is written and read back from cache (0.07 ms on 2 AVX2
    cores), where folding the gate into a per-image weight costs oneDNN's weight
    reorder on every call (a 960→160 1×1 conv: 2.60 ms folded, 2.35 ms packed with
    the product, measured here). The Triton kernel applies the gate as it reads x.
    """

    def __init__(self, conv: PackedConv2d) -> None:
        self.conv = conv

    def __call__(
        self, x: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor | None
    ) -> torch.Tensor:
        return self.conv(torch.mul(x, gate), residual)


_GEMM_1X1 = "conv2d 1×1 as one GEMM (MKL)"
_GATED_GEMM_1X1 = "conv2d 1×1 of x · SE gate, the gate folded into the weight (MKL)"


def _gated_step(
    gm: fx.GraphModule, node: fx.Node, native: Native | None = None, use_avx2: bool = True
) -> tuple[Callable, tuple, str] | None:
    (x, gate, w, b, stride, padding, dilation, groups, act, act_param, residual,
     residual_after_act) = node.args  # fmt: skip
    constants = _onednn_constants(gm, w, b, act, act_param)
    if constants is None:
        return None
    weight, bias = constants
    if _gemm_1x1(native, use_avx2, weight, stride, padding, dilation, groups, val(x)):
        gemm = gemm1x1.GatedGemmConv1x1(weight, bias, act, act_param, residual_after_act)
        return gemm, (x, gate, residual), _GATED_GEMM_1X1
    conv = PackedConv2d(
        weight, bias, stride, padding, dilation, groups, act, act_param, residual_after_act,
        "none", False, None, None, False, input_size=tuple(val(x).shape),
    )  # fmt: skip
    return GatedPackedConv2d(conv), (x, gate, residual), "conv2d of x · SE gate (oneDNN, packed)"


def _se_gate_step(
    gm: fx.GraphModule, node: fx.Node, native: Native
) -> tuple[Callable, tuple] | None:
    """``segfast.se_gate`` on ``sf_se_gate`` when its weights are constants and its
    activations the kernel's; else None (the composite runs it)."""
    p, w1, b1, act1, act1_param, w2, b2, act2, act2_param = node.args
    floats = (torch.float32, torch.bfloat16)
    consts = [_const(gm, t, floats) for t in (w1, b1, w2, b2)]
    if consts[0] is None or any(
        c is None for c, t in zip(consts, (w1, b1, w2, b2), strict=True) if t is not None
    ):
        return None
    if not se_gate.applies(act1, consts[2], act2):
        return None
    cw1, cb1, cw2, cb2 = consts
    gate = se_gate.NativeSEGate(native, cw1, cb1, act1, act1_param, cw2, cb2, act2, act2_param)
    return gate, (p,)


def _conv_transpose_step(gm: fx.GraphModule, node: fx.Node) -> tuple[Callable, tuple] | None:
    (x, w, b, stride, padding, output_padding, dilation, groups, act, act_param, residual,
     residual_after_act) = node.args  # fmt: skip
    constants = _onednn_constants(gm, w, b, act, act_param)
    if constants is None:
        return None
    weight, bias = constants
    conv = PackedConvTranspose2d(
        weight, bias, stride, padding, output_padding, dilation, groups, act, act_param,
        residual_after_act, input_size=tuple(val(x).shape),
    )  # fmt: skip
    return conv, (x, residual)


def _qconv2d_step(
    gm: fx.GraphModule,
    node: fx.Node,
    native: Native | None = None,
    use_winograd: bool = True,
    use_avx2: bool = True,
    int8_w7: bool = False,
) -> tuple[Callable, tuple, str]:
    (x, w, b, stride, padding, dilation, groups, act, act_param, residual, residual_after_act,
     x2, x2_resize, x2_align, x2_sh, x2_sw, x2_first, x_scale, w_scale) = node.args  # fmt: skip
    weight, scales = get_tensor(gm, w), get_tensor(gm, w_scale)
    bias = None if b is None else get_tensor(gm, b)
    nonneg = int8.nonnegative(x) and (x2 is None or int8.nonnegative(x2))
    # 7-bit weights for dense convs only: oneDNN's int8 depthwise at zero point 128 is
    # slower than its fp32 one (see int8.choose_mode)
    mode = int8.choose_mode(nonneg, w7=int8_w7 and int(groups) == 1)
    fp32_conv, kind = None, _QCONV_KINDS[mode]
    if mode == "fp32":
        fp32_conv, kind = _int8_on_fp32(node, native, use_winograd, use_avx2, weight, scales, bias)
    conv = int8.PackedQConv2d(
        weight, scales, bias, stride, padding, dilation, groups, act, act_param,
        residual_after_act, (x2_resize, x2_align, x2_sh, x2_sw, x2_first), x_scale,
        input_size=tuple(val(x).shape), nonneg=nonneg, mode=mode, fp32_conv=fp32_conv,
    )  # fmt: skip
    return conv, (x, residual, x2), kind


def _int8_on_fp32(
    node: fx.Node,
    native: Native | None,
    use_winograd: bool,
    use_avx2: bool,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[Callable, str]:
    """The fp32 conv an int8 conv runs on where this CPU's int8 sums would saturate:
    the one the fp32 plan would run for the layer — Winograd where it would take it
    (the int8 conv's own oneDNN int8 kernel is ~2× its fp32 direct conv on AVX2, so a
    Winograd layer loses nothing), a 1×1 as one MKL GEMM where AVX-512 is absent
    (:mod:`.gemm1x1`), else oneDNN's packed fp32 conv; two sources are joined by the
    conv (split-K), not concatenated. Called as ``conv(x, residual,
    x2)`` with the sources quantized, in order and resized (see
    :class:`segfast.backends.cpu.int8.PackedQConv2d`)."""
    (x, _, _, stride, padding, dilation, groups, act, act_param, _, residual_after_act, x2,
     _, _, _, _, x2_first) = node.args[:17]  # fmt: skip
    wd = ops.dequantize_weight(weight, w_scale, 0, torch.float32)
    bias = None if bias is None else bias.float()
    xv = val(x)
    n, c_x, h, w_ = (d if isinstance(d, int) else None for d in xv.shape)
    c_in = int(weight.shape[1]) * int(groups)
    if (
        native is not None
        and use_winograd
        and winograd.applies(wd, stride, dilation, groups)
        and h is not None
        and w_ is not None
        and winograd.worthwhile(c_in, int(wd.shape[0]), h, w_, native.wide_vectors, n or 1)
    ):
        conv = winograd.WinogradConv2d(native, wd, bias, padding, act, act_param,
                                       residual_after_act)  # fmt: skip
        return conv, "int8 conv2d on fp32 Winograd (no VNNI: int8 sums would saturate)"
    if x2 is None and _gemm_1x1(native, use_avx2, wd, stride, padding, dilation, groups, xv):
        gemm = gemm1x1.GemmConv1x1(wd, bias, act, act_param, residual_after_act)
        return gemm, "int8 conv2d 1×1 on one fp32 GEMM (MKL; no VNNI: int8 sums would saturate)"
    x2_channels = None
    size = tuple(xv.shape)
    if x2 is not None and isinstance(c_x, int):
        c_second = c_in - c_x if not x2_first else c_x  # the sources come in order
        c_first = c_in - c_second
        x2_channels = c_second
        size = (xv.shape[0], c_first, *xv.shape[2:])
    conv = PackedConv2d(
        wd, bias, stride, padding, dilation, groups, act, act_param, residual_after_act,
        "none", False, None, None, False, input_size=size, x2_channels=x2_channels,
    )  # fmt: skip
    return conv, _QCONV_KINDS["fp32"]


_QCONV_KINDS = {
    "int8": "int8 conv2d (oneDNN)",
    "int8-nonneg": "int8 conv2d (oneDNN, input >= 0: zero point 0)",
    "int8-w7": "int8 conv2d (oneDNN, 7-bit weights: exact without VNNI)",
    "fp32": "int8 conv2d on oneDNN fp32 (this CPU's int8 sums would saturate: no VNNI)",
}


def _qconv_transpose_step(
    gm: fx.GraphModule, node: fx.Node, int8_w7: bool = False
) -> tuple[Callable, tuple]:
    (x, w, b, stride, padding, output_padding, dilation, groups, act, act_param, residual,
     residual_after_act, x_scale, w_scale) = node.args  # fmt: skip
    nonneg = int8.nonnegative(x)
    conv = int8.QConvTranspose2d(
        get_tensor(gm, w), get_tensor(gm, w_scale), None if b is None else get_tensor(gm, b),
        stride, padding, output_padding, dilation, groups, act, act_param, residual_after_act,
        x_scale, input_size=tuple(val(x).shape), nonneg=nonneg,
        mode=int8.choose_mode(nonneg, w7=int8_w7 and int(groups) == 1),
    )  # fmt: skip
    return conv, (x, residual)


_QCONV_TRANSPOSE_KINDS = {
    "int8": "int8 conv_transpose2d, kernel = stride: 1×1 int8 conv + depth-to-space (oneDNN)",
    "int8-nonneg": (
        "int8 conv_transpose2d, kernel = stride: 1×1 int8 conv + depth-to-space "
        "(oneDNN, input >= 0: zero point 0)"
    ),
    "int8-w7": (
        "int8 conv_transpose2d, kernel = stride: 1×1 int8 conv + depth-to-space "
        "(oneDNN, 7-bit weights: exact without VNNI)"
    ),
    "fp32": "int8-input conv_transpose2d (oneDNN fp32, dequantized weight)",
}


def _const(
    gm: fx.GraphModule, node: Any, dtypes: tuple[torch.dtype, ...] = (torch.float32,)
) -> torch.Tensor | None:
    """A CPU constant in one of ``dtypes`` (fp32 unless told), else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    t = get_tensor(gm, node)
    return t if t.dtype in dtypes and t.device.type == "cpu" else None


def _plain_depthwise(
    gm: fx.GraphModule, node: fx.Node, dtypes: tuple[torch.dtype, ...] = (torch.float32,)
) -> bool:
    """A depthwise ``segfast.conv2d`` (weights in ``dtypes``) with one source, no
    residual and an activation segfast_cpu.c applies."""
    if not is_call(node, segfast_ops.conv2d.default, ops.conv2d_impl):
        return False
    a = node.args
    w = _const(gm, a[1], dtypes)
    if w is None or not is_depthwise(w, a[6]) or a[9] is not None or a[11] is not None:
        return False
    return (a[2] is None or _const(gm, a[2], dtypes) is not None) and a[7] in ACT_CODES


def _bilinear_behind_layout_fix(node: Any) -> tuple[fx.Node, list[fx.Node]] | None:
    """A bilinear upsample read once, possibly through the layout pass's
    ``to_nhwc`` (read once too): (the upsample, [it, the layout fix if any])."""
    absorbed = []
    if is_call(node, ops.to_nhwc) and len(node.users) == 1:
        absorbed.append(node)
        node = node.args[0]
    rs = resample_of(node) if isinstance(node, fx.Node) else None
    if rs is None or rs.mode != "bilinear" or len(node.users) != 1 or rs.size_for_graph() is None:
        return None
    return node, [node, *absorbed]


def _upsample_into(
    node: Any, dtypes: tuple[torch.dtype, ...] = (torch.float32,)
) -> tuple[fx.Node, list[fx.Node]] | None:
    """The bilinear upsample (and its layout fix) feeding only a depthwise conv,
    if its output is large: (upsample node, nodes the fusion absorbs)."""
    up = _bilinear_behind_layout_fix(node)
    if up is None:
        return None
    v = val(up[0])
    if v.dtype not in dtypes or not all(isinstance(d, int) for d in v.shape):
        return None
    if v.numel() * v.element_size() < MIN_BYTES:  # small maps stay in cache unfused
        return None
    return up


def _fusions(
    gm: fx.GraphModule, dtypes: tuple[torch.dtype, ...] = (torch.float32,)
) -> tuple[dict[fx.Node, fx.Node], dict[fx.Node, list[fx.Node]]]:
    """Depthwise convs (weights in ``dtypes``) that compute their upsampled input
    themselves: ({depthwise conv: upsample}, {depthwise conv: nodes it absorbs})."""
    fused: dict[fx.Node, fx.Node] = {}
    absorbed: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if not _plain_depthwise(gm, node, dtypes):
            continue
        up = _upsample_into(node.args[0], dtypes)
        if up is not None:
            fused[node] = up[0]
            absorbed[node] = up[1]
    return fused, absorbed


def _separable_after_upsample(
    gm: fx.GraphModule, fused: dict[fx.Node, fx.Node]
) -> dict[fx.Node, tuple[fx.Node, fx.Node, slice, fx.Node | None]]:
    """Pointwise convs reading a fused upsample→depthwise conv whose channel
    mixing is cheaper at the source resolution:
    {pointwise: (depthwise, upsample, its weight columns, other source or None)}."""
    out: dict[fx.Node, tuple[fx.Node, fx.Node, slice, fx.Node | None]] = {}
    for node in gm.graph.nodes:
        if not _pointwise_conv(gm, node, DTYPES) or node.args[9] is not None:
            continue
        a = node.args
        w = get_tensor(gm, a[1])
        x, x2, x2_resize, x2_first = a[0], a[11], a[12], a[16]
        cx = int(val(x).shape[1])
        c2 = 0 if x2 is None else int(val(x2).shape[1])
        if x in fused and (x2 is None or x2_resize == "none"):
            dw, other, cols = x, x2, slice(c2, c2 + cx) if x2_first else slice(0, cx)
        elif x2 is not None and x2 in fused and x2_resize == "none":
            dw, other, cols = x2, x, slice(0, c2) if x2_first else slice(cx, cx + c2)
        else:
            continue
        d = dw.args
        if len(dw.users) != 1 or d[7] != "none" or list(d[3]) != [1, 1]:
            continue
        if get_tensor(gm, d[1]).dtype != w.dtype:  # one dtype throughout
            continue
        up = fused[dw]
        src, dst = val(resample_of(up).input), val(up)
        taps = int(val(d[1]).shape[2]) * int(val(d[1]).shape[3])
        sizes = [*src.shape[2:], *dst.shape[2:]]
        if not all(isinstance(v, int) for v in sizes):
            continue
        h, w_, big_h, big_w = sizes
        if taps * h * w_ > 0.6 * big_h * big_w:  # mixing at the source must be cheaper
            continue
        out[node] = (dw, up, cols, other)
    return out


def _pointwise_conv(
    gm: fx.GraphModule, node: Any, dtypes: tuple[torch.dtype, ...] = (torch.float32,)
) -> bool:
    """A 1×1 ``segfast.conv2d`` with constant weights in ``dtypes`` (stride 1, no
    padding, groups 1) whose activation segfast_cpu.c applies; callers check its
    residual and second source."""
    if not isinstance(node, fx.Node) or not is_call(node, segfast_ops.conv2d.default,
                                                     ops.conv2d_impl):  # fmt: skip
        return False
    a = node.args
    w = _const(gm, a[1], dtypes)
    if w is None or w.dim() != 4 or tuple(w.shape[2:]) != (1, 1) or a[6] != 1:
        return False
    if list(a[3]) != [1, 1] or list(a[4]) != [0, 0] or a[7] not in ACT_CODES:
        return False
    return a[2] is None or _const(gm, a[2], dtypes) is not None


def _ring_front(
    gm: fx.GraphModule, dw: fx.Node, kh: int, taken: set[fx.Node]
) -> tuple[fx.Node | None, bool]:
    """For a depthwise conv ``dw`` (``kh`` kernel rows) that starts a block of the
    inverted-residual kernel: the 1×1 expand conv it may absorb (read only by ``dw``,
    no residual, one source, not in ``taken``) or None, and whether the kernel's ring
    of expanded rows pays for the depthwise input (:func:`.invres.worthwhile`). A zero
    pad between them (:func:`_padded_source`) is folded into the depthwise conv."""
    source = expand = _padded_source(dw)[0]
    if not (
        isinstance(expand, fx.Node)
        and expand not in taken
        and len(expand.users) == 1
        and _pointwise_conv(gm, expand)
        and expand.args[9] is None
        and expand.args[11] is None
    ):
        expand = None
    src = val(source)
    h, w_ = (d if isinstance(d, int) else None for d in src.shape[2:])
    ring_rows = (kh - 1) * int(dw.args[5][0]) + 1
    return expand, invres.worthwhile(int(src.shape[1]), h, w_, ring_rows)


def _inverted_residuals(
    gm: fx.GraphModule, taken: set[fx.Node]
) -> dict[fx.Node, tuple[fx.Node | None, fx.Node]]:
    """MobileNetV2 blocks ``[1×1 expand →] depthwise → 1×1 project (+ residual)``
    worth one :class:`~.invres.NativeInvertedResidual` call:
    {project: (expand or None, depthwise)}. ``taken``: nodes other fusions
    claimed (their depthwise and pointwise convs). In a chain ``dw → pw → dw → pw``
    (MobileNetV1, stacked separable convs) the first pointwise conv ends the
    first block and is not also the second block's expansion (graph order: a
    project is decided before a later block looks at it as an expand)."""
    out: dict[fx.Node, tuple[fx.Node | None, fx.Node]] = {}
    for node in gm.graph.nodes:
        if node in taken or not _pointwise_conv(gm, node) or node.args[11] is not None:
            continue
        dw = node.args[0]
        if not isinstance(dw, fx.Node) or dw in taken or len(dw.users) != 1:
            continue
        if not _plain_depthwise(gm, dw) or list(dw.args[5]) != [dw.args[5][0]] * 2:
            continue
        kh = int(val(dw.args[1]).shape[2])
        if kh > invres.MAX_KERNEL_ROWS:
            continue
        expand, worth = _ring_front(gm, dw, kh, taken | set(out))
        if worth:
            out[node] = (expand, dw)
    return out


def _padded_source(dw: fx.Node) -> tuple[Any, tuple[int, int, int, int] | None]:
    """What a depthwise conv of the inverted-residual kernel reads, and the zero pad it
    folds in: ``(the pad's input, (top, bottom, left, right))`` where ``dw`` reads an
    asymmetric zero pad that nothing else reads (the compiler folded the symmetric
    ones into the conv; efficientnet-pytorch's "same" padding before every strided
    depthwise conv pads the bottom and right only), else ``(dw's input, None)``. The
    kernel reads zeros past the map anyway, so the padded copy — 96 channels at 256²
    is 25 MB in smp's EfficientNet-B0 encoders at 512² — is never written, and the
    expand conv before it can join the block."""
    x = dw.args[0]
    sides = zero_pad_sides(x)
    if sides is None or len(x.users) != 1:
        return x, None
    return x.args[0], sides


def _conv_spec(gm: fx.GraphModule, node: fx.Node, fold_pad: bool = False) -> invres.Conv:
    """The block's conv ``node``; ``fold_pad``: the depthwise conv, with the zero pad
    it reads folded in (:func:`_padded_source`)."""
    a = node.args
    padding, end = [int(p) for p in a[4]], None
    if fold_pad:
        _, sides = _padded_source(node)
        if sides is not None:
            top, bottom, left, right = sides
            padding, end = [padding[0] + top, padding[1] + left], [
                padding[0] + bottom, padding[1] + right]  # fmt: skip
    return invres.conv_spec(get_tensor(gm, a[1]), None if a[2] is None else get_tensor(gm, a[2]),
                            a[3], padding, a[5], a[6], a[7], a[8], end)  # fmt: skip


def _invres_step(
    gm: fx.GraphModule, native: Native, project: fx.Node, expand: fx.Node | None, dw: fx.Node
) -> tuple[Callable, tuple]:
    block = invres.NativeInvertedResidual(
        native, None if expand is None else _conv_spec(gm, expand), _conv_spec(gm, dw, True),
        _conv_spec(gm, project), bool(project.args[10]),
    )  # fmt: skip
    x = _padded_source(dw)[0] if expand is None else expand.args[0]
    return block, (x, project.args[9])


_SE_FRONT = (
    "squeeze-excitation block front: [1×1 expand →] depthwise + the gate's mean (segfast kernel)"
)


def _se_fronts(
    gm: fx.GraphModule, native: Native, taken: set[fx.Node]
) -> dict[fx.Node, tuple[fx.Node | None, fx.Node, fx.Node, se_gate.NativeSEGate]]:
    """Squeeze-excitation blocks (EfficientNet's MBConv, MobileNetV3's bneck with SE)
    ``[1×1 expand →] depthwise → se_gate(d) → conv2d_gated(d, gate)`` whose front one
    :meth:`~.invres.NativeInvertedResidual` call computes — the depthwise output and
    its mean, so the expanded tensor is never written and the gate does not read the
    map again — where :func:`.invres.worthwhile` says the ring pays (measured on the
    AVX2 EPYC against the plan's three calls: 16→96 s2 at 128² 1.35–1.37×, 24→144 at
    64² 1.26–1.66×, 24→72 5×5 s2 at 128² 1.14–1.16×, 40→120 5×5 at 64² 1.06–1.35×;
    the wide late stages it turns down lost, 0.63–1.04×). Symbolic sizes count as
    large, as for the inverted residual blocks: a dynamic engine also fuses the
    ≤ 384-channel blocks on small maps (240 channels at 32²: 0.98–1.03×, par).
    {depthwise: (expand or None, the gate node, the gated conv, the gate's kernel)}."""
    out: dict[fx.Node, tuple[fx.Node | None, fx.Node, fx.Node, se_gate.NativeSEGate]] = {}
    for dw in gm.graph.nodes:
        if dw in taken or not _plain_depthwise(gm, dw) or list(dw.args[5]) != [dw.args[5][0]] * 2:
            continue
        users = list(dw.users)
        gate = next((u for u in users if is_call(u, segfast_ops.se_gate.default)), None)
        conv = next((u for u in users if is_call(u, segfast_ops.conv2d_gated.default)), None)
        if len(users) != 2 or gate is None or conv is None:
            continue
        if not (
            gate.args[0] is dw
            and dw not in gate.args[1:]
            and conv.args[0] is dw
            and conv.args[1] is gate
            and dw not in conv.args[2:]
            and gate not in conv.args[2:]
            and len(gate.users) == 1
        ):
            continue
        step = _se_gate_step(gm, gate, native)
        kh = int(val(dw.args[1]).shape[2])
        if step is None or kh > invres.MAX_KERNEL_ROWS:
            continue
        expand, worth = _ring_front(gm, dw, kh, taken)
        if worth:
            out[dw] = (expand, gate, conv, step[0])
    return out


def _se_front_step(
    gm: fx.GraphModule, native: Native, dw: fx.Node, expand: fx.Node | None
) -> tuple[Callable, tuple]:
    front = invres.NativeInvertedResidual(
        native,
        None if expand is None else _conv_spec(gm, expand),
        _conv_spec(gm, dw, True),
        None,
    )
    return front, (_padded_source(dw)[0] if expand is None else expand.args[0],)


class _PooledGate:
    """The SE gate of a block whose front returned ``(map, means)``: from the means."""

    def __init__(self, gate: se_gate.NativeSEGate, dtype: torch.dtype) -> None:
        self.gate, self.dtype = gate, dtype

    def __call__(self, front: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.gate.from_pooled(front[1], self.dtype)


class _OnTheMap:
    """A reader of an SE block front's ``(map, means)``: ``fn(map, ...)``."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, front: tuple[torch.Tensor, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        return self.fn(front[0], *args, **kwargs)


# ops whose result is a view: its strides on size-1 dims are whatever the view made them
_VIEWS = {
    aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.permute.default,
    aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.expand.default, aten.slice.Tensor, aten.select.int,
    aten.alias.default, aten.unflatten.int, aten.flatten.using_ints, aten.as_strided.default,
}  # fmt: skip


class _CanonicalStrides:
    """A view op whose 4-D result gets its layout's canonical strides
    (:func:`segfast.compiler.ops.canonical_strides`), so the PyTorch kernels reading it
    take their channels_last paths."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return ops.canonical_strides(self.fn(*args, **kwargs))


def _separable_step(
    gm: fx.GraphModule,
    native: Native,
    pw: fx.Node,
    spec: tuple[fx.Node, fx.Node, slice, fx.Node | None],
) -> tuple[Callable, tuple]:
    dw, up, cols, other = spec
    a, d = pw.args, dw.args
    rs = resample_of(up)
    conv = UpsampleSeparableConv2d(
        native, get_tensor(gm, d[1]), None if d[2] is None else get_tensor(gm, d[2]), d[4], d[5],
        get_tensor(gm, a[1]), None if a[2] is None else get_tensor(gm, a[2]), cols, a[7], a[8],
        rs.align_corners, (rs.scale_h, rs.scale_w), input_size=tuple(val(rs.input).shape),
    )  # fmt: skip
    return conv, (rs.input, list(rs.size_for_graph()), other)


def _resize_dw_step(
    gm: fx.GraphModule, native: Native, dw: fx.Node, up: fx.Node
) -> tuple[Callable, tuple]:
    a = dw.args
    weight, bias = get_tensor(gm, a[1]), None if a[2] is None else get_tensor(gm, a[2])
    rs = resample_of(up)
    conv = ResizeDepthwiseConv2d(
        native, weight, bias, a[3], a[4], a[5], a[7], a[8], rs.align_corners,
        (rs.scale_h, rs.scale_w),
    )  # fmt: skip
    return conv, (rs.input, list(rs.size_for_graph()))


def _output_upsample(out: Any) -> tuple[fx.Node, list[fx.Node]] | None:
    """The bilinear upsample the graph ends with: (upsample, nodes it replaces)."""
    up = _bilinear_behind_layout_fix(out)
    if up is None or val(up[0]).dtype not in (torch.float32, torch.bfloat16):
        return None
    return up


class _HeadArgmax:
    """``segfast.head`` in argmax mode: [1×1 conv on oneDNN or, with 2–4 classes where
    AVX-512 is absent, sf_conv_few] → resize+argmax kernel."""

    def __init__(
        self,
        conv: PackedConv2d | narrow.FewOutputConv2d | None,
        resize: NativeResize,
        mask_dtype: str,
    ) -> None:
        self.conv, self.resize, self.mask_dtype = conv, resize, mask_dtype

    def __call__(self, x: torch.Tensor, out_h: Any, out_w: Any, resize: bool) -> torch.Tensor:
        if self.conv is not None:
            x = self.conv(x)
        size = (int(out_h), int(out_w)) if resize else (int(x.shape[2]), int(x.shape[3]))
        return self.resize.argmax(x, size, self.mask_dtype)


def _head_step(
    gm: fx.GraphModule, node: fx.Node, native: Native, use_avx2: bool = True
) -> tuple[Callable, tuple] | None:
    (x, w, b, out_h, out_w, resize, align, scale_h, scale_w, mode, _threshold,
     mask_dtype) = node.args  # fmt: skip
    if mode != "argmax" or val(x).dtype not in (torch.float32, torch.bfloat16):
        return None
    conv = None
    if w is not None:
        constants = _onednn_constants(gm, w, b, "none", 0.0)
        if constants is None or constants[0].dtype != val(x).dtype:
            return None
        weight, bias = constants
        weight = weight if weight.dim() == 4 else weight[:, :, None, None]
        if (
            _few_output(native, use_avx2)
            and narrow.few_applies(weight, (1, 1), (1, 1), 1)
            and narrow.few_worthwhile(int(weight.shape[1]), 1, 1, _static_width(x))
        ):
            conv = narrow.FewOutputConv2d(native, weight, bias, [0, 0], "none", 0.0)
        else:
            conv = PackedConv2d(weight, bias, [1, 1], [0, 0], [1, 1], 1, "none", 0.0, False,
                                "none", False, None, None, False,
                                input_size=tuple(val(x).shape))  # fmt: skip
    rsz = NativeResize(native, bool(align), (scale_h, scale_w))
    return _HeadArgmax(conv, rsz, mask_dtype), (x, out_h, out_w, resize)


# segfast ops whose composite implementation the plan calls directly (no custom-op
# dispatch): the squeeze-excitation gate, a gated conv whose weight oneDNN cannot take
# packed, and GroupNorm + activation.
_DIRECT: dict[Any, tuple[Callable, str]] = {
    segfast_ops.se_gate.default: (ops.se_gate_impl, "squeeze-excitation gate"),
    segfast_ops.conv2d_gated.default: (
        ops.conv2d_gated_impl,
        "conv2d of x · SE gate (composite)",
    ),
    segfast_ops.group_norm.default: (ops.group_norm_impl, "group_norm + activation"),
}


def lower(
    gm: fx.GraphModule,
    native: Native | None = None,
    use_winograd: bool = True,
    use_avx2: bool = True,
    use_subpixel: bool = True,
    int8_w7: bool = False,
) -> Plan:
    """Lower the fused graph (on the CPU) into a :class:`Plan`.

    ``native``: segfast's CPU kernels (:func:`segfast.backends.cpu.native.load`),
    or None to run every convolution on oneDNN; ``use_winograd``: whether 3×3
    layers may take Winograd F(4×4, 3×3) (needs ``native``); ``use_avx2``: whether
    convs with 1–4 output channels may take ``sf_conv_few`` and, where AVX-512 is
    absent, depthwise layers ``sf_dwconv8`` and dense 1×1 convs one MKL GEMM
    (:mod:`.gemm1x1`; needs ``native``, which says whether AVX-512 is there);
    ``use_subpixel``: whether 3×3 convs of a ×2 nearest upsample may run at the
    source resolution (:mod:`.subpixel`; needs ``native``); ``int8_w7``: whether dense
    int8 convs whose input may be negative run oneDNN's int8 kernel with 7-bit weights
    (:func:`segfast.backends.cpu.int8.to_7bit`) — on every CPU, so an engine judged with
    them keeps them.
    """
    nodes = list(gm.graph.nodes)
    slot_of: dict[fx.Node, int] = {}
    consts: dict[fx.Node, Any] = {}
    lowered: Counter[str] = Counter()
    inputs: list[int] = []
    pending: list[tuple[fx.Node, Callable, tuple, dict]] = []
    output: Any = None
    # upsample → depthwise: fp32 (sf_resize_dw); → pointwise too: fp32 or bf16 (sf_up_taps)
    # the direct kernels only where they beat oneDNN: 16-float vectors in one register
    direct = native is not None and native.wide_vectors
    fused, into = _fusions(gm, DTYPES) if direct else ({}, {})
    separable = _separable_after_upsample(gm, fused) if direct else {}
    for dw, _, _, _ in separable.values():
        into[dw] = [*into[dw], dw]
        fused.pop(dw)
    for dw in [d for d in fused if val(d).dtype != torch.float32]:
        del fused[dw], into[dw]  # bf16 upsample → depthwise alone stays on oneDNN
    absorbed = {n for nodes in into.values() for n in nodes}
    claimed = set(into) | set(separable)
    # sf_invres is width-generic (one register of lanes): with AVX-512 and on AVX2
    blocks = _inverted_residuals(gm, claimed) if direct or _eight_lane(native, use_avx2) else {}
    # SE blocks' fronts (expand → depthwise + the gate's mean): what no fusion above took
    fronts = {}
    if direct or _eight_lane(native, use_avx2):
        taken = claimed | set(blocks)
        taken |= {n for pair in blocks.values() for n in pair if n is not None}
        fronts = _se_fronts(gm, native, taken)
    front_gates = {g: (dw, kernel) for dw, (_, g, _, kernel) in fronts.items()}
    front_readers = {conv for _, _, conv, _ in fronts.values()}
    # a zero pad before a depthwise conv: folded into the block or front that took the
    # conv, else (AVX2) into sf_dwconv8
    ring_dws = {dw for _, dw in blocks.values()} | set(fronts)
    # (a pad one of whose readers a ring kernel took stays written: that kernel reads it)
    folded = {c: v for c, v in _pads_into_depthwise(gm, native, use_avx2).items()
              if not any(u in ring_dws for u in c.args[0].users)}  # fmt: skip
    absorbed.update(conv.args[0] for conv in folded)  # the pads: their convs read past them
    absorbed.update(dw.args[0] for dw in ring_dws if _padded_source(dw)[1] is not None)
    for expand, dw in blocks.values():
        absorbed.add(dw)
        if expand is not None:
            absorbed.add(expand)
    absorbed.update(e for e, _, _, _ in fronts.values() if e is not None)
    up_convs = _nearest_up_convs(gm, native, use_winograd, use_avx2) if use_subpixel else {}
    for _, ups in up_convs.values():
        absorbed.update(ups)
    # a conv another fusion took (an inverted-residual block's expand: DeepLab v3+'s ASPP
    # projection, whose pooled branch is a resize with a dynamic size) stays with it
    taken = absorbed | set(blocks) | set(fronts) | set(up_convs) | set(separable) | set(fused)
    resized_cats = {c: v for c, v in _resized_concats(gm).items() if c not in taken}
    for _, _, _, nodes_in in resized_cats.values():
        absorbed.update(nodes_in)
    out_node = next(n for n in nodes if n.op == "output")
    final = _output_upsample(out_node.args[0]) if native is not None else None
    if final is not None:
        absorbed.update(final[1][1:])  # the layout fix after it; the upsample is replaced

    def template(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a in consts:
                return consts[a]
            return _Slot(slot_of[a])
        if isinstance(a, list | tuple):
            return type(a)(template(t) for t in a)
        if isinstance(a, dict):
            return {k: template(v) for k, v in a.items()}
        return a

    for node in nodes:
        if node.op == "placeholder":
            slot_of[node] = len(slot_of)
            inputs.append(slot_of[node])
            continue
        if node.op == "get_attr":
            consts[node] = get_tensor(gm, node)
            continue
        if node.op == "output":
            output = node.args[0]
            if final is not None:
                output = final[0]  # the native resize replaces upsample + layout fix
            continue
        if node.op in ("call_module", "call_method"):  # e.g. torch.export's shape-guard module
            slot_of[node] = len(slot_of)
            name = str(node.target)
            target = gm.get_submodule(name) if node.op == "call_module" else _method(name)
            pending.append((node, target, node.args, dict(node.kwargs)))
            continue
        # call_function: FX has no other kind of node
        if node in absorbed:  # computed inside the depthwise conv that reads it
            continue
        fn: Callable = node.target
        args: tuple = node.args
        kwargs = dict(node.kwargs)
        t = node.target
        if node in blocks:
            fn, args = _invres_step(gm, native, node, *blocks[node])
            lowered["inverted residual block (segfast kernel)"] += 1
        elif node in separable:
            fn, args = _separable_step(gm, native, node, separable[node])
            lowered["bilinear upsample + separable conv, mixed at the source (segfast kernel)"] += 1
        elif node in fused:
            fn, args = _resize_dw_step(gm, native, node, fused[node])
            lowered["bilinear upsample + depthwise conv2d (segfast kernel)"] += 1
        elif node in fronts:
            fn, args = _se_front_step(gm, native, node, fronts[node][0])
            lowered[_SE_FRONT] += 1
        elif node in front_gates:
            fn = _PooledGate(front_gates[node][1], val(node).dtype)
            args = (front_gates[node][0],)
            lowered["squeeze-excitation gate (segfast kernel)"] += 1
        elif node in up_convs:
            fn, args = _subpixel_step(gm, native, node, up_convs[node][0])
            lowered[_SUBPIXEL] += 1
        elif final is not None and node is final[0]:
            rs = resample_of(node)
            fn = NativeResize(native, rs.align_corners, (rs.scale_h, rs.scale_w)).logits
            args = (rs.input, list(rs.size_for_graph()))
            lowered["bilinear upsample of the logits, NCHW out (segfast kernel)"] += 1
        elif node in resized_cats:
            fn, args = _resized_concat_step(gm, node, resized_cats[node])
            lowered[_RESIZED_CONCAT] += 1
        elif t is segfast_ops.conv2d.default or t is ops.conv2d_impl:
            step = _conv2d_step(
                gm, node, native, use_winograd, use_avx2, folded.get(node), use_subpixel
            )
            if step is not None:
                fn, args, kind = step
                lowered[kind] += 1
            else:
                fn = ops.conv2d_impl
        elif t is segfast_ops.qconv2d.default and int8.available():
            fn, args, kind = _qconv2d_step(gm, node, native, use_winograd, use_avx2, int8_w7)
            lowered[kind] += 1
        elif t is segfast_ops.qconv_transpose2d.default:
            fn, args = _qconv_transpose_step(gm, node, int8_w7)
            lowered[_QCONV_TRANSPOSE_KINDS[fn.mode]] += 1
        elif t is segfast_ops.conv_transpose2d.default or t is ops.conv_transpose2d_impl:
            step = _conv_transpose_step(gm, node)
            if step is not None:
                fn, args = step
                lowered["conv_transpose2d"] += 1
            else:
                fn = ops.conv_transpose2d_impl
        elif t is segfast_ops.head.default or t is ops.head_impl:
            step = _head_step(gm, node, native, use_avx2) if native is not None else None
            if step is not None:
                fn, args = step
                lowered["head: [resize +] argmax (segfast kernel)"] += 1
            else:
                fn = ops.head_impl
        elif t is segfast_ops.conv2d_gated.default and (
            step := _gated_step(gm, node, native, use_avx2)
        ):
            fn, args, kind = step
            lowered[kind] += 1
        elif (
            t is segfast_ops.se_gate.default
            and native is not None
            and (step := _se_gate_step(gm, node, native))
        ):
            fn, args = step
            lowered["squeeze-excitation gate (segfast kernel)"] += 1
        elif (
            t is aten._to_copy.default
            and native is not None
            and entry.applies(kwargs, val(node).dtype, val(node).dim())
        ):
            fn, kwargs = entry.NativeToNHWC(native, val(node).dtype), {}
            lowered["layout conversion to NHWC (segfast kernel)"] += 1
        elif t in _DIRECT:
            fn, kind = _DIRECT[t]
            lowered[kind] += 1
        elif t is aten.max_pool2d_with_indices.default and _only_values_read(node):
            fn = _pool_no_indices
            lowered["max_pool2d (no indices)"] += 1
        if node in front_readers:  # the front's slot holds (map, means)
            fn = _OnTheMap(fn)
        if t in _VIEWS and isinstance(val(node), torch.Tensor) and val(node).dim() == 4:
            fn = _CanonicalStrides(fn)
        slot_of[node] = len(slot_of)
        pending.append((node, fn, args, kwargs))

    qconvs = {
        node: fn
        for node, fn, _, _ in pending
        if isinstance(fn, int8.PackedQConv2d | int8.QConvTranspose2d)
    }
    pending, resized = _quantized_upsamples(pending, qconvs, native)
    if resized:
        lowered["bilinear upsample written as its int8 readers' uint8 (segfast kernel)"] += resized
    stored = _int8_outputs(qconvs)
    if stored:
        lowered["int8 conv storing int8 (requantized for its int8 readers)"] += stored

    # Last reader of every slot (by what the steps really read): free it right after.
    last_use: dict[fx.Node, fx.Node | None] = {}
    for node, _, args, kwargs in pending:
        for inp in _nodes_in((args, kwargs)):
            if inp in slot_of:
                last_use[inp] = node
    for inp in _nodes_in(output):
        last_use[inp] = None  # the plan's result: never freed
    frees: dict[fx.Node, list[int]] = {}
    for value, reader in last_use.items():
        if reader is not None:
            frees.setdefault(reader, []).append(slot_of[value])
    for node in slot_of:  # values nobody reads (e.g. export's guard call) go at once
        if node.op != "placeholder" and node not in last_use:
            frees.setdefault(node, []).append(slot_of[node])
    steps = [
        Step(
            fn=fn,
            args=_resolver(template(tuple(args))),
            kwargs=_resolver(template(kwargs)),
            out=slot_of[node],
            free=tuple(frees.get(node, ())),
            name=node.name,
        )
        for node, fn, args, kwargs in pending
    ]
    return Plan(steps, inputs, template(output), len(slot_of), lowered)


# where an int8 conv's args hold (residual, x2): x is always args[0]
_INT8_READS = {
    segfast_ops.qconv2d.default: (9, 11),
    segfast_ops.qconv_transpose2d.default: (10, None),
}


def _int8_outputs(qconvs: dict[fx.Node, Any]) -> int:
    """Requantize on store: an int8 conv (no residual) whose every reader is an int8
    conv reading it as its input — all at one scale, no resize of it between — writes
    uint8 at that scale (:meth:`segfast.backends.cpu.int8.PackedQConv2d.store_quantized`)
    instead of fp32 that each reader quantizes again: a quarter of the bytes out and
    in, and no quantize pass. The readers take uint8 sources as they come. Returns
    how many convs store uint8. ``qconvs``: the plan's int8 convs by node."""
    count = 0
    for node, fn in qconvs.items():
        residual_at, _ = _INT8_READS[node.target]
        if not fn.can_store_quantized or node.args[residual_at] is not None or not node.users:
            continue
        quant = _int8_readers_scale(node, qconvs)
        if quant is not None and fn.can_store_at(quant[1]):
            fn.store_quantized(*quant)
            count += 1
    return count


def _int8_readers_scale(node: fx.Node, qconvs: dict[fx.Node, Any]) -> tuple[float, int] | None:
    """The one (scale, zero point) at which every reader of ``node`` quantizes it, when
    every reader is an int8 conv on oneDNN's int8 kernel (zero point 128, or 0 for an
    input proven ≥ 0 where int8 sums saturate) reading it as its input (not as a
    residual; not as a second source it resizes); else None."""
    scales = set()
    for user in node.users:
        if is_call(user, ops.to_nhwc):  # the layout pass's no-op on NHWC (uint8 too)
            quant = _int8_readers_scale(user, qconvs)
            if quant is None:
                return None
            scales.add(quant)
            continue
        reader = qconvs.get(user)
        if reader is None or reader.mode not in int8.INT8_MODES:
            return None
        residual_at, x2_at = _INT8_READS[user.target]
        if user.args[residual_at] is node:
            return None
        if x2_at is not None and user.args[x2_at] is not None and reader.x2_spec[0] != "none":
            return None  # a resized second source is resized in float
        scales.add((reader.x_scale, reader.zp))
    return scales.pop() if len(scales) == 1 else None


class _QuantizedUpsample:
    """A bilinear upsample read only by int8 convs, written as their uint8 input."""

    def __init__(self, resize: NativeResize, scale: float, zp: int) -> None:
        self.resize, self.scale, self.zp = resize, scale, zp

    def __call__(self, x: torch.Tensor, size: list[int]) -> torch.Tensor:
        return self.resize.quantized(x, size, self.scale, self.zp)


def _quantized_upsamples(
    pending: list[tuple[fx.Node, Callable, tuple, dict]],
    qconvs: dict[fx.Node, Any],
    native: Native | None,
) -> tuple[list[tuple[fx.Node, Callable, tuple, dict]], int]:
    """An fp32 bilinear upsample whose readers are all int8 convs at one scale
    (DeepLab v3+'s decoder: ASPP output → ×4 → depthwise) runs ``sf_resize_q8``: the
    readers' quantization of the resize, written as uint8 — a quarter of the bytes,
    and no quantize pass over the fp32 map. Returns the new pending list and how many.
    Only with AVX-512 (``native.wide_vectors``): on the AVX2 EPYC the kernel's 16-float
    vectors made it 2.5–3× slower than ATen's resize and the readers' quantize pass
    together (256 ch, 32² → 128²: 5.3–7.7 against 2.6–2.9 ms, 2026-12-07)."""
    if native is None or not native.wide_vectors or not qconvs:
        return pending, 0
    out, count = [], 0
    for node, fn, args, kwargs in pending:
        rs = resample_of(node)
        quant = None
        if (
            rs is not None
            and rs.mode == "bilinear"
            and fn is node.target  # not lowered to anything else
            and isinstance(rs.input, fx.Node)
            and val(rs.input).dtype == torch.float32
            and node.users
            and rs.size_for_graph() is not None
        ):
            quant = _int8_readers_scale(node, qconvs)
        if quant is None:
            out.append((node, fn, args, kwargs))
            continue
        resize = NativeResize(native, rs.align_corners, (rs.scale_h, rs.scale_w))
        size = list(rs.size_for_graph())
        out.append((node, _QuantizedUpsample(resize, *quant), (rs.input, size), {}))
        count += 1
    return out, count


def _nodes_in(a: Any) -> list[fx.Node]:
    if isinstance(a, fx.Node):
        return [a]
    if isinstance(a, list | tuple):
        return [n for t in a for n in _nodes_in(t)]
    if isinstance(a, dict):
        return [n for t in a.values() for n in _nodes_in(t)]
    return []
