"""``segfast.compile``: model → captured graph → fused graph → backend → Engine."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from segfast.backends import get_backend
from segfast.backends.base import BuildRequest, Runner
from segfast.compiler import ops as _ops  # noqa: F401  (registers torch.ops.segfast)
from segfast.compiler.capture import Captured, capture, dynamic_axes
from segfast.compiler.context import PassContext
from segfast.compiler.graph import activation_bytes, call_nodes, infer_val, val
from segfast.compiler.pipeline import run_passes
from segfast.compiler.postprocess import OUTPUTS, WithHead, head_mode, mask_dtype
from segfast.errors import BackendUnavailable, InputError, UnsupportedModelError
from segfast.runtime.engine import DTYPE_NAMES, DTYPES, Engine, EngineInfo, InputSpec

if TYPE_CHECKING:
    from segfast.export.guards import Guards


def resolve_precision(precision: str | torch.dtype) -> torch.dtype:
    if isinstance(precision, torch.dtype):
        if precision not in DTYPE_NAMES:
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision}")
        return precision
    key = str(precision).lower().replace("float", "fp").replace("bfloat", "bf")
    key = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "half": "fp16"}.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"precision must be 'fp32', 'fp16' or 'bf16', got {precision!r}")
    return DTYPES[key]


def _model_device(model: nn.Module) -> torch.device | None:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


def example_inputs(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor] | None,
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None,
    device: torch.device,
) -> tuple[torch.Tensor, ...]:
    """The example inputs compile traces with, from whichever form was given."""
    if example_input is not None and input_shape is not None:
        raise ValueError("give example_input or input_shape, not both")
    if example_input is not None:
        inputs = (
            (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
        )
        if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
            raise InputError("example_input must be a tensor or a sequence of tensors")
        return tuple(t.to(device) for t in inputs)
    if input_shape is not None:
        shapes = (
            [tuple(input_shape)]
            if all(isinstance(d, int) for d in input_shape)
            else [tuple(s) for s in input_shape]  # type: ignore[union-attr]
        )
        for s in shapes:
            if not s or any(not isinstance(d, int) or d < 1 for d in s):
                raise InputError(f"input_shape must be positive integers, got {s}")
        return tuple(torch.randn(s, device=device) for s in shapes)
    spec_info = getattr(model, "segfast_spec", None)
    if spec_info and "name" in spec_info:
        from segfast.models import get_spec

        spec = get_spec(spec_info["name"])
        return tuple(t.to(device) for t in spec.make_inputs(model, spec.standard_batch))
    raise ValueError("compile needs example_input or input_shape for this model")


def _leaf_index(structure: Any) -> int:
    """Index of the primary output among the flattened leaves (see postprocess.primary_output)."""
    while not isinstance(structure, int):
        if isinstance(structure, dict):
            structure = structure["out"] if "out" in structure else next(iter(structure.values()))
        elif isinstance(structure, list | tuple) and structure:
            structure = structure[0]
        else:
            raise UnsupportedModelError("the model's output holds no tensor")
    return structure


def select_primary_output(gm: fx.GraphModule) -> fx.Node:
    """Make the graph return only the primary output (dropping aux heads), plainly."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = list(pytree.tree_leaves(out_node.args[0]))
    spec = getattr(gm, "_out_spec", None)
    idx = 0
    if spec is not None and spec.num_leaves == len(leaves):
        idx = _leaf_index(pytree.tree_unflatten(list(range(len(leaves))), spec))
    primary = leaves[idx]
    if not isinstance(primary, fx.Node) or not isinstance(val(primary), torch.Tensor):
        raise UnsupportedModelError("the model's primary output is not a tensor")
    out_node.args = (primary,)
    # Plain calling convention: positional tensors in, one tensor out.
    gm.graph._codegen = fx.graph.CodeGen()
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return primary


def require_logits(out: torch.Tensor, output: str) -> None:
    """Raise UnsupportedModelError unless ``out`` can take the ``output=`` reduction."""
    if output != "logits" and out.dim() != 4:
        raise UnsupportedModelError(
            f"output={output!r} needs N×K×H×W logits; the model returns shape {tuple(out.shape)}"
        )


def append_head(gm: fx.GraphModule, output: str, threshold: float) -> None:
    """Append the ``segfast.head`` reduction the engine's ``output=`` asks for."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    logits = out_node.args[0]
    v = val(logits)
    if output == "logits":
        return
    require_logits(v, output)
    k = int(v.shape[1])
    mode = head_mode(output, k)
    with gm.graph.inserting_before(out_node):
        hd = gm.graph.call_function(
            torch.ops.segfast.head.default,
            # out_h/out_w are unused without a resize (0); the head pass may add one.
            (
                logits,
                None,
                None,
                0,
                0,
                False,
                False,
                None,
                None,
                mode,
                float(threshold),
                mask_dtype(k),
            ),
        )
    infer_val(gm, hd)
    out_node.args = (hd,)
    gm.recompile()


_UNBOUNDED = 2**31 - 1


def _input_specs(
    inputs: tuple[torch.Tensor, ...],
    axes: tuple[str, ...],
    ranges: dict[str, tuple[int, int]],
    min_size: int,
) -> list[InputSpec]:
    """Input specs; dynamic ranges from export where it proved them, else the model's minimum."""
    specs = []
    for i, t in enumerate(inputs):
        dyn: dict[str, tuple[int, int]] = {}
        if "batch" in axes and t.dim() >= 1:
            dyn["batch"] = ranges.get("batch", (1, _UNBOUNDED))
        if i == 0 and t.dim() == 4:
            for a in ("height", "width"):
                if a in axes:
                    dyn[a] = ranges.get(a, (min_size, _UNBOUNDED))
        specs.append(InputSpec(tuple(t.shape), str(t.dtype).removeprefix("torch."), dyn))
    return specs


def _shape_guards(
    captured: Captured, inputs: tuple[torch.Tensor, ...], axes: tuple[str, ...], notes: list[str]
) -> Guards | None:
    """The shape guards ``torch.export`` proved a dynamic graph under, or None.

    Refuses a dynamic axis the guards pin to its example size (the graph would
    claim a range it cannot run), as the ONNX export does. Guards segfast cannot
    read are left to the graph, which asserts them itself.
    """
    from segfast.export.guards import Guards, program_guards, refuse_pinned

    text = program_guards(captured.program)
    try:
        guards = Guards(text) if text else None
    except (ValueError, SyntaxError) as exc:
        notes.append(f"shape guards not checked by segfast ({exc}): the graph asserts them")
        return None
    refuse_pinned(inputs, axes, captured.ranges, guards)
    return guards


def _guarded(
    runner: Runner,
    axes: tuple[str, ...],
    ranges: dict[str, tuple[int, int]],
    guards: Guards | None,
) -> Runner:
    """``runner`` that first checks the inputs lie where export proved the graph.

    The captured graph asserts its guards too, but as an ``AssertionError``
    naming ``x.size()[3]``; this names the shapes and raises :class:`InputError`.
    ``ranges`` is read per call (batch 1 may be admitted after the build).
    """
    from segfast.export.guards import in_domain

    inner = runner.fn

    def fn(*inputs: torch.Tensor) -> torch.Tensor:
        why = in_domain([tuple(t.shape) for t in inputs], axes, ranges, guards)
        if why is not None:
            shapes = ", ".join("×".join(str(d) for d in t.shape) for t in inputs)
            raise InputError(
                f"input {shapes} is outside the shapes this engine is proven for: {why}"
            )
        return inner(*inputs)

    return dataclasses.replace(runner, fn=fn)


def _admit_batch_one(
    engine: Engine,
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    ranges: dict[str, tuple[int, int]],
    guards: Guards | None,
) -> None:
    """Extend a dynamic batch proven from 2 down to 1 when the engine is right there.

    ``torch.export`` specialises size 1, so it proves a dynamic batch from 2; the
    graph runs batch 1 all the same, unless the model branched on the batch size
    while traced. Batch 1 is run and judged by :func:`segfast.check` (as the ONNX
    export does): kept in the range when it passes, noted when it does not.
    """
    from segfast.check import check

    lo, hi = ranges["batch"]
    one = tuple(t[:1] if t.dim() >= 1 else t for t in inputs)
    if lo != 2 or (guards is not None and guards.first_violated([t.shape for t in one])):
        return
    specs = [s for s in engine.info.inputs if "batch" in s.dynamic]
    ranges["batch"] = (1, hi)
    for s in specs:
        s.dynamic["batch"] = (1, hi)
    report = check(engine, model, [one])
    if not report.passed:
        ranges["batch"] = (lo, hi)
        for s in specs:
            s.dynamic["batch"] = (lo, hi)
        engine.info.notes.append(
            f"batch 1 (below the proven minimum 2) does not match the model: {report.reason}; "
            "the batch range stays from 2"
        )


def _num_classes(model: nn.Module, out: torch.Tensor | None) -> int | None:
    if out is not None and out.dim() == 4:
        return int(out.shape[1])
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) else None


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
) -> Engine:
    """Compile ``model`` into an :class:`~segfast.runtime.engine.Engine`.

    Args:
        model: an ``nn.Module`` (any: zoo, torchvision, smp, your own), a zoo name,
            or an ``ExportedProgram`` (exported in eval mode).
        example_input / input_shape: what to trace with (one of them; zoo models
            default to their standard size).
        backend: "auto" (fastest correct here, measured), "eager", "torch",
            "triton", "inductor", "onnxruntime", "tensorrt".
        precision: "fp32", "fp16" or "bf16".
        output: "logits", "probs" (softmax; sigmoid for one class) or "mask"
            (argmax as uint8; a 0.5 sigmoid threshold for one class).
        dynamic: False (static shapes), True (height and width), or axis names
            among "batch", "height", "width".
        device: where the engine runs (default: the model's device). The model is
            copied, not moved, when it lives elsewhere.
        options: backend-specific options (e.g. ``{"candidates": [...]}`` for auto).

    The model is put in eval mode. The engine returns the model's primary
    output (a dict's ``"out"``, a tuple's first item), reduced per ``output``.
    """
    t0 = time.perf_counter()
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
    dtype = resolve_precision(precision)
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
    inputs = example_inputs(model, example_input, input_shape, dev)
    spec_info = getattr(model, "segfast_spec", None)
    min_size = 1
    if spec_info and "name" in spec_info:
        from segfast.models import get_spec

        min_size = get_spec(spec_info["name"]).min_size

    if backend == "auto":
        return _compile_auto(
            model,
            inputs,
            dtype=dtype,
            output=output,
            axes=axes,
            threshold=threshold,
            options=options,
            t0=t0,
        )
    be = get_backend(backend)
    ok, why = be.availability(dev)
    if not ok:
        raise BackendUnavailable(f"backend {be.name!r} cannot run here: {why}")
    info = EngineInfo(
        backend=be.name,
        precision=DTYPE_NAMES[dtype],
        output=output,
        device=str(dev),
        inputs=_input_specs(inputs, axes, {}, min_size),
        threshold=float(threshold),
    )
    graph = None
    captured = None
    guards = None
    ranges: dict[str, tuple[int, int]] | None = None  # graph backends: what export proved
    if be.uses_graph:
        captured = capture(model, inputs, dynamic=axes, program=program)
        info.inputs = _input_specs(inputs, axes, captured.ranges, min_size)
        if axes:
            ranges = dict(captured.ranges)
            guards = _shape_guards(captured, inputs, axes, info.notes)
        gm = captured.graph
        primary = select_primary_output(gm)
        info.num_classes = _num_classes(model, val(primary))
        append_head(gm, output, threshold)
        info.ops_before = len(call_nodes(gm))
        info.bytes_before = activation_bytes(gm)
        ctx = PassContext(gm, output=output, dtype=dtype, slice_outputs=be.slice_outputs)
        run_passes(ctx)
        info.passes = list(ctx.passes_run)
        info.fusions = dict(ctx.fired)
        info.ops_after = len(call_nodes(gm))
        info.bytes_after = activation_bytes(gm)
        info.notes += ctx.notes
        graph = gm
    else:  # the backend runs the model itself: see once what it returns
        with torch.no_grad():
            logits = WithHead(model, "logits")(*inputs)
        require_logits(logits, output)
        info.num_classes = _num_classes(model, logits)
    req = BuildRequest(
        model=WithHead(model, output, threshold),
        inputs=inputs,
        device=dev,
        dtype=dtype,
        output=output,
        dynamic=axes,
        graph=graph,
        options=dict(options or {}),
    )
    runner = be.build(req)
    if ranges is not None:
        runner = _guarded(runner, axes, ranges, guards)
    elif runner.details.get("dynamic_ranges"):  # e.g. onnxruntime: what its export proved
        info.inputs = _input_specs(inputs, axes, runner.details["dynamic_ranges"], min_size)
    if info.num_classes is None:
        with torch.no_grad():
            info.num_classes = _num_classes(model, WithHead(model, "logits")(*inputs))
    info.notes += runner.notes
    source = {
        "model": model,
        "inputs": inputs,
        "captured": captured,
        "threshold": threshold,
        "dynamic": axes,
        "options": dict(options or {}),
    }
    engine = Engine(runner, info, source)
    if ranges is not None and "batch" in ranges:
        _admit_batch_one(engine, model, inputs, ranges, guards)
    info.build_seconds = time.perf_counter() - t0
    return engine


def auto_candidates(device: torch.device) -> list[str]:
    """Backends ``auto`` measures, fastest-first guesses first."""
    if device.type == "cuda":
        return ["triton", "tensorrt", "torch", "onnxruntime"]
    return ["torch", "onnxruntime"]


def _compile_auto(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    *,
    dtype: torch.dtype,
    output: str,
    axes: tuple[str, ...],
    threshold: float,
    options: dict[str, Any] | None,
    t0: float,
) -> Engine:
    """Build every available candidate, time it briefly, keep the fastest correct one.

    Correct means within the accuracy contract against the fp32 eager model on
    the example input (see :func:`segfast.check`). ``options["candidates"]``
    overrides the list; ``options["iters"]`` the timed runs per candidate (5).
    """
    from segfast.backends import available
    from segfast.backends import names as registered
    from segfast.bench.timing import measure, median
    from segfast.check import check

    opts = dict(options or {})
    dev = inputs[0].device
    if "candidates" in opts:
        names = list(opts.pop("candidates"))
        unknown = [n for n in names if n not in registered()]
        if unknown:
            raise ValueError(f"unknown auto candidate(s) {unknown}; backends: {registered()}")
    else:
        names = [n for n in auto_candidates(dev) if n in registered()]
    iters = int(opts.pop("iters", 5))
    choice: list[dict[str, Any]] = []
    best: tuple[float, Engine] | None = None
    for name in names:
        ok, why = available(name, dev)
        if not ok:
            choice.append({"backend": name, "ms": None, "reason": why})
            continue
        try:
            eng = compile(
                model,
                inputs,
                backend=name,
                precision=dtype,
                output=output,
                dynamic=axes,
                device=dev,
                threshold=threshold,
                options=opts,
            )
        except (BackendUnavailable, UnsupportedModelError) as exc:
            choice.append({"backend": name, "ms": None, "reason": str(exc).splitlines()[0]})
            continue
        report = check(eng, model, [inputs])
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
            measure(eng.run_unchecked, [inputs], warmup=2, iters=iters, device=dev).host_s
        )
        choice.append({"backend": name, "ms": ms})
        if best is None or ms < best[0]:
            best = (ms, eng)
    if best is None:
        reasons = "; ".join(f"{c['backend']}: {c.get('reason')}" for c in choice)
        raise BackendUnavailable(f"auto found no backend that runs correctly here ({reasons})")
    engine = best[1]
    for c in choice:
        c["chosen"] = c["backend"] == engine.backend
    engine.info.choice = choice
    engine.info.notes.append(
        f"auto chose {engine.backend} ({best[0]:.2f} ms) among {', '.join(names)}"
    )
    engine.info.build_seconds = time.perf_counter() - t0
    return engine
