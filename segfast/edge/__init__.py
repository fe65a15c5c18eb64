"""segfast.edge: run a segfast TensorRT plan on an edge GPU without PyTorch.

Imports only numpy, json and hashlib at import time; cuda-python (``cuda.bindings``) and
TensorRT are imported when an :class:`EdgeEngine` is created. Install with
``pip install segfast[edge]`` plus NVIDIA's TensorRT for the device (JetPack ships it on
Jetson). Typical use::

    from segfast.edge import EdgeEngine

    with EdgeEngine("m.plan") as engine:          # checks m.plan.json first
        result = engine.run(frame_bgr)            # uint8 [H, W, 3], or (Y, UV) NV12 planes
        mask, overlay = result.output, result.overlay

Modules: :mod:`~segfast.edge.sidecar` (plan sidecars, engine-cache keys, the checks run
before deserialising), :mod:`~segfast.edge.reference` (numpy references of the csrc/
kernels), :mod:`~segfast.edge.kernels` (NVRTC / cubin loading and launches),
:mod:`~segfast.edge.trt` (TensorRT execution on device pointers),
:mod:`~segfast.edge.engine` (the pipeline).
"""

from __future__ import annotations

from segfast.edge.engine import EdgeEngine, EdgeResult
from segfast.edge.sidecar import (
    PlanMeta,
    Profile,
    TensorSpec,
    cache_key,
    check_environment,
    load_verified,
    read_plan,
    sidecar_path,
)

__all__ = [
    "EdgeEngine",
    "EdgeResult",
    "PlanMeta",
    "Profile",
    "TensorSpec",
    "cache_key",
    "check_environment",
    "load_verified",
    "read_plan",
    "sidecar_path",
]
