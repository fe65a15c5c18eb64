"""``tensorrt``: the model exported to ONNX (with its head) and built into a TensorRT
engine (:mod:`segfast.export.tensorrt`), run with ``execute_async_v3`` on the caller's
current CUDA stream.

Precision is the exported graph's (fp32, or an fp16 graph built strongly typed); bf16 is
refused, as the ONNX exporter refuses it. ``dynamic`` axes become one optimisation
profile (see :func:`segfast.export.tensorrt.resolve_profiles`).

Options (``segfast.compile(..., backend="tensorrt", options={...})``): ``cache_dir``
(engine cache), ``timing_cache`` (file), ``workspace`` (bytes), ``optimization_level``,
``profiles`` / ``min_size`` / ``max_size`` / ``max_batch`` (profile ranges),
``check_onnx`` (ONNX Runtime check of the export, default True), ``plan`` (also keep the
plan and its sidecar at this path).

Not run on this project's machines (no TensorRT; see README): availability, option
checks and the refusal paths are tested here; building and running need a GPU with
TensorRT.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from segfast.backends.base import Backend, BuildRequest, Runner
from segfast.errors import BackendUnavailable

OPTIONS = (
    "cache_dir",
    "timing_cache",
    "workspace",
    "optimization_level",
    "profiles",
    "min_size",
    "max_size",
    "max_batch",
    "check_onnx",
    "plan",
)
_PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16"}


class TensorRTBackend(Backend):
    name = "tensorrt"
    options = OPTIONS
    description = "ONNX export built into a TensorRT engine (GPU, where TensorRT is installed)"

    def availability(self, device: torch.device | None = None) -> tuple[bool, str]:
        try:
            import tensorrt
        except ImportError as exc:
            return False, f"TensorRT is not installed (NVIDIA's `tensorrt` package): {exc}"
        version = str(tensorrt.__version__)
        if int(version.split(".")[0]) < 10:
            return False, f"segfast needs TensorRT ≥ 10, found {version}"
        if device is not None and device.type != "cuda":
            return False, f"TensorRT runs on CUDA GPUs, not on {device.type}"
        if not torch.cuda.is_available():
            return False, f"TensorRT {version} is installed but PyTorch sees no CUDA GPU"
        return True, f"TensorRT {version}"

    def build(self, req: BuildRequest) -> Runner:
        from segfast.export.tensorrt import build_engine, load_engine

        ok, why = self.availability(req.device)
        if not ok:
            raise BackendUnavailable(f"tensorrt: {why}")
        if req.dtype not in _PRECISIONS:
            raise BackendUnavailable(
                f"tensorrt: precision {req.dtype} is not supported (fp32 or fp16 graphs only)"
            )
        # Options are shared by every backend (auto hands them to each candidate) and
        # compile refuses keys no backend reads: take this backend's own, skip the rest.
        opts = {k: v for k, v in req.options.items() if k in OPTIONS}
        if not req.verify_export:  # an int8 fallback trial: the guard judges the engine
            opts["check_onnx"] = False
        keep = opts.pop("plan", None)
        with tempfile.TemporaryDirectory(prefix="segfast-trt-") as tmp:
            plan = Path(tmp) / "model.plan"
            precision = _PRECISIONS[req.dtype] if req.int8_layers is None else "int8"
            result = build_engine(
                req.model,  # WithHead: the exporter writes the head into the graph
                plan,
                precision=precision,
                int8_layers=req.int8_layers,
                example_input=req.inputs,
                dynamic=list(req.dynamic) or False,
                device=req.device,
                **opts,
            )
            runner = load_engine(plan, device=req.device, reuse_outputs=False)
            if keep is not None:
                _copy_plan(plan, Path(keep))
        meta = result.meta
        dtypes = runner.input_dtypes

        def run(*inputs: torch.Tensor) -> torch.Tensor:
            xs = tuple(
                x.to(dt) if x.is_floating_point() and dt.is_floating_point else x
                for x, dt in zip(inputs, dtypes, strict=True)
            )
            out = runner(*xs)
            return out if isinstance(out, torch.Tensor) else out[0]

        ranges = ", ".join(
            f"{t.name} {list(t.profile.min)}…{list(t.profile.max)}"
            for t in meta.inputs
            if t.profile is not None and t.profile.dynamic
        )
        notes = [
            f"TensorRT {meta.tensorrt_version}, {meta.precision} strongly typed, "
            f"plan sha256 {meta.plan_sha256[:12]}…"
            + (" (engine cache hit)" if result.cache_hit else f", built in {result.seconds:.1f} s"),
        ]
        if ranges:
            notes.append(f"optimisation profile: {ranges}")
        details: dict[str, Any] = {"plan_meta": meta, "build": result}
        return Runner(run, notes=notes, details=details)


def _copy_plan(plan: Path, dest: Path) -> None:
    from segfast._io import atomic_path
    from segfast.edge.sidecar import sidecar_path

    for src, dst in ((plan, dest), (sidecar_path(plan), sidecar_path(dest))):
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
