"""Runs the ordered passes over a captured graph and tidies the result."""

from __future__ import annotations

import torch
from torch import fx

from segfast.compiler.context import PassContext
from segfast.compiler.graph import fake_mode_of, infer_val
from segfast.compiler.passes import PASSES


def refresh_values(gm: fx.GraphModule) -> None:
    """Recompute every node's fake value after passes changed dtypes and layouts."""
    mode = fake_mode_of(gm)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            if isinstance(obj, torch.Tensor):
                node.meta["val"] = mode.from_tensor(obj, static_shapes=True)
        elif node.op == "call_function":
            infer_val(gm, node)


def prune_constants(gm: fx.GraphModule) -> None:
    """Delete parameters and buffers no ``get_attr`` node reads any more."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used:
            continue
        owner_path, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        owner._parameters.pop(leaf, None)
        owner._buffers.pop(leaf, None)


def run_passes(ctx: PassContext) -> PassContext:
    for name, fn in PASSES:
        fn(ctx)
        ctx.passes_run.append(name)
    ctx.gm.graph.eliminate_dead_code()
    prune_constants(ctx.gm)
    ctx.gm.graph.lint()
    refresh_values(ctx.gm)
    ctx.gm.recompile()
    return ctx
