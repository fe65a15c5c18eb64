"""Deployment export: model + head reduction → a checked file another runtime loads.

``export_onnx`` writes an ONNX graph (verified in ONNX Runtime against the eager
model); the ``onnxruntime`` and ``tensorrt`` backends build on it.
"""

from __future__ import annotations

from segfast.export.onnx import OnnxExport, ShapeCheck, export_onnx, in_domain, run_onnx

__all__ = ["OnnxExport", "ShapeCheck", "export_onnx", "in_domain", "run_onnx"]
