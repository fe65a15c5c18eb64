"""``onnxruntime``: the model exported to ONNX (:func:`segfast.export.export_onnx`,
head included) and run by ONNX Runtime.

Build: export to a temporary file (checked against the eager model by
``export_onnx``), then one ``InferenceSession`` with the latency-tuned options
of :func:`segfast.export._ort.session_options` (ORT_ENABLE_ALL, intra-op
threads = the process's usable cores, sequential execution, memory pattern and
CPU arena on). ``options={"intra_op_num_threads": n}`` overrides the thread
count, ``options={"opset": n}`` the ONNX opset (default 18); other options are
for other backends and ignored here.

CPU (verified here): torch tensors are handed over as numpy arrays without a
copy when they are contiguous CPU tensors of the graph's dtype; the output
array becomes the returned tensor without a copy. An fp16 engine runs the
strongly-typed fp16 graph; the CPU execution provider has fp16 kernels for
only some ops and inserts fp32 casts around the rest, so CPU fp16 is a
correctness path, not a fast one.

CUDA (written against the documented ONNX Runtime API, **not run here**: no
GPU and no onnxruntime-gpu on this machine): the CUDA execution provider on
the engine's device, with ``user_compute_stream`` set to the torch stream that
is current at build time, and I/O binding straight to the torch CUDA tensors'
memory (inputs and a preallocated output; when the output shape cannot be
derived from the input shapes, ONNX Runtime allocates it and it is copied).

Dynamic shapes: the graph is proven for the ranges and the shape guards
``torch.export`` recorded (e.g. PSPNet needs H, W ≥ 9; FCN-8s's graph assumes
its 1/32 map is not 1×1, so H, W ≥ 33); the runner refuses other inputs with
an :class:`~segfast.errors.InputError` naming the condition, as the ``torch``
backend's graph does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from segfast.backends.base import Backend, BuildRequest, Runner
from segfast.errors import BackendUnavailable, InputError
from segfast.outputs import WithHead


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    options = ("opset", "intra_op_num_threads")
    uses_graph = False
    description = "ONNX export run by ONNX Runtime (CPU; CUDA execution provider where installed)"

    def availability(self, device: torch.device | None = None) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError:
            return False, "onnxruntime is not installed: pip install 'segfast[onnx]'"
        for mod in ("onnx", "onnxscript"):
            try:
                __import__(mod)
            except ImportError:
                return False, f"{mod} (needed to export the model) is not installed: " + (
                    "pip install 'segfast[onnx]'"
                )
        providers = ort.get_available_providers()
        if device is not None and device.type == "cuda":
            if "CUDAExecutionProvider" not in providers:
                return False, (
                    f"ONNX Runtime {ort.__version__} has no CUDAExecutionProvider here "
                    f"(has {', '.join(providers)}); install onnxruntime-gpu"
                )
            return True, f"ONNX Runtime {ort.__version__}, CUDAExecutionProvider"
        if device is not None and device.type != "cpu":
            return False, f"ONNX Runtime runs on cpu or cuda devices, not {device.type}"
        return True, f"ONNX Runtime {ort.__version__}, CPUExecutionProvider"

    def build(self, req: BuildRequest) -> Runner:
        ok, why = self.availability(req.device)
        if not ok:
            raise BackendUnavailable(f"onnxruntime: {why}")
        if req.dtype == torch.bfloat16:
            raise BackendUnavailable(
                "onnxruntime: bf16 is not supported (ONNX export of bf16 convolutions fails the "
                "checker and ONNX Runtime has no bf16 convolution on the CPU); use fp16 or fp32"
            )
        if not isinstance(req.model, WithHead):
            raise TypeError(
                f"the onnxruntime backend expects the model wrapped by WithHead, "
                f"got {type(req.model).__name__}"
            )
        from segfast.export import _ort
        from segfast.export.onnx import export_onnx

        ort = _ort.import_onnxruntime()
        precision = "fp16" if req.dtype == torch.float16 else "fp32"
        if req.int8_layers is not None:
            precision = "int8"  # an fp32 graph with Q/DQ pairs (QDQ format)
        opset = int(req.options.get("opset", 18))
        threads = int(req.options.get("intra_op_num_threads") or _ort.usable_cores())
        with tempfile.TemporaryDirectory(prefix="segfast-onnx-") as tmp:
            exp = export_onnx(
                req.model.model,
                Path(tmp) / "model.onnx",
                example_input=req.inputs,
                output=req.output,
                precision=precision,
                dynamic=req.dynamic,
                opset=opset,
                threshold=req.model.threshold,
                check=req.verify_export,
                int8_layers=req.int8_layers,
                size_guards=req.options.get("size_guards"),
            )
            data = exp.path.read_bytes()
        so = _ort.session_options(threads)
        providers: list[Any] = ["CPUExecutionProvider"]
        if req.device.type == "cuda":
            provider_options = {
                "device_id": str(req.device.index or 0),
                "user_compute_stream": str(torch.cuda.current_stream(req.device).cuda_stream),
            }
            # CPU listed second: ORT places nodes the CUDA EP lacks kernels for there.
            providers = [("CUDAExecutionProvider", provider_options), "CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(data, sess_options=so, providers=providers)
        except Exception as exc:  # ORT's errors subclass Exception directly
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendUnavailable(
                f"onnxruntime: ONNX Runtime could not create a session for the exported graph: "
                f"{first}"
            ) from exc
        if req.device.type == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
            # ORT falls back to the CPU when the CUDA EP fails to load (e.g. no cuDNN).
            raise BackendUnavailable(
                "onnxruntime: the CUDA execution provider did not load (ONNX Runtime fell back to "
                f"{', '.join(session.get_providers())}); check the CUDA/cuDNN libraries"
            )
        names = [i.name for i in session.get_inputs()]
        dtypes = _ort.input_dtypes(session)
        out_name = exp.output_names[0]
        ranges = dict(exp.ranges)
        check = _domain_checker(exp.dynamic, ranges, exp.guards)

        if req.device.type == "cuda":
            fn = _cuda_runner(session, names, dtypes, out_name, req.device, check)
        else:

            def fn(*inputs: torch.Tensor) -> torch.Tensor:
                check(inputs)
                (out,) = session.run([out_name], _ort.feeds(names, dtypes, inputs))
                return torch.from_numpy(out)

        notes = [
            f"ONNX Runtime {ort.__version__}, providers {', '.join(session.get_providers())}",
            f"ONNX opset {exp.opset} from torch.onnx.export(dynamo=True), torch {torch.__version__}"
            f"; {precision} graph, output {exp.output}",
            f"session: ORT_ENABLE_ALL, {threads} intra-op thread(s), sequential, "
            "memory pattern + CPU arena",
        ]
        if ranges:
            notes.append(
                "dynamic ranges (proven by torch.export): "
                + ", ".join(f"{a} {lo}..{hi}" for a, (lo, hi) in ranges.items())
                + (
                    f", and {len(exp.guards)} shape guard(s), enforced per call"
                    if exp.guards
                    else ""
                )
            )
            if exp.guards is None:
                notes.append("this torch keeps no export guards: only the ranges are enforced")
        if precision == "fp16" and req.device.type == "cpu":
            notes.append("fp16 on the CPU EP: ops without fp16 kernels run in fp32 behind casts")
        details: dict[str, Any] = {
            "onnx_sha256": exp.sha256,
            "opset": exp.opset,
            "providers": session.get_providers(),
            "dynamic_ranges": ranges,
            "guards": exp.guards,
            "input_names": names,
        }
        return Runner(fn, notes=notes, details=details)


def _domain_checker(
    axes: tuple[str, ...], ranges: dict[str, tuple[int, int]], guards: tuple[str, ...] | None
) -> Any:
    """A check that inputs lie where export proved the graph: its ranges and its guards."""
    from segfast.compiler.guards import Guards, in_domain

    compiled = Guards(guards) if guards else None

    def check(inputs: tuple[torch.Tensor, ...]) -> None:
        if not axes:
            return  # static: the engine's own shape check covers it
        why = in_domain([tuple(t.shape) for t in inputs], axes, ranges, compiled)
        if why is not None:
            shapes = ", ".join("×".join(str(d) for d in t.shape) for t in inputs)
            raise InputError(
                f"input {shapes} is outside the shapes the exported ONNX graph is proven for: {why}"
            )

    return check


def _cuda_runner(
    session: Any,
    names: list[str],
    dtypes: list[torch.dtype],
    out_name: str,
    device: torch.device,
    check: Any,
) -> Any:
    """I/O binding on torch CUDA tensors (documented ONNX Runtime API; not run here)."""
    import numpy as np

    from segfast.export._ort import ORT_TO_TORCH

    out_meta = next(o for o in session.get_outputs() if o.name == out_name)
    out_dtype = ORT_TO_TORCH[out_meta.type]
    np_out = torch.empty(0, dtype=out_dtype).numpy().dtype
    np_in = [torch.empty(0, dtype=d).numpy().dtype for d in dtypes]
    index = device.index or 0

    def out_shape(inputs: tuple[torch.Tensor, ...]) -> list[int] | None:
        # Dims are ints or the names export gave the dynamic axes (batch/height/width).
        x = inputs[0]
        sizes = {"batch": x.shape[0]}
        if x.dim() == 4:
            sizes.update(height=x.shape[2], width=x.shape[3])
        shape = []
        for d in out_meta.shape:
            if isinstance(d, int):
                shape.append(d)
            elif d in sizes:
                shape.append(int(sizes[d]))
            else:
                return None
        return shape

    def fn(*inputs: torch.Tensor) -> torch.Tensor:
        check(inputs)
        binding = session.io_binding()
        held = []  # keep the cast/contiguous copies alive until the run ends
        for name, t, dt, npdt in zip(names, inputs, dtypes, np_in, strict=True):
            t = t.to(device, dt).contiguous()
            held.append(t)
            binding.bind_input(name, "cuda", index, npdt, list(t.shape), t.data_ptr())
        shape = out_shape(inputs)
        if shape is not None:
            out = torch.empty(shape, dtype=out_dtype, device=device)
            binding.bind_output(out_name, "cuda", index, np_out, shape, out.data_ptr())
            session.run_with_iobinding(binding)
            return out
        binding.bind_output(out_name, "cuda", index)
        session.run_with_iobinding(binding)
        host = binding.copy_outputs_to_cpu()[0]
        return torch.from_numpy(np.asarray(host)).to(device)

    return fn
