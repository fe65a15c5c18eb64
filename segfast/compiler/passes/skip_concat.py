"""Skip-concat fusion: ``cat([a, b], dim=1)`` read only by convolutions becomes
those convolutions' two-source prologue, so the concatenated tensor is never
written; when one side is a nearest/bilinear upsample (the U-Net, FPN and
DeepLab v3+ decoders), the resize is computed on the fly as well.

Runs after conv_epilogue: the consumers must already be ``segfast.conv2d``
(groups 1, single source).
"""

from __future__ import annotations

import torch
from torch import fx

from segfast.compiler.context import PassContext
from segfast.compiler.graph import erase_dead, infer_val, is_call, val
from segfast.compiler.patterns import resample_of

aten = torch.ops.aten
segfast = torch.ops.segfast


def _consumer_ok(user: fx.Node, cat: fx.Node) -> bool:
    if not is_call(user, segfast.conv2d.default):
        return False
    args = user.args
    # args: x, w, b, stride, padding, dilation, groups, act, act_param, residual,
    #       residual_after_act, x2, ...
    return args[0] is cat and args[6] == 1 and args[11] is None and args[9] is not cat


def _cat_parts(cat: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    if not is_call(cat, aten.cat.default) or len(cat.args[0]) != 2:
        return None
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if dim not in (1, -3) or len(val(cat).shape) != 4:
        return None
    a, b = cat.args[0]
    return a, b


def run(ctx: PassContext) -> None:
    gm = ctx.gm
    for cat in list(gm.graph.nodes):
        parts = _cat_parts(cat)
        if parts is None or not cat.users:
            continue
        if not all(_consumer_ok(u, cat) for u in cat.users):
            continue
        a, b = parts
        ra, rb = resample_of(a), resample_of(b)
        if rb is not None:
            x, src, first, rs = a, rb.input, False, rb
        elif ra is not None:
            x, src, first, rs = b, ra.input, True, ra
        else:
            x, src, first, rs = a, b, False, None
        if rs is not None and rs.mode == "nearest-exact":
            x, src, first, rs = a, b, False, None
        for conv in list(cat.users):
            args = list(conv.args)
            args[0] = x
            args[11] = src
            if rs is not None:
                args[12], args[13], args[14], args[15] = (
                    rs.mode,
                    rs.align_corners,
                    rs.scale_h,
                    rs.scale_w,
                )
            args[16] = first
            with gm.graph.inserting_before(conv):
                new = gm.graph.call_function(segfast.conv2d.default, tuple(args))
            infer_val(gm, new)
            conv.replace_all_uses_with(new)
            gm.graph.erase_node(conv)
            ctx.record("skip_concat_resize" if rs is not None else "skip_concat")
        resized = b if rb is not None else a if ra is not None else None
        erase_dead(gm, [cat] + ([resized] if resized is not None and rs is not None else []))
