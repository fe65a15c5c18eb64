"""ONNX export: a model plus its head reduction as one checked ``.onnx`` file.

``export_onnx(model, "m.onnx", output="mask", dynamic=True)`` writes a graph
that takes the model's inputs and returns logits, probabilities or an argmax
mask (``ArgMax`` in the graph), with the meaning of
:class:`segfast.outputs.WithHead`.

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

**Where the steps live.** This module checks the arguments and runs the steps
(:func:`export_onnx`, :func:`run_onnx`); :mod:`segfast.export.onnx_graph` traces with
``torch.export`` and translates with ``torch.onnx``, then names the file's dynamic dims
and writes its metadata; :mod:`segfast.export.onnx_verify` runs the written file in ONNX
Runtime against the eager model (``check=True``, :class:`ShapeCheck`);
:mod:`segfast.export.rewrites` holds the exact substitutes made while tracing.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segfast._io import atomic_path, sha256_file
from segfast.compiler.capture import dynamic_axes, dynamic_ranges, example_tensors
from segfast.compiler.guards import Guards, eager_size_guards, program_guards, refuse_pinned
from segfast.compiler.guards import in_domain as in_domain  # re-exported (segfast.export)
from segfast.errors import BackendUnavailable, UnsupportedModelError
from segfast.export import _ort
from segfast.export.onnx_graph import (
    _first_line,
    _name_dynamic_dims,
    _set_metadata,
    _to_onnx,
    _torch_export,
    _trace_inputs,
)
from segfast.export.onnx_verify import FP32_MIN_MASK_AGREEMENT as FP32_MIN_MASK_AGREEMENT
from segfast.export.onnx_verify import ShapeCheck, _verify
from segfast.export.qdq import qdq_model
from segfast.export.rewrites import ExportRewrites, audit
from segfast.outputs import OUTPUTS, WithHead
from segfast.precision import resolve_precision

DEFAULT_OPSET = 18
MIN_OPSET = 17  # the floor; the exporter writes 18 and converts down


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
    input_shapes: list[
        tuple[int, ...]
    ]  # the example's shapes (see onnx_graph._trace_inputs: size 1)
    sha256: str  # of the written file
    # (min, max) each dynamic axis may take: proven by torch.export, batch 1 added by check.
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    input_dtypes: list[str] = field(default_factory=list)  # torch names: "float16", "int64"
    num_classes: int | None = None  # logits channels of a 4-D output, else None
    checks: tuple[ShapeCheck, ...] = ()  # check=True: ONNX Runtime vs eager, per input set
    rewrites: dict[str, int] = field(default_factory=dict)  # exact substitutes made (rewrites.py)
    # torch.export's shape guards (segfast.compiler.guards), named sizes; None: this torch
    # keeps none to read (then only the ranges are known). Empty for static exports.
    guards: tuple[str, ...] | None = ()


def export_onnx(
    model: nn.Module,
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
    int8_layers: Mapping[str, float | None] | None = None,
    size_guards: Sequence[str] | None = None,
) -> OnnxExport:
    """Export ``model`` with its head reduction to an ONNX file at ``path``.

    Args:
        model: an ``nn.Module`` (put in eval mode).
        example_input / input_shape: what to trace with (one of them), as for
            ``segfast.compile``.
        output: "logits", "probs" (softmax; sigmoid for one class) or "mask"
            (``ArgMax`` to uint8; a sigmoid threshold for one class).
        precision: "fp32", "fp16" (a strongly-typed fp16 graph) or "int8": an fp32 graph
            with QuantizeLinear / DequantizeLinear pairs (QDQ) in front of the conv
            modules ``int8_layers`` names (see :mod:`segfast.export.qdq`).
        dynamic: False, True (height and width) or axis names among "batch",
            "height", "width".
        opset: ONNX opset, 17 or newer (18 is the exporter's own; 17 is converted).
        threshold: the one-class mask threshold.
        check: run the file in ONNX Runtime (CPU) on the example and, when
            dynamic, two other sizes (and batch 1), compare with the eager model
            in fp32, and refuse to write a graph that disagrees (an int8 file: with
            the Q/DQ model in fp32, within the low-precision bounds).
        int8_layers: precision="int8": conv module name → the calibrated amax of its
            input (None: keep the module in floating point) — what ``segfast.compile``
            and ``segfast.quantize`` decided.
        size_guards: conditions on the height/width the model itself takes beyond what
            its graph does (``"height % 32 == 0"``: see
            ``segfast.compiler.guards.eager_size_guards``), written with the export's
            guards; None probes the model for them when height or width is dynamic.

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
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be an nn.Module, got {type(model).__name__} (a zoo name: build it "
            "with segfast.models.create, or use `segfast export NAME`)"
        )
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    prec = _precision_name(precision)
    if (prec == "int8") != (int8_layers is not None):
        raise ValueError("precision='int8' and int8_layers= go together")
    axes = dynamic_axes(dynamic)
    max_opset = int(onnx.defs.onnx_opset_version())
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset:
        raise ValueError(
            f"opset must be an integer from {MIN_OPSET} to {max_opset} (this onnx), got {opset!r}"
        )
    ort = _ort.import_onnxruntime() if check else None

    _to_eval_mode(model)
    if int8_layers is not None:
        model = qdq_model(model, int8_layers)
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    inputs = example_tensors(example_input, input_shape, device)
    if inputs is None:
        raise ValueError(
            "export_onnx needs example_input or input_shape (what to trace with); "
            "`segfast export` picks a zoo model's standard size for you"
        )
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
    if dynamic_hw and size_guards is None and not isinstance(model, torch.fx.GraphModule):
        size_guards, _ = eager_size_guards(model, inputs, axes)  # see its docstring
    if size_guards:
        guard_text = (*(guard_text or ()), *size_guards)
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
            reference = _head(model, output, threshold)
            checks, ranges = _verify(tmp, reference, inputs, output, prec, axes, ranges, guards)
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
    if precision == "int8":
        return "int8"
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
