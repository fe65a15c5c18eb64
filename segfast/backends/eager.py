"""``eager``: the untouched model, run by PyTorch as written — the reference and
the baseline. In fp16/bf16 a copy of the model is cast (PyTorch's own
low-precision result, which the accuracy contract compares against)."""

from __future__ import annotations

import copy

import torch

from segfast.backends.base import Backend, BuildRequest, Runner, cast_inputs


class EagerBackend(Backend):
    name = "eager"
    options = ("channels_last",)
    propagates_nonfinite = True  # see Backend
    description = "the model as written, run by PyTorch"

    def availability(self, device: torch.device | None = None) -> tuple[bool, str]:
        return True, f"PyTorch {torch.__version__}"

    def build(self, req: BuildRequest) -> Runner:
        """``options={"channels_last": True}``: model and 4-D inputs in channels_last
        memory — the one-line speed-up users try first, measured as ``eager_cl``."""
        model = req.model
        channels_last = bool(req.options.get("channels_last", False))
        if req.dtype != torch.float32 or channels_last:
            model = copy.deepcopy(model).to(req.dtype)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
        dtype = req.dtype

        def run(*inputs: torch.Tensor) -> torch.Tensor:
            xs = cast_inputs(inputs, dtype)
            if channels_last:
                xs = tuple(
                    t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
                    for t in xs
                )
            with torch.inference_mode():
                return model(*xs)

        note = "runs the model as written (no fusion)"
        return Runner(run, notes=[note + (", channels_last" if channels_last else "")])
