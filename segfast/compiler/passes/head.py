"""Head fusion: grow the final ``segfast.head`` reduction (appended by the
compiler for ``output="mask"``/``"probs"``) backwards over a bilinear upsample
of the logits and a plain 1×1 classifier convolution, so the Triton kernel
computes argmax/softmax at full resolution without writing full-resolution
logits. Spatial crops (``slice`` on H/W, as pad-and-crop models end) between
them are moved after the head: a per-pixel reduction commutes with cropping.
"""

from __future__ import annotations

import torch
from torch import fx

from segfast.compiler.context import PassContext
from segfast.compiler.graph import erase_dead, infer_val, is_call, single_user, val
from segfast.compiler.patterns import resample_of

aten = torch.ops.aten
segfast = torch.ops.segfast


def _plain_1x1(node: fx.Node) -> bool:
    if not is_call(node, segfast.conv2d.default):
        return False
    w, stride, padding, groups, act, res, x2 = (node.args[i] for i in (1, 3, 4, 6, 7, 9, 11))
    ws = val(w).shape
    return (
        ws[2] == 1
        and ws[3] == 1
        and list(stride) == [1, 1]
        and list(padding) == [0, 0]
        and groups == 1
        and act == "none"
        and res is None
        and x2 is None
    )


def run(ctx: PassContext) -> None:
    gm = ctx.gm
    for hd in list(gm.graph.nodes):
        if not is_call(hd, segfast.head.default) or hd.args[1] is not None or hd.args[5]:
            continue
        x, _, _, _, _, _, _, _, _, mode, threshold, mask_dtype = hd.args
        absorbed: list[fx.Node] = []
        slices: list[fx.Node] = []
        node = x
        while (
            is_call(node, aten.slice.Tensor)
            and node.args[1] in (2, 3)
            and single_user(node)
            and (len(node.args) < 5 or node.args[4] == 1)
        ):
            slices.append(node)
            node = node.args[0]
        rs = resample_of(node)
        size = rs.size_for_graph() if rs is not None else None
        resize = (
            rs is not None
            and rs.mode == "bilinear"
            and single_user(node) is not None
            and size is not None
        )
        if resize:
            absorbed.append(node)
            out_h, out_w = size
            align, sh, sw = rs.align_corners, rs.scale_h, rs.scale_w
            node = rs.input
        else:
            out_h, out_w, align, sh, sw = 0, 0, False, None, None
        weight = bias = None
        if _plain_1x1(node) and single_user(node) is not None:
            absorbed.append(node)
            weight, bias = node.args[1], node.args[2]
            node = node.args[0]
        if not absorbed:
            continue
        args = (
            node,
            weight,
            bias,
            out_h,
            out_w,
            resize,
            align,
            sh,
            sw,
            mode,
            threshold,
            mask_dtype,
        )
        with gm.graph.inserting_before(hd):
            new = gm.graph.call_function(segfast.head.default, args)
        infer_val(gm, new)
        out = new
        # Re-apply the crops to the reduced output: the class dim is gone for masks.
        shift = 1 if mode in ("argmax", "threshold") else 0
        for s in reversed(slices):
            sargs = list(s.args)
            sargs[0], sargs[1] = out, s.args[1] - shift
            with gm.graph.inserting_before(hd):
                out = gm.graph.call_function(aten.slice.Tensor, tuple(sargs))
            infer_val(gm, out)
        hd.replace_all_uses_with(out)
        erase_dead(gm, [hd, *slices, *absorbed])
        ctx.record("head_conv" if weight is not None else "head")
