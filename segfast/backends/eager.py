"""``eager``: the untouched model, run by PyTorch as written — the reference and
the baseline. In fp16/bf16 a copy of the model is cast (PyTorch's own
low-precision result, which the accuracy contract compares against)."""

from __future__ import annotations

import copy

import torch

from segfast.backends.base import Backend, BuildRequest, Runner, cast_inputs


class EagerBackend(Backend):
    name = "eager"
    description = "the model as written, run by PyTorch"

    def availability(self, device: torch.device | None = None) -> tuple[bool, str]:
        return True, f"PyTorch {torch.__version__}"

    def build(self, req: BuildRequest) -> Runner:
        model = req.model
        if req.dtype != torch.float32:
            model = copy.deepcopy(model).to(req.dtype)
        dtype = req.dtype

        def run(*inputs: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model(*cast_inputs(inputs, dtype))

        return Runner(run, notes=["runs the model as written (no fusion)"])
