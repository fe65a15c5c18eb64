"""Concat elimination: the producers of a ``cat`` along channels write straight
into their channel slice of one preallocated NHWC buffer, so the concatenation
copies nothing.

Applied only for backends whose kernels write through arbitrary output strides
(``PassContext.slice_outputs``: the Triton backend). The pass marks the graph —
``meta["segfast_slices"]`` on the cat (the producers and their channel offsets)
— and the backend's lowering allocates the buffer and passes each producer an
``out=`` view. A producer qualifies when it is a segfast conv op or a resize
whose output feeds this cat once and nothing else, so writing into the buffer
changes nothing for other readers.
"""

from __future__ import annotations

import torch
from torch import fx

from segfast.compiler.context import PassContext
from segfast.compiler.graph import is_call, val
from segfast.compiler.patterns import resample_of

aten = torch.ops.aten
segfast = torch.ops.segfast


def slice_producer(node: fx.Node) -> bool:
    """Ops whose Triton lowering can write into an ``out=`` channel slice."""
    return is_call(node, segfast.conv2d.default, segfast.conv_transpose2d.default) or (
        resample_of(node) is not None
    )


def run(ctx: PassContext) -> None:
    if not ctx.slice_outputs:
        return
    for cat in ctx.gm.graph.nodes:
        if not is_call(cat, aten.cat.default):
            continue
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        if dim not in (1, -3) or val(cat).dim() != 4:
            continue
        if not all(isinstance(d, int) for d in val(cat).shape):
            continue  # dynamic shapes: the buffer is sized per call, not planned
        parts = list(cat.args[0])
        offsets, off, slices = [], 0, []
        for p in parts:
            c = int(val(p).shape[1])
            ok = slice_producer(p) and len(p.users) == 1 and parts.count(p) == 1
            slices.append((p.name, off, c) if ok else None)
            offsets.append(off)
            off += c
        if any(s is not None for s in slices):
            cat.meta["segfast_slices"] = slices
            ctx.record("concat_slices", sum(s is not None for s in slices))
