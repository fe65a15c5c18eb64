"""A sum over stacked tensors — ``torch.stack(xs).sum(0)`` (smp's FPN merge),
``torch.stack(xs, d).sum(d)`` — becomes a chain of adds, and Python's ``sum(xs)``
loses its ``+ 0``.

A stack copies every term into one new tensor and the sum reads it back: two
passes over n tensors before anything useful happens. Adds cost one pass each,
and most disappear: ``conv_epilogue`` folds ``add(·, conv(x))`` into the conv's
store (its residual epilogue) and the Triton backend folds ``add(·, resize(x))``
into the resize's store. So the terms are summed in an order that lets that
happen: terms whose producer can take an addend (a convolution, with or without
its activation; a resize) last, the others first, each group in the stack's order.

Matched forms (what ``torch.export`` decomposes a stack into): ``view(cat(xs, d),
[..., n, ...])`` and ``cat([unsqueeze(x, d) for x in xs], d)`` (a stack along the
last dimension), read by ``sum.dim_IntList`` over that one dimension, without
``keepdim`` or a ``dtype``; floating-point terms of one shape and dtype, each read
by nothing else of the stack. Anything else (a stack someone else reads, a mean,
a weighted sum, integer terms, which ``sum`` would promote to int64) is left as it
is. ``add(x, 0)`` (Python's ``sum`` starts from 0) is dropped when it changes
neither dtype nor shape.

Numerics: the same n − 1 additions as ATen's reduction along an outer dimension,
possibly in another order: results differ from eager in the last bit of fp32
(relative 1e-7), far inside segfast's fp32 contract; in fp16/bf16 each add rounds
once, where ATen's reduction accumulates in fp32 and rounds at the end (so a sum
near fp16's range limit can overflow in the chain) — the low-precision contracts the
checks apply judge the result either way.
"""

from __future__ import annotations

import torch
from torch import fx

from segfast.compiler.context import PassContext
from segfast.compiler.graph import erase_dead, infer_val, is_call, single_user, val
from segfast.compiler.patterns import ACTIVATION_OPS, resample_of

aten = torch.ops.aten


def _same_size(a: object, b: object) -> bool:
    """Two sizes that are the same int, or the same symbolic expression."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


def _norm(dim: object, rank: int) -> int | None:
    if not isinstance(dim, int) or not -rank <= dim < rank:
        return None
    return dim % rank


def _terms(src: fx.Node, dim: int) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """(the stacked tensors, the stack's own nodes) when ``src`` is a stack of
    same-shaped floating-point tensors along ``dim`` (of the stacked rank), else None."""
    inner: list[fx.Node] = []
    if is_call(src, aten.view.default, aten.reshape.default):
        cat = src.args[0]
        if not is_call(cat, aten.cat.default) or single_user(cat) is not src:
            return None
        xs = list(cat.args[0])
        shape = list(val(src).shape)
        rank = len(shape) - 1
        cat_dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        if _norm(cat_dim, rank) != dim or dim >= rank or not _same_size(shape[dim], len(xs)):
            return None
        expect = shape[:dim] + shape[dim + 1 :]
        inner = [cat, src]
    elif is_call(src, aten.cat.default):
        parts = list(src.args[0])
        rank = val(src).dim() - 1
        cat_dim = src.args[1] if len(src.args) > 1 else src.kwargs.get("dim", 0)
        if _norm(cat_dim, rank + 1) != dim:
            return None
        xs = []
        for u in parts:
            if not is_call(u, aten.unsqueeze.default) or single_user(u) is not src:
                return None
            if _norm(u.args[1], rank + 1) != dim:
                return None
            xs.append(u.args[0])
        v0 = val(xs[0]) if xs and isinstance(xs[0], fx.Node) else None
        expect = list(v0.shape) if isinstance(v0, torch.Tensor) else []
        inner = [*parts, src]
    else:
        return None
    if not xs or len(set(xs)) != len(xs):
        return None
    first = val(xs[0]) if isinstance(xs[0], fx.Node) else None
    for x in xs:
        v = val(x) if isinstance(x, fx.Node) else None
        if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point:
            return None
        if v.dtype != first.dtype or len(v.shape) != len(expect):
            return None
        if not all(_same_size(a, b) for a, b in zip(v.shape, expect, strict=True)):
            return None
    return xs, inner


def _takes_addend(node: fx.Node) -> bool:
    """Whether ``node``'s producer can absorb an add into its store (see the docstring)."""
    if is_call(node, aten.convolution.default) or resample_of(node) is not None:
        return True
    if node.op == "call_function" and node.target in ACTIVATION_OPS:
        src = node.args[0]
        return is_call(src, aten.convolution.default) and single_user(src) is node
    return False


def _stack_sum(ctx: PassContext, node: fx.Node) -> bool:
    if not is_call(node, aten.sum.dim_IntList) or node.kwargs.get("dtype") is not None:
        return False
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    dims = node.args[1]
    src = node.args[0]
    if keepdim or not isinstance(dims, (list, tuple)) or len(dims) != 1:
        return False
    if not isinstance(src, fx.Node) or single_user(src) is not node:
        return False
    dim = _norm(dims[0], val(src).dim())
    found = None if dim is None else _terms(src, dim)
    if found is None:
        return False
    xs, inner = found
    if val(node).dtype != val(xs[0]).dtype:
        return False
    # stable: the terms nothing can absorb first, then those a producer can
    order = sorted(xs, key=lambda x: _takes_addend(x) and len(x.users) == 1)
    acc = order[0]
    with ctx.gm.graph.inserting_before(node):
        for term in order[1:]:
            acc = ctx.gm.graph.call_function(aten.add.Tensor, (acc, term))
            acc.meta.update(
                {k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")}
            )
            infer_val(ctx.gm, acc)
    node.replace_all_uses_with(acc)
    erase_dead(ctx.gm, [node, *reversed(inner)])
    ctx.record("stack_sum")
    return True


def _plus_zero(node: fx.Node) -> bool:
    """``add(x, 0)`` that returns x unchanged (same dtype and shape)."""
    if not is_call(node, aten.add.Tensor) or len(node.args) != 2:
        return False
    x, zero = node.args
    if isinstance(zero, bool) or not isinstance(zero, (int, float)) or zero != 0:
        return False
    if node.kwargs.get("alpha", 1) != 1 or not isinstance(x, fx.Node):
        return False
    xv, ov = val(x), val(node)
    if not isinstance(xv, torch.Tensor) or not isinstance(ov, torch.Tensor):
        return False
    return xv.dtype == ov.dtype and len(xv.shape) == len(ov.shape)


def run(ctx: PassContext) -> None:
    for node in list(ctx.gm.graph.nodes):  # a match erases only nodes up to itself
        if _plus_zero(node):
            node.replace_all_uses_with(node.args[0])
            erase_dead(ctx.gm, [node])
        else:
            _stack_sum(ctx, node)
