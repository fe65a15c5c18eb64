"""Precision: run the graph in fp32, fp16 or bf16. Floating constants are cast
once (after BN folding, which is done in float64); floating inputs are cast at
the graph's entry (merged into the layout conversion when there is one), so an
engine accepts any floating input dtype. Integer inputs the model turns into floats
itself (``x.float() / 255`` of uint8 frames) become ``dtype`` where they turn."""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import fx

from segfast.compiler.context import PassContext
from segfast.compiler.graph import fake_mode_of, get_tensor, infer_val, set_constant, val

aten = torch.ops.aten
_ENTRY = "segfast_entry_cast"  # the input's cast at the entry: a later cast_graph retargets it


def run(ctx: PassContext) -> None:
    cast_graph(ctx.gm, ctx.dtype)


def cast_graph(gm: fx.GraphModule, dtype: torch.dtype, keep: Collection[str] = ()) -> None:
    """Cast ``gm``'s floating constants to ``dtype`` (but the get_attr nodes named in
    ``keep``) and its floating inputs at the entry, in place; where an op makes fp32 out
    of integers only (the model's own ``x.float()`` or ``x / 255`` of a uint8 input),
    its result becomes ``dtype`` too. Values of the nodes downstream are not recomputed
    (the pipeline's ``refresh_values`` does that)."""
    if dtype != torch.float32:
        _cast_where_integers_turn_float(gm, dtype)
    mode = None
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and dtype != torch.float32 and node.name not in keep:
            t = get_tensor(gm, node)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype:
                cast = t.detach().to(dtype)
                set_constant(gm, str(node.target), cast)
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
                and ("dtype" not in users[0].kwargs or users[0].meta.get(_ENTRY))
            ):
                users[0].kwargs = {**users[0].kwargs, "dtype": dtype}
                users[0].meta[_ENTRY] = True
                continue
            with gm.graph.inserting_after(node):
                cast_node = gm.graph.call_function(aten._to_copy.default, (node,), {"dtype": dtype})
            cast_node.meta[_ENTRY] = True
            for u in users:
                u.replace_input_with(node, cast_node)
            infer_val(gm, cast_node)


def _cast_where_integers_turn_float(gm: fx.GraphModule, dtype: torch.dtype) -> None:
    """An op whose tensor inputs are all integer and whose result is fp32 (a cast, or
    true division promoting to the default dtype) makes ``dtype`` instead: a cast's own
    dtype is retargeted, any other op gets a cast after it."""
    for node in list(gm.graph.nodes):
        v = val(node) if node.op == "call_function" else None
        if not isinstance(v, torch.Tensor) or v.dtype != torch.float32:
            continue
        ins = [val(a) for a in node.all_input_nodes]
        if not ins or not all(isinstance(t, torch.Tensor) and not t.is_floating_point()
                              for t in ins):  # fmt: skip
            continue
        if node.target is aten._to_copy.default:
            node.kwargs = {**node.kwargs, "dtype": dtype}
            infer_val(gm, node)
            continue
        users = list(node.users)
        with gm.graph.inserting_after(node):
            cast_node = gm.graph.call_function(aten._to_copy.default, (node,), {"dtype": dtype})
        for u in users:
            u.replace_input_with(node, cast_node)
        infer_val(gm, cast_node)
