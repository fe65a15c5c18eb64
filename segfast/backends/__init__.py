"""Backends: one module each, all behind :class:`segfast.backends.base.Backend`."""

from __future__ import annotations

import torch

from segfast.backends.base import Backend, BuildRequest, Runner
from segfast.backends.eager import EagerBackend
from segfast.backends.inductor import InductorBackend
from segfast.backends.onnxruntime_backend import OnnxRuntimeBackend
from segfast.backends.tensorrt_backend import TensorRTBackend
from segfast.backends.torch_backend import TorchBackend
from segfast.backends.triton_backend import TritonBackend

_BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    _BACKENDS[backend.name] = backend
    return backend


for _b in (
    EagerBackend(),
    TorchBackend(),
    TritonBackend(),
    InductorBackend(),
    OnnxRuntimeBackend(),
    TensorRTBackend(),
):
    register(_b)


def names() -> list[str]:
    return list(_BACKENDS)


def get_backend(name: str) -> Backend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; choose from: auto, {', '.join(_BACKENDS)}"
        ) from None


# Keys segfast.compile reads itself: auto's candidate list and timed runs, and the int8
# ranges an engine file stores for its rebuild.
COMPILE_OPTIONS = ("candidates", "iters", "int8", "size_guards")


def known_options() -> list[str]:
    """Every ``options`` key some backend (or ``compile`` itself) reads."""
    keys = set(COMPILE_OPTIONS)
    for b in _BACKENDS.values():
        keys.update(b.options)
    return sorted(keys)


def available(name: str, device: torch.device | str | None = None) -> tuple[bool, str]:
    """(whether backend ``name`` can run on ``device`` here, and why)."""
    dev = torch.device(device) if device is not None else None
    return get_backend(name).availability(dev)


def availability(device: torch.device | str | None = None) -> dict[str, tuple[bool, str]]:
    """Every backend's availability on ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {name: available(name, device) for name in _BACKENDS}


__all__ = [
    "Backend",
    "BuildRequest",
    "Runner",
    "availability",
    "available",
    "get_backend",
    "known_options",
    "names",
    "register",
]
