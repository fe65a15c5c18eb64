"""segfast: fast, checked inference for image-segmentation networks.

Public API (re-exported here):

- ``segfast.models``: the reference model zoo (``models.create``, ``models.names``);
- ``load_weights`` / ``save_weights``: safetensors or PyTorch state dicts, checked;
- the error types in :mod:`segfast.errors`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from segfast import models
from segfast.check import CheckReport, check
from segfast.compiler.api import compile
from segfast.errors import (
    BackendUnavailable,
    EngineFileError,
    InputError,
    SegfastError,
    UnsupportedModelError,
    WeightsError,
)
from segfast.runtime.engine import Engine
from segfast.runtime.engine_file import load
from segfast.weights import load_state_dict, load_weights, save_weights

__all__ = [
    "BackendUnavailable",
    "CheckReport",
    "Engine",
    "EngineFileError",
    "InputError",
    "SegfastError",
    "UnsupportedModelError",
    "WeightsError",
    "__version__",
    "check",
    "compile",
    "load",
    "load_state_dict",
    "load_weights",
    "models",
    "save_weights",
]
