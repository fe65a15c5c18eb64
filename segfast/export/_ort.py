"""ONNX Runtime plumbing shared by the exporter's check and the ``onnxruntime`` backend:
importing it with a clear error, latency-tuned sessions, torch ↔ numpy feeds."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from segfast.errors import BackendUnavailable

INSTALL_HINT = "pip install 'segfast[onnx]'"

# ONNX tensor element types (onnx.TensorProto) the graphs segfast writes can hold.
ONNX_TO_TORCH = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}
# ONNX Runtime's type strings, as InferenceSession.get_inputs() reports them.
ORT_TO_TORCH = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(double)": torch.float64,
    "tensor(uint8)": torch.uint8,
    "tensor(int8)": torch.int8,
    "tensor(int32)": torch.int32,
    "tensor(int64)": torch.int64,
    "tensor(bool)": torch.bool,
}


def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or BackendUnavailable saying how to install it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable(f"onnxruntime is not installed: {INSTALL_HINT}") from exc
    return onnxruntime


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def session_options(intra_op_threads: int | None = None) -> Any:
    """``SessionOptions`` tuned for single-request latency.

    * ``ORT_ENABLE_ALL``: every graph rewrite ONNX Runtime has (constant folding,
      Conv+BN/activation fusion, and on the CPU the NCHWc layout transform).
    * ``intra_op_num_threads`` = the cores this process may use (default): one
      inference is parallelised inside each op; there is nothing to run beside it.
    * sequential execution, one inter-op thread: segmentation graphs are chains
      with short side branches, and a second thread pool only competes for cores.
    * memory pattern + CPU arena on: the second run reuses the first run's
      allocation plan instead of calling the allocator per tensor (with dynamic
      shapes ORT re-plans per new shape and caches the plans).
    """
    ort = import_onnxruntime()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(intra_op_threads or usable_cores())
    so.inter_op_num_threads = 1
    so.enable_mem_pattern = True
    so.enable_cpu_mem_arena = True
    so.log_severity_level = 3  # errors only: ORT warns about every unused initializer
    return so


def cpu_session(model: str | os.PathLike[str] | bytes, intra_op_threads: int | None = None) -> Any:
    """An ``InferenceSession`` on the CPU execution provider with :func:`session_options`."""
    ort = import_onnxruntime()
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(
        src, sess_options=session_options(intra_op_threads), providers=["CPUExecutionProvider"]
    )


def input_dtypes(session: Any) -> list[torch.dtype]:
    """The torch dtype of each graph input of ``session``."""
    out = []
    for i in session.get_inputs():
        if i.type not in ORT_TO_TORCH:
            raise TypeError(
                f"graph input {i.name!r} has type {i.type}, which segfast does not feed"
            )
        out.append(ORT_TO_TORCH[i.type])
    return out


def to_numpy(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """``t`` as a CPU numpy array of ``dtype``; no copy when it already is one, contiguous."""
    t = t.detach()
    if t.device.type != "cpu" or t.dtype != dtype:
        t = t.to("cpu", dtype)
    return t.contiguous().numpy()


def feeds(
    names: list[str], dtypes: list[torch.dtype], inputs: tuple[torch.Tensor, ...]
) -> dict[str, np.ndarray]:
    """The ``{name: array}`` a session runs on, each input cast to its graph dtype."""
    if len(inputs) != len(names):
        raise ValueError(f"the graph takes {len(names)} input(s) {names}, got {len(inputs)}")
    return {n: to_numpy(t, d) for n, t, d in zip(names, inputs, dtypes, strict=True)}
