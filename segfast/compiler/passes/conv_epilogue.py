"""Convolutions become segfast ops, and absorb the activation and residual add after them.

Matched chains (each intermediate with a single user), longest first:

    conv → add(·, r) → act      act(conv + r)            residual before the activation
    conv → act → add(·, r)      act(conv) + r            residual after the activation
    conv → add(·, r)            conv + r
    conv → act                  act(conv)

``r`` must have the conv output's shape and dtype (no broadcasting). The fused
node is inserted where the last absorbed node stood, so ``r`` is already
computed there.
"""

from __future__ import annotations

import torch
from torch import fx

from segfast.compiler.context import PassContext
from segfast.compiler.graph import erase_dead, infer_val, is_call, single_user, val
from segfast.compiler.patterns import ACTIVATION_OPS

aten = torch.ops.aten
segfast = torch.ops.segfast


def _activation(node: fx.Node | None) -> tuple[str, float] | None:
    if node is None or node.op != "call_function" or node.target not in ACTIVATION_OPS:
        return None
    return ACTIVATION_OPS[node.target](node)


def _residual(add: fx.Node | None, producer: fx.Node) -> fx.Node | None:
    """If ``add`` is ``producer + r`` with r of the same shape and dtype, return r."""
    if add is None or not is_call(add, aten.add.Tensor):
        return None
    if add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
        return None
    a, b = add.args
    other = b if a is producer else a if b is producer else None
    if not isinstance(other, fx.Node) or other is producer:
        return None
    pv, ov = val(producer), val(other)
    if not isinstance(ov, torch.Tensor) or tuple(ov.shape) != tuple(pv.shape):
        return None
    if ov.dtype != pv.dtype:
        return None
    return other


def _convert(ctx: PassContext, conv: fx.Node) -> None:
    x, w, b, stride, padding, dilation, transposed, out_pad, groups = conv.args
    chain = [conv]
    act, act_param = "none", 0.0
    residual, after = None, False
    nxt = single_user(conv)
    a = _activation(nxt)
    if a is not None:
        act, act_param = a
        chain.append(nxt)
        r = _residual(single_user(nxt), nxt)
        if r is not None:
            residual, after = r, True
            chain.append(single_user(nxt))
    else:
        r = _residual(nxt, conv)
        if r is not None:
            residual = r
            chain.append(nxt)
            a = _activation(single_user(nxt))
            if a is not None:
                act, act_param = a
                chain.append(single_user(nxt))
    last = chain[-1]
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    if transposed:
        args = (
            x,
            w,
            b,
            stride,
            padding,
            list(out_pad),
            dilation,
            int(groups),
            act,
            float(act_param),
            residual,
            after,
        )
        target = segfast.conv_transpose2d.default
        ctx.record("conv_transpose")
    else:
        args = (
            x,
            w,
            b,
            stride,
            padding,
            dilation,
            int(groups),
            act,
            float(act_param),
            residual,
            after,
            None,
            "none",
            False,
            None,
            None,
            False,
        )
        target = segfast.conv2d.default
        ctx.record("conv")
    with ctx.gm.graph.inserting_before(last):
        new = ctx.gm.graph.call_function(target, args)
    infer_val(ctx.gm, new)
    last.replace_all_uses_with(new)
    erase_dead(ctx.gm, list(reversed(chain)))
    if act != "none":
        ctx.record("conv_act")
    if residual is not None:
        ctx.record("conv_residual")


def run(ctx: PassContext) -> None:
    for node in list(ctx.gm.graph.nodes):
        if is_call(node, aten.convolution.default):
            _convert(ctx, node)
