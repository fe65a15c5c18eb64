"""The orchestration users call: ``compile``, ``auto``, ``load`` (``check`` is beside it).

``compile`` reads top to bottom as the path data takes through segfast::

    resolve  model / zoo name / ExportedProgram, inputs, device, precision  (this module)
    capture  torch.export → ATen graph, primary output, head   (compiler/capture, heads)
    passes   the fusion passes from one ordered list             (compiler/pipeline)
    build    fused graph or model → Runner                      (backends/)
    guard    inputs checked against what export proved           (compiler/guards)
    engine   Runner + EngineInfo + EngineSource                  (runtime/engine)

Each stage is a function below (``_resolve``, ``_capture`` — which also reads the
shape guards the guard stage enforces —, ``_passes``, ``_build``, ``_guard`` and
``_finite_or_reference``, ``_source``), called in that order by ``_compile_one``;
backends that run the model themselves skip capture and passes (``_probe`` looks
at the model's output instead). Everything a
user names by convenience — a zoo model by name, a zoo model's standard input
size, a minimum size — is resolved here, so the layers below take plain
modules and tensors. ``load`` lives here too: reading an engine file is the
runtime's (:mod:`segfast.runtime.engine_file`), but rebuilding the engine from
it is a build.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from segfast import int8
from segfast._warnings import quiet_torch_internals
from segfast.backends import available, get_backend, known_options
from segfast.backends import names as backend_names
from segfast.backends.base import Backend, BuildRequest, Runner
from segfast.check import CheckReport, check
from segfast.compiler.capture import Captured, capture, dynamic_axes, example_tensors
from segfast.compiler.context import PassContext
from segfast.compiler.graph import activation_bytes, call_nodes, val
from segfast.compiler.guards import (
    Guards,
    eager_size_guards,
    in_domain,
    program_guards,
    refuse_pinned,
)
from segfast.compiler.heads import append_head, require_logits, select_primary_output
from segfast.compiler.patterns import FUSIONS
from segfast.compiler.pipeline import run_passes
from segfast.compiler.quant import QuantizedLayer, cast_float_part, quantizable, quantize_graph
from segfast.errors import BackendUnavailable, EngineFileError, InputError, UnsupportedModelError
from segfast.outputs import OUTPUTS, WithHead
from segfast.precision import DTYPE_NAMES, resolve_precision
from segfast.runtime import engine_file
from segfast.runtime.engine import Engine, EngineInfo, EngineSource, InputSpec
from segfast.timing import measure, median

_UNBOUNDED = 2**31 - 1


# -- resolve ------------------------------------------------------------------------------


@dataclass
class _Request:
    """What ``compile`` was asked for, resolved: the model on its device, in eval mode,
    and the inputs to trace with. Every later stage reads from here."""

    model: nn.Module
    program: torch.export.ExportedProgram | None  # when compile was given one
    inputs: tuple[torch.Tensor, ...]  # example inputs, on ``device``
    device: torch.device
    dtype: torch.dtype
    output: str
    axes: tuple[str, ...]  # dynamic axes
    threshold: float
    options: dict[str, Any]
    min_size: int  # the smallest H/W the model takes (zoo models know theirs), else 1
    int8: bool = False  # precision="int8": convs on int8, the rest in ``dtype`` (fp32)
    calibration: Any = None  # what int8 calibrates on (see segfast.int8.Calibration)
    int8_layers: dict[str, float | None] | None = None  # int8 for model backends (Q/DQ)
    # export-based backends compare their exported file with the eager model before
    # building; off for the int8 guard's fallback trials, which it judges itself
    verify_export: bool = True
    size_notes: list[str] = dataclasses.field(default_factory=list)  # see _size_guards


def _model_device(model: nn.Module) -> torch.device | None:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


def _zoo_spec(model: nn.Module) -> Any:
    """The zoo's ``ModelSpec`` of a model built by ``segfast.models.create``, else None."""
    spec_info = getattr(model, "segfast_spec", None)
    if spec_info and "name" in spec_info:
        from segfast.models import get_spec

        return get_spec(spec_info["name"])
    return None


def _example_inputs(
    model: nn.Module,
    spec: Any,
    example_input: torch.Tensor | Sequence[torch.Tensor] | None,
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None,
    device: torch.device,
) -> tuple[torch.Tensor, ...]:
    """The example inputs to trace with: as given, or the zoo ``spec``'s standard input."""
    inputs = example_tensors(example_input, input_shape, device)
    if inputs is not None:
        return inputs
    if spec is not None:
        return tuple(t.to(device) for t in spec.make_inputs(model, spec.standard_batch))
    raise ValueError("compile needs example_input or input_shape for this model")


def _check_options(options: Any) -> None:
    """Refuse an options dict with a key no backend reads (a typo would otherwise be
    silently ignored: options are shared, so each backend skips the others' keys)."""
    if options is None:
        return
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    known = known_options()
    unknown = sorted(str(k) for k in options if k not in known)
    if unknown:
        hints = [
            f"{k!r} → {close[0]!r}?"
            for k in unknown
            if (close := difflib.get_close_matches(k, known, n=1, cutoff=0.7))
        ]
        hint = f" (did you mean {', '.join(hints)})" if hints else ""
        raise ValueError(f"unknown option(s) {unknown}{hint}; options backends read: {known}")


def _resolve(
    model: nn.Module | str | torch.export.ExportedProgram,
    example_input: torch.Tensor | Sequence[torch.Tensor] | None,
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None,
    *,
    precision: str | torch.dtype,
    output: str,
    dynamic: bool | str | Sequence[str],
    device: str | torch.device | None,
    threshold: float,
    options: dict[str, Any] | None,
    calibration: Any = None,
) -> _Request:
    if isinstance(model, str):
        from segfast.models import build_from_reference

        model = build_from_reference(model)
    program = None
    if isinstance(model, torch.export.ExportedProgram):
        program, model = model, model.module()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be an nn.Module, an ExportedProgram or a zoo name, "
            f"got {type(model).__name__}"
        )
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    _check_options(options)
    int8 = isinstance(precision, str) and precision.lower() == "int8"
    dtype = torch.float32 if int8 else resolve_precision(precision)
    if calibration is not None and not int8:
        raise ValueError(f"calibration= is for precision='int8', not {precision!r}")
    axes = dynamic_axes(dynamic)
    model_dev = _model_device(model)
    dev = torch.device(device) if device is not None else model_dev or torch.device("cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"device {dev} was asked for, but no CUDA GPU is available here")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if model_dev is not None and model_dev != dev:
        if program is not None:
            raise ValueError(
                f"an exported program on {model_dev} cannot be compiled for {dev}; "
                "export the model on the target device"
            )
        model = copy.deepcopy(model).to(dev)
    if program is None:
        model.eval()
    spec = _zoo_spec(model)
    inputs = _example_inputs(model, spec, example_input, input_shape, dev)
    opts, size_notes = _size_guards(model, program, inputs, axes, dict(options or {}))
    return _Request(
        model=model,
        program=program,
        inputs=inputs,
        device=dev,
        dtype=dtype,
        output=output,
        axes=axes,
        threshold=float(threshold),
        options=opts,
        min_size=spec.min_size if spec is not None else 1,
        int8=int8,
        calibration=calibration,
        size_notes=size_notes,
    )


def _size_guards(
    model: nn.Module,
    program: torch.export.ExportedProgram | None,
    inputs: tuple[torch.Tensor, ...],
    axes: tuple[str, ...],
    options: dict[str, Any],
) -> tuple[dict[str, Any], list[str]]:
    """``options`` with ``size_guards``: the heights/widths the eager model takes where
    its graph would take more (see :func:`~segfast.compiler.guards.eager_size_guards`),
    probed once for a dynamic height/width. Given (an engine file's, or the caller's:
    e.g. ``["height % 32 == 0"]``), they are checked and kept; an exported program has
    no Python checks left to probe."""
    given = options.get("size_guards")
    if given is not None:
        if isinstance(given, str) or not all(isinstance(g, str) for g in given):
            raise ValueError(f"options['size_guards'] must be a list of strings, got {given!r}")
        try:
            Guards(list(given))
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"options['size_guards']: {exc}") from exc
        return {**options, "size_guards": list(given)}, []
    if program is not None or not ({"height", "width"} & set(axes)):
        return options, []
    guards, notes = eager_size_guards(model, inputs, axes)
    # kept even when empty: the backends that export (onnxruntime) do not probe again
    return {**options, "size_guards": list(guards)}, notes


def _input_specs(req: _Request, ranges: dict[str, tuple[int, int]]) -> list[InputSpec]:
    """Input specs; dynamic ranges from export where it proved them, else the model's minimum."""
    specs = []
    for i, t in enumerate(req.inputs):
        dyn: dict[str, tuple[int, int]] = {}
        if "batch" in req.axes and t.dim() >= 1:
            dyn["batch"] = ranges.get("batch", (1, _UNBOUNDED))
        if i == 0 and t.dim() == 4:
            for a in ("height", "width"):
                if a in req.axes:
                    dyn[a] = ranges.get(a, (req.min_size, _UNBOUNDED))
        specs.append(InputSpec(tuple(t.shape), str(t.dtype).removeprefix("torch."), dyn))
    return specs


def _num_classes(model: nn.Module, out: torch.Tensor | None) -> int | None:
    if out is not None and out.dim() == 4:
        return int(out.shape[1])
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) else None


def _backend(name: str, device: torch.device) -> Backend:
    be = get_backend(name)
    ok, why = be.availability(device)
    if not ok:
        raise BackendUnavailable(f"backend {be.name!r} cannot run here: {why}")
    return be


@dataclass
class _Domain:
    """Where a dynamic graph engine is proven: export's ranges and guards. ``ranges`` is
    read per call (batch 1 may be admitted after the build, see :func:`_admit_batch_one`)."""

    axes: tuple[str, ...]
    ranges: dict[str, tuple[int, int]]
    guards: Guards | None


# -- capture ------------------------------------------------------------------------------


def _capture(req: _Request, info: EngineInfo) -> tuple[Captured, _Domain | None]:
    """``torch.export`` the model, keep its primary output, append the ``output=`` head.

    Returns the capture and, for dynamic shapes, the domain export proved it for
    (refusing an axis the model pins, before anything is built)."""
    captured = capture(req.model, req.inputs, dynamic=req.axes, program=req.program)
    info.inputs = _input_specs(req, captured.ranges)
    domain = None
    if req.axes:
        domain = _Domain(req.axes, dict(captured.ranges), _shape_guards(captured, req, info.notes))
    primary = select_primary_output(captured.graph)
    info.num_classes = _num_classes(req.model, val(primary))
    append_head(captured.graph, req.output, req.threshold)
    return captured, domain


def _probe(req: _Request, info: EngineInfo) -> None:
    """For backends that run the model itself: see once what it returns."""
    with torch.no_grad():
        logits = WithHead(req.model, "logits")(*req.inputs)
    require_logits(logits, req.output)
    info.num_classes = _num_classes(req.model, logits)


# -- passes -------------------------------------------------------------------------------


def _passes(gm: fx.GraphModule, req: _Request, be: Backend, info: EngineInfo) -> fx.GraphModule:
    """The fusion passes, in place; what they did goes into ``info``."""
    info.ops_before = len(call_nodes(gm))
    info.bytes_before = activation_bytes(gm)
    ctx = PassContext(gm, output=req.output, dtype=req.dtype, slice_outputs=be.slice_outputs)
    run_passes(ctx)
    info.passes = list(ctx.passes_run)
    info.fusions = dict(ctx.fired)
    info.fusion_patterns = {
        name: f"{FUSIONS[name].pattern}  →  {FUSIONS[name].into}" for name in ctx.fired
    }
    info.ops_after = len(call_nodes(gm))
    info.bytes_after = activation_bytes(gm)
    info.notes += ctx.notes
    return gm


# -- build --------------------------------------------------------------------------------


def _build(be: Backend, req: _Request, graph: fx.GraphModule | None, info: EngineInfo) -> Runner:
    runner = be.build(
        BuildRequest(
            model=WithHead(req.model, req.output, req.threshold),
            inputs=req.inputs,
            device=req.device,
            dtype=req.dtype,
            output=req.output,
            dynamic=req.axes,
            graph=graph,
            options=dict(req.options),
            int8_layers=req.int8_layers,
            verify_export=req.verify_export,
        )
    )
    if runner.details.get("dynamic_ranges"):  # e.g. onnxruntime: what its export proved
        info.inputs = _input_specs(req, runner.details["dynamic_ranges"])
    if info.num_classes is None:
        with torch.no_grad():
            info.num_classes = _num_classes(req.model, WithHead(req.model, "logits")(*req.inputs))
    return runner


def _runner(
    be: Backend,
    req: _Request,
    graph: fx.GraphModule | None,
    domain: _Domain | None,
    info: EngineInfo,
    reference: _Reference,
) -> Runner:
    """build → guard: the backend's runner, checking shapes against what export proved
    and running non-finite inputs through the model as compiled where the kernels would
    drop NaN."""
    runner = _build(be, req, graph, info)
    propagates = runner.propagates_nonfinite
    if not (be.propagates_nonfinite if propagates is None else propagates):
        runner = _finite_or_reference(runner, req, reference)
    if domain is None and req.options.get("size_guards") and {"height", "width"} & set(req.axes):
        # a backend that runs the model itself (tensorrt; onnxruntime checks its file's
        # guards too): the sizes the model refuses, over the ranges it reports
        ranges = dict(runner.details.get("dynamic_ranges") or {})
        ranges = {a: tuple(ranges.get(a, (1, _UNBOUNDED))) for a in req.axes}
        domain = _Domain(req.axes, ranges, Guards(list(req.options["size_guards"])))
    if domain is not None:  # outermost: a NaN input of a refused shape is refused too
        runner = _guard(runner, domain)
    return runner


# -- guard --------------------------------------------------------------------------------


def _shape_guards(captured: Captured, req: _Request, notes: list[str]) -> Guards | None:
    """The shape guards ``torch.export`` proved a dynamic graph under, or None.

    Refuses a dynamic axis the guards pin to its example size (the graph would
    claim a range it cannot run), as the ONNX export does. Guards segfast cannot
    read are left to the graph, which asserts them itself.
    """
    text = program_guards(captured.program)
    extra = tuple(req.options.get("size_guards") or ())
    if extra:
        text = (*(text or ()), *extra)
    try:
        guards = Guards(text) if text else None
    except (ValueError, SyntaxError) as exc:
        notes.append(f"shape guards not checked by segfast ({exc}): the graph asserts them")
        return None
    refuse_pinned(req.inputs, req.axes, captured.ranges, guards)
    return guards


def _guard(runner: Runner, domain: _Domain) -> Runner:
    """``runner`` that first checks the inputs lie where export proved the graph.

    The captured graph asserts its guards too, but as an ``AssertionError``
    naming ``x.size()[3]``; this names the shapes and raises :class:`InputError`.
    """
    inner = runner.fn

    def fn(*inputs: torch.Tensor) -> torch.Tensor:
        why = in_domain([tuple(t.shape) for t in inputs], domain.axes, domain.ranges, domain.guards)
        if why is not None:
            shapes = ", ".join("×".join(str(d) for d in t.shape) for t in inputs)
            raise InputError(
                f"input {shapes} is outside the shapes this engine is proven for: {why}"
            )
        return inner(*inputs)

    return dataclasses.replace(runner, fn=fn)


class _Reference:
    """The fp32 eager model *as it was at compile time*, with the head: what inputs
    holding NaN/Inf run through on backends whose kernels would drop NaN.

    Never the caller's live module: a later in-place change to it (a training step,
    ``param.mul_``) must not reach an engine, and a model put back in train mode would
    run BatchNorm on batch statistics and write the NaN into its running stats. Graph
    backends hold the captured program (its weights copied at capture); it becomes a
    module on the first non-finite input. Backends that run the model themselves
    (ONNX Runtime, TensorRT) get a deep copy taken here, at build time — one copy of
    the weights; a model that cannot be copied runs live, and the engine says so.
    """

    def __init__(self, req: _Request, captured: Captured | None, copy_model: bool) -> None:
        self.output, self.threshold = req.output, req.threshold
        self.notes: list[str] = []
        self._program = captured.program if captured is not None else None
        self._module: nn.Module | None = None
        self._lock = threading.Lock()
        if self._program is None and not copy_model:  # a backend that propagates NaN itself
            self._module = WithHead(req.model, self.output, self.threshold)
        elif self._program is None:
            try:
                with torch.no_grad():
                    copied = copy.deepcopy(req.model).eval()
                self._module = WithHead(copied, self.output, self.threshold)
            except Exception as exc:  # any module: deepcopy runs its own __deepcopy__/pickling
                self._module = WithHead(req.model, self.output, self.threshold)
                self.notes.append(
                    f"inputs holding NaN/Inf run the live model (it could not be copied: "
                    f"{type(exc).__name__}): later changes to the model reach them"
                )

    def module(self) -> nn.Module:
        """The model with the head (built on first use for a captured program)."""
        if self._module is None:
            with self._lock:
                if self._module is None:
                    assert self._program is not None
                    with quiet_torch_internals():
                        self._module = WithHead(self._program.module(), self.output, self.threshold)
        return self._module

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module()(*inputs)


def _finite_or_reference(runner: Runner, req: _Request, reference: _Reference) -> Runner:
    """``runner`` for finite inputs; the eager model as compiled (fp32, with the head;
    see :class:`_Reference`) for inputs holding NaN or ±Inf, for backends whose kernels
    would turn them into numbers (see
    :attr:`~segfast.backends.base.Backend.propagates_nonfinite`).

    One reduction per floating-point input decides (its fp32 sum is non-finite when
    any element is; a sum that overflows on huge finite values takes the reference
    too, which is slower but still right). On CUDA reading that decision waits for
    the input to be ready.
    """
    inner = runner.fn
    dtype = req.dtype

    def fn(*inputs: torch.Tensor) -> torch.Tensor:
        for t in inputs:
            if (
                t.is_floating_point()
                and not t.is_meta  # shapes only, no values
                and not bool(torch.isfinite(t.sum(dtype=torch.float32)))
            ):
                out = reference(*(x.float() if x.is_floating_point() else x for x in inputs))
                return out.to(dtype) if out.is_floating_point() else out
        return inner(*inputs)

    return dataclasses.replace(
        runner,
        fn=fn,
        notes=[
            *runner.notes,
            "inputs holding NaN/Inf run the eager model as compiled (kernels here would drop NaN)",
            *reference.notes,
        ],
    )


# -- engine -------------------------------------------------------------------------------


def _source(req: _Request, captured: Captured | None) -> EngineSource:
    """What ``Engine.save`` writes: the captured program (captured on the first save
    for backends that did not need one), the dynamic axes, options and zoo spec."""
    known = captured.program if captured is not None else req.program
    if known is not None:
        program = known

        def get_program() -> torch.export.ExportedProgram:
            return program

    else:
        model, inputs, axes = req.model, req.inputs, req.axes

        @functools.cache
        def get_program() -> torch.export.ExportedProgram:
            return capture(model, inputs, dynamic=axes).program

    return EngineSource(
        program=get_program,
        dynamic=req.axes,
        options=dict(req.options),
        model_spec=getattr(req.model, "segfast_spec", None),
    )


def _admit_batch_one(engine: Engine, req: _Request, domain: _Domain) -> None:
    """Extend a dynamic batch proven from 2 down to 1 when the engine is right there.

    ``torch.export`` specialises size 1, so it proves a dynamic batch from 2; the
    graph runs batch 1 all the same, unless the model branched on the batch size
    while traced. Batch 1 is run and judged by :func:`segfast.check` (as the ONNX
    export does): kept in the range when it passes, noted when it does not.
    """
    ranges = domain.ranges
    lo, hi = ranges["batch"]
    one = tuple(t[:1] if t.dim() >= 1 else t for t in req.inputs)
    if lo != 2 or (
        domain.guards is not None and domain.guards.first_violated([t.shape for t in one])
    ):
        return
    specs = [s for s in engine.info.inputs if "batch" in s.dynamic]
    ranges["batch"] = (1, hi)
    for s in specs:
        s.dynamic["batch"] = (1, hi)
    report = check(engine, req.model, [one])
    if not report.passed:
        ranges["batch"] = (lo, hi)
        for s in specs:
            s.dynamic["batch"] = (lo, hi)
        engine.info.notes.append(
            f"batch 1 (below the proven minimum 2) does not match the model: {report.reason}; "
            "the batch range stays from 2"
        )


# -- int8 ---------------------------------------------------------------------------------


def _int8(
    be: Backend,
    req: _Request,
    graph: fx.GraphModule | None,
    domain: _Domain | None,
    info: EngineInfo,
    reference: _Reference,
) -> Runner:
    """The int8 stage (:mod:`segfast.int8`): calibrate the fused graph, quantize it, build,
    judge on held-out inputs, fall back the most sensitive layers until the contract
    holds. An engine file's stored ranges (``options["int8"]``) rebuild without
    calibrating again."""
    if graph is None and be.name not in INT8_EXPORT_BACKENDS:
        raise UnsupportedModelError(
            f"backend {be.name!r} has no int8 path: int8 engines run on torch (oneDNN's int8 "
            f"convolutions on the CPU), triton, and {', '.join(INT8_EXPORT_BACKENDS)} (a Q/DQ "
            "ONNX file)"
        )
    stored = req.options.get("int8")
    if stored is not None and req.calibration is None:
        # files from before int8_w7 existed were judged with 8-bit weights everywhere
        req.options.setdefault("int8_w7", False)
        float_dtype = _stored_float_part(stored, be, req, info)
    else:
        float_dtype = int8.float_part_dtype(
            int8.as_calibration(req.calibration).float_precision, be.name, req.device
        )
    info.int8_float = DTYPE_NAMES[float_dtype]
    float_req = dataclasses.replace(req, dtype=float_dtype)
    runs_graph = graph is not None
    if graph is None:
        graph = _fused_graph(req, get_backend("torch"))

    def runner_for(g: fx.GraphModule, layers: list[QuantizedLayer], verify: bool = True) -> Runner:
        if runs_graph:
            if float_dtype != torch.float32:
                cast_float_part(g, float_dtype)  # g is this attempt's own copy
            return _runner(be, float_req, g, domain, info, reference)
        model_req = dataclasses.replace(
            req, int8_layers=int8.module_ranges(layers, req.model), verify_export=verify
        )
        return _runner(be, model_req, None, None, info, reference)

    names = [n.name for n in graph.graph.nodes if quantizable(n)]
    if stored is not None and req.calibration is None:
        if len(stored["amax"]) != len(names):
            raise EngineFileError(
                f"the stored int8 ranges cover {len(stored['amax'])} layers; the rebuilt graph "
                f"has {len(names)}: the file does not belong to this segfast"
            )
        keep = {names[int(i)]: why for i, why in stored.get("keep", {}).items()}
        with quiet_torch_internals():
            quantized = copy.deepcopy(graph)
        layers = quantize_graph(quantized, dict(zip(names, stored["amax"], strict=True)), keep)
        info.notes.append("int8: ranges and fallback read from the engine file")
        _record_int8(info, layers)
        return runner_for(quantized, layers)
    cal = int8.as_calibration(req.calibration)
    cal_sets, held, labels = int8.split_holdout(cal, req.inputs, req.axes, req.device)

    attempts = 0

    def judge(g: fx.GraphModule, layers: list[QuantizedLayer]) -> tuple[CheckReport, Runner]:
        # The first (all-int8) build's export is compared with its Q/DQ model by the
        # exporter, as every export is; the fallback trials after it differ only in
        # which convs keep floating point, and the contract check below judges each
        # built engine end to end on the held-out inputs — so their exports skip that
        # extra ONNX Runtime comparison (measured ~2.9 s each on a tiny U-Net).
        nonlocal attempts
        attempts += 1
        report, runner = trial(g, layers, attempts == 1)
        if not report.passed and runner.details.get("int8_w7") and auto_w7:
            # 7-bit weights (no VNNI) missed the contract: 8-bit weights on fp32 convs for
            # maps that may be negative are tried before any layer falls back to float
            req.options["int8_w7"] = False  # this build's and every later attempt's
            info.notes.append(
                f"int8: with 7-bit weights (no VNNI) the engine missed the contract ({report}); "
                "8-bit weights from here (int8_w7=False: fp32 convs for maps that may be "
                "negative)"
            )
            report, runner = trial(g, layers, False)
        return report, runner

    # the CPU plan's own choice of 7-bit weights (not the user's, not an engine file's)
    auto_w7 = runs_graph and be.name == "torch" and req.options.get("int8_w7") is None

    def trial(g: fx.GraphModule, layers: list[QuantizedLayer], verify: bool):
        runner = runner_for(g, layers, verify=verify)
        engine = Engine(runner, dataclasses.replace(info, notes=[]))
        report = check(
            engine, req.model, held, labels=labels, min_agreement=cal.min_agreement,
            max_metric_drop=cal.max_metric_drop,
        )  # fmt: skip
        return report, runner

    built = int8.quantize_with_guard(graph, cal, cal_sets, held, judge, req.output, req.threshold)
    info.notes += built.notes
    info.notes.append(f"int8 contract on held-out inputs: {built.report}")
    _record_int8(info, built.layers)
    # stored by layer order (node names may differ when an engine file is rebuilt)
    req.options["int8"] = {
        "amax": [built.amax[n] for n in names],
        "keep": {str(names.index(x.name)): x.reason for x in built.layers if not x.int8},
        "float": info.int8_float,
    }
    _keep_int8_w7(req, built.artefact)
    return built.artefact


def _keep_int8_w7(req: _Request, runner: Runner) -> None:
    """The CPU plan's 7-bit-weight choice, as judged, into the engine file's options:
    loaded on another CPU the engine runs the weights the contract was checked with."""
    if runner.details.get("int8_w7") is not None:
        req.options["int8_w7"] = runner.details["int8_w7"]


def _stored_float_part(stored: dict, be: Backend, req: _Request, info: EngineInfo) -> torch.dtype:
    """An engine file's float part, where this backend and device run it; else fp32 (the
    contract was judged with the stored one: fp32 is the more accurate), noted."""
    name = stored.get("float", "fp32")  # files written before float parts existed: fp32
    if name not in DTYPE_NAMES.values():
        raise EngineFileError(f"the stored int8 float precision {name!r} is not one segfast knows")
    try:
        return int8.float_part_dtype(name, be.name, req.device)
    except (UnsupportedModelError, BackendUnavailable) as exc:
        info.notes.append(f"int8: float layers in fp32 here, not the file's {name} ({exc})")
        return torch.float32


INT8_EXPORT_BACKENDS = ("onnxruntime", "tensorrt")  # run the model's Q/DQ ONNX file


def _fused_graph(req: _Request, settings: Backend) -> fx.GraphModule:
    """The fused graph the passes make for ``settings``' kernels (for int8 decisions of
    backends that run the model itself)."""
    scratch = EngineInfo("", "", req.output, str(req.device), _input_specs(req, {}))
    captured, _ = _capture(req, scratch)
    return _passes(captured.graph, req, settings, scratch)


def _record_int8(info: EngineInfo, layers: list[QuantizedLayer]) -> None:
    info.int8_layers = [dataclasses.asdict(x) for x in layers]
    n = sum(x.int8 for x in layers)
    if n:
        info.fusions["int8_conv"] = n
        info.fusion_patterns["int8_conv"] = (
            f"{FUSIONS['int8_conv'].pattern}  →  {FUSIONS['int8_conv'].into}"
        )


# -- compile ------------------------------------------------------------------------------


def _compile_one(req: _Request, backend: str, t0: float) -> Engine:
    """resolve → capture → passes → build → guard → engine, for one named backend."""
    be = _backend(backend, req.device)
    info = EngineInfo(
        backend=be.name,
        precision="int8" if req.int8 else DTYPE_NAMES[req.dtype],
        output=req.output,
        device=str(req.device),
        inputs=_input_specs(req, {}),
        threshold=req.threshold,
    )
    captured, domain, graph = None, None, None
    if be.uses_graph:
        captured, domain = _capture(req, info)
        graph = _passes(captured.graph, req, be, info)
    else:
        _probe(req, info)
    reference = _Reference(req, captured, copy_model=not be.propagates_nonfinite)
    if req.int8:
        runner = _int8(be, req, graph, domain, info, reference)
    else:
        runner = _runner(be, req, graph, domain, info, reference)
    info.notes += req.size_notes + runner.notes
    engine = Engine(runner, info, _source(req, captured))
    if domain is not None and "batch" in domain.ranges:
        _admit_batch_one(engine, req, domain)
    info.build_seconds = time.perf_counter() - t0
    return engine


def compile(
    model: nn.Module | str | torch.export.ExportedProgram,
    example_input: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
    backend: str = "auto",
    precision: str | torch.dtype = "fp32",
    output: str = "logits",
    dynamic: bool | str | Sequence[str] = False,
    device: str | torch.device | None = None,
    threshold: float = 0.5,
    options: dict[str, Any] | None = None,
    calibration: Any = None,
) -> Engine:
    """Compile ``model`` into an :class:`~segfast.runtime.engine.Engine`.

    Args:
        model: an ``nn.Module`` (any: zoo, torchvision, smp, your own), a zoo name,
            or an ``ExportedProgram`` (exported in eval mode).
        example_input / input_shape: what to trace with (one of them; zoo models
            default to their standard size).
        backend: "auto" (fastest correct here, measured), "eager", "torch",
            "triton", "inductor", "onnxruntime", "tensorrt".
        precision: "fp32", "fp16", "bf16" or "int8" (convolutions on int8; needs
            ``calibration``).
        output: "logits", "probs" (softmax; sigmoid for one class) or "mask"
            (argmax as uint8; a 0.5 sigmoid threshold for one class).
        dynamic: False (static shapes), True (height and width), or axis names
            among "batch", "height", "width".
        device: where the engine runs (default: the model's device). The model is
            copied, not moved, when it lives elsewhere.
        options: backend-specific options (e.g. ``{"candidates": [...]}`` for auto).
        calibration: int8 only: example inputs from the data the engine will see (a list
            of tensors), or a :class:`segfast.Calibration` (method, held-out inputs,
            labels, the contract's bounds). The engine is judged on held-out inputs
            and its most sensitive layers kept in floating point until it meets the
            int8 contract (see :mod:`segfast.int8`).

    The model is put in eval mode. The engine returns the model's primary
    output (a dict's ``"out"``, a tuple's first item), reduced per ``output``.
    """
    t0 = time.perf_counter()
    req = _resolve(
        model,
        example_input,
        input_shape,
        precision=precision,
        output=output,
        dynamic=dynamic,
        device=device,
        threshold=threshold,
        options=options,
        calibration=calibration,
    )
    if backend == "auto":
        return _auto(req, t0)
    return _compile_one(req, backend, t0)


def plan(
    model: nn.Module | str | torch.export.ExportedProgram,
    example_input: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
    backend: str = "triton",
    precision: str | torch.dtype = "fp32",
    output: str = "logits",
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(the captured graph, the fused plan) ``compile`` would hand ``backend``, unbuilt.

    resolve → capture → passes, static shapes, nothing built: the backend need not be
    available here, only its pass settings are read (e.g. ``triton``'s channel-slice
    outputs, on a machine without a GPU). The captured graph is a copy taken before
    the passes (its head appended, sharing the weights); both carry fake values.
    """
    req = _resolve(
        model, example_input, input_shape, precision=precision, output=output, dynamic=False,
        device=None, threshold=0.5, options=None,
    )  # fmt: skip
    be = get_backend(backend)
    if not be.uses_graph:
        raise ValueError(f"backend {be.name!r} runs the model itself: it has no fused plan")
    info = EngineInfo(
        backend=be.name, precision=DTYPE_NAMES[req.dtype], output=req.output,
        device=str(req.device), inputs=_input_specs(req, {}), threshold=req.threshold,
    )  # fmt: skip
    captured, _ = _capture(req, info)
    gm = captured.graph
    shared: dict[int, Any] = {id(t): t for t in (*gm.parameters(), *gm.buffers())}
    with quiet_torch_internals():
        unfused = copy.deepcopy(gm, shared)
    return unfused, _passes(gm, req, be, info)


def quantize(
    model: nn.Module | str | torch.export.ExportedProgram,
    example_input: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    calibration: Any,
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
    output: str = "logits",
    threshold: float = 0.5,
    device: str | torch.device | None = None,
) -> int8.QuantizedModel:
    """Calibrate and quantize ``model`` to int8 on its own, without building an engine.

    resolve → capture → passes → the int8 stage of :mod:`segfast.int8` (calibrate,
    quantize, judge on held-out inputs, fall back the most sensitive layers), judged
    on the quantized graph's composite implementation. Returns a
    :class:`~segfast.int8.QuantizedModel` (call it, read its ``summary()``,
    ``export_onnx()`` the Q/DQ file).
    """
    req = _resolve(
        model, example_input, input_shape, precision="int8", output=output, dynamic=False,
        device=device, threshold=threshold, options=None, calibration=calibration,
    )  # fmt: skip
    cal = int8.as_calibration(req.calibration)
    if cal.float_precision not in (None, "fp32"):
        raise InputError(
            f"float_precision={cal.float_precision!r} is an engine's: segfast.quantize runs "
            "the quantized graph's composite in fp32; give it to segfast.compile"
        )
    fp_graph = _fused_graph(req, get_backend("torch"))
    cal_sets, held, labels = int8.split_holdout(cal, req.inputs, req.axes, req.device)
    with torch.no_grad():
        num_classes = _num_classes(req.model, WithHead(req.model, "logits")(*req.inputs))

    def judge(g: fx.GraphModule, layers: list[QuantizedLayer]) -> tuple[CheckReport, None]:
        sim = int8.GraphEngine(g, req.output, req.threshold, num_classes)
        report = check(
            sim, req.model, held, labels=labels, min_agreement=cal.min_agreement,
            max_metric_drop=cal.max_metric_drop,
        )  # fmt: skip
        return report, None

    built = int8.quantize_with_guard(
        fp_graph, cal, cal_sets, held, judge, req.output, req.threshold
    )
    return int8.QuantizedModel(
        req.model, req.inputs, built.graph, built.layers, built.report, req.output,
        req.threshold, built.notes,
    )  # fmt: skip


# -- auto ---------------------------------------------------------------------------------


def auto_candidates(device: torch.device) -> list[str]:
    """Backends ``auto`` measures, fastest-first guesses first."""
    if device.type == "cuda":
        return ["triton", "tensorrt", "torch", "onnxruntime"]
    return ["torch", "onnxruntime"]


def _auto(req: _Request, t0: float) -> Engine:
    """Build every available candidate, time it briefly, keep the fastest correct one.

    Correct means within the accuracy contract against the fp32 eager model on
    the example input (see :func:`segfast.check`). ``options["candidates"]``
    overrides the list; ``options["iters"]`` the timed runs per candidate (5).
    """
    opts = dict(req.options)
    if "candidates" in opts:
        names = list(opts.pop("candidates"))
        unknown = [n for n in names if n not in backend_names()]
        if unknown:
            raise ValueError(f"unknown auto candidate(s) {unknown}; backends: {backend_names()}")
    else:
        names = [n for n in auto_candidates(req.device) if n in backend_names()]
    iters = int(opts.pop("iters", 5))
    each = dataclasses.replace(req, options=opts)
    choice: list[dict[str, Any]] = []
    crashed: list[Exception] = []
    best: tuple[float, Engine] | None = None
    for name in names:
        ok, why = available(name, req.device)
        if not ok:
            choice.append({"backend": name, "ms": None, "reason": why})
            continue
        try:
            eng = _compile_one(each, name, time.perf_counter())
        except (BackendUnavailable, UnsupportedModelError) as exc:
            choice.append({"backend": name, "ms": None, "reason": str(exc).splitlines()[0]})
            continue
        except InputError:  # the caller's inputs: no backend takes them
            raise
        except Exception as exc:  # a backend's own failure: the next one may build
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            crashed.append(exc)
            choice.append(
                {
                    "backend": name,
                    "ms": None,
                    "reason": f"failed to build ({type(exc).__name__}: {first[:200]})",
                }
            )
            continue
        if req.int8 and req.calibration is not None:  # judged by the calibration's bounds
            cal = int8.as_calibration(req.calibration)
            report = check(eng, req.model, [req.inputs], min_agreement=cal.min_agreement,
                           max_metric_drop=cal.max_metric_drop)  # fmt: skip
        else:
            report = check(eng, req.model, [req.inputs])
        if not report.passed:
            choice.append(
                {
                    "backend": name,
                    "ms": None,
                    "reason": f"failed the accuracy check: {report.reason}",
                }
            )
            continue
        ms = 1e3 * median(
            measure(
                eng.run_unchecked, [req.inputs], warmup=2, iters=iters, device=req.device
            ).host_s
        )
        choice.append({"backend": name, "ms": ms})
        if best is None or ms < best[0]:
            best = (ms, eng)
    if best is None:
        reasons = "; ".join(f"{c['backend']}: {c.get('reason')}" for c in choice)
        raise BackendUnavailable(
            f"auto found no backend that runs correctly here ({reasons})"
        ) from (crashed[0] if crashed else None)
    engine = best[1]
    for c in choice:
        c["chosen"] = c["backend"] == engine.backend
    engine.info.choice = choice
    engine.info.notes.append(
        f"auto chose {engine.backend} ({best[0]:.2f} ms) among {', '.join(names)}"
    )
    engine.info.notes += [
        f"auto: {c['backend']} {c['reason']}"
        for c in choice
        if "failed to build" in c.get("reason", "")
    ]
    engine.info.build_seconds = time.perf_counter() - t0
    return engine


# -- load ---------------------------------------------------------------------------------


def load(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    input_shape: Any = None,
) -> Engine:
    """Load an engine saved by ``Engine.save`` and rebuild it here.

    Before anything is built, the file is read and verified
    (:func:`segfast.runtime.engine_file.read`: it parses, its digests match) and
    checked against this machine (:func:`~segfast.runtime.engine_file.check_compatible`:
    segfast and torch versions, device, and ``input_shape`` when given). Then the
    stored program is compiled with the stored settings.
    """
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    p = Path(path)
    meta, tensors = engine_file.read(p)
    dev = torch.device(device) if device is not None else torch.device(meta["device"]["type"])
    engine_file.check_compatible(meta, p, dev, input_shape)
    params = set(meta.get("parameters", ()))
    state = {
        k[2:]: torch.nn.Parameter(v, requires_grad=False) if k[2:] in params else v
        for k, v in tensors.items()
        if k.startswith("w.")
    }
    consts = {k[2:]: v for k, v in tensors.items() if k.startswith("c.")}
    shapes = [tuple(s["shape"]) for s in meta["inputs"]]
    dtypes = [getattr(torch, s["dtype"]) for s in meta["inputs"]]
    examples = tuple(
        torch.zeros(s, dtype=d) if not d.is_floating_point else torch.randn(s, dtype=d)
        for s, d in zip(shapes, dtypes, strict=True)
    )
    try:
        with quiet_torch_internals():
            program = deserialize(
                SerializedArtifact(meta["program"].encode(), state, consts, (examples, {}))
            )
    except Exception as exc:  # the serde raises many types on a malformed program
        raise EngineFileError(f"{p}: the stored program cannot be deserialised: {exc}") from exc
    if dev.type != "cpu":
        # The weights were read onto the CPU; the program (its weights and any device
        # its ops name) moves to the engine's device before it is compiled there.
        from torch.export.passes import move_to_device_pass

        with quiet_torch_internals():
            program = move_to_device_pass(program, dev)
    # Options a file stored that no backend reads any more (or never did: compile
    # ignored unknown keys before it refused them) are dropped, not fatal.
    known = set(known_options())
    stored = dict(meta["options"] or {})
    dropped = sorted(str(k) for k in stored if k not in known)
    if meta["backend"] not in backend_names():
        raise EngineFileError(f"{p}: unknown backend {meta['backend']!r} (corrupt file?)")
    engine = compile(
        program,
        tuple(t.to(dev) for t in examples),
        backend=meta["backend"],
        precision=meta["precision"],
        output=meta["output"],
        dynamic=tuple(meta["dynamic"]),
        device=dev,
        threshold=meta["threshold"],
        options={k: v for k, v in stored.items() if k in known},
    )
    engine.info.notes.append(f"loaded from {p}")
    if dropped:
        engine.info.notes.append(f"engine file options no backend reads, ignored: {dropped}")
    return engine


# -- batch --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineLoader:
    """Builds a batch actor's engine: loads the engine file on the actor's device
    (``device``, or CUDA where the actor was given a GPU, else the CPU), then applies
    ``wrap`` (a picklable callable engine → engine, e.g. to instrument it)."""

    path: str
    device: str | None = None
    wrap: Any = None

    def __call__(self) -> Engine:
        dev = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        engine = load(self.path, device=dev)
        return self.wrap(engine) if self.wrap is not None else engine


def batch(
    engine: Engine | str | os.PathLike[str],
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    device: str | None = None,
    batch: int | None = None,
    tile: int | tuple[int, int] | None = None,
    overlap: int = 64,
    blend: str = "crop",
    band_rows: int | None = None,
    video_output: str = "mkv",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    retries: int = 1,
    max_task_retries: int = 3,
    retry_failed: bool = False,
    verify: str = "digest",
    address: str | None = None,
    num_cpus: int | None = None,
    progress: bool = False,
    wrap_engine: Any = None,
    on_record: Any = None,
) -> Any:
    """Segment every input — images, videos, large TIFF/.npy images — on Ray Data, one
    engine per actor, into ``output`` with a resumable manifest
    (:mod:`segfast.runtime.batchrun`, :mod:`segfast.runtime.batchjob`).

    Args:
        engine: an :class:`Engine` (saved into ``output/.segfast-batch/`` for the
            actors) or a ``.segfast`` file. Compile it with a dynamic batch
            (``dynamic=("batch",)``) so that frames and tiles run batched.
        inputs: folders, glob patterns, list files (.txt) or files (one or a list).
        output: the output folder (created); ``manifest.jsonl`` lands there.
        actors: actors (engines) to run; default: the Ray cluster's CPUs ÷
            ``cpus_per_actor`` (and GPUs ÷ ``gpus_per_actor`` when that is > 0).
        device: where actors run their engine; default CUDA when the actor has a GPU.
        batch: frames / tiles / images per engine call (default 4, or the engine's
            static batch).
        tile, overlap, blend: large images' overlap-tile settings, as
            :meth:`Engine.segment_large`; ``blend="crop"`` splits an image into bands
            of ``band_rows`` tile rows across actors, ``"gaussian"`` runs each large
            image in one actor.
        video_output: "mkv" / "mp4" (a mask video) or "png" (a folder of class-id PNGs).
        mean, std: normalisation (as ``segfast run``; large images: after ÷ 255 for
            uint8, ÷ 65535 for uint16).
        retries: extra attempts in the actor for an item that raises (bad input: none).
        max_task_retries: re-runs of a unit whose actor died.
        retry_failed: redo inputs that failed in a previous run (default: left alone
            unless they changed).
        verify: how a previous run's outputs are checked before being skipped:
            "digest" (size and sha256) or "size".
        address: a Ray cluster to join (``ray.init(address=...)``); default: a local Ray
            instance with ``num_cpus`` CPUs (started and stopped here) unless Ray is
            already initialised in this process.
        progress: a progress bar over the units.
        wrap_engine: a picklable callable applied to each actor's engine.
        on_record: called with each manifest record as it is written.

    Returns:
        a :class:`~segfast.runtime.batchrun.BatchReport`.
    """
    from segfast._io import sha256_file
    from segfast.runtime.batchjob import SCRATCH, WorkerOptions
    from segfast.runtime.batchrun import run_batch
    from segfast.runtime.tiling import tile_grid

    out_dir = Path(output)
    if isinstance(engine, Engine):
        # Saved under its own digest: a rerun with the same engine finds the same file.
        folder = out_dir / SCRATCH / "engines"
        tmp = engine.save(folder / f"incoming-{os.getpid()}.segfast")
        digest = sha256_file(tmp)
        path = folder / f"engine-{digest[:16]}.segfast"
        os.replace(tmp, path)
        for old in folder.glob("engine-*.segfast"):  # engines of earlier jobs here
            if old != path:
                old.unlink(missing_ok=True)
    elif isinstance(engine, str | os.PathLike):
        path = Path(engine)
        digest = None
    else:
        raise InputError(
            f"engine must be a segfast.Engine or a .segfast file, got {type(engine).__name__} "
            f"(compile a model first: segfast.compile(model, ..., dynamic=('batch',)))"
        )
    meta, _ = engine_file.read(path)  # parses and verifies it before any actor starts
    io = engine_file.io_of(meta)
    if blend == "gaussian" and io.output == "mask":
        raise InputError(
            "blend='gaussian' averages probabilities, but this engine outputs class masks: "
            "compile it with output='logits' or 'probs', or use blend='crop'"
        )
    if tile is not None:
        tile_grid(io, 1, 1, tile=tile, overlap=overlap)  # a bad tile fails here, not in actors
    options = WorkerOptions(
        batch=batch,
        tile=None if tile is None else (tile, tile) if isinstance(tile, int) else tuple(tile),
        overlap=int(overlap),
        blend=blend,
        mean=None if mean is None else tuple(float(v) for v in mean),
        std=None if std is None else tuple(float(v) for v in std),
        retries=int(retries),
    )

    def grid(h: int, w: int) -> Any:
        return tile_grid(io, h, w, tile=options.tile, overlap=options.overlap)

    return run_batch(
        EngineLoader(str(path.resolve()), device, wrap_engine),
        inputs,
        out_dir,
        engine_digest=digest or sha256_file(path),
        tile_grid=grid,
        options=options,
        video_output=video_output,
        actors=actors,
        cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor,
        band_rows=band_rows,
        max_task_retries=max_task_retries,
        retry_failed=retry_failed,
        verify=verify,
        address=address,
        num_cpus=num_cpus,
        progress=progress,
        on_record=on_record,
    )
