"""ONNX → TensorRT plan, with an engine cache, a timing cache and a verified sidecar; and
loading a plan for execution on torch CUDA tensors.

    build_engine(model | model.onnx, "m.plan", precision="fp16", profiles=…)
        → m.plan + m.plan.json (segfast.edge.sidecar), cached under cache_dir by
          cache_key(onnx sha256, profiles, precision, TensorRT version, compute capability)
    load_engine("m.plan")  → TensorRTRunner: sidecar checked before deserialising
    TensorRTRunner(*cuda_tensors) → outputs, enqueued with execute_async_v3 on
        torch.cuda.current_stream()

This module builds (the ONNX source — exported here or an existing file —, the engine
cache, the TensorRT build proper) and loads plans (the checks before deserialising, and
the machine probes both use). The ONNX file's inputs and the optimisation profiles are
:mod:`segfast.export.tensorrt_profiles`; running a loaded plan,
:class:`~segfast.export.tensorrt_runner.TensorRTRunner`, is
:mod:`segfast.export.tensorrt_runner`. Their public names are importable from here too.

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
from segfast._version import __version__
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
from segfast.export.tensorrt_profiles import (
    OnnxInput,
    _load_onnx,
    check_precision,
    onnx_inputs,
    resolve_profiles,
)
from segfast.export.tensorrt_runner import TensorRTRunner
from segfast.outputs import WithHead

DEFAULT_WORKSPACE = 1 << 30  # bytes of scratch memory TensorRT's tactics may use


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
    int8_layers: Mapping[str, float | None] | None = None,
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
        int8_layers=int8_layers,
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
    int8_layers: Mapping[str, float | None] | None = None,
) -> BuildResult:
    """Build a TensorRT plan from ``model`` (an ``nn.Module``, exported here with
    :func:`segfast.export.onnx.export_onnx`; or an ``.onnx`` file) and write ``plan_path``
    and its sidecar ``<plan_path>.json``.

    Args:
        precision: "fp32", "fp16" — the exported graph's types (strongly typed build) — or
            "int8": a Q/DQ graph (``int8_layers`` for a module, as
            :func:`segfast.export.onnx.export_onnx` takes them; an ``.onnx`` file must carry
            its Q/DQ nodes). TensorRT 11 has no INT8 builder flag and no calibrators: the
            Q/DQ pairs are the only way int8 reaches it.
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
                int8_layers=int8_layers,
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
        if precision == "int8" and not _has_qdq(src.path):
            raise InputError(
                f"{src.path.name} has no QuantizeLinear/DequantizeLinear nodes: TensorRT 11 builds "
                "int8 only from a Q/DQ graph (export it with precision='int8' and int8_layers, or "
                "`segfast export --precision int8`)"
            )
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
        segfast_version=__version__,
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


def _unwrap_head(model: nn.Module, output: str, threshold: float) -> tuple[nn.Module, str, float]:
    """A ``WithHead`` wrapper (what backends receive) → its model, output and threshold, so
    the exporter writes the head itself."""
    if isinstance(model, WithHead):
        return model.model, model.output, model.threshold
    return model, output, threshold


def _has_qdq(path: Path) -> bool:
    """Whether the ONNX file holds Q/DQ pairs (explicit quantization)."""
    kinds = {n.op_type for n in _load_onnx(path).graph.node}
    return {"QuantizeLinear", "DequantizeLinear"} <= kinds


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
# Loading (running a loaded plan: segfast.export.tensorrt_runner)
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
