"""Drop ops that compute nothing at inference: identity clones (eval-mode dropout
becomes one), aliases, and zero padding; and move symmetric zero padding read only by
convolutions into their padding (``pad_into_conv``: TensorFlow-style "same" padding,
``Conv2dStaticSamePadding`` in efficientnet-pytorch / smp's ``efficientnet-b*``
encoders, explicit ``F.pad`` before a conv). Exact: a zero border convolved is the
conv's own zero padding. Asymmetric pads (stride-2 "same" at even sizes) stay.

A ``cat`` part of size 0 along the cat's dim is dropped (``empty_concat_part``):
segmentation_models_pytorch's U-Net on an encoder without a stride-2 stage (``mit_b*``)
joins its decoder with a 0-channel placeholder, which the two-source conv prologue would
otherwise split into a conv with a 0-channel weight (oneDNN refuses to pack one).
"""

from __future__ import annotations

import torch
from torch import fx

from segfast.compiler.context import PassContext
from segfast.compiler.graph import erase_dead, is_call, val
from segfast.compiler.patterns import zero_pad_sides

aten = torch.ops.aten


def _is_identity(node) -> bool:  # type: ignore[no-untyped-def]
    if node.op != "call_function":
        return False
    if node.target in (aten.alias.default, aten.detach.default):
        return True
    if node.target is aten.clone.default:
        # A clone that changes the memory format is a layout op, not an identity.
        return node.kwargs.get("memory_format") in (None, torch.preserve_format)
    if node.target is aten.constant_pad_nd.default:
        pads = node.args[1]
        return all(isinstance(p, int) and p == 0 for p in pads)
    return False


def _symmetric_zero_pad(node) -> tuple[int, int] | None:  # type: ignore[no-untyped-def]
    """(pad_h, pad_w) of a zero pad of H and W equal on both sides; None otherwise."""
    sides = zero_pad_sides(node)
    if sides is None or sides[0] != sides[1] or sides[2] != sides[3]:
        return None
    return sides[0], sides[2]


def _plain_conv(node, source) -> bool:  # type: ignore[no-untyped-def]
    """A non-transposed 2-D convolution of ``source`` (its input, not its weight)."""
    if not is_call(node, aten.convolution.default) or node.args[0] is not source:
        return False
    return not node.args[6] and len(node.args[4]) == 2


def _pad_into_conv(ctx: PassContext, pad) -> None:  # type: ignore[no-untyped-def]
    sym = _symmetric_zero_pad(pad)
    users = list(pad.users)
    if sym is None or not users or not all(_plain_conv(u, pad) for u in users):
        return
    for conv in users:
        args = list(conv.args)
        ph, pw = (int(p) for p in args[4])
        args[0], args[4] = pad.args[0], [ph + sym[0], pw + sym[1]]
        conv.args = tuple(args)
        ctx.record("pad_into_conv")
    erase_dead(ctx.gm, [pad])


def _drop_empty_parts(ctx: PassContext, cat) -> None:  # type: ignore[no-untyped-def]
    """``cat`` without its parts of static size 0 along its dim (one part left: that part)."""
    if not is_call(cat, aten.cat.default):
        return
    parts = list(cat.args[0])
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    out = val(cat)
    if not isinstance(out, torch.Tensor) or not isinstance(dim, int):
        return
    dim %= out.dim()
    kept, dropped = [], []
    for p in parts:
        v = val(p) if isinstance(p, fx.Node) else None
        # a 1-D empty tensor is cat's legacy "skip me" (any shape): dropped too
        size = v.shape[dim] if isinstance(v, torch.Tensor) and v.dim() == out.dim() else None
        if (
            isinstance(v, torch.Tensor)
            and v.dtype == out.dtype  # cat promotes across every part, empty ones too
            and ((isinstance(size, int) and size == 0) or (v.dim() == 1 and v.shape[0] == 0))
        ):
            dropped.append(p)
            continue
        kept.append(p)
    if len(kept) == len(parts) or not kept:
        return
    if any(
        not isinstance(val(p), torch.Tensor) or val(p).dtype != out.dtype
        for p in kept
        if isinstance(p, fx.Node)
    ):
        return  # the kept parts alone would make another dtype
    if len(kept) == 1 and val(kept[0]).shape == out.shape:
        cat.replace_all_uses_with(kept[0])
    else:
        cat.args = (kept, *cat.args[1:])
    ctx.record("empty_concat_part")
    erase_dead(ctx.gm, [cat, *(p for p in dropped if p.op != "placeholder")])


def run(ctx: PassContext) -> None:
    g = ctx.gm.graph
    for node in list(g.nodes):
        if _is_identity(node):
            node.replace_all_uses_with(node.args[0])
            erase_dead(ctx.gm, [node])
        else:
            _pad_into_conv(ctx, node)
            _drop_empty_parts(ctx, node)
