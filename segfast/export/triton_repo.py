"""An ONNX file → a model repository NVIDIA Triton Inference Server loads as is.

    write_triton_repo("m.onnx", "repo/", "unet", max_batch_size=8)
        → repo/unet/config.pbtxt        platform "onnxruntime_onnx", the file's I/O
          repo/unet/1/model.onnx        the file, copied
          repo/unet/1/model.plan (+ .json sidecar)  only where TensorRT builds here

**The config** is protobuf text format, written here (no tritonclient at run time) and
checked in the tests by parsing it into Triton's own schema
(``tritonclient.grpc.model_config_pb2.ModelConfig``). Inputs and outputs take their
names, element types (``TYPE_FP32``, ``TYPE_FP16``, ``TYPE_UINT8``, ``TYPE_INT64`` …) and
dims from the ONNX file, symbolic dims as ``-1``. A batch-dynamic file
(``max_batch_size > 0``) leaves the batch dim out of every ``dims`` — Triton adds it — and
gets ``dynamic_batching { }`` (with ``max_queue_delay_microseconds`` when given); a static
file gets ``max_batch_size: 0`` and its full dims. ``parameters`` record what the file
computes (``segfast_output``: logits / probs / mask, ``segfast_precision``,
``segfast_threshold``, ``segfast_num_classes``) and ``segfast_version``; Triton passes
parameters it does not know to the backend, which ignores them.

**Batch range.** Triton forms batches of any size from 1 to ``max_batch_size``, so a file
whose ``segfast.dynamic_ranges`` metadata admits fewer batch sizes is refused rather than
served wrong.

**The TensorRT plan** (``plan=True``) is built with
:func:`segfast.export.tensorrt.build_engine` from the copied ``model.onnx``, with a batch
profile up to ``max_batch_size``. Where TensorRT cannot run here (not installed, no CUDA
GPU) the plan is skipped and :attr:`TritonRepo.plan_note` says why; nothing stands in for
it. The config serves ``model.onnx`` either way (``default_model_filename``); serving the
plan is a copy of the config with ``platform: "tensorrt_plan"``. Not run on this
project's machines: the plan build (no TensorRT) and Triton Inference Server itself (a
container).

**Atomic.** The model folder is written into a temporary folder beside it and renamed
into place; an existing non-empty ``repo/<name>`` is refused unless ``force=True`` (then
it is replaced only once the new one is complete). On any error nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segfast._io import sha256_file
from segfast._version import __version__
from segfast.errors import BackendUnavailable, InputError, UnsupportedModelError
from segfast.export import tensorrt
from segfast.export.tensorrt_profiles import _load_onnx

PLATFORM = "onnxruntime_onnx"
ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"
VERSION = "1"  # the one model version written
DEFAULT_MAX_BATCH_SIZE = 8

# ONNX TensorProto element type names → Triton's DataType names (model_config.proto).
TRITON_TYPES = {
    "FLOAT": "TYPE_FP32",
    "FLOAT16": "TYPE_FP16",
    "BFLOAT16": "TYPE_BF16",
    "DOUBLE": "TYPE_FP64",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "BOOL": "TYPE_BOOL",
    "STRING": "TYPE_STRING",
}
# The model name is the folder's name and a URL path segment (/v2/models/<name>).
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class TritonTensor:
    """One input or output as the config declares it."""

    name: str
    data_type: str  # Triton's, e.g. "TYPE_FP32"
    dims: tuple[int, ...]  # without the batch dim when max_batch_size > 0; -1: dynamic


@dataclass(frozen=True)
class TritonRepo:
    """What :func:`write_triton_repo` wrote."""

    path: Path  # repo/<name>
    name: str
    config: Path  # repo/<name>/config.pbtxt
    onnx: Path  # repo/<name>/1/model.onnx
    max_batch_size: int
    inputs: tuple[TritonTensor, ...]
    outputs: tuple[TritonTensor, ...]
    parameters: dict[str, str]
    onnx_sha256: str
    plan: Path | None = None  # repo/<name>/1/model.plan, where TensorRT built it
    plan_note: str = ""  # why there is no plan, or how it was built
    replaced: bool = False  # force=True replaced an existing folder
    notes: list[str] = field(default_factory=list)


def check_name(name: str) -> str:
    """``name`` if Triton can serve a model under it (a folder name and a URL segment)."""
    if not isinstance(name, str) or not name:
        raise InputError("the Triton model name must not be empty")
    if "/" in name or "\\" in name:
        raise InputError(f"the Triton model name {name!r} must not contain '/' or '\\'")
    if not _NAME.fullmatch(name):
        raise InputError(
            f"the Triton model name {name!r} must be letters, digits, '_', '-' and '.', not "
            "starting with '.' or '-'"
        )
    return name


def default_name(reference: str) -> str:
    """A model name from what was exported: a zoo name (``unet``), the factory of
    ``module:factory`` / ``file.py:factory``, or an engine file's stem."""
    ref = reference.rstrip("/\\")
    if ref.endswith(".segfast"):
        base = Path(ref).stem
    elif ":" in ref:
        base = ref.rsplit(":", 1)[1]
    else:
        base = Path(ref).name
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", base).lstrip(".-")
    return base or "model"


def check_target(repo: str | os.PathLike[str], name: str, force: bool) -> Path:
    """``repo/<name>``, refused when it holds anything and ``force`` is off (or is a file)."""
    target = Path(repo) / check_name(name)
    if Path(repo).exists() and not Path(repo).is_dir():
        raise InputError(f"{repo} is a file; the Triton model repository must be a folder")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise InputError(f"{target} exists and is not a folder; not replacing it")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise InputError(
            f"{target} exists and is not empty; pass --force (force=True) to replace it"
        )
    return target


def write_triton_repo(
    model: str | os.PathLike[str] | Any,
    repo: str | os.PathLike[str],
    name: str,
    *,
    max_batch_size: int = 0,
    max_queue_delay_us: int | None = None,
    output: str | None = None,
    force: bool = False,
    plan: bool = True,
    parameters: Mapping[str, str] | None = None,
) -> TritonRepo:
    """Write ``repo/<name>/`` for Triton Inference Server from an ONNX file (or ModelProto).

    Args:
        model: the ``.onnx`` file (copied as is) or an ``onnx.ModelProto``.
        repo: the model repository folder (created when missing).
        name: the model name, also the folder name (:func:`check_name`).
        max_batch_size: 0 for a static-batch file (full dims, no batching); N > 0 for a
            batch-dynamic one (every input and output has a symbolic first dim): Triton
            batches requests up to N with ``dynamic_batching``.
        max_queue_delay_us: ``dynamic_batching``'s ``max_queue_delay_microseconds``
            (how long Triton waits to fill a batch); only with ``max_batch_size > 0``.
        output: what the graph returns (logits / probs / mask); files from
            :func:`~segfast.export.onnx.export_onnx` carry it (``segfast.output``) and a
            different value is refused; others default to logits.
        force: replace an existing non-empty ``repo/<name>``.
        plan: also build ``1/model.plan`` with TensorRT where it can run here.
        parameters: extra string ``parameters`` for the config.

    Raises:
        InputError: a bad name, an existing folder without ``force``, a file whose I/O does
            not fit ``max_batch_size`` or whose element types Triton has no type for.
    """
    import onnx

    if not isinstance(max_batch_size, int) or max_batch_size < 0:
        raise InputError(f"max_batch_size must be an integer >= 0, got {max_batch_size!r}")
    if max_queue_delay_us is not None:
        if max_batch_size == 0:
            raise InputError(
                "max_queue_delay_us is a dynamic_batching setting: it needs max_batch_size > 0 "
                "(a batch-dynamic export)"
            )
        if not isinstance(max_queue_delay_us, int) or max_queue_delay_us < 0:
            raise InputError(
                f"max_queue_delay_us must be an integer >= 0, got {max_queue_delay_us!r}"
            )
    target = check_target(repo, name, force)
    proto = model if isinstance(model, onnx.ModelProto) else _load_onnx(_onnx_file(model))
    meta = {e.key: e.value for e in proto.metadata_props}
    stored = meta.get("segfast.output")
    if stored is not None and output is not None and output != stored:
        raise InputError(f"the ONNX file was exported with output={stored!r}, not {output!r}")
    out_kind = stored or output or "logits"
    if out_kind not in ("logits", "probs", "mask"):
        raise InputError(f"output must be logits, probs or mask, got {out_kind!r}")
    if max_batch_size > 0:
        _check_batch_range(meta, max_batch_size)
    inputs = tuple(_tensors(proto, "input", max_batch_size))
    outputs = tuple(_tensors(proto, "output", max_batch_size))
    params = {
        "segfast_version": __version__,
        "segfast_output": out_kind,
        "segfast_precision": meta.get("segfast.precision") or _float_precision(inputs),
    }
    for key in ("threshold", "num_classes"):
        if meta.get(f"segfast.{key}"):
            params[f"segfast_{key}"] = meta[f"segfast.{key}"]
    params.update(parameters or {})
    text = config_text(name, inputs, outputs, max_batch_size, max_queue_delay_us, params)

    repo_dir = Path(repo)
    made_repo = not repo_dir.exists()
    repo_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=repo_dir))
    try:
        version = tmp / VERSION
        version.mkdir()
        onnx_path = version / ONNX_FILE
        if isinstance(model, onnx.ModelProto):
            onnx.save_model(model, str(onnx_path))
        else:
            shutil.copyfile(_onnx_file(model), onnx_path)
        digest = sha256_file(onnx_path)
        (tmp / "config.pbtxt").write_text(text, encoding="utf-8")
        plan_path, plan_note = None, "not asked for (plan=False)"
        if plan:
            plan_path, plan_note = _build_plan(
                onnx_path, version / PLAN_FILE, params["segfast_precision"], max_batch_size
            )
        _fsync_tree(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
        replaced = _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made_repo:
            with contextlib.suppress(OSError):
                repo_dir.rmdir()
        raise
    return TritonRepo(
        path=target,
        name=name,
        config=target / "config.pbtxt",
        onnx=target / VERSION / ONNX_FILE,
        max_batch_size=max_batch_size,
        inputs=inputs,
        outputs=outputs,
        parameters=params,
        onnx_sha256=digest,
        plan=None if plan_path is None else target / VERSION / PLAN_FILE,
        plan_note=plan_note,
        replaced=replaced,
    )


# -- the config -------------------------------------------------------------------------


def config_text(
    name: str,
    inputs: tuple[TritonTensor, ...],
    outputs: tuple[TritonTensor, ...],
    max_batch_size: int,
    max_queue_delay_us: int | None,
    parameters: Mapping[str, str],
) -> str:
    """``config.pbtxt``: a ``ModelConfig`` in protobuf text format."""
    lines = [
        f"# Triton Inference Server model configuration, written by segfast {__version__}",
        f"name: {_quote(name)}",
        f"platform: {_quote(PLATFORM)}",
        f"max_batch_size: {int(max_batch_size)}",
        f"default_model_filename: {_quote(ONNX_FILE)}",
    ]
    for field_name, tensors in (("input", inputs), ("output", outputs)):
        lines.append(f"{field_name} [")
        for i, t in enumerate(tensors):
            lines += [
                "  {",
                f"    name: {_quote(t.name)}",
                f"    data_type: {t.data_type}",
                f"    dims: [ {', '.join(str(d) for d in t.dims)} ]",
                "  }" + ("," if i < len(tensors) - 1 else ""),
            ]
        lines.append("]")
    if max_batch_size > 0:
        if max_queue_delay_us is None:
            lines.append("dynamic_batching { }")
        else:
            lines += [
                "dynamic_batching {",
                f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}",
                "}",
            ]
    for key, value in parameters.items():
        lines.append(
            f"parameters {{ key: {_quote(key)} value {{ string_value: {_quote(str(value))} }} }}"
        )
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    """A protobuf text-format string literal: printable ASCII as is, the rest escaped."""
    out = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= byte < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _tensors(proto: Any, kind: str, max_batch_size: int) -> list[TritonTensor]:
    """The graph's real inputs (not initializers) or outputs as Triton tensors."""
    import onnx

    init = {t.name for t in proto.graph.initializer}
    values = proto.graph.input if kind == "input" else proto.graph.output
    out = []
    for v in values:
        if kind == "input" and v.name in init:
            continue
        if not v.type.HasField("tensor_type"):
            raise InputError(f"ONNX {kind} {v.name!r} is not a tensor; Triton cannot declare it")
        tt = v.type.tensor_type
        elem = onnx.TensorProto.DataType.Name(tt.elem_type)
        if elem not in TRITON_TYPES:
            raise InputError(
                f"ONNX {kind} {v.name!r} has type {elem}, which Triton has no type for"
            )
        if not tt.HasField("shape"):
            raise InputError(f"ONNX {kind} {v.name!r} has no shape (not even its rank)")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if max_batch_size > 0:
            first = tt.shape.dim[0] if dims else None
            if first is None or first.HasField("dim_value"):
                raise InputError(
                    f"ONNX {kind} {v.name!r} has dims {dims}: its first dim is not a dynamic "
                    f"batch, so max_batch_size={max_batch_size} cannot apply (export with a "
                    "dynamic batch, or use max_batch_size=0)"
                )
            dims = dims[1:]
        out.append(TritonTensor(v.name, TRITON_TYPES[elem], tuple(dims)))
    return out


def _check_batch_range(meta: Mapping[str, str], max_batch_size: int) -> None:
    """Triton sends any batch from 1 to max_batch_size: the file must take all of them."""
    try:
        ranges = json.loads(meta.get("segfast.dynamic_ranges") or "{}")
        lo, hi = (int(v) for v in ranges["batch"]) if "batch" in ranges else (1, max_batch_size)
    except (ValueError, TypeError) as exc:
        raise InputError(f"unreadable segfast.dynamic_ranges metadata ({exc})") from None
    if lo > 1 or hi < max_batch_size:
        raise InputError(
            f"the ONNX file takes batch {lo}..{hi}, but Triton sends any batch from 1 to "
            f"max_batch_size={max_batch_size}"
        )


def _float_precision(inputs: tuple[TritonTensor, ...]) -> str:
    return "fp16" if any(t.data_type == "TYPE_FP16" for t in inputs) else "fp32"


# -- the plan ---------------------------------------------------------------------------


def _build_plan(
    onnx_path: Path, plan_path: Path, precision: str, max_batch_size: int
) -> tuple[Path | None, str]:
    """``model.plan`` beside ``model.onnx`` where TensorRT can build here, else why not."""
    try:
        built = tensorrt.build_engine(
            onnx_path,
            plan_path,
            precision=precision,
            max_batch=max_batch_size or None,
        )
    except BackendUnavailable as exc:
        return None, f"not built: TensorRT cannot build here ({exc})"
    except (RuntimeError, ValueError) as exc:
        raise UnsupportedModelError(
            f"TensorRT could not build model.plan: {exc}; write the repository without it "
            "(--no-plan, plan=False)"
        ) from exc
    return plan_path, (
        f"built with TensorRT {built.meta.tensorrt_version} ({built.seconds:.1f} s); the config "
        'serves model.onnx: serve the plan with platform: "tensorrt_plan" in a copy of it'
    )


# -- the folder -------------------------------------------------------------------------


def _onnx_file(model: str | os.PathLike[str]) -> Path:
    p = Path(model)
    if not p.is_file():
        raise InputError(f"{p}: no such ONNX file")
    return p


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def _move_into_place(tmp: Path, target: Path) -> bool:
    """Rename ``tmp`` to ``target``; an existing ``target`` (checked by :func:`check_target`)
    is moved aside first and deleted only once the new folder is in place."""
    if not target.exists():
        os.rename(tmp, target)
        return False
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, old / target.name)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old / target.name, target)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return True
