"""``torch``: the fused graph on PyTorch ops — BN folded, activations and
residual adds fused into oneDNN convolutions on the CPU, NHWC throughout, the
head reduction fused. The CPU default."""

from __future__ import annotations

import torch

from segfast.backends.base import Backend, BuildRequest, Runner
from segfast.compiler import ops
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
        direct = {
            torch.ops.segfast.conv2d.default: ops.conv2d_impl,
            torch.ops.segfast.conv_transpose2d.default: ops.conv_transpose2d_impl,
            torch.ops.segfast.head.default: ops.head_impl,
        }
        # Call the composite implementations directly: same code, without the
        # custom-op dispatch (~40 µs a call on the CPU).
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in direct:
                node.target = direct[node.target]
        gm.recompile()

        def run(*inputs: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return gm(*inputs)

        notes = []
        if req.device.type == "cpu":
            notes.append(
                "oneDNN fused conv post-ops: "
                + ("on" if ops._mkldnn_ok() else "unavailable, plain PyTorch convolutions")
            )
        return Runner(run, notes=notes, details={"graph": gm})
