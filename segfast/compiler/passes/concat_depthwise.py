"""Depthwise convolution of a concat: ``dw(cat([a, b]))`` becomes
``cat([dw_a(a), dw_b(b)])`` with the depthwise weights split by channel.

A depthwise convolution reads one channel per output channel, so it cannot take
the two-source prologue itself; but it commutes with the concatenation. Pushed
through, the concat moves one step down to the depthwise convolution's
consumer — in DeepLab v3+'s decoder (``cat([up(aspp), low]) → depthwise 3×3 →
pointwise 1×1``) and in any separable convolution after a skip concat that
consumer is a dense convolution, which the ``skip_concat`` pass then turns into
a two-source prologue, so no concatenated tensor is written at all (DeepLab v3+
at 512×512: 304 channels at 128×128, 20 MB written and read twice per frame).

Exact: each output channel is computed from the same inputs and weights as
before. Runs after conv_epilogue (the depthwise convs are ``segfast.conv2d``)
and before skip_concat.
"""

from __future__ import annotations

import torch
from torch import fx

from segfast.compiler.context import PassContext
from segfast.compiler.graph import add_constant, erase_dead, get_tensor, infer_val, is_call, val
from segfast.compiler.patterns import channel_concat

aten = torch.ops.aten
segfast = torch.ops.segfast


def _depthwise_reader(user: fx.Node, cat: fx.Node, channels: int) -> bool:
    if not is_call(user, segfast.conv2d.default):
        return False
    x, w, b = user.args[0], user.args[1], user.args[2]
    groups, residual, x2 = user.args[6], user.args[9], user.args[11]
    if x is not cat or residual is not None or x2 is not None:
        return False
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return False
    if b is not None and (not isinstance(b, fx.Node) or b.op != "get_attr"):
        return False
    wv = val(w)
    return groups == channels and wv.shape[0] == channels and wv.shape[1] == 1


def run(ctx: PassContext) -> None:
    gm = ctx.gm
    for cat in list(gm.graph.nodes):
        parts = channel_concat(cat)
        if parts is None:
            continue
        widths = [val(p).shape[1] for p in parts]
        if len(parts) < 2 or not all(isinstance(c, int) for c in widths):
            continue
        channels = sum(widths)
        if not all(_depthwise_reader(u, cat, channels) for u in cat.users):
            continue
        for dw in list(cat.users):
            weight = get_tensor(gm, dw.args[1])
            bias = None if dw.args[2] is None else get_tensor(gm, dw.args[2])
            pieces, c0 = [], 0
            for part, c in zip(parts, widths, strict=True):
                w_node = add_constant(
                    gm, weight[c0 : c0 + c], f"{dw.args[1].target}_c{c0}", dw, source=dw.args[1]
                )
                b_node = None
                if bias is not None:
                    b_node = add_constant(
                        gm, bias[c0 : c0 + c], f"{dw.args[2].target}_c{c0}", dw, source=dw.args[2]
                    )
                args = list(dw.args)
                args[0], args[1], args[2], args[6] = part, w_node, b_node, c
                with gm.graph.inserting_before(dw):
                    piece = gm.graph.call_function(segfast.conv2d.default, tuple(args))
                infer_val(gm, piece)
                pieces.append(piece)
                c0 += c
            with gm.graph.inserting_before(dw):
                joined = gm.graph.call_function(aten.cat.default, (pieces, 1))
            infer_val(gm, joined)
            dw.replace_all_uses_with(joined)
            gm.graph.erase_node(dw)
            ctx.record("concat_depthwise")
        erase_dead(gm, [cat])
