"""Running a deserialised TensorRT plan on torch CUDA tensors: :class:`TensorRTRunner`.

:func:`segfast.export.tensorrt.load_engine` checks a plan and its sidecar, deserialises it
into a :class:`~segfast.edge.trt.TrtSession` and wraps it here. The runner checks each
input (dtype, device, shape against the profile), binds inputs and output buffers (reused
per shape by default) and enqueues ``execute_async_v3`` on the caller's current stream.
"""

from __future__ import annotations

import torch

from segfast.edge.trt import TrtSession
from segfast.errors import InputError

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}


class TensorRTRunner:
    """Runs a deserialised plan on torch CUDA tensors, on the caller's current stream.

    ``runner(*inputs)`` checks each input's dtype, device and shape (against the profile),
    binds it, binds output buffers and enqueues ``execute_async_v3`` on
    ``torch.cuda.current_stream()`` — asynchronous like any CUDA op. With
    ``reuse_outputs`` (default) output buffers are kept per shape and returned again, so a
    result is valid until the next call with the same shapes; otherwise every call
    allocates fresh outputs (from PyTorch's caching allocator).
    """

    def __init__(
        self, session: TrtSession, device: torch.device, *, reuse_outputs: bool = True
    ) -> None:
        self.session = session
        self.device = device
        self.meta = session.meta
        self.reuse_outputs = reuse_outputs
        self._outputs: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def _stream_handle(self) -> int:
        """The raw handle of PyTorch's current stream on the engine's device."""
        return int(torch.cuda.current_stream(self.device).cuda_stream)

    @property
    def input_dtypes(self) -> list[torch.dtype]:
        return [_TORCH_DTYPES[t.dtype] for t in self.meta.inputs]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        specs = self.meta.inputs
        if len(inputs) != len(specs):
            raise InputError(f"the engine takes {len(specs)} input(s), got {len(inputs)}")
        keep = []
        for spec, x in zip(specs, inputs, strict=True):
            if not isinstance(x, torch.Tensor):
                raise InputError(
                    f"input {spec.name!r} must be a torch.Tensor, got {type(x).__name__}"
                )
            want = _TORCH_DTYPES[spec.dtype]
            if x.dtype != want:
                raise InputError(f"input {spec.name!r} must be {want}, got {x.dtype}")
            if x.device != self.device:
                raise InputError(f"input {spec.name!r} must be on {self.device}, got {x.device}")
            x = x.contiguous()
            keep.append(x)
            self.session.set_input(spec.name, tuple(x.shape), x.data_ptr())
        outs = []
        for spec in self.meta.outputs:
            shape = self.session.output_shape(spec.name)
            buf = self._outputs.get((spec.name, shape)) if self.reuse_outputs else None
            if buf is None:
                buf = torch.empty(shape, dtype=_TORCH_DTYPES[spec.dtype], device=self.device)
                if self.reuse_outputs:
                    self._outputs[(spec.name, shape)] = buf
            self.session.set_output(spec.name, buf.data_ptr())
            outs.append(buf)
        self.session.execute(self._stream_handle())
        del keep  # freed after enqueueing: PyTorch's allocator is stream-ordered
        return outs[0] if len(outs) == 1 else tuple(outs)
