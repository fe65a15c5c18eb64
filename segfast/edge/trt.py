"""TensorRT execution on raw device pointers — torch-free, shared by the torch backend
(``segfast.export.tensorrt.TensorRTRunner``) and the edge runtime (``segfast.edge.EdgeEngine``).

Written against TensorRT's documented Python API, which TensorRT 10 and 11 share for
running an engine: ``trt.Runtime(logger).deserialize_cuda_engine(bytes)``,
``engine.num_io_tensors`` / ``get_tensor_name`` / ``get_tensor_mode`` /
``get_tensor_dtype`` / ``get_tensor_shape``, ``engine.create_execution_context()``,
``context.set_input_shape``, ``context.get_tensor_shape``, ``context.set_tensor_address``
and ``context.execute_async_v3(stream_handle)``.

Not run on this project's machines: TensorRT cannot be installed here (see README). What
runs here is everything before the first TensorRT call: the sidecar checks
(:mod:`segfast.edge.sidecar`) and the shape checks against the profile ranges.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from segfast.edge.sidecar import PlanMeta, TensorSpec
from segfast.errors import BackendUnavailable, EngineFileError, InputError

# TensorRT DataType member name → numpy's dtype name (the sidecar's spelling).
DTYPE_NAMES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
}


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or :class:`BackendUnavailable` saying how to get it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(
            "TensorRT is not installed (the `tensorrt` Python package from NVIDIA, which "
            f"needs an NVIDIA GPU and driver): {exc}"
        ) from None
    return tensorrt


def tensorrt_version() -> str:
    """The installed TensorRT's version string (``tensorrt.__version__``)."""
    return str(import_tensorrt().__version__)


def tensorrt_major(version: str) -> int:
    """'10.8.0.43' → 10."""
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise ValueError(f"not a TensorRT version: {version!r}") from None


def dtype_name(trt_dtype: Any) -> str:
    """A TensorRT DataType as numpy's dtype name; raises on types segfast does not map."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise EngineFileError(
            f"the engine has a tensor of TensorRT type {name}; segfast handles "
            f"{sorted(DTYPE_NAMES)}"
        ) from None


class TrtSession:
    """A deserialised engine and one execution context, driven by device pointers.

    ``plan`` must be bytes that passed :func:`segfast.edge.sidecar.load_verified`; the
    engine's I/O tensors are checked against the sidecar's (names, modes, dtypes) so a
    sidecar can only vouch for the engine it describes. Not thread-safe (one context).
    """

    def __init__(self, plan: bytes, meta: PlanMeta) -> None:
        trt = import_tensorrt()
        self.trt = trt
        self.meta = meta
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineFileError(
                "TensorRT could not deserialise the plan (its log above says why) although "
                "its sidecar matched"
            )
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if n not in ins]
        self._check_io("input", ins, meta.inputs)
        self._check_io("output", outs, meta.outputs)
        self.inputs: tuple[TensorSpec, ...] = meta.inputs
        self.outputs: tuple[TensorSpec, ...] = meta.outputs
        self._shapes: dict[str, tuple[int, ...]] = {}

    def _check_io(self, kind: str, names: list[str], specs: tuple[TensorSpec, ...]) -> None:
        want = [t.name for t in specs]
        if sorted(names) != sorted(want):
            raise EngineFileError(
                f"the engine's {kind}s are {names}, its sidecar lists {want}: the sidecar "
                "belongs to another engine"
            )
        for t in specs:
            got = dtype_name(self.engine.get_tensor_dtype(t.name))
            if got != t.dtype:
                raise EngineFileError(
                    f"engine {kind} {t.name!r} is {got}, its sidecar says {t.dtype}: the "
                    "sidecar belongs to another engine"
                )

    def set_input(self, name: str, shape: tuple[int, ...], ptr: int) -> None:
        """Bind input ``name`` of ``shape`` at device address ``ptr``; the shape is checked
        against the profile first (one clear error instead of TensorRT's log)."""
        spec = self.meta.input(name)
        assert spec.profile is not None  # parse_sidecar guarantees a profile per input
        spec.profile.check(name, shape)
        if self._shapes.get(name) != shape:
            if not self.context.set_input_shape(name, shape):
                raise InputError(f"TensorRT refused shape {list(shape)} for input {name!r}")
            self._shapes[name] = shape
        self.context.set_tensor_address(name, int(ptr))

    def output_shape(self, name: str) -> tuple[int, ...]:
        """Output ``name``'s shape for the input shapes set so far."""
        shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise InputError(f"output {name!r} has unresolved shape {list(shape)}: set every input")
        return shape

    def set_output(self, name: str, ptr: int) -> None:
        self.context.set_tensor_address(name, int(ptr))

    def execute(self, stream_handle: int) -> None:
        """Enqueue the engine on CUDA stream ``stream_handle`` (asynchronous)."""
        if not self.context.execute_async_v3(int(stream_handle)):
            raise RuntimeError("TensorRT execute_async_v3 failed (its log above says why)")
