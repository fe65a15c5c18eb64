"""NHWC end to end: 4-D float inputs are converted to channels_last once at the
graph's entry; every segfast op returns channels_last (convolutions on oneDNN,
cuDNN and Triton all run fastest in it).

For backends that run PyTorch ops (not ``slice_outputs`` ones, whose kernels
always write NHWC), resizes and concatenations get a ``to_nhwc`` after them:
PyTorch resizes a 1×1 map (DeepLab's image pooling) into NCHW, and a concat
with one NCHW input turns NCHW, which made every later op convert.

``view`` ops become ``reshape``: export recorded them on the model's NCHW
tensors, and a view of an NHWC tensor that merges the channel axis with
another (InstanceNorm decomposes into a view of N×C×H×W as 1×(N·C)×H×W) is
not expressible as a view. The graph is functional, so a copying reshape is exact.
"""

from __future__ import annotations

import torch

from segfast.compiler.context import PassContext
from segfast.compiler.graph import infer_val, is_call, val
from segfast.compiler.ops import to_nhwc
from segfast.compiler.patterns import resample_of

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

    for node in gm.graph.nodes:
        if is_call(node, aten.view.default, aten._unsafe_view.default):
            node.target = aten.reshape.default
            infer_val(gm, node)

    if ctx.slice_outputs:
        return
    for node in list(gm.graph.nodes):
        if not (resample_of(node) is not None or is_call(node, aten.cat.default)):
            continue
        v = val(node)
        if not isinstance(v, torch.Tensor) or v.dim() != 4:
            continue
        users = list(node.users)
        with gm.graph.inserting_after(node):
            fix = gm.graph.call_function(to_nhwc, (node,))
        infer_val(gm, fix)
        for u in users:
            u.replace_input_with(node, fix)
