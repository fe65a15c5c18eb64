"""Squeeze-excitation: the gate becomes one op, and its multiply moves into the next conv.

Matched (after conv_epilogue, so the gate's 1×1 convs are ``segfast.conv2d`` with
their activations fused)::

    g = conv_b(conv_a(pool(p)))   or   g = conv_a(pool(p))        [N, C, 1, 1]
    y = x * g                                                      x: [N, C, H, W]

``pool`` is a global average (``mean`` over H and W with keepdim, or an adaptive
average pool to 1×1); ``conv_a``/``conv_b`` are 1×1 convolutions of groups 1 on
the pooled map with no residual and no second source, each read only by the next
step. ``p`` is usually ``x`` (MobileNetV3's bneck, EfficientNet's MBConv); LR-ASPP
gates one branch by the pool of another.

The gate chain becomes ``segfast.se_gate`` (fusion ``squeeze_excite``). Each reader
of ``y`` that is a one-source ``segfast.conv2d`` taking ``y`` as its input — or a
bilinear/nearest resize of ``y`` read only by such a conv (a per-channel scale
commutes with a per-channel interpolation, so the resize moves before the gate) —
becomes ``segfast.conv2d_gated`` of ``x`` (fusion ``se_scale``): the gate is applied
as the conv reads its input and ``y`` is never written. A reader of any other kind
keeps the multiply (with the fused gate); the summary then lists ``mul`` as left
on PyTorch.
"""

from __future__ import annotations

import torch
from torch import fx

from segfast.compiler.context import PassContext
from segfast.compiler.graph import erase_dead, infer_val, is_call, replace_chain, single_user, val
from segfast.compiler.patterns import resample_of

aten = torch.ops.aten
segfast = torch.ops.segfast


def _global_pool(node: fx.Node) -> fx.Node | None:
    """The input of a global average pool with keepdim ([N, C, 1, 1] out), else None."""
    v = val(node)
    if not isinstance(v, torch.Tensor) or v.dim() != 4 or tuple(v.shape[2:]) != (1, 1):
        return None
    if is_call(node, aten.mean.dim):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if node.kwargs.get("dtype") is not None or not keep or dims is None:
            return None
        return node.args[0] if sorted(int(d) % 4 for d in dims) == [2, 3] else None
    if is_call(node, aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default):
        return node.args[0] if [int(s) for s in node.args[1]] == [1, 1] else None
    return None


def _gate_conv(node: fx.Node) -> bool:
    """A 1×1, groups-1, one-source ``segfast.conv2d`` with no residual on a 1×1 map."""
    if not is_call(node, segfast.conv2d.default):
        return False
    a = node.args
    w = val(a[1])
    if a[6] != 1 or a[9] is not None or a[11] is not None or tuple(w.shape[2:]) != (1, 1):
        return False
    return list(a[4]) == [0, 0] and tuple(val(node).shape[2:]) == (1, 1)


def _gate_chain(g: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(p, [conv_a, conv_b] or [conv_a]) when ``g`` is an SE gate, else None."""
    if not _gate_conv(g):
        return None
    inner = g.args[0]
    if isinstance(inner, fx.Node) and _gate_conv(inner) and single_user(inner) is g:
        pooled = inner.args[0]
        convs = [inner, g]
    else:
        pooled = inner
        convs = [g]
    if not isinstance(pooled, fx.Node):
        return None
    p = _global_pool(pooled)
    if p is None:
        return None
    return p, convs


def _gated_reader(user: fx.Node, y: fx.Node) -> bool:
    """``user`` is a one-source segfast.conv2d reading ``y`` as its input only."""
    if not is_call(user, segfast.conv2d.default):
        return False
    a = user.args
    return a[0] is y and a[11] is None and a[9] is not y


def _gated_conv(ctx: PassContext, conv: fx.Node, x: fx.Node, gate: fx.Node) -> None:
    args = (x, gate, *conv.args[1:11])
    replace_chain(ctx.gm, conv, segfast.conv2d_gated.default, args, [conv])


def _rewrite(ctx: PassContext, mul: fx.Node) -> None:
    if len(mul.args) != 2 or not all(isinstance(a, fx.Node) for a in mul.args):
        return
    yv = val(mul)
    for x, g in (mul.args, tuple(reversed(mul.args))):
        xv, gv = val(x), val(g)
        if not (isinstance(xv, torch.Tensor) and isinstance(gv, torch.Tensor)):
            continue
        if xv.dim() != 4 or gv.dim() != 4 or tuple(gv.shape[2:]) != (1, 1):
            continue
        if tuple(gv.shape[:2]) != tuple(xv.shape[:2]) or tuple(yv.shape) != tuple(xv.shape):
            continue
        if xv.dtype != gv.dtype or single_user(g) is not mul:
            continue
        chain = _gate_chain(g)
        if chain is not None:
            break
    else:
        return
    p, convs = chain
    gm = ctx.gm
    a = convs[0].args
    b = convs[1].args if len(convs) == 2 else None
    args = (
        p,
        a[1],
        a[2],
        a[7],
        float(a[8]),
        b[1] if b else None,
        b[2] if b else None,
        b[7] if b else "none",
        float(b[8]) if b else 0.0,
    )
    pool = convs[0].args[0]
    gate = replace_chain(gm, g, segfast.se_gate.default, args, [*reversed(convs), pool])
    ctx.record("squeeze_excite")

    for user in list(mul.users):
        if _gated_reader(user, mul):
            _gated_conv(ctx, user, x, gate)
            ctx.record("se_scale")
            continue
        rs = resample_of(user)
        reader = single_user(user)
        if (
            rs is not None
            and rs.input is mul
            and rs.mode in ("bilinear", "nearest")
            and reader is not None
            and _gated_reader(reader, user)
        ):
            with gm.graph.inserting_before(user):
                moved = gm.graph.call_function(user.target, (x, *user.args[1:]), user.kwargs)
            infer_val(gm, moved)
            _gated_conv(ctx, reader, moved, gate)
            erase_dead(gm, [user])
            ctx.record("se_scale")
    erase_dead(gm, [mul])


def run(ctx: PassContext) -> None:
    for node in list(ctx.gm.graph.nodes):
        if is_call(node, aten.mul.Tensor):
            _rewrite(ctx, node)
