"""``torch``: the fused graph on PyTorch ops — BN folded, activations and
residual adds fused into oneDNN convolutions on the CPU, NHWC throughout, the
head reduction fused. The CPU default.

On the CPU (fp32 and bf16, where oneDNN is usable) the fused graph is lowered
into a flat plan (:mod:`segfast.backends.cpu`): convolution weights packed once
for oneDNN, two-source convolutions as accumulating halves instead of a concat,
max-pools without their unused indices, each intermediate freed after its last
reader. Elsewhere (CUDA, fp16 on the CPU) the graph runs as a ``GraphModule``
with the composite implementations called directly.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from segfast.backends.base import Backend, BuildRequest, Runner
from segfast.compiler import ops
from segfast.compiler.graph import nbytes
from segfast.errors import BackendUnavailable, SlowPrecisionWarning


class TorchBackend(Backend):
    name = "torch"
    options = (
        "no_cpu_plan", "cpu_kernels", "winograd", "avx2_kernels", "subpixel", "keep_memory",
        "int8_w7",
    )  # fmt: skip
    uses_graph = True
    description = "fused graph on PyTorch ops (prepacked oneDNN convolutions on the CPU)"

    def availability(self, device: torch.device | None = None) -> tuple[bool, str]:
        return True, f"PyTorch {torch.__version__}"

    def build(self, req: BuildRequest) -> Runner:
        if req.graph is None:
            raise BackendUnavailable("the torch backend needs the fused graph")
        gm = req.graph.to(req.device)
        details: dict[str, Any] = {"graph": gm}
        notes: list[str] = []
        cpu_plan = (
            req.device.type == "cpu"
            and req.dtype in (torch.float32, torch.bfloat16)
            and ops._mkldnn_ok(req.dtype)
            and not req.options.get("no_cpu_plan")
        )
        if cpu_plan:
            from segfast.backends.cpu import native as cpu_native
            from segfast.backends.cpu.memory import MIN_BYTES, keep_large_allocations
            from segfast.backends.cpu.plan import lower

            kernels = None
            if req.options.get("cpu_kernels", True):
                kernels = cpu_native.load()
                ok, why = cpu_native.status()
                note = "loaded" if ok else f"not used ({why})"
                if kernels is not None and not kernels.wide_vectors:
                    note += (
                        "; no AVX-512 here: its 8-lane kernels (Winograd, depthwise, "
                        "inverted residual blocks, SE gates, heads) where they beat oneDNN"
                    )
                notes.append("segfast CPU kernels: " + note)
            w7 = _int8_w7(gm, req.options.get("int8_w7"))
            if w7 is not None:  # an int8 graph: the choice goes into the engine file
                details["int8_w7"] = w7
            plan = lower(
                gm,
                native=kernels,
                use_winograd=bool(req.options.get("winograd", True)),
                use_avx2=bool(req.options.get("avx2_kernels", True)),
                use_subpixel=bool(req.options.get("subpixel", True)),
                int8_w7=bool(w7),
            )
            if req.options.get("keep_memory", True) and _largest_activation(gm) >= MIN_BYTES:
                _, why = keep_large_allocations()
                notes.append("activation memory: " + why)
            details["lowered"] = dict(plan.lowered)
            notes.append(
                "CPU plan: " + ", ".join(f"{k} ×{n}" for k, n in sorted(plan.lowered.items()))
            )

            def run(*inputs: torch.Tensor) -> torch.Tensor:
                with torch.inference_mode():
                    return plan(*inputs)

            return Runner(run, notes=notes, details=details)

        direct = {
            torch.ops.segfast.conv2d.default: ops.conv2d_impl,
            torch.ops.segfast.conv_transpose2d.default: ops.conv_transpose2d_impl,
            torch.ops.segfast.head.default: ops.head_impl,
            torch.ops.segfast.se_gate.default: ops.se_gate_impl,
            torch.ops.segfast.conv2d_gated.default: ops.conv2d_gated_impl,
            torch.ops.segfast.group_norm.default: ops.group_norm_impl,
        }
        # Call the composite implementations directly: same code, without the
        # custom-op dispatch (~40 µs a call on the CPU).
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in direct:
                node.target = direct[node.target]
        gm.recompile()

        def run_graph(*inputs: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return gm(*inputs)

        if req.device.type == "cpu":
            notes.append(
                "oneDNN fused conv post-ops: "
                + (
                    "on"
                    if ops._mkldnn_ok(req.dtype)
                    else f"unavailable in {req.dtype} here, plain PyTorch convolutions"
                )
            )
            if req.dtype == torch.bfloat16 and not ops._mkldnn_ok(req.dtype):
                msg = (
                    "bf16 on this CPU: oneDNN has no bf16 convolutions here (they need "
                    "AVX-512 BF16 or AMX), so the engine runs plain PyTorch bf16 "
                    "convolutions — measured ~30× slower than fp32 on an AVX2 CPU; "
                    "compile with precision='fp32' for speed"
                )
                notes.append(msg)
                warnings.warn(msg, SlowPrecisionWarning, stacklevel=2)
        return Runner(run_graph, notes=notes, details=details)


def _int8_w7(gm: torch.fx.GraphModule, asked: Any) -> bool | None:
    """Whether the CPU plan runs int8 convs with possibly negative inputs on 7-bit
    weights (:func:`segfast.backends.cpu.int8.to_7bit`): as ``asked`` (the ``int8_w7``
    option, which an engine file keeps), else where this CPU's int8 sums would saturate
    on them (no VNNI). None for a graph without int8 convs."""
    if asked is not None and not isinstance(asked, bool):
        raise ValueError(f"options['int8_w7'] must be True, False or None, got {asked!r}")
    qops = (torch.ops.segfast.qconv2d.default, torch.ops.segfast.qconv_transpose2d.default)
    if not any(n.op == "call_function" and n.target in qops for n in gm.graph.nodes):
        return None
    if asked is not None:
        return bool(asked)
    from segfast.backends.cpu import int8 as cpu_int8

    return cpu_int8.available() and not cpu_int8.exact_u8_range()


def _largest_activation(gm: torch.fx.GraphModule) -> int:
    """Bytes of the graph's largest tensor value (values with symbolic sizes skipped)."""
    vals = (n.meta.get("val") for n in gm.graph.nodes)
    return max(
        (nbytes(v) for v in vals
         if isinstance(v, torch.Tensor) and all(isinstance(d, int) for d in v.shape)),
        default=0,
    )  # fmt: skip
