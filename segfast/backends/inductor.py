"""``inductor``: ``torch.compile`` of the model (default mode) — the peer segfast
measures itself against. Compilation happens at build time (two warm-up calls),
so the engine's build seconds include it."""

from __future__ import annotations

import torch

from segfast.backends.base import Backend, BuildRequest, Runner, cast_inputs
from segfast.errors import BackendUnavailable


class InductorBackend(Backend):
    name = "inductor"
    description = "torch.compile of the model (the peer to beat)"

    def availability(self, device: torch.device | None = None) -> tuple[bool, str]:
        if not hasattr(torch, "compile"):
            return False, "this PyTorch has no torch.compile"
        if device is not None and device.type == "cuda":
            try:
                import triton  # noqa: F401
            except ImportError:
                return False, "torch.compile on CUDA needs triton, which is not installed"
        return True, f"torch.compile in PyTorch {torch.__version__}"

    def build(self, req: BuildRequest) -> Runner:
        ok, why = self.availability(req.device)
        if not ok:
            raise BackendUnavailable(f"inductor: {why}")
        import copy

        model = req.model if req.dtype == torch.float32 else copy.deepcopy(req.model).to(req.dtype)
        compiled = torch.compile(model, dynamic=bool(req.dynamic))
        dtype = req.dtype

        def run(*inputs: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return compiled(*cast_inputs(inputs, dtype))

        try:
            for _ in range(2):  # compile now, not on the user's first frame
                run(*req.inputs)
        except Exception as exc:  # torch.compile fails in many ways; report the cause
            raise BackendUnavailable(
                f"inductor: torch.compile failed on this model: {str(exc).splitlines()[0]}"
            ) from exc
        return Runner(run, notes=["torch.compile, default mode"])
