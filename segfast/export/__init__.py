"""Deployment export: model + head reduction → a checked file another runtime loads.

``export_onnx`` writes an ONNX graph (verified in ONNX Runtime against the eager
model); the ``onnxruntime`` and ``tensorrt`` backends build on it.

    onnx               export_onnx, run_onnx: the export, step by step (the exporter explained)
    onnx_graph         torch.export → torch.onnx, the file's dim names and metadata
    onnx_verify        the written file in ONNX Runtime vs the eager model (ShapeCheck)
    rewrites           exact substitutes for ops the exporter translates wrongly
    tensorrt           build_engine, load_engine: ONNX → TensorRT plan, engine cache, sidecar
    tensorrt_profiles  an ONNX file's inputs → TensorRT optimisation profiles
    tensorrt_runner    TensorRTRunner: a loaded plan run on torch CUDA tensors
    triton_repo        write_triton_repo: ONNX file → a Triton Inference Server model repository
    _ort               ONNX Runtime sessions and feeds
"""

from __future__ import annotations

from segfast.export.onnx import OnnxExport, ShapeCheck, export_onnx, in_domain, run_onnx

__all__ = ["OnnxExport", "ShapeCheck", "export_onnx", "in_domain", "run_onnx"]
