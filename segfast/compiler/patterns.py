"""The pattern table: every fusion segfast performs, by name, and the op tables
the passes match against. Passes record each fusion they apply under its name,
so ``Engine.summary()`` reports exactly what fired.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

aten = torch.ops.aten


@dataclass(frozen=True)
class Fusion:
    name: str
    pattern: str  # what is matched, in graph terms
    into: str  # what replaces it
    pass_name: str  # the pass (compiler/passes/<pass_name>.py) that applies it


FUSIONS: dict[str, Fusion] = {
    f.name: f
    for f in (
        Fusion("bn_fold", "convolution → batch_norm", "conv weight × scale, bias", "fold_bn"),
        Fusion(
            "int8_conv",
            "conv (after every fusion)",
            "segfast.qconv2d: int8 input (per tensor) × int8 weights (per channel)",
            "quant",
        ),
        Fusion(
            "pad_into_conv",
            "constant_pad_nd(x, symmetric, 0) → convolution(s)",
            "the pad added to the convolutions' padding",
            "cleanup",
        ),
        Fusion(
            "empty_concat_part",
            "cat([..., x with 0 channels, ...], dim)",
            "the cat of the other parts (the part itself where one is left)",
            "cleanup",
        ),
        Fusion(
            "stack_sum",
            "sum(stack(xs, d), d)",
            "a chain of adds, the terms a conv or resize can absorb last",
            "stack_sum",
        ),
        Fusion(
            "written_activation",
            "x·sigmoid(x); relu6(x + 3)/6; x·relu6(x + 3)/6 or x·hardsigmoid(x)",
            "silu; hardsigmoid; hardswish (then fused like the library ops)",
            "activations",
        ),
        Fusion("conv", "convolution", "segfast.conv2d", "conv_epilogue"),
        Fusion(
            "conv_transpose", "transposed convolution", "segfast.conv_transpose2d", "conv_epilogue"
        ),
        Fusion("conv_act", "conv → activation", "activation in the conv epilogue", "conv_epilogue"),
        Fusion(
            "conv_residual",
            "conv → add(·, r) [→ activation]",
            "residual add in the conv epilogue",
            "conv_epilogue",
        ),
        Fusion(
            "group_norm",
            "native_group_norm",
            "segfast.group_norm: statistics pass + one normalise/affine/activation pass",
            "norm_act",
        ),
        Fusion(
            "instance_norm",
            "reshape → batch_norm(training, no stats) → reshape (InstanceNorm2d)",
            "segfast.group_norm with one group per channel",
            "norm_act",
        ),
        Fusion(
            "norm_act",
            "group/instance norm → activation",
            "activation in segfast.group_norm's write",
            "norm_act",
        ),
        Fusion(
            "squeeze_excite",
            "global mean → 1×1 conv [→ act → 1×1 conv] → act (the SE gate)",
            "segfast.se_gate: one reduction pass + both mat-vecs in one kernel",
            "squeeze_excite",
        ),
        Fusion(
            "se_scale",
            "x · gate → [resize →] conv",
            "segfast.conv2d_gated: the gate applied as the conv reads x",
            "squeeze_excite",
        ),
        Fusion(
            "broadcast_branch",
            "cat([..., upsample(p at 1×1)]) → 1×1 conv",
            "W_p·p at 1×1 as a per-image residual; the rest of the concat convolved",
            "broadcast_branch",
        ),
        Fusion(
            "concat_depthwise",
            "cat([a, b]) → depthwise conv",
            "cat([depthwise(a), depthwise(b)]): the concat moves to the next conv",
            "concat_depthwise",
        ),
        Fusion(
            "skip_concat_resize",
            "cat([skip, upsample(x)]) → conv",
            "two-source prologue, resize on the fly",
            "skip_concat",
        ),
        Fusion(
            "skip_concat",
            "cat([a, b]) → conv",
            "two-source prologue (no concat tensor)",
            "skip_concat",
        ),
        Fusion(
            "concat_slices",
            "producers → cat",
            "producers write channel slices of one buffer",
            "concat_slices",
        ),
        Fusion(
            "head_conv",
            "1×1 conv → [upsample] → argmax/softmax",
            "segfast.head with the 1×1 conv inside",
            "head",
        ),
        Fusion("head", "[upsample] → argmax/softmax", "segfast.head", "head"),
    )
}


# -- zero padding -------------------------------------------------------------------------


def zero_pad_sides(node: Any) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of a zero, non-negative ``constant_pad_nd`` of H and W
    (``F.pad``, ``ZeroPad2d``); None for anything else (a crop, another value)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return None
    if node.target is not aten.constant_pad_nd.default:
        return None
    pads = list(node.args[1])
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
    if value != 0 or len(pads) not in (2, 4) or not all(isinstance(p, int) for p in pads):
        return None
    left, right, top, bottom = pads + [0] * (4 - len(pads))
    if min(left, right, top, bottom) < 0:
        return None
    return top, bottom, left, right


# -- activations that fuse into a conv epilogue ------------------------------------------


def _const_args(node: fx.Node, defaults: tuple[Any, ...]) -> tuple[Any, ...]:
    args = list(node.args[1:]) + list(defaults[len(node.args) - 1 :])
    return tuple(args)


def _hardtanh(node: fx.Node) -> tuple[str, float] | None:
    lo, hi = _const_args(node, (-1.0, 1.0))[:2]
    if float(lo) == 0.0 and float(hi) == 6.0:
        return ("relu6", 0.0)
    return None


def _clamp(node: fx.Node) -> tuple[str, float] | None:
    args = _const_args(node, (None, None))
    lo, hi = args[0], args[1]
    if lo is not None and hi is not None and float(lo) == 0.0 and float(hi) == 6.0:
        return ("relu6", 0.0)
    if lo is not None and hi is None and float(lo) == 0.0:
        return ("relu", 0.0)
    return None


def _leaky(node: fx.Node) -> tuple[str, float] | None:
    (slope,) = _const_args(node, (0.01,))[:1]
    return ("leaky_relu", float(slope))


def _gelu(node: fx.Node) -> tuple[str, float] | None:
    approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    if approximate not in ("none", "tanh"):
        return None
    return ("gelu", 1.0 if approximate == "tanh" else 0.0)


# op -> function(node) -> (activation name, parameter) or None when not fusable
ACTIVATION_OPS: dict[Any, Callable[[fx.Node], tuple[str, float] | None]] = {
    aten.relu.default: lambda n: ("relu", 0.0),
    aten.hardtanh.default: _hardtanh,
    aten.clamp.default: _clamp,
    aten.leaky_relu.default: _leaky,
    aten.silu.default: lambda n: ("silu", 0.0),
    aten.sigmoid.default: lambda n: ("sigmoid", 0.0),
    aten.tanh.default: lambda n: ("tanh", 0.0),
    aten.hardswish.default: lambda n: ("hardswish", 0.0),
    aten.hardsigmoid.default: lambda n: ("hardsigmoid", 0.0),
    aten.gelu.default: _gelu,
}


# -- resampling ops ------------------------------------------------------------------------


@dataclass(frozen=True)
class Resample:
    input: fx.Node
    size: tuple[Any, Any]  # output (H, W), possibly symbolic
    mode: str  # "bilinear" | "nearest" | "nearest-exact"
    align_corners: bool
    scale_h: float | None  # ATen's scales_h: the scale factor itself, not its inverse
    scale_w: float | None
    size_args: Any = None  # the op's own output_size argument (ints or graph nodes), if given

    def size_for_graph(self) -> tuple[Any, Any] | None:
        """The output size as graph arguments: ints, or the nodes that compute them.

        None when the size is symbolic and came from a scale factor (no node holds it).
        """
        if all(isinstance(s, int) for s in self.size):
            return (int(self.size[0]), int(self.size[1]))
        if self.size_args is not None:
            return (self.size_args[0], self.size_args[1])
        return None


def _vec_scales(scales: Any) -> tuple[float | None, float | None]:
    if scales is None:
        return None, None
    return float(scales[0]), float(scales[1])


def channel_concat(node: Any) -> list[fx.Node] | None:
    """The parts of a 4-D ``cat`` along channels that something reads, else None."""
    if (
        not isinstance(node, fx.Node)
        or node.op != "call_function"
        or node.target is not aten.cat.default
    ):
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out = node.meta.get("val")
    if dim not in (1, -3) or not isinstance(out, torch.Tensor) or out.dim() != 4 or not node.users:
        return None
    return list(node.args[0])


def resample_of(node: fx.Node) -> Resample | None:
    """Describe an upsample node in one normalised form, or None if it is not one."""
    if node.op != "call_function":
        return None
    t, a = node.target, node.args
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        return None
    size = (out.shape[2], out.shape[3])
    if t is aten.upsample_bilinear2d.vec:
        sh, sw = _vec_scales(a[3] if len(a) > 3 else node.kwargs.get("scale_factors"))
        return Resample(a[0], size, "bilinear", bool(a[2]), sh, sw, a[1])
    if t is aten.upsample_bilinear2d.default:
        sh = a[3] if len(a) > 3 else node.kwargs.get("scales_h")
        sw = a[4] if len(a) > 4 else node.kwargs.get("scales_w")
        return Resample(a[0], size, "bilinear", bool(a[2]), sh, sw, a[1])
    for vec, default, mode in (
        (aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default, "nearest"),
        (
            aten._upsample_nearest_exact2d.vec,
            aten._upsample_nearest_exact2d.default,
            "nearest-exact",
        ),
    ):
        if t is vec:
            sh, sw = _vec_scales(a[2] if len(a) > 2 else node.kwargs.get("scale_factors"))
            return Resample(a[0], size, mode, False, sh, sw, a[1])
        if t is default:
            sh = a[2] if len(a) > 2 else node.kwargs.get("scales_h")
            sw = a[3] if len(a) > 3 else node.kwargs.get("scales_w")
            return Resample(a[0], size, mode, False, sh, sw, a[1])
    return None
