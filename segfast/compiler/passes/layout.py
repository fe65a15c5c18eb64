"""NHWC end to end: 4-D float inputs are converted to channels_last once at the
graph's entry; every segfast op and the PyTorch ops after them keep that layout
(convolutions on oneDNN / cuDNN / Triton all run fastest in it)."""

from __future__ import annotations

import torch

from segfast.compiler.context import PassContext
from segfast.compiler.graph import infer_val, val

aten = torch.ops.aten


def run(ctx: PassContext) -> None:
    gm = ctx.gm
    for ph in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        v = val(ph)
        if not isinstance(v, torch.Tensor) or v.dim() != 4 or not v.is_floating_point():
            continue
        users = list(ph.users)
        with gm.graph.inserting_after(ph):
            cl = gm.graph.call_function(
                aten._to_copy.default, (ph,), {"memory_format": torch.channels_last}
            )
        infer_val(gm, cl)
        for u in users:
            u.replace_input_with(ph, cl)
