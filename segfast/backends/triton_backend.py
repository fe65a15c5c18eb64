"""``triton``: the fused graph on segfast's Triton kernels.

Lowering rewrites the fused graph's targets: every ``segfast.conv2d`` (groups 1
or depthwise), ``segfast.conv2d_gated`` (groups 1: the squeeze-excitation gate
applied as the conv reads its input), ``segfast.se_gate``, ``segfast.group_norm``,
``segfast.conv_transpose2d`` (groups 1), ``segfast.head``,
bilinear/nearest resize, max-pool (with indices), max-unpool and adaptive /
global average pooling runs a kernel from :mod:`segfast.kernels` (a gate or GroupNorm
reading a conv's output takes the channel statistics that conv's epilogue wrote, so
its input map is never re-read for them); convolution
weights are packed once, at build time, into the layout the kernels read
fastest. In int8 engines (``precision="int8"``) every ``segfast.qconv2d``
(groups 1 or depthwise) runs :mod:`segfast.kernels.qconv2d` (int8 × int8 → int32
tensor-core GEMM, the input quantized on load) with its int8 weight packed K-major
once; ``segfast.qconv_transpose2d`` stays on its composite (fake-quantized
PyTorch: there is no int8 transposed-conv kernel yet), and so do grouped
(non-depthwise) qconv2d. Integers carry no NaN and int8 saturates ±Inf, so an
int8 engine runs inputs holding NaN/Inf through the eager model. Concatenations the
``concat_slices`` pass marked become one preallocated NHWC buffer that each producer writes its channel slice of. What
has no kernel stays on PyTorch (the summary counts it).

On a GPU a static engine is captured once into a CUDA graph (after the
autotuning warm-up): each call copies the input into the graph's static buffer,
replays, and returns a copy of the output, so every intermediate buffer is
reused across calls. On the CPU the backend runs only under Triton's
interpreter (``TRITON_INTERPRET=1``) — for tests, not for speed.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from segfast.backends.base import Backend, BuildRequest, Runner
from segfast.compiler.graph import is_call, set_constant, val
from segfast.compiler.ops import MASK_DTYPES
from segfast.compiler.patterns import zero_pad_sides
from segfast.errors import BackendUnavailable

aten = torch.ops.aten
segfast_ops = torch.ops.segfast


def _interpreting() -> bool:
    from segfast.kernels._common import interpreting

    return interpreting()


# -- wrappers: graph-op signature → kernel launcher ----------------------------------------


def _conv2d(
    x, w, b, stride, padding, dilation, groups, act, act_param, residual, residual_after_act,
    x2, x2_resize, x2_align_corners, x2_scale_h, x2_scale_w, x2_first, out=None, stats=None,
):  # fmt: skip
    from segfast.kernels.conv2d import conv2d

    scales = None if x2_scale_h is None else (float(x2_scale_h), float(x2_scale_w))
    return conv2d(
        x, w, None, b, stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation),
        groups=groups, act=act, act_param=act_param, residual=residual,
        residual_after_act=residual_after_act, x2=x2, x2_resize=x2_resize,
        x2_align_corners=x2_align_corners, x2_scales=scales, x2_first=x2_first, out=out,
        stats=stats,
    )  # fmt: skip


def _conv2d_gated(
    x, gate, w, b, stride, padding, dilation, groups, act, act_param, residual,
    residual_after_act, out=None, stats=None,
):  # fmt: skip
    from segfast.kernels.conv2d import conv2d

    return conv2d(
        x, w, None, b, stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation),
        groups=groups, act=act, act_param=act_param, residual=residual,
        residual_after_act=residual_after_act, gate=gate, out=out, stats=stats,
    )  # fmt: skip


def _with_stats(conv: Callable[..., torch.Tensor], x_arg: int) -> Callable[..., Any]:
    """``conv``, also writing its output's channel statistics: returns (out, stats)."""

    def run(*args, out=None):
        from segfast.kernels.conv2d import output_size, stats_buffer

        x, w = args[x_arg], args[x_arg + 1]
        stride, padding, dilation = (args[x_arg + i] for i in (3, 4, 5))
        ho, wo = output_size(
            (x.shape[2], x.shape[3]), (w.shape[2], w.shape[3]), tuple(stride),
            tuple(padding), tuple(dilation),
        )  # fmt: skip
        stats = stats_buffer(x.shape[0], ho * wo, w.shape[0], x.device)
        return conv(*args, out=out, stats=stats), stats

    run.__name__ = f"{conv.__name__}_stats"
    return run


_CONV2D_STATS = _with_stats(_conv2d, 0)
_CONV2D_GATED_STATS = _with_stats(_conv2d_gated, 1)
_STATS_OF = {_conv2d: _CONV2D_STATS, _conv2d_gated: _CONV2D_GATED_STATS}


def _se_gate(p, w1, b1, act1, act1_param, w2, b2, act2, act2_param, stats=None):
    from segfast.kernels.squeeze_excite import se_gate

    return se_gate(p, w1, b1, act1, act1_param, w2, b2, act2, act2_param, stats=stats)


def _group_norm(x, groups, weight, bias, eps, act, act_param, stats=None):
    from segfast.kernels.group_norm import group_norm

    return group_norm(x, int(groups), weight, bias, float(eps), act, float(act_param), stats=stats)


def _qconv2d(
    x, w, b, stride, padding, dilation, groups, act, act_param, residual, residual_after_act,
    x2, x2_resize, x2_align_corners, x2_scale_h, x2_scale_w, x2_first, x_scale, w_scale,
    out=None,
):  # fmt: skip
    from segfast.kernels.qconv2d import qconv2d

    scales = None if x2_scale_h is None else (float(x2_scale_h), float(x2_scale_w))
    return qconv2d(
        x, w, b, x_scale=float(x_scale), w_scale=w_scale, stride=tuple(stride),
        padding=tuple(padding), dilation=tuple(dilation), groups=groups, act=act,
        act_param=act_param, residual=residual, residual_after_act=residual_after_act, x2=x2,
        x2_resize=x2_resize, x2_align_corners=x2_align_corners, x2_scales=scales,
        x2_first=x2_first, out=out,
    )  # fmt: skip


def _conv_transpose2d(
    x, w, b, stride, padding, output_padding, dilation, groups, act, act_param, residual,
    residual_after_act, out=None,
):  # fmt: skip
    from segfast.kernels.conv_transpose2d import conv_transpose2d

    return conv_transpose2d(
        x, w, None, b, stride=tuple(stride), padding=tuple(padding),
        output_padding=tuple(output_padding), dilation=tuple(dilation), act=act,
        act_param=act_param, residual=residual, residual_after_act=residual_after_act, out=out,
    )  # fmt: skip


def _head(x, w, b, out_h, out_w, resize, align_corners, scale_h, scale_w, mode, threshold,
          mask_dtype):  # fmt: skip
    from segfast.kernels.head import seg_head

    scales = None if scale_h is None and scale_w is None else (scale_h, scale_w)
    return seg_head(
        x, w, b, out_size=(int(out_h), int(out_w)) if resize else None,
        align_corners=align_corners, scales=scales if resize else None, mode=mode,
        threshold=threshold, mask_dtype=MASK_DTYPES[mask_dtype],
    )  # fmt: skip


def _size_from(x: torch.Tensor, output_size: Any, factors: Any) -> list[int]:
    if output_size is not None:
        return [int(output_size[0]), int(output_size[1])]
    # ATen: floor(input_size * scale_factor), in double precision
    return [math.floor(x.shape[2] * float(factors[0])), math.floor(x.shape[3] * float(factors[1]))]


def _resize_vec(mode: str) -> Callable[..., torch.Tensor]:
    def run(x, output_size, *rest, out=None, residual=None):
        from segfast.kernels.resize import resize

        align = bool(rest[0]) if mode == "bilinear" else False
        factors = rest[-1] if len(rest) else None
        scales = None if factors is None else (float(factors[0]), float(factors[1]))
        size = _size_from(x, output_size, factors)
        return resize(x, size, mode, align, scales, out=out, residual=residual)

    return run


def _resize_default(mode: str) -> Callable[..., torch.Tensor]:
    def run(x, output_size, *rest, out=None, residual=None):
        from segfast.kernels.resize import resize

        align = bool(rest[0]) if mode == "bilinear" else False
        scale_args = [*rest[1 if mode == "bilinear" else 0 :], None, None]
        sh, sw = scale_args[0], scale_args[1]
        scales = None if sh is None and sw is None else (sh, sw)
        size = [int(s) for s in output_size]
        return resize(x, size, mode, align, scales, out=out, residual=residual)

    return run


def _max_pool(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    from segfast.kernels.pool import max_pool2d

    stride = list(stride) if stride else list(kernel_size)
    return max_pool2d(x, list(kernel_size), stride, padding, dilation, ceil_mode,
                      return_indices=True)  # fmt: skip


def _max_unpool(x, indices, output_size):
    from segfast.kernels.pool import max_unpool2d

    return max_unpool2d(x, indices, [int(s) for s in output_size])


def _adaptive_avg(x, output_size, stats=None):
    from segfast.kernels.pool import adaptive_avg_pool2d, global_avg_pool2d

    if stats is not None:  # a 1×1 output (see _lower_channel_stats)
        return global_avg_pool2d(x, stats=stats)
    return adaptive_avg_pool2d(x, tuple(int(s) for s in output_size))


def _global_avg(x, dims, keepdim=False, dtype=None, stats=None):
    from segfast.kernels.pool import global_avg_pool2d

    return global_avg_pool2d(x, stats=stats)


def _alloc_nhwc(shape: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)


def _channel_slice(buf: torch.Tensor, offset: int, size: int) -> torch.Tensor:
    return buf[:, offset : offset + size]


def _copy_into(view: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return view.copy_(src)


def _joined(buf: torch.Tensor, *written: torch.Tensor) -> torch.Tensor:
    """The concat buffer, once every slice of it is written (the args order the graph)."""
    return buf


_RESIZE = {
    aten.upsample_bilinear2d.vec: _resize_vec("bilinear"),
    aten.upsample_nearest2d.vec: _resize_vec("nearest"),
    aten._upsample_nearest_exact2d.vec: _resize_vec("nearest-exact"),
    aten.upsample_bilinear2d.default: _resize_default("bilinear"),
    aten.upsample_nearest2d.default: _resize_default("nearest"),
    aten._upsample_nearest_exact2d.default: _resize_default("nearest-exact"),
}


_SLICE_WRITERS = (_conv2d, _qconv2d, _conv_transpose2d, _conv2d_gated)
# x2 resizes the conv kernels' two-source prologues compute (nearest-exact is not one)
_PROLOGUE_RESIZES = ("none", "nearest", "bilinear")


def _is_depthwise(w: torch.Tensor, groups: int) -> bool:
    return groups > 1 and w.shape[1] == 1 and w.shape[0] == groups


def _qconv_kind(node: fx.Node) -> str | None:
    """What :mod:`segfast.kernels.qconv2d` runs a ``segfast.qconv2d`` node as ("qconv2d",
    "depthwise_qconv2d"), or None when it stays on the composite."""
    w, groups, x2 = val(node.args[1]), node.args[6], node.args[11]
    if groups == 1:
        return "qconv2d" if x2 is None or node.args[12] in _PROLOGUE_RESIZES else None
    return "depthwise_qconv2d" if _is_depthwise(w, groups) and x2 is None else None


def _global_mean(node: fx.Node) -> bool:
    if not is_call(node, aten.mean.dim) or val(node.args[0]).dim() != 4:
        return False
    dims = sorted(d % 4 for d in node.args[1])
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return dims == [2, 3] and bool(keep) and node.kwargs.get("dtype") is None


def lower(gm: fx.GraphModule) -> tuple[fx.GraphModule, Counter[str], Counter[str]]:
    """Point the fused graph's ops at the Triton launchers; returns (gm, lowered, kept)."""
    from segfast.kernels.conv2d import pack_conv_weight
    from segfast.kernels.conv_transpose2d import pack_weight
    from segfast.kernels.qconv2d import pack_qconv_weight
    from segfast.kernels.squeeze_excite import MAX_HIDDEN

    lowered: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    packed: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}

    def tensor_of(node: fx.Node) -> torch.Tensor:
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj

    _pads_into_convs(gm, lowered)
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        t = node.target
        if t is segfast_ops.conv2d.default:
            w = val(node.args[1])
            groups = node.args[6]
            if groups == 1 or (_is_depthwise(w, groups) and node.args[11] is None):
                node.target = _conv2d
                if node.args[1].op == "get_attr":
                    packed[str(node.args[1].target)] = pack_conv_weight
                lowered["conv2d" if groups == 1 else "depthwise_conv2d"] += 1
            else:
                kept["grouped conv2d"] += 1
        elif t is segfast_ops.conv2d_gated.default:
            if node.args[7] == 1:
                node.target = _conv2d_gated
                if node.args[2].op == "get_attr":
                    packed[str(node.args[2].target)] = pack_conv_weight
                lowered["conv2d_gated"] += 1
            else:
                kept["grouped conv2d_gated"] += 1
        elif t is segfast_ops.se_gate.default:
            hidden = val(node.args[1]).shape[0]
            if hidden <= MAX_HIDDEN:
                node.target = _se_gate
                lowered["se_gate"] += 1
            else:
                kept[f"se_gate (hidden width {hidden} > {MAX_HIDDEN})"] += 1
        elif t is segfast_ops.group_norm.default:
            node.target = _group_norm
            lowered["group_norm"] += 1
        elif t is segfast_ops.qconv2d.default:
            kind = _qconv_kind(node)
            if kind is not None:
                node.target = _qconv2d
                if node.args[1].op == "get_attr":  # the int8 weight; w_scale is used as is
                    packed[str(node.args[1].target)] = pack_qconv_weight
                lowered[kind] += 1
            else:
                kept["qconv2d (grouped or nearest-exact x2: composite)"] += 1
        elif t is segfast_ops.qconv_transpose2d.default:
            kept["qconv_transpose2d (composite)"] += 1
        elif t is segfast_ops.conv_transpose2d.default:
            if node.args[7] == 1:
                node.target = _conv_transpose2d
                if node.args[1].op == "get_attr":
                    packed[str(node.args[1].target)] = pack_weight
                lowered["conv_transpose2d"] += 1
            else:
                kept["grouped conv_transpose2d"] += 1
        elif t is segfast_ops.head.default:
            node.target = _head
            lowered["head"] += 1
        elif t in _RESIZE:
            node.target = _RESIZE[t]
            lowered["resize"] += 1
        elif t is aten.max_pool2d_with_indices.default:
            node.target = _max_pool
            lowered["max_pool2d"] += 1
        elif t is aten.max_unpool2d.default:
            node.target = _max_unpool
            lowered["max_unpool2d"] += 1
        elif t is aten._adaptive_avg_pool2d.default:
            node.target = _adaptive_avg
            lowered["adaptive_avg_pool2d"] += 1
        elif _global_mean(node):
            node.target = _global_avg
            lowered["global_avg_pool2d"] += 1
        elif _add_into_resize(gm, node):
            lowered["resize + add"] += 1
        elif t is aten.cat.default and node.meta.get("segfast_slices"):
            continue  # becomes a slice-written buffer in _lower_concats
        elif t is not operator.getitem and t is not aten._to_copy.default:
            kept[str(t).removeprefix("aten.").split(".")[0]] += 1
    # A weight read by one packer only is stored packed; a shared one keeps its layout.
    users: Counter[str] = Counter(
        str(n.target) for n in gm.graph.nodes if n.op == "get_attr" for _ in n.users
    )
    for name, packer in packed.items():
        if users[name] != 1:
            continue
        owner_path, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        set_constant(gm, name, packer(getattr(owner, leaf).detach()))
    _lower_concats(gm, lowered)
    _lower_channel_stats(gm, lowered)
    gm.graph.lint()
    gm.recompile()
    return gm, lowered, kept


def _add_into_resize(gm: fx.GraphModule, add: fx.Node) -> bool:
    """Fold ``add(resize(x), r)`` (either order; the resize lowered already, read by
    this add only) into the resize's store: ``resize(x, residual=r)``. r must have the
    sum's shape and dtype (no broadcast, no promotion)."""
    if not is_call(add, aten.add.Tensor) or len(add.args) != 2:
        return False
    if add.kwargs.get("alpha", 1) != 1:
        return False
    out = val(add)
    for up, other in (add.args, reversed(add.args)):
        if not (isinstance(up, fx.Node) and up.op == "call_function"):
            continue
        if up.target not in _RESIZE.values() or len(up.users) != 1 or "out" in up.kwargs:
            continue
        if "residual" in up.kwargs or not isinstance(other, fx.Node) or other is up:
            continue
        rv, uv = val(other), val(up)
        if not isinstance(rv, torch.Tensor) or rv.dtype != out.dtype or uv.dtype != out.dtype:
            continue
        if tuple(rv.shape) != tuple(out.shape) or tuple(uv.shape) != tuple(out.shape):
            continue
        add.prepend(up)  # r may come after the resize in graph order; both precede the add
        up.kwargs = {**up.kwargs, "residual": other}
        up.meta["val"] = out
        add.replace_all_uses_with(up)
        gm.graph.erase_node(add)
        return True
    return False


def _one_source_conv_of(conv: fx.Node, x: fx.Node) -> bool:
    """``conv`` is a segfast.conv2d of ``x`` alone that a Triton kernel runs."""
    if not is_call(conv, segfast_ops.conv2d.default) or conv.args[0] is not x:
        return False
    w, groups = val(conv.args[1]), conv.args[6]
    return conv.args[11] is None and (groups == 1 or _is_depthwise(w, groups))


def _pads_into_convs(gm: fx.GraphModule, lowered: Counter[str]) -> None:
    """A zero pad read only by convolutions the Triton kernels run (as their one
    source: a second source would be resized to the padded size) becomes their
    padding — asymmetric too (stride-2 "same" padding; the compiler's pad_into_conv
    moved the symmetric ones already): the kernels read zeros outside the map."""
    for pad in list(gm.graph.nodes):
        sides = zero_pad_sides(pad)
        users = list(pad.users)
        if sides is None or not users or not all(_one_source_conv_of(c, pad) for c in users):
            continue
        for conv in users:
            args = list(conv.args)
            ph, pw = (int(p) for p in args[4])
            top, bottom, left, right = sides
            args[0], args[4] = pad.args[0], [ph + top, ph + bottom, pw + left, pw + right]
            conv.args = tuple(args)
            lowered["pad_into_conv"] += 1
        gm.graph.erase_node(pad)


def _lower_concats(gm: fx.GraphModule, lowered: Counter[str]) -> None:
    """Turn each marked ``cat`` into a buffer its producers write slices of."""
    g = gm.graph
    for cat in list(g.nodes):
        slices = cat.meta.get("segfast_slices")
        if not is_call(cat, aten.cat.default) or not slices:
            continue
        v = val(cat)
        if not all(isinstance(d, int) for d in v.shape):
            continue
        parts = list(cat.args[0])
        first = next(n for n in g.nodes if n in parts)  # the earliest producer
        with g.inserting_before(first):
            buf = g.call_function(_alloc_nhwc, (list(v.shape), v.dtype, v.device))
        written = []
        for part, spec in zip(parts, slices, strict=True):
            off = sum(int(val(p).shape[1]) for p in parts[: parts.index(part)])
            c = int(val(part).shape[1])
            if spec is not None and (
                part.target in _SLICE_WRITERS or part.target in _RESIZE.values()
            ):
                with g.inserting_before(part):
                    view = g.call_function(_channel_slice, (buf, off, c))
                part.kwargs = {**part.kwargs, "out": view}
                written.append(part)
            else:
                with g.inserting_before(cat):
                    view = g.call_function(_channel_slice, (buf, off, c))
                    written.append(g.call_function(_copy_into, (view, part)))
        with g.inserting_before(cat):
            joined = g.call_function(_joined, (buf, *written))
        joined.meta["val"] = v
        cat.replace_all_uses_with(joined)
        g.erase_node(cat)
        lowered["concat_slices"] += 1


def _lower_channel_stats(gm: fx.GraphModule, lowered: Counter[str]) -> None:
    """A squeeze-excitation gate, a GroupNorm or a global average pool (ASPP's image
    pooling, PSPNet's 1×1 level) reading a conv's output takes the channel statistics
    that conv's epilogue writes (``conv2d(..., stats=)``) instead of reading the map
    again: the conv returns (out, stats); its readers get ``out``, the reducers also
    ``stats``. Runs after _lower_concats (a slice-writing conv keeps its out=)."""
    g = gm.graph
    readers: dict[fx.Node, list[fx.Node]] = {}
    for node in g.nodes:
        global_pool = node.target is _adaptive_avg and [int(s) for s in node.args[1]] == [1, 1]
        if node.op == "call_function" and (
            node.target in (_se_gate, _group_norm, _global_avg) or global_pool
        ):
            src = node.args[0]
            if isinstance(src, fx.Node) and src.target in _STATS_OF:
                readers.setdefault(src, []).append(node)
    for conv, consumers in readers.items():
        with g.inserting_after(conv):
            pair = g.call_function(_STATS_OF[conv.target], conv.args, dict(conv.kwargs))
        with g.inserting_after(pair):
            out = g.call_function(operator.getitem, (pair, 0))
        with g.inserting_after(out):
            stats = g.call_function(operator.getitem, (pair, 1))
        out.meta = dict(conv.meta)
        conv.replace_all_uses_with(out)
        g.erase_node(conv)
        for node in consumers:
            node.kwargs = {**node.kwargs, "stats": stats}
            lowered["channel_stats_from_conv"] += 1


class TritonBackend(Backend):
    name = "triton"
    options = ("no_cuda_graph",)
    # see Backend: the kernels use where(), not min/max, and NaN-aware argmax and max-pool
    propagates_nonfinite = True
    uses_graph = True
    slice_outputs = True
    description = "fused graph on segfast's Triton kernels, CUDA-graph replay on GPU"

    def availability(self, device: torch.device | None = None) -> tuple[bool, str]:
        try:
            import triton
        except ImportError:
            return False, "triton is not installed (pip install 'segfast[triton]')"
        version = f"triton {triton.__version__}"
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return False, f"{version}, but no CUDA GPU is present"
            return True, f"{version} on {torch.cuda.get_device_name(device)}"
        if device.type == "cpu" and _interpreting():
            return True, f"{version} interpreter on the CPU (TRITON_INTERPRET=1: tests only, slow)"
        return False, (
            f"{version} needs a CUDA GPU (on the CPU only under TRITON_INTERPRET=1, for tests)"
        )

    def build(self, req: BuildRequest) -> Runner:
        ok, why = self.availability(req.device)
        if not ok:
            raise BackendUnavailable(f"triton: {why}")
        if req.graph is None:
            raise BackendUnavailable("the triton backend needs the fused graph")
        if req.device.type == "cpu" and req.dtype == torch.bfloat16:
            raise BackendUnavailable(
                "triton: bf16 arithmetic is wrong in Triton's CPU interpreter; "
                "bf16 engines need a GPU"
            )
        gm, lowered, kept = lower(req.graph.to(req.device))
        notes = ["Triton kernels: " + ", ".join(f"{k} ×{n}" for k, n in sorted(lowered.items()))]
        if kept:
            notes.append(
                "still on PyTorch: " + ", ".join(f"{k} ×{n}" for k, n in sorted(kept.items()))
            )

        def run(*inputs: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return gm(*inputs)

        # integers carry no NaN and int8 saturates ±Inf: the api runs non-finite inputs
        # of an int8 engine through the eager model (outside any CUDA graph)
        finite = {"propagates_nonfinite": False} if _has_int8(gm) else {}
        details: dict[str, Any] = {"graph": gm, "lowered": dict(lowered), "kept": dict(kept)}
        static = not req.dynamic
        if req.device.type == "cuda" and static and not req.options.get("no_cuda_graph"):
            replay = _cuda_graph(run, req.inputs)
            notes.append("CUDA graph: captured after autotuning; replayed per call")
            return Runner(replay, notes=notes, cuda_graph=True, details=details, **finite)
        return Runner(run, notes=notes, details=details, **finite)


_INT8_OPS = (_qconv2d, segfast_ops.qconv2d.default, segfast_ops.qconv_transpose2d.default)


def _has_int8(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and n.target in _INT8_OPS for n in gm.graph.nodes)


def _cuda_graph(
    run: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]
) -> Callable[..., torch.Tensor]:
    """Warm up (autotune) on a side stream, capture one graph, return a replayer."""
    static_in = [t.clone() for t in inputs]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # the first calls autotune and compile
            run(*static_in)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(*static_in)

    def replay(*xs: torch.Tensor) -> torch.Tensor:
        for dst, src in zip(static_in, xs, strict=True):
            dst.copy_(src)
        graph.replay()
        return static_out.clone()

    return replay


def _register_cuda_kernels() -> None:
    """Give ``torch.ops.segfast.*`` their Triton implementations on CUDA tensors.

    The composite PyTorch implementation stays the default for every other
    device; the ``torch`` backend calls the composite directly, so only direct
    callers of the ops on CUDA (and graphs that keep the ops) reach these.
    """
    torch.library.register_kernel("segfast::conv2d", "cuda", _conv2d)
    torch.library.register_kernel("segfast::conv_transpose2d", "cuda", _conv_transpose2d)
    torch.library.register_kernel("segfast::head", "cuda", _head)
    # segfast::qconv2d keeps its composite on CUDA: the torch backend runs int8 graphs
    # through the op (its direct-call table has no qconv2d), and must stay PyTorch.


_register_cuda_kernels()
