"""Precision: run the graph in fp32, fp16 or bf16. Floating constants are cast
once (after BN folding, which is done in float64); floating inputs are cast at
the graph's entry (merged into the layout conversion when there is one), so an
engine accepts any floating input dtype."""

from __future__ import annotations

import torch

from segfast.compiler.context import PassContext
from segfast.compiler.graph import get_tensor, infer_val, val

aten = torch.ops.aten


def run(ctx: PassContext) -> None:
    gm = ctx.gm
    mode = None
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and ctx.dtype != torch.float32:
            t = get_tensor(gm, node)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != ctx.dtype:
                owner_path, _, leaf = str(node.target).rpartition(".")
                owner = gm.get_submodule(owner_path) if owner_path else gm
                cast = t.detach().to(ctx.dtype)
                if leaf in owner._parameters:
                    owner._parameters[leaf] = torch.nn.Parameter(cast, requires_grad=False)
                else:
                    owner._buffers[leaf] = cast
                from segfast.compiler.graph import fake_mode_of

                mode = mode or fake_mode_of(gm)
                node.meta["val"] = mode.from_tensor(cast, static_shapes=True)
        elif node.op == "placeholder":
            v = val(node)
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                continue
            users = list(node.users)
            if (
                len(users) == 1
                and users[0].target is aten._to_copy.default
                and "dtype" not in users[0].kwargs
            ):
                users[0].kwargs = {**users[0].kwargs, "dtype": ctx.dtype}
                continue
            with gm.graph.inserting_after(node):
                cast_node = gm.graph.call_function(
                    aten._to_copy.default, (node,), {"dtype": ctx.dtype}
                )
            for u in users:
                u.replace_input_with(node, cast_node)
            infer_val(gm, cast_node)
