"""A spatially constant branch of a concat read by 1×1 convolutions becomes a
per-image residual of those convolutions.

DeepLab's ASPP (and PSPNet's coarsest pyramid level) pools the whole map to
1×1, convolves it and upsamples it back before concatenating it with the other
branches; the 1×1 projection after the concat then multiplies a tensor that is
the same at every pixel. Split the projection's weight by the concat's
channels: the constant part contributes ``W_p · p`` (one vector per image),
computed at 1×1 and added as a broadcast residual before the activation, and
the upsampled tensor and its share of the concat are never written (ASPP at
512×512: 256 of 1280 concatenated channels, 20 % of the projection's
multiply-adds).

Exact up to rounding: bilinear/nearest resizing of a 1×1 map reproduces its
value at every pixel. Static spatial sizes only (the residual is an ``expand``
of the per-image vector to the output's size). Runs after conv_epilogue (the
projection must be a ``segfast.conv2d``) and before the passes that rewrite
concats.
"""

from __future__ import annotations

import torch
from torch import fx

from segfast.compiler.context import PassContext
from segfast.compiler.graph import add_constant, erase_dead, get_tensor, infer_val, is_call, val
from segfast.compiler.patterns import channel_concat, resample_of

aten = torch.ops.aten
segfast = torch.ops.segfast


def _constant_source(node: fx.Node) -> fx.Node | None:
    """The [N, C, 1, 1] tensor ``node`` spreads over the map, if it does."""
    rs = resample_of(node)
    src = rs.input if rs is not None and rs.mode in ("bilinear", "nearest") else None
    if src is None and is_call(node, aten.expand.default):
        src = node.args[0]
    if src is None:
        return None
    v = val(src)
    if not isinstance(v, torch.Tensor) or v.dim() != 4 or tuple(v.shape[2:]) != (1, 1):
        return None
    return src


def _pointwise_reader(user: fx.Node, cat: fx.Node) -> bool:
    if not is_call(user, segfast.conv2d.default):
        return False
    a = user.args
    if a[0] is not cat or a[9] is not None or a[11] is not None or a[6] != 1:
        return False
    if not isinstance(a[1], fx.Node) or a[1].op != "get_attr":
        return False
    return tuple(val(a[1]).shape[2:]) == (1, 1) and list(a[3]) == [1, 1] and list(a[4]) == [0, 0]


def run(ctx: PassContext) -> None:
    gm = ctx.gm
    for cat in list(gm.graph.nodes):
        parts = channel_concat(cat)
        out = val(cat)
        if parts is None or not all(isinstance(d, int) for d in out.shape):
            continue
        consts = [(i, _constant_source(p)) for i, p in enumerate(parts)]
        consts = [(i, s) for i, s in consts if s is not None]
        if len(consts) != 1 or len(parts) < 2 or parts.count(parts[consts[0][0]]) != 1:
            continue
        if not all(_pointwise_reader(u, cat) for u in cat.users):
            continue
        ((ci, src),) = consts
        widths = [int(val(p).shape[1]) for p in parts]
        c0 = sum(widths[:ci])
        keep = [p for i, p in enumerate(parts) if i != ci]
        with gm.graph.inserting_before(cat):
            rest = (
                keep[0] if len(keep) == 1 else gm.graph.call_function(aten.cat.default, (keep, 1))
            )
        if rest is not keep[0]:
            infer_val(gm, rest)
        n, _, h, w = out.shape
        for conv in list(cat.users):
            weight = get_tensor(gm, conv.args[1])
            k = int(weight.shape[0])
            w_const = torch.cat([weight[:, :c0], weight[:, c0 + widths[ci] :]], 1)
            w_rest = add_constant(
                gm, w_const, f"{conv.args[1].target}_rest", conv, source=conv.args[1]
            )
            w_p = add_constant(
                gm,
                weight[:, c0 : c0 + widths[ci]],
                f"{conv.args[1].target}_bcast",
                conv,
                source=conv.args[1],
            )
            with gm.graph.inserting_before(conv):
                vec = gm.graph.call_function(
                    segfast.conv2d.default,
                    (src, w_p, None, [1, 1], [0, 0], [1, 1], 1, "none", 0.0, None, False, None,
                     "none", False, None, None, False),
                )  # fmt: skip
                infer_val(gm, vec)
                spread = gm.graph.call_function(aten.expand.default, (vec, [n, k, h, w]))
                infer_val(gm, spread)
                args = list(conv.args)
                args[0], args[1], args[9], args[10] = rest, w_rest, spread, False
                new = gm.graph.call_function(segfast.conv2d.default, tuple(args))
            infer_val(gm, new)
            conv.replace_all_uses_with(new)
            gm.graph.erase_node(conv)
            ctx.record("broadcast_branch")
        erase_dead(gm, [cat, parts[ci]])
