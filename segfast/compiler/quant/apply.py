"""Placing the quantization: float convs → int8 convs, per the calibrated ranges.

Weights are quantized per output channel, symmetrically: ``s_c = max|w_c| / 127``,
``q = clamp(round(w / s_c), −127, 127)`` (a channel of zeros gets ``s_c = 1``).
The input scale is ``amax / 127`` from the layer's observer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from segfast.compiler.graph import add_constant, constant_source, get_tensor, infer_val
from segfast.compiler.passes.precision import cast_graph
from segfast.compiler.pipeline import prune_constants, refresh_values

segfast = torch.ops.segfast
INT8_MAX = 127


def quantizable(node: fx.Node) -> bool:
    """Convs that become int8: every ``segfast.conv2d``, and ``conv_transpose2d`` with
    groups 1 (its output channels lie on one weight axis). The head stays float."""
    if node.op != "call_function":
        return False
    if node.target is segfast.conv2d.default:
        return True
    return node.target is segfast.conv_transpose2d.default and node.args[7] == 1


@dataclass
class QuantizedLayer:
    """One quantizable layer and what became of it (``engine.summary()`` lists them)."""

    name: str  # the fused graph's node name
    kind: str  # "conv 3×3 64→64", "convT 2×2 128→64", "two-source conv ..."
    amax: float  # the calibrated range of its input
    int8: bool
    reason: str = ""  # why it stayed floating point
    sensitivity: float | None = None  # error it adds when it alone is int8 (fallback)
    source: str | None = None  # the model parameter its weight comes from (BN folded, split)

    def describe(self) -> str:
        what = "int8" if self.int8 else f"float ({self.reason})"
        sens = f" (sensitivity {self.sensitivity:.3g})" if self.sensitivity is not None else ""
        return f"{self.name:28s} {self.kind:32s} amax {self.amax:.4g}  {what}{sens}"


def _kind(gm: fx.GraphModule, node: fx.Node) -> str:
    w = get_tensor(gm, node.args[1]) if isinstance(node.args[1], fx.Node) else None
    if w is None:
        return "conv"
    kh, kw = int(w.shape[2]), int(w.shape[3])
    if node.target is segfast.conv_transpose2d.default:
        return f"convT {kh}×{kw} {int(w.shape[0])}→{int(w.shape[1])}"
    groups = int(node.args[6])
    cin = int(w.shape[1]) * groups
    what = "depthwise conv" if groups > 1 and groups == int(w.shape[0]) else "conv"
    if node.args[11] is not None:
        what = "two-source conv"
    return f"{what} {kh}×{kw} {cin}→{int(w.shape[0])}"


def weight_scales(w: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-channel symmetric scales of ``w`` along ``axis`` (fp32); 1 for a zero channel."""
    dims = [d for d in range(w.dim()) if d != axis]
    amax = w.detach().float().abs().amax(dim=dims)
    return torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))


def quantize_weight(w: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, per-channel fp32 scales) of ``w`` quantized along ``axis``."""
    s = weight_scales(w, axis)
    shape = [1] * w.dim()
    shape[axis] = -1
    q = torch.clamp(torch.round(w.detach().float() / s.view(shape)), -INT8_MAX, INT8_MAX)
    return q.to(torch.int8), s


def quantize_graph(
    gm: fx.GraphModule,
    amax: dict[str, float],
    keep_float: dict[str, str] | None = None,
) -> list[QuantizedLayer]:
    """Rewrite ``gm`` in place: each quantizable layer with a range becomes its int8 op,
    except those in ``keep_float`` (name → why). Returns every layer's record."""
    keep_float = dict(keep_float or {})
    layers: list[QuantizedLayer] = []
    for node in list(gm.graph.nodes):
        if not quantizable(node):
            continue
        a = float(amax.get(node.name, 0.0))
        layer = QuantizedLayer(
            node.name, _kind(gm, node), a, int8=False, source=constant_source(gm, node.args[1])
        )
        layers.append(layer)
        if node.name in keep_float:
            layer.reason = keep_float[node.name]
            continue
        if a <= 0.0:
            layer.reason = "its input was zero throughout calibration"
            continue
        w_node = node.args[1]
        if not isinstance(w_node, fx.Node) or w_node.op != "get_attr":
            layer.reason = "its weight is not a constant"
            continue
        w = get_tensor(gm, w_node)
        transposed = node.target is segfast.conv_transpose2d.default
        q, s = quantize_weight(w, 1 if transposed else 0)
        qn = add_constant(gm, q, f"{node.name}_w_int8", node)
        sn = add_constant(gm, s, f"{node.name}_w_scale", node)
        x_scale = a / INT8_MAX
        args = list(node.args)
        args[1] = qn
        target = segfast.qconv_transpose2d.default if transposed else segfast.qconv2d.default
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(target, (*args, x_scale, sn))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        infer_val(gm, new)
        layer.int8 = True
    gm.graph.eliminate_dead_code()
    prune_constants(gm)  # the float weights int8 replaced: not kept beside their int8 copy
    gm.recompile()
    return layers


_INT8_OPS = (segfast.qconv2d.default, segfast.qconv_transpose2d.default)


def cast_float_part(gm: fx.GraphModule, dtype: torch.dtype) -> None:
    """Run what int8 does not cover in ``dtype`` (fp16/bf16 on a GPU), in place: the
    float convs (the guard's fallback layers), the head, resizes, pools, residual adds.

    Every floating constant and the input are cast as an fp16/bf16 engine's are; the
    int8 convs then read and write ``dtype``, quantizing from it. Triton's int8 kernels
    dequantize and bias their exact int32 sums in fp32 and round once on store; the
    composite (the torch backend on CUDA, Triton's int8 transposed and grouped convs)
    fake-quantizes in ``dtype`` — the weight dequantized to it, the conv run in it.
    Per-channel weight scales stay fp32: the kernels and the composite read them so."""
    scales = {
        n.args[-1].name
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target in _INT8_OPS and isinstance(n.args[-1], fx.Node)
    }
    cast_graph(gm, dtype, keep=scales)
    refresh_values(gm)
    gm.recompile()
