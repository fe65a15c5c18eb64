"""Activations written out in elementary ops become the ATen op they spell, so the
epilogue and SE passes fuse them like the library modules:

- ``x · sigmoid(x)`` (either order) → ``silu(x)``: timm's ``Swish`` (smp's
  ``timm-efficientnet-*`` encoders), hand-written Swish/SiLU in detection and
  segmentation code.
- ``relu6(x + 3) / 6`` → ``hardsigmoid(x)`` and ``x · relu6(x + 3) / 6`` or
  ``x · hardsigmoid(x)`` → ``hardswish(x)``: MobileNetV3 implementations written
  before PyTorch had the ops (``h_sigmoid`` / ``h_swish``). relu6 is ``F.relu6`` /
  ``hardtanh(·, 0, 6)`` / ``clamp(·, 0, 6)``; ``/ 6`` may be ``· (1/6)``.

Exact up to rounding: PyTorch's own kernels compute the same expressions (hardsigmoid
as min(max(x + 3, 0), 6) / 6; SiLU as x · sigmoid(x) with the sigmoid in the
vectorised form), so results differ by an ulp or so where they differ at all. Runs
right after cleanup, before the passes that fuse activations.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from segfast.compiler.context import PassContext
from segfast.compiler.graph import erase_dead, infer_val, is_call, val

aten = torch.ops.aten


def _scalar(arg: Any) -> float | None:
    return float(arg) if isinstance(arg, int | float) and not isinstance(arg, bool) else None


def _float_tensor(node: Any) -> bool:
    v = val(node) if isinstance(node, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _relu6_of(node: Any) -> fx.Node | None:
    """a, where ``node`` is relu6(a) (hardtanh(a, 0, 6) or clamp(a, 0, 6))."""
    relu6 = is_call(node, aten.hardtanh.default, aten.clamp.default) and len(node.args) == 3
    if relu6 and _scalar(node.args[1]) == 0.0 and _scalar(node.args[2]) == 6.0:
        return node.args[0]
    return None


def _plus3_of(node: Any) -> fx.Node | None:
    """x, where ``node`` is x + 3."""
    if is_call(node, aten.add.Tensor) and node.kwargs.get("alpha", 1) == 1:
        a, b = node.args[0], node.args[1]
        if isinstance(a, fx.Node) and _scalar(b) == 3.0:
            return a
        if isinstance(b, fx.Node) and _scalar(a) == 3.0:
            return b
    return None


def _over6_of(node: Any) -> fx.Node | None:
    """a, where ``node`` is a / 6 or a · (1/6)."""
    div = is_call(node, aten.div.Tensor) and len(node.args) == 2 and not node.kwargs
    if div and isinstance(node.args[0], fx.Node) and _scalar(node.args[1]) == 6.0:
        return node.args[0]
    if is_call(node, aten.mul.Tensor):
        for a, b in (node.args, node.args[::-1]):
            c = _scalar(b)
            if isinstance(a, fx.Node) and c is not None and abs(c - 1 / 6) < 1e-7:
                return a
    return None


def _hardsigmoid_core(node: Any) -> tuple[fx.Node, list[fx.Node]] | None:
    """(x, [relu6, add]) where ``node`` is relu6(x + 3)."""
    inner = _relu6_of(node)
    x = _plus3_of(inner)
    return (x, [node, inner]) if x is not None else None


def _product(node: fx.Node) -> list[tuple[fx.Node, Any]]:
    """Both (x, other) orderings of a two-tensor multiply."""
    if not is_call(node, aten.mul.Tensor) or len(node.args) != 2:
        return []
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return []
    return [(a, b), (b, a)]


def _match(node: fx.Node) -> tuple[Any, fx.Node, list[fx.Node]] | None:
    """(the ATen activation, its input, the nodes it replaces) for ``node``, or None."""
    for x, other in _product(node):
        if is_call(other, aten.sigmoid.default) and other.args[0] is x:
            return aten.silu.default, x, [node, other]
        if is_call(other, aten.hardsigmoid.default) and other.args[0] is x:
            return aten.hardswish.default, x, [node, other]
    inner = _over6_of(node)
    if inner is None:
        return None
    core = _hardsigmoid_core(inner)
    if core is not None:  # relu6(x + 3) / 6
        return aten.hardsigmoid.default, core[0], [node, *core[1]]
    for x, other in _product(inner):  # x · relu6(x + 3) / 6
        core = _hardsigmoid_core(other)
        if core is not None and core[0] is x:
            return aten.hardswish.default, x, [node, inner, *core[1]]
    return None


def run(ctx: PassContext) -> None:
    gm = ctx.gm
    made: set[fx.Node] = set()  # x·hardsigmoid(x) over a rewritten hardsigmoid counts once
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph or node.op != "call_function":
            continue  # erased as part of an earlier match
        m = _match(node)
        if m is None:
            continue
        target, x, chain = m
        v = val(node)
        if not (_float_tensor(x) and isinstance(v, torch.Tensor)):
            continue
        if tuple(v.shape) != tuple(val(x).shape) or v.dtype != val(x).dtype:
            continue  # a broadcast or a type promotion: not the activation
        with gm.graph.inserting_before(node):
            act = gm.graph.call_function(target, (x,))
        infer_val(gm, act)
        node.replace_all_uses_with(act)
        if not made.intersection(chain):
            ctx.record("written_activation")
        made.add(act)
        erase_dead(gm, chain)  # the inner nodes stay where something else reads them
