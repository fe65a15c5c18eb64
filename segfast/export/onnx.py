"""ONNX export: a model plus its head reduction as one checked ``.onnx`` file.

``export_onnx(model, "m.onnx", output="mask", dynamic=True)`` writes a graph
that takes the model's inputs and returns logits, probabilities or an argmax
mask (``ArgMax`` in the graph), with the meaning of
:class:`segfast.compiler.postprocess.WithHead`.

**Exporter.** ``torch.onnx.export(dynamo=True)`` — ``torch.export``, then the
onnxscript translation — on a program segfast exports itself first. Measured
on every zoo model (torch 2.13, onnxscript 0.7, ONNX Runtime 1.32), the
TorchScript exporter (``dynamo=False``, deprecated) fails two of them: PSPNet
("adaptive_avg_pool2d, output size that are not factor of input size",
static or dynamic) and SegNet (``F.max_unpool2d``'s size check, a tensor
condition it cannot trace). The dynamo exporter exports all of them, static
and dynamic, its graphs pass ``onnx.checker`` with ``full_check``, and
``max_unpool2d`` becomes ``ScatterND`` at the pooling indices, correct at
every size tested. Its translations that do not compute what PyTorch computes
(nearest resizes to a size, non-power-of-two scale factors, antialiased
resizes by a factor, adaptive pooling with a dynamic height/width) are
replaced or refused while ``torch.export`` traces: see
:mod:`segfast.export.rewrites`.

**Resize semantics.** ``align_corners=False`` becomes ``Resize`` with
``coordinate_transformation_mode="half_pixel"`` — PyTorch samples
``(i + 0.5)·in/out − 0.5``, the centre, also for an output of size 1, where
ONNX's ``pytorch_half_pixel`` would sample index 0 (the classic mismatch);
``align_corners=True`` becomes ``"align_corners"``; ``scale_factor=`` passes
``scales`` (PyTorch's ``1/scale`` coordinates), exact for powers of two.
Nearest resizes become gathers at PyTorch's float32 source indices.
tests/export/test_onnx_resize.py compares all of it with PyTorch in ONNX
Runtime, static and dynamic, over sweeps of sizes.

**Dynamic shapes.** ``torch.export`` with ``Dim.AUTO`` proves the range each
dynamic axis may take (``OnnxExport.ranges``, also in the file's metadata).
It specialises sizes of 1, so a dynamic axis of size 1 is traced at 2 and the
proven minimum is usually 2 (larger where the model needs it: PSPNet's
stride-8 features need H, W ≥ 9). Batch 1, the one value below that minimum
that matters in practice, is run and compared when ``check=True``, and the
batch range starts at 1 only when it matches. The exporter's own
decompositions run after ``torch.export`` and their guards are not checked
against the ranges, so ``check=True`` also compares ONNX Runtime with
PyTorch at two other sizes in the range, and nothing is written when they
disagree. For static graphs the check at the one shape they take is
complete for shape-dependent semantics (resize indices, sizes).

**Precision.** fp32, or fp16 as a strongly-typed fp16 graph (weights,
inputs and activations fp16; what TensorRT 11 needs). bf16 is refused: the
exporter writes fp32 weights into bf16 ``Conv`` nodes (the checker rejects
the graph) and ONNX Runtime has no bf16 convolution on the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from segfast._io import atomic_path, sha256_file
from segfast.bench.metrics import Accuracy, compare
from segfast.check import FP32_MAX_REL, LOWP_MAX_REL, MIN_MASK_AGREEMENT
from segfast.compiler.api import example_inputs, resolve_precision
from segfast.compiler.capture import dynamic_axes, dynamic_ranges
from segfast.compiler.postprocess import OUTPUTS, WithHead
from segfast.errors import BackendUnavailable, UnsupportedModelError
from segfast.export import _ort
from segfast.export.guards import (
    AXIS_DIM,
    GROW_STEPS,
    SHRINK_STEPS,
    Guards,
    changed_shapes,
    in_domain,
    program_guards,
    refuse_pinned,
)
from segfast.export.rewrites import ExportRewrites, audit

DEFAULT_OPSET = 18
MIN_OPSET = 17  # the floor; the exporter writes 18 and converts down
# ONNX Runtime vs eager on the exported file (issue 6): fp32 masks agree on ≥ 99.9 %.
FP32_MIN_MASK_AGREEMENT = 0.999
# Loggers whose warnings during export are noise for a segfast user: the
# exporter's registry skipping torchvision ops (not installed, not used), and
# onnx_ir typing an empty attribute list as INTS (correct; the checker verifies it).
_QUIET_LOGGERS = ("torch.onnx._internal.exporter._registration", "onnx_ir._convenience")


@dataclass(frozen=True)
class ShapeCheck:
    """ONNX Runtime vs eager PyTorch (fp32) on one random input set."""

    shapes: tuple[tuple[int, ...], ...]
    accuracy: Accuracy | None  # None when ONNX Runtime failed to run (see reason)
    passed: bool
    reason: str = ""


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    path: Path
    input_names: list[str]
    output_names: list[str]
    opset: int
    precision: str
    output: str
    dynamic: tuple[str, ...]  # axes exported dynamic: "batch" / "height" / "width"
    input_shapes: list[tuple[int, ...]]  # the example's shapes (see _trace_inputs for size 1)
    sha256: str  # of the written file
    # (min, max) each dynamic axis may take: proven by torch.export, batch 1 added by check.
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    input_dtypes: list[str] = field(default_factory=list)  # torch names: "float16", "int64"
    num_classes: int | None = None  # logits channels of a 4-D output, else None
    checks: tuple[ShapeCheck, ...] = ()  # check=True: ONNX Runtime vs eager, per input set
    rewrites: dict[str, int] = field(default_factory=dict)  # exact substitutes made (rewrites.py)
    # torch.export's shape guards (segfast.export.guards), named sizes; None: this torch
    # keeps none to read (then only the ranges are known). Empty for static exports.
    guards: tuple[str, ...] | None = ()


def export_onnx(
    model: nn.Module | str,
    path: str | os.PathLike[str],
    *,
    example_input: torch.Tensor | Sequence[torch.Tensor] | None = None,
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
    output: str = "logits",
    precision: str = "fp32",
    dynamic: bool | str | Sequence[str] = False,
    opset: int = DEFAULT_OPSET,
    threshold: float = 0.5,
    check: bool = True,
) -> OnnxExport:
    """Export ``model`` with its head reduction to an ONNX file at ``path``.

    Args:
        model: an ``nn.Module`` (put in eval mode) or a zoo name / ``module:factory``.
        example_input / input_shape: what to trace with, as for ``segfast.compile``
            (zoo models default to their standard size).
        output: "logits", "probs" (softmax; sigmoid for one class) or "mask"
            (``ArgMax`` to uint8; a sigmoid threshold for one class).
        precision: "fp32" or "fp16" (a strongly-typed fp16 graph).
        dynamic: False, True (height and width) or axis names among "batch",
            "height", "width".
        opset: ONNX opset, 17 or newer (18 is the exporter's own; 17 is converted).
        threshold: the one-class mask threshold.
        check: run the file in ONNX Runtime (CPU) on the example and, when
            dynamic, two other sizes (and batch 1), compare with the eager model
            in fp32, and refuse to write a graph that disagrees.

    The file is checked with ``onnx.checker.check_model(full_check=True)`` and
    written atomically: on any error nothing is left at ``path``.

    Raises:
        UnsupportedModelError: the model cannot be exported, or the graph does
            not reproduce it (the message names the op or the input shape).
        BackendUnavailable: onnx / onnxscript (or, for ``check``, onnxruntime)
            are not installed.
        ValueError: a bad argument (output kind, precision, opset, axes).
    """
    onnx = _import_onnx()
    if isinstance(model, str):
        from segfast.models import build_from_reference

        model = build_from_reference(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or a zoo name, got {type(model).__name__}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    prec = _precision_name(precision)
    axes = dynamic_axes(dynamic)
    max_opset = int(onnx.defs.onnx_opset_version())
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset:
        raise ValueError(
            f"opset must be an integer from {MIN_OPSET} to {max_opset} (this onnx), got {opset!r}"
        )
    ort = _ort.import_onnxruntime() if check else None

    _to_eval_mode(model)
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    inputs = example_inputs(model, example_input, input_shape, device)
    with torch.no_grad():
        logits = _head(model, "logits", threshold)(*inputs)
    if output != "logits" and logits.dim() != 4:
        raise UnsupportedModelError(
            f"output={output!r} needs N×K×H×W logits; the model returns shape "
            f"{tuple(logits.shape)} (export it with output='logits')"
        )
    num_classes = int(logits.shape[1]) if logits.dim() == 4 else None

    dtype = torch.float16 if prec == "fp16" else torch.float32
    wrapped: nn.Module = _head(model, output, threshold)
    if dtype != torch.float32:
        wrapped = copy.deepcopy(wrapped).to(dtype)
    traced = _trace_inputs(inputs, axes, dtype)
    dynamic_hw = "height" in axes or "width" in axes
    rewrites = ExportRewrites(dynamic_hw)
    program = _torch_export(wrapped, traced, axes, rewrites)
    ranges = dynamic_ranges(program, axes)
    audit(program, dynamic_hw)
    guard_text = program_guards(program) if axes else ()
    try:
        guards = Guards(guard_text) if guard_text else None
    except (ValueError, SyntaxError) as exc:
        raise UnsupportedModelError(
            f"torch.export recorded shape guards segfast cannot evaluate ({exc}); export "
            "with static shapes"
        ) from exc
    if axes:
        refuse_pinned(traced, axes, ranges, guards)
    in_names = _input_names(model, len(inputs))
    proto = _to_onnx(program, traced, in_names, output, opset)

    _name_dynamic_dims(proto, in_names, axes)

    def write(tmp: Path, ranges: dict[str, tuple[int, int]]) -> None:
        _set_metadata(proto, model, prec, output, threshold, num_classes, ranges, guard_text)
        onnx.save_model(proto, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise UnsupportedModelError(
                f"the exported graph fails onnx.checker (full_check): {_first_line(exc)}"
            ) from exc

    with atomic_path(path) as tmp:
        write(tmp, ranges)
        checks: tuple[ShapeCheck, ...] = ()
        if ort is not None:
            proven = ranges
            checks, ranges = _verify(
                tmp, model, inputs, output, threshold, prec, axes, ranges, guards
            )
            if ranges != proven:  # batch 1 ran and matched: the file's metadata says so
                write(tmp, ranges)
        digest = sha256_file(tmp)
    return OnnxExport(
        path=Path(path),
        input_names=in_names,
        output_names=[output],
        opset=opset,
        precision=prec,
        output=output,
        dynamic=axes,
        input_shapes=[tuple(t.shape) for t in inputs],
        sha256=digest,
        ranges=ranges,
        input_dtypes=[str(t.dtype).removeprefix("torch.") for t in traced],
        num_classes=num_classes,
        checks=checks,
        rewrites=dict(rewrites.fired),
        guards=guard_text,
    )


def run_onnx(
    path: str | os.PathLike[str], *inputs: torch.Tensor, threads: int | None = None
) -> torch.Tensor:
    """Run an exported file once in ONNX Runtime (CPU) on torch tensors; return its output.

    Inputs are cast to the graph's input types (fp32 → fp16 for an fp16 graph).
    One session per call: for repeated runs compile with ``backend="onnxruntime"``.
    """
    session = _ort.cpu_session(path, intra_op_threads=threads or torch.get_num_threads())
    names = [i.name for i in session.get_inputs()]
    (out,) = session.run(
        [session.get_outputs()[0].name], _ort.feeds(names, _ort.input_dtypes(session), inputs)
    )
    return torch.from_numpy(out)


# -- arguments ------------------------------------------------------------------------


def _to_eval_mode(model: nn.Module) -> None:
    """``model.eval()`` — except for ``ExportedProgram.module()``, which is exported in
    eval mode already and raises NotImplementedError on ``eval()``/``train()``."""
    try:
        model.eval()
    except NotImplementedError:
        if not isinstance(model, torch.fx.GraphModule):
            raise


def _head(model: nn.Module, output: str, threshold: float) -> WithHead:
    """``WithHead(model)`` marked as not training without recursing into ``model``
    (see :func:`_to_eval_mode`; WithHead has no layer that depends on the mode)."""
    wrapped = WithHead(model, output, threshold)
    wrapped.training = False
    return wrapped


def _import_onnx() -> Any:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as exc:
        raise BackendUnavailable(
            f"ONNX export needs onnx and onnxscript ({exc.name} is missing): {_ort.INSTALL_HINT}"
        ) from exc
    return onnx


def _precision_name(precision: str | torch.dtype) -> str:
    dtype = resolve_precision(precision)
    if dtype == torch.bfloat16:
        raise ValueError(
            "precision='bf16' cannot be exported to ONNX here: torch.onnx writes fp32 weights "
            "into bf16 Conv nodes (onnx.checker rejects the graph) and ONNX Runtime has no "
            "bf16 convolution on the CPU; export 'fp16' or 'fp32'"
        )
    return "fp16" if dtype == torch.float16 else "fp32"


def _input_names(model: nn.Module, n: int) -> list[str]:
    """``["input"]`` for one input, else the forward's parameter names (``z``, ``labels``)."""
    if n == 1:
        return ["input"]
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        params = []  # type: ignore[assignment]
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(names) >= n and len(set(names[:n])) == n:
        return names[:n]
    return [f"input{i}" for i in range(n)]


def _trace_inputs(
    inputs: tuple[torch.Tensor, ...], axes: tuple[str, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """The inputs to trace with: cast to ``dtype``; a dynamic axis of size 1 doubled to 2.

    ``torch.export`` specialises dimensions of size 1 (they broadcast), so a
    dynamic batch or side of 1 must be traced at 2 to stay symbolic. The tensors
    are new objects (``detach()``): export marks the ones it traces as dynamic
    and leaves the mark when it fails, which would make a later static export of
    the caller's tensors symbolic.
    """
    out = []
    for i, t in enumerate(inputs):
        t = t.detach()
        if t.is_floating_point():
            t = t.to(dtype)
        for axis in axes:
            d = AXIS_DIM[axis]
            applies = d == 0 or (i == 0 and t.dim() == 4)
            if applies and d < t.dim() and t.shape[d] == 1:
                t = torch.cat([t, t], dim=d)
        out.append(t)
    return tuple(out)


def _dynamic_shapes(inputs: tuple[torch.Tensor, ...], axes: tuple[str, ...]) -> Any:
    """``dynamic_shapes`` for ``WithHead.forward(*inputs)``: one entry, the varargs tuple.

    ``Dim.AUTO`` lets export infer each range from the model's own guards.
    """
    if not axes:
        return None
    per_input = []
    for i, t in enumerate(inputs):
        dims: dict[int, Any] = {}
        if "batch" in axes and t.dim() >= 1:
            dims[0] = Dim.AUTO
        if i == 0 and t.dim() == 4:
            dims.update({AXIS_DIM[a]: Dim.AUTO for a in ("height", "width") if a in axes})
        per_input.append(dims or None)
    return (tuple(per_input),)


# -- export ---------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the export noise named at :data:`_QUIET_LOGGERS`, restoring it afterwards."""
    saved = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    try:
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            # torch 2.13's own pytree use inside torch.export (nothing segfast can change).
            warnings.filterwarnings(
                "ignore",
                message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                category=FutureWarning,
            )
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return chain


def _torch_export(
    wrapped: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    axes: tuple[str, ...],
    rewrites: ExportRewrites,
) -> torch.export.ExportedProgram:
    try:
        with _quiet_exporter(), torch.no_grad(), rewrites:
            return torch.export.export(
                wrapped, inputs, dynamic_shapes=_dynamic_shapes(inputs, axes), strict=False
            )
    except UnsupportedModelError:
        raise  # a refusal by ExportRewrites: its message names the call
    except Exception as exc:  # torch.export raises many types; name the stage, keep the cause
        inner = type(wrapped.model).__name__ if isinstance(wrapped, WithHead) else "the model"
        raise UnsupportedModelError(
            f"torch.export could not capture {inner}"
            f"{' with dynamic ' + ', '.join(axes) if axes else ''}: {_first_line(exc)}"
        ) from exc


_FAILED_NODE = re.compile(r"Error when translating node %(\S+) .*?target=([\w.]+)", re.S)


def _to_onnx(
    program: torch.export.ExportedProgram,
    inputs: tuple[torch.Tensor, ...],
    input_names: list[str],
    output: str,
    opset: int,
) -> Any:
    """Translate ``program`` with torch.onnx (dynamo); return the ``ModelProto``."""
    try:
        with _quiet_exporter(), torch.no_grad():
            onnx_program = torch.onnx.export(
                program,
                inputs,
                dynamo=True,
                opset_version=opset,
                input_names=input_names,
                output_names=[output],
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter wraps the cause in several layers
        chain = _cause_chain(exc)
        for e in chain:
            m = _FAILED_NODE.search(str(e))
            if m:
                raise UnsupportedModelError(
                    f"torch.onnx cannot translate {m.group(2)} (node %{m.group(1)}) to ONNX "
                    f"opset {opset}: {_first_line(chain[-1])}"
                ) from exc
        raise UnsupportedModelError(
            f"torch.onnx could not export the model: {_first_line(chain[-1])}"
        ) from exc
    proto = onnx_program.model_proto
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise UnsupportedModelError(
            f"asked for ONNX opset {opset}, but torch.onnx could only write opset {got} for this "
            "model (its version converter failed); use opset 18 or newer"
        )
    return proto


# -- the written file -----------------------------------------------------------------


def _name_dynamic_dims(proto: Any, input_names: list[str], axes: tuple[str, ...]) -> None:
    """Rename the exporter's symbols (``s77``) of dynamic axes to batch/height/width.

    The names appear in the inputs, outputs and value_info (whole tokens of
    expressions such as ``s77 + 1`` too), so a reader sees ``[batch, 3, height,
    width] -> [batch, height, width]``.
    """
    if not axes:
        return
    rename: dict[str, str] = {}
    by_name = {v.name: v for v in proto.graph.input}
    for i, name in enumerate(input_names):
        dims = by_name[name].type.tensor_type.shape.dim
        for axis in axes:
            d = AXIS_DIM[axis]
            if (d == 0 or (i == 0 and len(dims) == 4)) and d < len(dims) and dims[d].dim_param:
                rename.setdefault(dims[d].dim_param, axis)
    if not rename:
        return
    token = re.compile(r"\b(" + "|".join(re.escape(k) for k in rename) + r")\b")
    values = [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]
    for v in values:
        if not v.type.HasField("tensor_type"):
            continue
        for dim in v.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = token.sub(lambda m: rename[m.group(1)], dim.dim_param)


def _set_metadata(
    proto: Any,
    model: nn.Module,
    precision: str,
    output: str,
    threshold: float,
    num_classes: int | None,
    ranges: dict[str, tuple[int, int]],
    guards: tuple[str, ...] | None,
) -> None:
    import onnxscript

    import segfast

    spec = getattr(model, "segfast_spec", None)
    props = {
        "segfast.version": segfast.__version__,
        "segfast.model": json.dumps(spec, default=str) if spec else type(model).__name__,
        "segfast.output": output,
        "segfast.precision": precision,
        "segfast.threshold": repr(float(threshold)),
        "segfast.num_classes": "" if num_classes is None else str(num_classes),
        "segfast.dynamic_ranges": json.dumps({k: list(v) for k, v in ranges.items()}),
        "segfast.guards": json.dumps(list(guards) if guards is not None else None),
        "segfast.exporter": (
            f"torch.onnx.export(dynamo=True), torch {torch.__version__}, "
            f"onnxscript {onnxscript.__version__}"
        ),
    }
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.doc_string = (
        f"segfast export: {props['segfast.model']} with output={output}, precision={precision}"
    )


# -- verification ---------------------------------------------------------------------


def _random_like(t: torch.Tensor, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A random tensor of ``shape`` like ``t``: normal floats; ints drawn from ``t``'s values."""
    if t.is_floating_point():
        return torch.randn(shape, generator=gen).to(t.device)
    flat = t.reshape(-1)
    idx = torch.randint(0, flat.numel(), shape, generator=gen).to(t.device)
    return flat[idx]


def _probe_shapes(
    inputs: tuple[torch.Tensor, ...],
    axes: tuple[str, ...],
    ranges: dict[str, tuple[int, int]],
    guards: Guards | None,
) -> list[list[tuple[int, ...]]]:
    """Up to two shape sets in the proven domain, differing from the example on each dynamic axis:
    the first larger and the first smaller candidate (see GROW_STEPS, SHRINK_STEPS) that satisfy
    the ranges and the guards."""
    example = [tuple(t.shape) for t in inputs]
    sets: list[list[tuple[int, ...]]] = []
    for candidates in (GROW_STEPS, SHRINK_STEPS):
        for step in candidates:
            shapes = changed_shapes(example, axes, step)
            fresh = shapes != example and shapes not in sets
            if fresh and in_domain(shapes, axes, ranges, guards) is None:
                sets.append(shapes)
                break
    return sets


def _judge(out: torch.Tensor, ref: torch.Tensor, precision: str) -> tuple[Accuracy | None, str]:
    if tuple(out.shape) != tuple(ref.shape) or (out.is_floating_point() != ref.is_floating_point()):
        return None, (
            f"ONNX Runtime returned {tuple(out.shape)} {out.dtype}, PyTorch "
            f"{tuple(ref.shape)} {ref.dtype}"
        )
    acc = compare(out.float() if out.is_floating_point() else out, ref)
    if not acc.finite:
        return acc, f"{acc.nonfinite} non-finite values"
    if not out.is_floating_point():
        need = FP32_MIN_MASK_AGREEMENT if precision == "fp32" else MIN_MASK_AGREEMENT
        agree = acc.mask_agreement if acc.mask_agreement is not None else 0.0
        if agree < need:
            return acc, f"mask agreement {100 * agree:.3f}% < {100 * need:g}%"
        return acc, ""
    bound = FP32_MAX_REL if precision == "fp32" else LOWP_MAX_REL
    if acc.rel_l2 > bound:
        return acc, f"rel-L2 {acc.rel_l2:.3g} > {bound:g}"
    return acc, ""


def _verify(
    path: Path,
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    output: str,
    threshold: float,
    precision: str,
    axes: tuple[str, ...],
    ranges: dict[str, tuple[int, int]],
    guards: Guards | None,
) -> tuple[tuple[ShapeCheck, ...], dict[str, tuple[int, int]]]:
    """ONNX Runtime (CPU) vs the fp32 eager model: the example, then probe sizes.

    Raises UnsupportedModelError at the first input set that disagrees. Returns
    the checks and the ranges, the batch range extended to 1 when batch 1 matches.
    """
    try:
        session = _ort.cpu_session(path, intra_op_threads=torch.get_num_threads())
    except Exception as exc:  # ORT's errors subclass Exception directly
        raise UnsupportedModelError(
            f"ONNX Runtime cannot load the exported graph: {_first_line(exc)}"
        ) from exc
    names = [i.name for i in session.get_inputs()]
    dtypes = _ort.input_dtypes(session)
    reference = _head(model, output, threshold)
    gen = torch.Generator().manual_seed(0)

    def run(sets: tuple[torch.Tensor, ...]) -> ShapeCheck:
        with torch.no_grad():
            ref = reference(*sets)
        shapes = tuple(tuple(t.shape) for t in sets)
        try:
            (out,) = session.run([output], _ort.feeds(names, dtypes, sets))
        except Exception as exc:  # ORT's errors subclass Exception directly
            reason = f"ONNX Runtime failed: {_first_line(exc)}"
            return ShapeCheck(shapes, None, False, reason)
        acc, reason = _judge(torch.from_numpy(out), ref.cpu(), precision)
        return ShapeCheck(shapes, acc, not reason, reason)

    probes = [inputs] + [
        tuple(_random_like(t, s, gen) for t, s in zip(inputs, shapes, strict=True))
        for shapes in _probe_shapes(inputs, axes, ranges, guards)
    ]
    checks = []
    for k, sets in enumerate(probes):
        result = run(sets)
        checks.append(result)
        if not result.passed:
            where = "the example input" if k == 0 else "an input size other than the example's"
            raise UnsupportedModelError(
                f"ONNX Runtime's result on the exported graph differs from the model on {where} "
                f"(shapes {_fmt_shapes(result.shapes)}): {result.reason}. The exporter produced "
                "a graph that computes something else"
                + ("; export with static shapes" if k > 0 else "")
            )
    # Batch 1 is below the proven minimum 2 (torch.export specialises size 1): the one
    # value there, so running it decides. Recorded either way; never an error.
    ranges = dict(ranges)
    if "batch" in ranges and ranges["batch"][0] == 2:
        one = [(1, *t.shape[1:]) for t in inputs]
        guard = guards.first_violated(one) if guards is not None else None
        if guard is None:
            if inputs[0].shape[0] == 1:  # the example itself was batch 1, and it matched
                result = checks[0]
            else:
                result = run(
                    tuple(_random_like(t, s, gen) for t, s in zip(inputs, one, strict=True))
                )
                checks.append(result)
            if result.passed:
                ranges["batch"] = (1, ranges["batch"][1])
            else:
                checks[-1] = ShapeCheck(
                    result.shapes,
                    result.accuracy,
                    False,
                    f"batch 1 (below the proven minimum 2) does not match: {result.reason}; "
                    "the batch range stays from 2",
                )
    return tuple(checks), ranges


def _fmt_shapes(shapes: tuple[tuple[int, ...], ...]) -> str:
    return ", ".join("×".join(str(d) for d in s) for s in shapes)
