"""Drop ops that compute nothing at inference: identity clones (eval-mode dropout
becomes one), aliases, and zero padding."""

from __future__ import annotations

import torch

from segfast.compiler.context import PassContext
from segfast.compiler.graph import erase_dead

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


def run(ctx: PassContext) -> None:
    g = ctx.gm.graph
    for node in list(g.nodes):
        if _is_identity(node):
            node.replace_all_uses_with(node.args[0])
            erase_dead(ctx.gm, [node])
