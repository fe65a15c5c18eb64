"""Capture: ``torch.export`` of the model in eval mode, lowered to core ATen.

The decomposition table is the default core-ATen one minus the ops the fusion
passes and kernels want whole: resampling, max-unpooling, SiLU/Hardswish and
friends. The result is the unlifted ``GraphModule`` the passes rewrite.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim, ExportedProgram

from segfast._warnings import quiet_torch_internals
from segfast.compiler import decompose
from segfast.errors import InputError, UnsupportedModelError

aten = torch.ops.aten

# Ops kept whole instead of decomposed: the passes match them and the Triton
# backend has kernels for them; decomposed they become index arithmetic.
KEEP_WHOLE = (
    aten.upsample_bilinear2d.default,
    aten.upsample_bilinear2d.vec,
    aten.upsample_nearest2d.default,
    aten.upsample_nearest2d.vec,
    aten._upsample_nearest_exact2d.default,
    aten._upsample_nearest_exact2d.vec,
    aten.max_unpool2d.default,
    aten.silu.default,
    aten.hardswish.default,
    aten.hardsigmoid.default,
    aten.gelu.default,
    aten.mish.default,
)

DYNAMIC_AXES = ("batch", "height", "width")


@dataclass(frozen=True)
class Captured:
    program: ExportedProgram  # as exported (kept for saving)
    graph: fx.GraphModule  # decomposed and unlifted: what the passes rewrite
    ranges: dict[str, tuple[int, int]]  # proven (min, max) of each dynamic axis


def decomposition_table() -> dict[Any, Any]:
    table = torch.export.default_decompositions()
    for op in KEEP_WHOLE:
        table.pop(op, None)
    return table


def dynamic_axes(dynamic: bool | str | Iterable[str]) -> tuple[str, ...]:
    """Normalise ``dynamic=``: False, True (height and width), or names of axes."""
    if dynamic is False or dynamic is None:
        return ()
    if dynamic is True:
        return ("height", "width")
    axes = (dynamic,) if isinstance(dynamic, str) else tuple(dynamic)
    bad = [a for a in axes if a not in DYNAMIC_AXES]
    if bad:
        raise ValueError(f"dynamic axes must be among {DYNAMIC_AXES}, got {bad}")
    return axes


def example_tensors(
    example_input: torch.Tensor | Sequence[torch.Tensor] | None,
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None,
    device: torch.device,
) -> tuple[torch.Tensor, ...] | None:
    """The example inputs to trace with, from whichever form was given (on ``device``);
    None when neither was (the caller knows the model's default, if any)."""
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
    return None


def dynamic_shapes(
    inputs: tuple[torch.Tensor, ...], axes: tuple[str, ...]
) -> tuple[dict[int, Any] | None, ...] | None:
    """Dim.AUTO on the requested axes: export infers each range from the model's
    own guards (e.g. a minimum size below which a stride-2 stage would be empty)."""
    if not axes:
        return None
    shapes: list[dict[int, Any] | None] = []
    for i, t in enumerate(inputs):
        dims: dict[int, Any] = {}
        if "batch" in axes and t.dim() >= 1:
            dims[0] = Dim.AUTO
        if i == 0 and t.dim() == 4:
            dims.update({d: Dim.AUTO for a, d in (("height", 2), ("width", 3)) if a in axes})
        shapes.append(dims or None)
    return tuple(shapes)


def trace_inputs(
    inputs: tuple[torch.Tensor, ...], axes: tuple[str, ...]
) -> tuple[torch.Tensor, ...]:
    """The inputs to export with: new tensor objects, a dynamic axis of size 1 doubled to 2.

    ``torch.export`` specialises dimensions of size 1 (they broadcast), so a
    dynamic batch or side traced at 1 would be pinned to 1. And it marks the
    tensors it traces as dynamic (``_dynamo_weak_dynamic_indices``) without
    clearing the mark when the export fails: a later static export of the
    caller's tensors would then trace symbolic shapes. ``detach()`` gives
    export objects of its own (sharing the data).
    """
    out = []
    for i, t in enumerate(inputs):
        t = t.detach()
        for axis, d in (("batch", 0), ("height", 2), ("width", 3)):
            applies = d == 0 or (i == 0 and t.dim() == 4)
            if axis in axes and applies and d < t.dim() and t.shape[d] == 1:
                t = torch.cat([t, t], dim=d)
        out.append(t)
    return tuple(out)


def _finite_int(bound: Any) -> int | None:
    """int of a sympy range bound; None for an unbounded one (sympy oo / int_oo)."""
    try:
        if bool(getattr(bound, "is_finite", True)) and bound.is_integer:
            return int(bound)
    except (TypeError, ValueError, AttributeError):
        pass
    return None


def dynamic_ranges(program: ExportedProgram, axes: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """The (min, max) export proved for each dynamic axis of the first input.

    Raises UnsupportedModelError when the model pinned an axis it was asked to
    keep dynamic (e.g. a reshape to a fixed size).
    """
    # The first user input (not a parameter, buffer or lifted tensor constant).
    first = program.graph_signature.user_inputs[0]
    ph = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == first)
    v = ph.meta["val"]
    out: dict[str, tuple[int, int]] = {}
    for axis, d in (("batch", 0), ("height", 2), ("width", 3)):
        if axis not in axes or d >= v.dim():
            continue
        size = v.shape[d]
        if not isinstance(size, torch.SymInt):
            raise UnsupportedModelError(
                f"the model fixes the input {axis} to {size}; it cannot be compiled with a "
                f"dynamic {axis}"
            )
        rng = program.range_constraints.get(size.node.expr)
        lo = int(rng.lower) if rng is not None else 2
        hi = _finite_int(rng.upper) if rng is not None else None
        hi = hi if hi is not None else 2**31 - 1
        out[axis] = (lo, hi)
    return out


def _own_state(program: ExportedProgram) -> None:
    """Give a freshly exported program copies of the model's weights and constants.

    ``torch.export`` keeps the model's own tensors in the program's state: an engine
    built from it would follow every later in-place change to the model (a training
    step, ``param.mul_``, ``model.double()``) and save those into its engine file.
    An engine is a snapshot of the model at compile time, as TensorRT's and ONNX
    Runtime's are. Costs one copy of the weights while the model lives."""
    with torch.no_grad():
        for key, t in list(program.state_dict.items()):
            copy = t.detach().clone()
            program.state_dict[key] = (
                nn.Parameter(copy, requires_grad=t.requires_grad)
                if isinstance(t, nn.Parameter)
                else copy
            )
        for key, t in list(program.constants.items()):
            if isinstance(t, torch.Tensor):
                program.constants[key] = t.detach().clone()


def capture(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    *,
    dynamic: bool | str | Iterable[str] = False,
    program: ExportedProgram | None = None,
) -> Captured:
    """Export ``model`` (eval mode) on ``inputs`` and decompose to core ATen.

    With ``program`` (an already exported model, e.g. from an engine file) the
    export step is skipped.
    """
    axes = dynamic_axes(dynamic)
    if program is not None:
        ranges = dynamic_ranges(program, axes)
        return Captured(program, lower_to_core(program), ranges)
    model = model.eval()
    try:
        with torch.no_grad(), quiet_torch_internals():
            traced = trace_inputs(inputs, axes)
            program = torch.export.export(
                model,
                traced,
                dynamic_shapes=dynamic_shapes(traced, axes),
                strict=False,
            )
    except Exception as exc:  # export raises many types; name the stage and keep the cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"torch.export could not capture {type(model).__name__}"
            f"{' with dynamic ' + ', '.join(axes) if axes else ''}: {first}"
        ) from exc
    _own_state(program)
    ranges = dynamic_ranges(program, axes)
    return Captured(program, lower_to_core(program), ranges)


def lower_to_core(program: ExportedProgram) -> fx.GraphModule:
    """The unlifted core-ATen graph of ``program``: rewritten node by node where
    :func:`segfast.compiler.decompose.lower` can do that exactly, else through
    ``run_decompositions`` (a re-trace: seconds on a large graph)."""
    table = decomposition_table()
    with quiet_torch_internals():
        fast = decompose.lower(program, table, KEEP_WHOLE)
        if fast is not None:
            return fast
        return program.run_decompositions(table).module()
