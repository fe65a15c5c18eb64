"""Q/DQ models: the int8 decisions of a segfast engine, written as QuantizeLinear /
DequantizeLinear pairs that ONNX Runtime (QDQ format) and TensorRT 11 (explicit
quantization, strongly typed) build int8 engines from.

:func:`qdq_model` returns a copy of the model in which each quantized convolution
module

- quantizes its input per tensor (``quantized_decomposed.quantize_per_tensor`` then
  ``dequantize_per_tensor``: int8, zero point 0, scale ``amax / 127``) — where
  TensorRT's explicit-quantization rules put a Q/DQ pair, in front of the
  convolution, so a concatenation feeding it is quantized once, with one scale;
- and reads its weight as int8 per output channel, dequantized
  (``dequantize_per_channel`` of an int8 constant: ONNX ``DequantizeLinear`` with
  ``axis``).

``torch.onnx.export`` writes those ops as ``QuantizeLinear`` / ``DequantizeLinear``.
Batch norm stays where the model has it: per-channel symmetric quantization of
the unfolded weight gives the same int8 values as of the folded one (folding
scales each output channel), and ONNX Runtime and TensorRT fold it after the
``DequantizeLinear``. Convolutions called functionally (``F.conv2d`` with a raw
tensor) have no module to hook and stay in floating point in the file.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from segfast.errors import InputError

INT8_MIN, INT8_MAX = -128, 127


def _ops() -> object:
    import torch.ao.quantization.fx._decomposed

    return torch.ops.quantized_decomposed


class _QuantizeInput:
    """Forward pre-hook: the module's input through Q/DQ at ``scale``."""

    def __init__(self, scale: float) -> None:
        self.scale = float(scale)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        q = _ops()
        x = args[0]
        xq = q.quantize_per_tensor(x, self.scale, 0, INT8_MIN, INT8_MAX, torch.int8)
        return (
            q.dequantize_per_tensor(xq, self.scale, 0, INT8_MIN, INT8_MAX, torch.int8),
            *args[1:],
        )


class _Int8Weight(nn.Module):
    """Parametrization: the weight as int8 per channel along ``axis``, dequantized."""

    def __init__(self, weight: torch.Tensor, axis: int) -> None:
        super().__init__()
        dims = [d for d in range(weight.dim()) if d != axis]
        amax = weight.detach().float().abs().amax(dim=dims)
        scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
        shape = [1] * weight.dim()
        shape[axis] = -1
        q = torch.clamp(
            torch.round(weight.detach().float() / scale.view(shape)), -INT8_MAX, INT8_MAX
        )
        self.axis = axis
        self.register_buffer("q", q.to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(scale.numel(), dtype=torch.int64))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # the float weight is not read
        return (
            _ops()
            .dequantize_per_channel(
                self.q, self.scale, self.zero_point, self.axis, -INT8_MAX, INT8_MAX, torch.int8
            )
            .to(weight.dtype)
        )


def conv_axis(module: nn.Module) -> int | None:
    """The weight axis of a conv module's output channels; None where it has no
    per-channel quantization here (grouped transposed convolutions)."""
    if isinstance(module, nn.Conv2d):
        return 0
    if isinstance(module, nn.ConvTranspose2d) and module.groups == 1:
        return 1
    return None


def qdq_model(model: nn.Module, layers: Mapping[str, float | None]) -> nn.Module:
    """A copy of ``model`` with Q/DQ around the conv modules named in ``layers``
    (module name → the calibrated ``amax`` of its input; None keeps it in floating point)."""
    q = copy.deepcopy(model)
    modules = dict(q.named_modules())
    for name, amax in layers.items():
        if name not in modules:
            raise InputError(f"the model has no module {name!r} to quantize")
        module = modules[name]
        axis = conv_axis(module)
        if axis is None:
            raise InputError(
                f"{name} ({type(module).__name__}) is not a conv module segfast quantizes"
            )
        if amax is None:
            continue
        if amax <= 0:
            raise InputError(f"{name}: amax must be positive, got {amax}")
        module.register_forward_pre_hook(_QuantizeInput(amax / INT8_MAX))
        parametrize.register_parametrization(module, "weight", _Int8Weight(module.weight, axis))
    return q
