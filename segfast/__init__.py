"""segfast: fast, checked inference for image-segmentation networks.

Public API (re-exported here):

- ``compile(model, example_input, backend=..., precision=..., output=...)`` → ``Engine``;
  ``load(path)`` an engine file; ``check(engine, model, inputs)`` against eager fp32;
- ``models``: the reference model zoo (``models.create``, ``models.names``);
- ``load_weights`` / ``save_weights``: safetensors or PyTorch state dicts, checked;
- the error types in :mod:`segfast.errors`.

Without PyTorch (an edge box) only :mod:`segfast.edge` and the errors import;
every other name says why it is missing.
"""

from __future__ import annotations

from segfast import _source_tree
from segfast._version import __version__
from segfast.errors import (
    BackendUnavailable,
    EngineFileError,
    InputError,
    SegfastError,
    SlowPrecisionWarning,
    UnsupportedModelError,
    WeightsError,
)

_source_tree.install()  # segfast.kernels / segfast.edge.csrc from a bare checkout

try:
    import torch as _torch  # noqa: F401
except ImportError as _exc:
    _TORCH_MISSING: str | None = str(_exc)
else:
    _TORCH_MISSING = None
    from segfast import models
    from segfast.api import batch, compile, load, quantize
    from segfast.check import CheckReport, check
    from segfast.int8 import Calibration, QuantizedModel
    from segfast.runtime.engine import Engine
    from segfast.runtime.video import run_video, stream
    from segfast.weights import load_state_dict, load_weights, save_weights

__all__ = [
    "BackendUnavailable",
    "Calibration",
    "CheckReport",
    "Engine",
    "EngineFileError",
    "InputError",
    "QuantizedModel",
    "SegfastError",
    "SlowPrecisionWarning",
    "UnsupportedModelError",
    "WeightsError",
    "__version__",
    "batch",
    "check",
    "compile",
    "load",
    "load_state_dict",
    "load_weights",
    "models",
    "quantize",
    "run_video",
    "save_weights",
    "stream",
]


def __getattr__(name: str) -> object:
    if _TORCH_MISSING is not None and name in __all__:
        raise ImportError(
            f"segfast.{name} needs PyTorch, which is not installed ({_TORCH_MISSING}); "
            "without it only segfast.edge (the TensorRT edge runtime) is available"
        )
    raise AttributeError(f"module 'segfast' has no attribute {name!r}")
