"""int8 quantization of a fused graph: calibrate, place, fall back.

The fused graph (after every fusion pass: BN folded, activations and residuals in
the conv epilogues, two-source skip concats, fused heads) is quantized where
TensorRT's explicit-quantization rules put Q/DQ pairs:

- every ``segfast.conv2d`` (dense, depthwise, two-source) and groups-1
  ``segfast.conv_transpose2d`` becomes ``segfast.qconv2d`` /
  ``segfast.qconv_transpose2d``: its input quantized per tensor, symmetrically, at
  the scale its observer chose; its weight (BN already folded into it) per output
  channel, symmetrically;
- a two-source conv quantizes the joined input ``cat([x, up(x2)])`` with one scale —
  the concat stays int8 (:mod:`segfast.compiler.quant.calibrate` observes both
  sources into one observer);
- pools, resizes and residual adds sit between quantized convs in the graph and
  take their values as they come; the head (argmax / softmax / the classifier
  conv inside ``segfast.head``) and everything that reads logits stay in floating
  point.

Layers named in ``keep_float`` stay floating point (the accuracy guard's fallback).
:func:`cast_float_part` then runs that floating-point part in fp16/bf16 on a GPU.
"""

from __future__ import annotations

from segfast.compiler.quant.apply import (
    QuantizedLayer,
    cast_float_part,
    quantizable,
    quantize_graph,
)
from segfast.compiler.quant.calibrate import calibrate
from segfast.compiler.quant.observers import METHODS, make_observer

__all__ = [
    "METHODS",
    "QuantizedLayer",
    "calibrate",
    "cast_float_part",
    "make_observer",
    "quantizable",
    "quantize_graph",
]
