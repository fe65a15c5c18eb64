"""``torch``: the fused graph on PyTorch ops — BN folded, activations and
residual adds fused into oneDNN convolutions on the CPU, NHWC throughout, the
head reduction fused. The CPU default."""

from __future__ import annotations

import torch

from segfast.backends.base import Backend, BuildRequest, Runner
from segfast.errors import BackendUnavailable


class TorchBackend(Backend):
    name = "torch"
    uses_graph = True
    description = "fused graph on PyTorch ops (oneDNN post-ops on the CPU)"

    def availability(self, device: torch.device | None = None) -> tuple[bool, str]:
        return True, f"PyTorch {torch.__version__}"

    def build(self, req: BuildRequest) -> Runner:
        if req.graph is None:
            raise BackendUnavailable("the torch backend needs the fused graph")
        gm = req.graph.to(req.device)

        def run(*inputs: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return gm(*inputs)

        from segfast.compiler.ops import _mkldnn_ok

        notes = []
        if req.device.type == "cpu":
            notes.append(
                "oneDNN fused conv post-ops: "
                + ("on" if _mkldnn_ok() else "unavailable, plain PyTorch convolutions")
            )
        return Runner(run, notes=notes, details={"graph": gm})
