"""Fold inference BatchNorm into the convolution before it.

conv(x, w, b) → BN(γ, β, μ, σ², ε)  ≡  conv(x, w·s, (b − μ)·s + β)  with  s = γ / √(σ² + ε),
computed in float64 and stored in the weights' dtype. Transposed convolutions
scale their output-channel dimension (dim 1 of the weight, per group).
"""

from __future__ import annotations

import torch

from segfast.compiler.context import PassContext
from segfast.compiler.graph import add_constant, erase_dead, get_tensor, getitem_users, is_call

aten = torch.ops.aten


def _fold(
    w: torch.Tensor,
    b: torch.Tensor | None,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    transposed: bool,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    w64 = w.double()
    s = (gamma.double() if gamma is not None else torch.ones_like(mean, dtype=torch.float64)) / (
        var.double() + eps
    ).sqrt()
    shift = beta.double() if beta is not None else torch.zeros_like(s)
    b64 = b.double() if b is not None else torch.zeros_like(s)
    if transposed:
        # weight [Cin, Cout/groups, kh, kw]; output channel o = g*(Cout/groups) + j
        cin, cpg = w64.shape[:2]
        wg = w64.reshape(groups, cin // groups, cpg, *w64.shape[2:])
        wg = wg * s.reshape(groups, 1, cpg, 1, 1)
        new_w = wg.reshape_as(w64)
    else:
        new_w = w64 * s.reshape(-1, 1, 1, 1)
    new_b = (b64 - mean.double()) * s + shift
    return new_w.to(w.dtype), new_b.to(w.dtype)


def run(ctx: PassContext) -> None:
    gm = ctx.gm
    for bn in list(gm.graph.nodes):
        if not is_call(bn, aten._native_batch_norm_legit_no_training.default):
            continue
        conv = bn.args[0]
        if not is_call(conv, aten.convolution.default) or len(conv.users) != 1:
            continue
        x, w_node, b_node, stride, padding, dilation, transposed, out_pad, groups = conv.args
        consts = [bn.args[i] for i in range(1, 5)]
        if w_node.op != "get_attr" or (b_node is not None and b_node.op != "get_attr"):
            continue
        if any(c is not None and c.op != "get_attr" for c in consts):
            continue
        outs = getitem_users(bn, 0)
        if len(outs) != len(bn.users):  # the saved mean/var outputs are used: leave it
            continue
        gamma, beta, mean, var = (get_tensor(gm, c) if c is not None else None for c in consts)
        eps = float(bn.args[6])
        new_w, new_b = _fold(
            get_tensor(gm, w_node),
            get_tensor(gm, b_node) if b_node is not None else None,
            gamma,
            beta,
            mean,
            var,
            eps,
            bool(transposed),
            int(groups),
        )
        w_new = add_constant(gm, new_w, f"{w_node.target}_bnfold", conv, source=w_node)
        b_new = add_constant(gm, new_b, f"{w_node.target}_bnfold_bias", conv)
        conv.args = (x, w_new, b_new, stride, padding, dilation, transposed, out_pad, groups)
        for o in outs:
            o.replace_all_uses_with(conv)
        erase_dead(gm, [*outs, bn, w_node, *(c for c in consts if c is not None)])
        if b_node is not None:
            erase_dead(gm, [b_node])
        ctx.record("bn_fold")
