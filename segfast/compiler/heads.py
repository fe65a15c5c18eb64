"""The head of a captured graph: keep the primary output, append the ``output=`` reduction.

:func:`select_primary_output` makes the graph return the model's primary output
(the meaning of :func:`segfast.outputs.primary_output`: a dict's ``"out"``, a
tuple's first item), dropping auxiliary heads; :func:`append_head` appends the
``segfast.head`` op that turns logits into probabilities or a mask, which the
head pass may later fuse with the last convolution and resize.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from segfast.compiler import ops as _ops  # noqa: F401  (registers torch.ops.segfast)
from segfast.compiler.graph import infer_val, val
from segfast.errors import UnsupportedModelError
from segfast.outputs import head_mode, mask_dtype


def _leaf_index(structure: Any) -> int:
    """Index of the primary output among the flattened leaves (see outputs.primary_output)."""
    while not isinstance(structure, int):
        if isinstance(structure, dict):
            structure = structure["out"] if "out" in structure else next(iter(structure.values()))
        elif isinstance(structure, list | tuple) and structure:
            structure = structure[0]
        else:
            raise UnsupportedModelError("the model's output holds no tensor")
    return structure


def select_primary_output(gm: fx.GraphModule) -> fx.Node:
    """Make the graph return only the primary output (dropping aux heads), plainly."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = list(pytree.tree_leaves(out_node.args[0]))
    spec = getattr(gm, "_out_spec", None)
    idx = 0
    if spec is not None and spec.num_leaves == len(leaves):
        idx = _leaf_index(pytree.tree_unflatten(list(range(len(leaves))), spec))
    primary = leaves[idx]
    if not isinstance(primary, fx.Node) or not isinstance(val(primary), torch.Tensor):
        raise UnsupportedModelError("the model's primary output is not a tensor")
    out_node.args = (primary,)
    # Plain calling convention: positional tensors in, one tensor out.
    gm.graph._codegen = fx.graph.CodeGen()
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return primary


def require_logits(out: torch.Tensor, output: str) -> None:
    """Raise UnsupportedModelError unless ``out`` can take the ``output=`` reduction."""
    if output != "logits" and out.dim() != 4:
        raise UnsupportedModelError(
            f"output={output!r} needs N×K×H×W logits; the model returns shape {tuple(out.shape)}"
        )


def append_head(gm: fx.GraphModule, output: str, threshold: float) -> None:
    """Append the ``segfast.head`` reduction the engine's ``output=`` asks for."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    logits = out_node.args[0]
    v = val(logits)
    if output == "logits":
        return
    require_logits(v, output)
    k = int(v.shape[1])
    mode = head_mode(output, k)
    with gm.graph.inserting_before(out_node):
        hd = gm.graph.call_function(
            torch.ops.segfast.head.default,
            # out_h/out_w are unused without a resize (0); the head pass may add one.
            (
                logits,
                None,
                None,
                0,
                0,
                False,
                False,
                None,
                None,
                mode,
                float(threshold),
                mask_dtype(k),
            ),
        )
    infer_val(gm, hd)
    out_node.args = (hd,)
    gm.recompile()
