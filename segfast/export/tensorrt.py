"""ONNX → TensorRT plan, with an engine cache, a timing cache and a verified sidecar; and
execution of a plan on torch CUDA tensors.

    build_engine(model | model.onnx, "m.plan", precision="fp16", profiles=…)
        → m.plan + m.plan.json (segfast.edge.sidecar), cached under cache_dir by
          cache_key(onnx sha256, profiles, precision, TensorRT version, compute capability)
    load_engine("m.plan")  → TensorRTRunner: sidecar checked before deserialising
    TensorRTRunner(*cuda_tensors) → outputs, enqueued with execute_async_v3 on
        torch.cuda.current_stream()

TensorRT 10 and 11. Networks are always created strongly typed
(``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): TensorRT 11 builds nothing else, and on
10 it gives the same semantics — every tensor keeps the type the ONNX graph gives it, so
precision comes from the export (``export_onnx(precision="fp16")`` writes an fp16 graph)
and no FP16/BF16/INT8 builder flag is ever set. For fp32 builds the TF32 flag is cleared
where the installed TensorRT has one (TF32 convolutions would miss the fp32 accuracy
contract, rel-L2 ≤ 1e-4).

TensorRT plugins from segfast's Triton kernels (``tensorrt.plugin``, TensorRT ≥ 10.9) are
not implemented. The issue asks for them only where segfast's kernels beat TensorRT's own
fusion, which has not been measured: TensorRT cannot be installed on this project's
machines. Writing plugin code that was never run, against a gain never measured, would be
guesswork; the switch does not exist until both can be checked on a GPU with TensorRT.

Not run here: every line from the first ``import tensorrt`` on (no TensorRT on these
machines). What runs and is tested here: profile resolution, ONNX reading, cache keys,
sidecars and their checks, the refusal paths of :func:`load_engine` (before
deserialisation), and :class:`TensorRTRunner`'s input checks and output-buffer reuse
(with a stand-in for the TensorRT session).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segfast._io import atomic_path, sha256_file
from segfast.edge.sidecar import (
    PRECISIONS,
    PlanMeta,
    Profile,
    TensorSpec,
    cache_key,
    check_environment,
    make_sidecar,
    parse_sidecar,
    read_plan,
    sidecar_path,
    write_plan,
)
from segfast.edge.trt import TrtSession, dtype_name, import_tensorrt, tensorrt_major
from segfast.errors import BackendUnavailable, EngineFileError, InputError, UnsupportedModelError

DEFAULT_WORKSPACE = 1 << 30  # bytes of scratch memory TensorRT's tactics may use
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


# ---------------------------------------------------------------------------------------
# Probes (module functions so tests can stand in for a GPU and TensorRT)
# ---------------------------------------------------------------------------------------


def _tensorrt_version() -> str:
    return str(import_tensorrt().__version__)


def _cuda_device(device: int | str | torch.device | None) -> torch.device:
    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs a CUDA GPU; PyTorch sees none here")
    dev = (
        torch.device("cuda", torch.cuda.current_device())
        if device is None
        else torch.device(device)
    )
    if dev.type != "cuda":
        raise InputError(f"TensorRT engines run on CUDA devices, got {dev}")
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def _capability(device: int | str | torch.device | None) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(_cuda_device(device))
    return int(major), int(minor)


def _gpu_name(device: int | str | torch.device | None) -> str:
    return str(torch.cuda.get_device_name(_cuda_device(device)))


def _driver_version() -> int | None:
    """cuDriverGetVersion via libcuda (e.g. 12080), or None where no driver is loaded."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    v = ctypes.c_int(0)
    return int(v.value) if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 else None


# ---------------------------------------------------------------------------------------
# ONNX inputs and optimisation profiles
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnnxInput:
    """A graph input of an ONNX file: name, dims (None where dynamic/symbolic), dtype."""

    name: str
    dims: tuple[int | None, ...]
    dtype: str


def _load_onnx(path: str | os.PathLike[str]) -> Any:
    """An ONNX file's graph and metadata, without its external weights."""
    try:
        import onnx
    except ImportError:
        raise BackendUnavailable(
            "reading ONNX files needs the onnx package: pip install 'segfast[onnx]'"
        ) from None
    return onnx.load(str(path), load_external_data=False)


def onnx_inputs(path: str | os.PathLike[str]) -> list[OnnxInput]:
    """The real inputs (not initializers) of an ONNX file, with numpy dtype names."""
    import onnx

    model = _load_onnx(path)
    init = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in init:
            continue
        t = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        out.append(OnnxInput(vi.name, dims, dtype))
    return out


def _as_profile(name: str, value: Profile | Sequence[Sequence[int]]) -> Profile:
    if isinstance(value, Profile):
        return value
    try:
        lo, opt, hi = value
        return Profile(*(tuple(int(d) for d in s) for s in (lo, opt, hi)))
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"profile for input {name!r} must be a Profile or (min, opt, max) shapes: {exc}"
        ) from None


_AXES = {0: "batch", 2: "height", 3: "width"}  # dim → the exporter's axis name (4-D inputs)


def _axis(rank: int, dim: int) -> str | None:
    if dim == 0:
        return "batch"
    return _AXES.get(dim) if rank == 4 else None


def resolve_profiles(
    inputs: Sequence[OnnxInput],
    opt_shapes: Mapping[str, Sequence[int]] | None = None,
    profiles: Mapping[str, Profile | Sequence[Sequence[int]]] | None = None,
    *,
    min_size: Sequence[int] | None = None,
    max_size: Sequence[int] | None = None,
    max_batch: int | None = None,
    ranges: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Profile]:
    """One :class:`Profile` per ONNX input.

    Static dims are fixed. An input named in ``profiles`` takes that (min, opt, max),
    which must keep the static dims. Otherwise a dynamic dim takes its opt from
    ``opt_shapes`` (the example input) and its range from: batch (dim 0) → 1 …
    ``max_batch`` (default: opt); height/width of a 4-D input (dims 2, 3) →
    ``min_size`` … ``max_size`` (default: half … twice the opt size); any other dim →
    fixed at opt. ``ranges`` ({"batch" / "height" / "width": (lo, hi)}, what the ONNX
    exporter proved the graph supports) bound the defaults, and a range reaching outside
    them is refused.
    """
    profiles = dict(profiles or {})
    ranges = {k: (int(v[0]), int(v[1])) for k, v in (ranges or {}).items()}
    unknown = set(profiles) - {i.name for i in inputs}
    if unknown:
        raise InputError(
            f"profiles name unknown inputs {sorted(unknown)}; inputs: {[i.name for i in inputs]}"
        )
    out = {}
    for inp in inputs:
        shown = ["?" if d is None else d for d in inp.dims]
        if inp.name in profiles:
            prof = _as_profile(inp.name, profiles[inp.name])
            if len(prof.min) != len(inp.dims) or any(
                d is not None and not lo == d == hi
                for d, lo, hi in zip(inp.dims, prof.min, prof.max, strict=True)
            ):
                raise InputError(
                    f"profile {prof.as_dict()} for input {inp.name!r} does not fit its ONNX "
                    f"shape {shown}"
                )
        elif all(d is not None for d in inp.dims):
            prof = Profile.fixed(inp.dims)  # type: ignore[arg-type]
        else:
            if opt_shapes is None or inp.name not in opt_shapes:
                raise InputError(
                    f"input {inp.name!r} has dynamic dims {shown}: give an example input (its "
                    "shape is the profile's opt) or a profile"
                )
            opt = tuple(int(d) for d in opt_shapes[inp.name])
            if len(opt) != len(inp.dims) or any(
                d is not None and d != o for d, o in zip(inp.dims, opt, strict=True)
            ):
                raise InputError(
                    f"example shape {list(opt)} of input {inp.name!r} does not fit its ONNX "
                    f"shape {shown}"
                )
            lo, hi = list(opt), list(opt)
            for i, d in enumerate(inp.dims):
                if d is not None:
                    continue
                axis = _axis(len(opt), i)
                r_lo, r_hi = ranges.get(axis, (1, 2**31 - 1)) if axis else (opt[i], opt[i])
                if axis == "batch":
                    lo[i], hi[i] = max(1, r_lo), max(opt[i], max_batch or opt[i])
                elif axis is not None:
                    j = i - 2
                    lo[i] = int(min_size[j]) if min_size is not None else max(r_lo, opt[i] // 2)
                    hi[i] = int(max_size[j]) if max_size is not None else min(r_hi, 2 * opt[i])
            try:
                prof = Profile(tuple(lo), opt, tuple(hi))
            except ValueError as exc:
                raise InputError(f"input {inp.name!r}: {exc}") from None
        for i, d in enumerate(inp.dims):
            axis = _axis(len(inp.dims), i)
            if d is None and axis in ranges:
                r_lo, r_hi = ranges[axis]
                if prof.min[i] < r_lo or prof.max[i] > r_hi:
                    raise InputError(
                        f"input {inp.name!r}: the profile's {axis} range {prof.min[i]}…"
                        f"{prof.max[i]} reaches outside {r_lo}…{r_hi}, the range the ONNX "
                        "export supports"
                    )
        out[inp.name] = prof
    return out


# ---------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------


@dataclass
class BuildResult:
    """What :func:`build_engine` did: the plan, its verified sidecar, and how."""

    plan: Path
    sidecar: Path
    meta: PlanMeta
    cache_hit: bool
    seconds: float
    onnx: Path | None = None  # the exported file, when it was kept
    notes: list[str] = field(default_factory=list)


@dataclass
class OnnxSource:
    """The ONNX file a plan is built from, and what is known about it."""

    path: Path
    output: str  # the head: logits / probs / mask
    threshold: float
    num_classes: int | None
    opset: int | None
    ranges: dict[str, tuple[int, int]]  # dynamic axis → (min, max) the export supports
    opt_shapes: dict[str, tuple[int, ...]] | None  # example shapes, by input name
    inputs: list[OnnxInput]


def _example_shapes(example_input: Any, input_shape: Any) -> list[tuple[int, ...]] | None:
    if example_input is not None:
        xs = (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
        return [tuple(int(d) for d in t.shape) for t in xs]
    if input_shape is not None:
        if all(isinstance(d, int) for d in input_shape):
            return [tuple(input_shape)]
        return [tuple(s) for s in input_shape]
    return None


def _by_name(
    inputs: Sequence[OnnxInput], shapes: Sequence[tuple[int, ...]] | None
) -> dict[str, tuple[int, ...]] | None:
    if shapes is None:
        return None
    if len(shapes) != len(inputs):
        raise InputError(f"{len(shapes)} example shapes for {len(inputs)} ONNX inputs")
    return {i.name: tuple(s) for i, s in zip(inputs, shapes, strict=True)}


def export_source(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    precision: str,
    example_input: Any = None,
    input_shape: Any = None,
    output: str = "logits",
    threshold: float = 0.5,
    dynamic: bool | str | Sequence[str] = False,
    opset: int = 18,
    check: bool = True,
) -> OnnxSource:
    """Export ``model`` (a ``WithHead`` wrapper is unwrapped so the exporter writes the
    head) with :func:`segfast.export.onnx.export_onnx` into ``directory/model.onnx``."""
    from segfast.export.onnx import export_onnx

    inner, output, threshold = _unwrap_head(model, output, threshold)
    exported = export_onnx(
        inner,
        Path(directory) / "model.onnx",
        example_input=example_input,
        input_shape=input_shape,
        output=output,
        precision=precision,
        dynamic=dynamic,
        opset=opset,
        threshold=threshold,
        check=check,
    )
    inputs = onnx_inputs(exported.path)
    # the caller's example shapes are the profile's opt (the exporter traces size-1 axes
    # at 2); without them, the traced shapes
    shapes = _example_shapes(example_input, input_shape) or list(exported.input_shapes)
    return OnnxSource(
        path=Path(exported.path),
        output=exported.output,
        threshold=float(threshold),
        num_classes=exported.num_classes,
        opset=int(exported.opset),
        ranges=dict(exported.ranges),
        opt_shapes=_by_name(inputs, shapes),
        inputs=inputs,
    )


def onnx_source(
    path: str | os.PathLike[str],
    *,
    example_input: Any = None,
    input_shape: Any = None,
    output: str | None = None,
    threshold: float | None = None,
) -> OnnxSource:
    """An existing ``.onnx`` file. Files from :func:`~segfast.export.onnx.export_onnx`
    carry their head, threshold, class count and dynamic ranges as metadata; for other
    files ``output`` (default "logits") and ``threshold`` (0.5) say what the graph ends in.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such ONNX file")
    proto = _load_onnx(p)
    meta = {e.key: e.value for e in proto.metadata_props}
    stored = meta.get("segfast.output")
    if stored is not None and output is not None and output != stored:
        raise InputError(f"{p.name} was exported with output={stored!r}, not {output!r}")
    out_kind = stored or output or "logits"
    if out_kind not in ("logits", "probs", "mask"):
        raise InputError(f"output must be logits, probs or mask, got {out_kind!r}")
    thr = float(meta["segfast.threshold"]) if "segfast.threshold" in meta else threshold
    k = meta.get("segfast.num_classes")
    try:
        ranges = {
            a: (int(v[0]), int(v[1]))
            for a, v in json.loads(meta.get("segfast.dynamic_ranges", "{}")).items()
        }
    except (ValueError, TypeError, IndexError, AttributeError) as exc:
        raise InputError(f"{p.name}: unreadable segfast.dynamic_ranges metadata ({exc})") from None
    opset = next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    inputs = onnx_inputs(p)
    return OnnxSource(
        path=p,
        output=out_kind,
        threshold=0.5 if thr is None else float(thr),
        num_classes=int(k) if k else None,
        opset=opset,
        ranges=ranges,
        opt_shapes=_by_name(inputs, _example_shapes(example_input, input_shape)),
        inputs=inputs,
    )


def build_engine(
    model: nn.Module | str | os.PathLike[str],
    plan_path: str | os.PathLike[str],
    *,
    precision: str = "fp32",
    example_input: torch.Tensor | Sequence[torch.Tensor] | None = None,
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
    output: str | None = None,
    threshold: float | None = None,
    dynamic: bool | str | Sequence[str] = False,
    profiles: Mapping[str, Profile | Sequence[Sequence[int]]] | None = None,
    min_size: Sequence[int] | None = None,
    max_size: Sequence[int] | None = None,
    max_batch: int | None = None,
    workspace: int = DEFAULT_WORKSPACE,
    timing_cache: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    optimization_level: int | None = None,
    opset: int = 18,
    check_onnx: bool = True,
    preprocess: Mapping[str, Any] | None = None,
    device: int | str | torch.device | None = None,
    keep_onnx: bool = False,
) -> BuildResult:
    """Build a TensorRT plan from ``model`` (an ``nn.Module``, exported here with
    :func:`segfast.export.onnx.export_onnx`; or an ``.onnx`` file) and write ``plan_path``
    and its sidecar ``<plan_path>.json``.

    Args:
        precision: "fp32" or "fp16" — the exported graph's types (strongly typed build).
            For an ``.onnx`` file it must match the file's floating-point inputs.
        example_input / input_shape: for a module, what to export with; for both, the
            opt shapes of dynamic inputs.
        output / threshold: the head ("logits" — the default for modules —, "probs",
            "mask"); files from export_onnx carry theirs.
        dynamic / opset / check_onnx: the export's dynamic axes, opset, and whether ONNX
            Runtime checks the exported file against the model (modules only).
        profiles: {input name: (min, opt, max)} overriding the defaults of
            :func:`resolve_profiles` (``min_size`` / ``max_size`` (h, w), ``max_batch``).
        workspace: TensorRT's workspace memory-pool limit in bytes.
        timing_cache: a file TensorRT's tactic timings are read from and written back to
            (shared across builds: later builds skip timing known layers).
        cache_dir: the engine cache — a plan built before with the same
            :func:`~segfast.edge.sidecar.cache_key` is verified and copied instead of
            rebuilt.
        optimization_level: TensorRT's builder optimisation level (0–5; default 3).
        preprocess: the frames → input normalisation recorded for the edge runtime
            (``mean``, ``std``, ``input_order``, ``align_corners``; ImageNet's and BGR by
            default).
        device: the CUDA device to build for (default: the current one).
        keep_onnx: keep the exported ONNX file beside the plan (``<plan>.onnx``).
    """
    t0 = time.perf_counter()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt_version = _tensorrt_version()  # fails first, and clearly, without TensorRT
    cap = _capability(device)
    pre = _preprocess_meta(preprocess)
    plan_path = Path(plan_path)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="segfast-trt-") as tmp:
        if isinstance(model, nn.Module):
            src = export_source(
                model,
                tmp,
                precision=precision,
                example_input=example_input,
                input_shape=input_shape,
                output=output or "logits",
                threshold=0.5 if threshold is None else threshold,
                dynamic=dynamic,
                opset=opset,
                check=check_onnx,
            )
        else:
            src = onnx_source(
                model,
                example_input=example_input,
                input_shape=input_shape,
                output=output,
                threshold=threshold,
            )
        check_precision(src.inputs, precision, src.path.name)
        profs = resolve_profiles(
            src.inputs,
            src.opt_shapes,
            profiles,
            min_size=min_size,
            max_size=max_size,
            max_batch=max_batch,
            ranges=src.ranges,
        )
        onnx_sha = sha256_file(src.path)
        key = cache_key(
            onnx_sha256=onnx_sha,
            profiles=profs,
            precision=precision,
            tensorrt_version=trt_version,
            capability=cap,
        )
        kept = None
        if keep_onnx:
            kept = plan_path.with_name(plan_path.name + ".onnx")
            with atomic_path(kept) as dst:
                shutil.copyfile(src.path, dst)
        if cache_dir is not None:
            hit = _from_cache(Path(cache_dir), key, plan_path, trt_version, cap, pre, notes)
            if hit is not None:
                seconds = time.perf_counter() - t0
                return BuildResult(
                    plan_path, sidecar_path(plan_path), hit, True, seconds, kept, notes
                )
        plan_data, in_specs, out_specs = _build_plan(
            src.path, profs, workspace, timing_cache, optimization_level, precision, device
        )
    doc = make_sidecar(
        plan_data=plan_data,
        tensorrt_version=trt_version,
        strongly_typed=True,
        capability=cap,
        gpu_name=_gpu_name(device),
        precision=precision,
        inputs=in_specs,
        outputs=out_specs,
        onnx_sha256=onnx_sha,
        opset=src.opset,
        output=src.output,
        threshold=src.threshold,
        num_classes=src.num_classes,
        preprocess=pre,
        segfast_version=_segfast_version(),
        cuda={"runtime": torch.version.cuda, "driver": _driver_version()},
        builder={
            "workspace": int(workspace),
            "optimization_level": optimization_level,
            "timing_cache": timing_cache is not None,
        },
    )
    if doc["cache_key"] != key:
        raise RuntimeError(
            "TensorRT's network inputs differ from the ONNX file's profiles; not writing a "
            "plan whose sidecar would not match its cache key"
        )
    write_plan(plan_path, plan_data, doc)
    if cache_dir is not None:
        _to_cache(Path(cache_dir), key, plan_path)
    meta, _ = read_plan(plan_path)
    return BuildResult(
        plan_path, sidecar_path(plan_path), meta, False, time.perf_counter() - t0, kept, notes
    )


def check_precision(inputs: Sequence[OnnxInput], precision: str, where: str) -> None:
    """A strongly typed build runs in the graph's types: fp16 needs fp16 float inputs."""
    want = "float16" if precision == "fp16" else "float32"
    for i in inputs:
        if i.dtype in ("float16", "float32", "bfloat16") and i.dtype != want:
            raise InputError(
                f"{where}: input {i.name!r} is {i.dtype}, but precision={precision!r} needs a "
                f"{want} graph (TensorRT builds it strongly typed): export with "
                f"precision={precision!r}"
            )


def _unwrap_head(model: nn.Module, output: str, threshold: float) -> tuple[nn.Module, str, float]:
    """A ``WithHead`` wrapper (what backends receive) → its model, output and threshold, so
    the exporter writes the head itself."""
    from segfast.compiler.postprocess import WithHead

    if isinstance(model, WithHead):
        return model.model, model.output, model.threshold
    return model, output, threshold


def _segfast_version() -> str:
    import segfast

    return str(segfast.__version__)


def _preprocess_meta(preprocess: Mapping[str, Any] | None) -> dict[str, Any]:
    from segfast.edge import reference as ref

    meta = {
        "mean": list(ref.IMAGENET_MEAN),
        "std": list(ref.IMAGENET_STD),
        "input_order": "bgr",
        "align_corners": False,
    }
    unknown = set(preprocess or {}) - set(meta)
    if unknown:
        raise ValueError(f"unknown preprocess keys {sorted(unknown)}; known: {sorted(meta)}")
    meta.update(preprocess or {})
    ref.normalisation(meta["mean"], meta["std"])  # validates
    if meta["input_order"] not in ("bgr", "rgb"):
        raise ValueError(f"input_order must be 'bgr' or 'rgb', got {meta['input_order']!r}")
    meta["mean"], meta["std"] = list(map(float, meta["mean"])), list(map(float, meta["std"]))
    return meta


def _from_cache(
    cache: Path,
    key: str,
    plan_path: Path,
    trt_version: str,
    cap: tuple[int, int],
    preprocess: dict[str, Any],
    notes: list[str],
) -> PlanMeta | None:
    """Copy a verified cached plan to ``plan_path``; None when there is none (or a bad one,
    which is reported and rebuilt). The sidecar keeps the cached build's record but this
    build's ``preprocess`` (metadata for the edge runtime; it does not change the plan)."""
    cached = cache / f"{key}.plan"
    if not cached.exists():
        return None
    try:
        meta, data = read_plan(cached)
        check_environment(meta, tensorrt_version=trt_version, capability=cap, where=str(cached))
        if meta.cache_key != key:
            raise EngineFileError(f"{cached}: its sidecar's cache key is {meta.cache_key}")
    except EngineFileError as exc:
        msg = f"engine cache entry refused ({exc}); rebuilding it"
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
        return None
    doc = {**meta.raw, "preprocess": preprocess}
    write_plan(plan_path, data, doc)
    notes.append(f"engine cache hit: {cached}")
    return parse_sidecar(doc, sidecar_path(plan_path))


def _to_cache(cache: Path, key: str, plan_path: Path) -> None:
    meta, data = read_plan(plan_path)
    write_plan(cache / f"{key}.plan", data, meta.raw)


def _build_plan(
    onnx_path: Path,
    profiles: Mapping[str, Profile],
    workspace: int,
    timing_cache: str | os.PathLike[str] | None,
    optimization_level: int | None,
    precision: str,
    device: int | str | torch.device | None,
) -> tuple[bytes, list[TensorSpec], list[TensorSpec]]:
    """The TensorRT build proper (TensorRT 10/11 documented API). Not run here."""
    trt = import_tensorrt()
    major = tensorrt_major(str(trt.__version__))
    if major < 10:
        raise BackendUnavailable(f"segfast needs TensorRT ≥ 10, found {trt.__version__}")
    logger = trt.Logger(trt.Logger.WARNING)
    with torch.cuda.device(_cuda_device(device)):
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise UnsupportedModelError(
                f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}"
            )
        names = {network.get_input(i).name for i in range(network.num_inputs)}
        if names != set(profiles):
            raise UnsupportedModelError(
                f"TensorRT sees inputs {sorted(names)}, the ONNX file {sorted(profiles)}"
            )
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
        if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
        if optimization_level is not None:
            config.builder_optimization_level = int(optimization_level)
        if any(p.dynamic for p in profiles.values()):
            profile = builder.create_optimization_profile()
            for name, p in profiles.items():
                profile.set_shape(name, p.min, p.opt, p.max)
            config.add_optimization_profile(profile)
        cache_file = Path(timing_cache) if timing_cache is not None else None
        if cache_file is not None:
            blob = cache_file.read_bytes() if cache_file.is_file() else b""
            config.set_timing_cache(config.create_timing_cache(blob), False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(
                f"TensorRT could not build {onnx_path.name} (its log above says why)"
            )
        if cache_file is not None:
            with atomic_path(cache_file) as tmp:
                tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        ins = []
        for i in range(network.num_inputs):
            t = network.get_input(i)
            ins.append(TensorSpec(t.name, dtype_name(t.dtype), tuple(t.shape), profiles[t.name]))
        outs = []
        for i in range(network.num_outputs):
            t = network.get_output(i)
            outs.append(TensorSpec(t.name, dtype_name(t.dtype), tuple(t.shape)))
        return bytes(serialized), ins, outs


# ---------------------------------------------------------------------------------------
# Loading and running
# ---------------------------------------------------------------------------------------


def _deserialize(plan: bytes, meta: PlanMeta, device: torch.device) -> TrtSession:
    with torch.cuda.device(device):
        return TrtSession(plan, meta)


def load_engine(
    plan_path: str | os.PathLike[str],
    *,
    sidecar: str | os.PathLike[str] | None = None,
    device: int | str | torch.device | None = None,
    reuse_outputs: bool = True,
) -> TensorRTRunner:
    """Load a plan for execution on torch CUDA tensors.

    Before TensorRT deserialises a byte: the sidecar must exist, parse and match the
    plan's size and sha256 (:func:`~segfast.edge.sidecar.read_plan`), and the plan's
    TensorRT version and compute capability must be this machine's
    (:func:`~segfast.edge.sidecar.check_environment`). Each refusal is an
    :class:`~segfast.errors.EngineFileError` saying which check failed.
    """
    meta, data = read_plan(plan_path, sidecar)
    dev = _cuda_device(device)
    check_environment(
        meta,
        tensorrt_version=_tensorrt_version(),
        capability=_capability(dev),
        where=str(plan_path),
    )
    return TensorRTRunner(_deserialize(data, meta, dev), dev, reuse_outputs=reuse_outputs)


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
