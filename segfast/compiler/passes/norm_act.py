"""GroupNorm and InstanceNorm (+ the activation after them) become ``segfast.group_norm``.

Matched::

    native_group_norm(x, w, b, N, C, HxW, G, eps)[0] [→ act]            GroupNorm
    reshape(x, [1, N·C, H, W]) → _native_batch_norm_legit.no_stats(·,
        repeat(w, [N]), repeat(b, [N]), training=True, ·, eps)[0]
        → reshape([N, C, H, W]) [→ act]                                 InstanceNorm2d

(``torch.export`` decomposes ``InstanceNorm2d`` into the second form, statistics per
image and channel; with ``affine=False`` the weight and bias are absent; with a
dynamic batch the sizes N·C and the repeat count are symbolic, compared as
expressions.) The
activation is any of the epilogue activations. On a GPU the op is one statistics
pass and one pass that normalises, applies the affine and the activation and
writes once (PyTorch: GroupNorm, then a separate activation pass).
"""

from __future__ import annotations

import torch
from torch import fx

from segfast.compiler.context import PassContext
from segfast.compiler.graph import erase_dead, getitem_users, infer_val, is_call, single_user, val
from segfast.compiler.patterns import ACTIVATION_OPS

try:  # torch ≥ 2.1; the name moved between releases
    from torch.fx.experimental.symbolic_shapes import statically_known_true
except ImportError:  # pragma: no cover

    def statically_known_true(x: object) -> bool:  # type: ignore[misc]
        return isinstance(x, bool) and x


aten = torch.ops.aten
segfast = torch.ops.segfast

_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _only_output(norm: fx.Node) -> fx.Node | None:
    """The single ``getitem 0`` of a multi-output norm node, when nothing else is read."""
    outs = getitem_users(norm, 0)
    if len(outs) != 1 or len(norm.users) != 1:
        return None
    return outs[0]


# (x, groups, weight, bias, eps, the node whose value the norm ends in, every node matched)
_Match = tuple[fx.Node, int, object, object, float, fx.Node, list[fx.Node]]


def _group_norm(node: fx.Node) -> _Match | None:
    if not is_call(node, aten.native_group_norm.default):
        return None
    x, w, b, _n, _c, _hw, groups, eps = node.args
    out = _only_output(node)
    if out is None or val(x).dim() != 4:
        return None
    return x, int(groups), w, b, float(eps), out, [node, out]


def _same(a: object, b: object) -> bool:
    """Sizes known equal: ints, or symbolic sizes (a dynamic batch) whose expressions
    are equal without adding a guard."""
    if isinstance(a, fx.Node):
        a = val(a)
    if isinstance(b, fx.Node):
        b = val(b)
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except (TypeError, RuntimeError):
        return False


def _repeat_source(node: object, n: object) -> tuple[bool, object]:
    """(ok, w) when ``node`` is None or ``repeat(w, [n])`` of a 1-D ``w``."""
    if node is None:
        return True, None
    if not is_call(node, aten.repeat.default) or len(node.args[1]) != 1:
        return False, None
    if not _same(node.args[1][0], n):
        return False, None
    return True, node.args[0]


def _instance_norm(node: fx.Node) -> _Match | None:
    if not is_call(node, aten._native_batch_norm_legit.no_stats):
        return None
    v, w, b, training, _momentum, eps = node.args
    if not training or not is_call(v, *_RESHAPES) or single_user(v) is not node:
        return None
    x = v.args[0]
    xv = val(x)
    if not isinstance(xv, torch.Tensor) or xv.dim() != 4:
        return None
    n, c = xv.shape[0], xv.shape[1]  # n may be symbolic (a dynamic batch); c is not
    if not isinstance(c, int):
        return None
    vv = val(v)
    if vv.dim() != 4 or not (_same(vv.shape[0], 1) and _same(vv.shape[1], n * c)):
        return None
    if not all(_same(a, b) for a, b in zip(vv.shape[2:], xv.shape[2:], strict=True)):
        return None
    ok_w, w0 = _repeat_source(w, n)
    ok_b, b0 = _repeat_source(b, n)
    item = _only_output(node)
    back = single_user(item) if item is not None else None
    if not (ok_w and ok_b) or back is None or not is_call(back, *_RESHAPES):
        return None
    bv = val(back)
    if bv.dim() != 4 or not all(_same(a, b) for a, b in zip(bv.shape, xv.shape, strict=True)):
        return None
    repeats = [a for a in (w, b) if isinstance(a, fx.Node)]
    return x, int(c), w0, b0, float(eps), back, [v, node, item, back, *repeats]


def run(ctx: PassContext) -> None:
    gm = ctx.gm
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        m = _group_norm(node)
        kind = "group_norm"
        if m is None:
            m = _instance_norm(node)
            kind = "instance_norm"
        if m is None:
            continue
        x, groups, w, b, eps, last, absorbed = m
        act, act_param = "none", 0.0
        nxt = single_user(last)
        if nxt is not None and nxt.op == "call_function" and nxt.target in ACTIVATION_OPS:
            a = ACTIVATION_OPS[nxt.target](nxt)
            if a is not None:
                act, act_param = a
                absorbed.append(nxt)
                last = nxt
        with gm.graph.inserting_before(last):
            new = gm.graph.call_function(
                segfast.group_norm.default, (x, groups, w, b, eps, act, float(act_param))
            )
        infer_val(gm, new)
        last.replace_all_uses_with(new)
        erase_dead(gm, list(reversed(absorbed)))
        ctx.record(kind)
        if act != "none":
            ctx.record("norm_act")
