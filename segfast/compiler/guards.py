"""The input-shape conditions under which ``torch.export`` proved an exported graph.

A dynamic export is proven for the per-axis ranges of ``range_constraints``
*and* for the guards ``torch.export`` recorded while tracing — e.g. a U-Net
of depth 3 is traced assuming its 1/8 bottleneck is not 1×1, a guard on
``(width + (-width) % 8) // 8 != 1`` that the ranges do not show. PyTorch
enforces them when the program runs (``ExportedProgram.module()`` raises
"Guard failed"); an ONNX file cannot carry them. segfast records them in the
file's metadata (``segfast.guards``) and the ``onnxruntime`` backend enforces
them, as the ``torch`` backend does.

The guards come from ``ExportedProgram._guards_code`` (torch ≥ 2.9; a private
attribute, read with ``getattr``: on a torch without it :func:`program_guards`
returns ``None`` and the caller says the guards are unknown). They are Python
expressions over input sizes; they are rewritten to name the sizes
(``batch``, ``height``, ``width`` of the first input, ``input1_d0`` …) and
evaluated by a small AST walker that accepts only integer arithmetic
(and the float64 ``math.trunc(s·torch.sym_float(n))`` of scale factors),
comparisons, ``and``/``or``/``not`` and ``min``/``max`` — never ``eval``.
"""

from __future__ import annotations

import ast
import copy
import math
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from segfast.errors import UnsupportedModelError

# A size in a guard: of the varargs ``inputs`` (segfast's ONNX export traces
# ``WithHead.forward(*inputs)``), or of a named argument (a model's own forward).
_SIZE = re.compile(r"L\['inputs'\]\[(\d+)\]\.size\(\)\[(\d+)\]")
_NAMED_SIZE = re.compile(r"L\['(\w+)'\]\.size\(\)\[(\d+)\]")
_FIRST_INPUT = {0: "batch", 1: "channels", 2: "height", 3: "width"}
_BINARY: dict[type, Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Div: operator.truediv,
}
_COMPARE: dict[type, Callable[[int, int], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
# Functions guards call: shape arithmetic of F.interpolate's scale factors appears as
# math.trunc(0.5*torch.sym_float(width)); evaluated in float64, as PyTorch does.
_CALLS: dict[str, Callable[..., Any]] = {
    "min": min,
    "max": max,
    "math.trunc": math.trunc,
    "math.floor": math.floor,
    "math.ceil": math.ceil,
    "torch.sym_float": float,
    "torch.sym_int": math.trunc,
    "torch.sym_max": max,
    "torch.sym_min": min,
}


def size_name(index: int, dim: int) -> str:
    """The name a guard uses for ``inputs[index].shape[dim]``."""
    if index == 0 and dim in _FIRST_INPUT:
        return _FIRST_INPUT[dim]
    return f"input{index}_d{dim}"


def program_guards(program: torch.export.ExportedProgram) -> tuple[str, ...] | None:
    """The program's shape guards with named sizes; ``None`` when this torch keeps none
    (or a guard reads an input this function cannot place)."""
    code = getattr(program, "_guards_code", None)
    if code is None:
        return None
    # A model's own forward names its arguments: the user inputs, in order.
    index = {name: i for i, name in enumerate(program.graph_signature.user_inputs)}
    out = []
    for g in code:
        g = _SIZE.sub(lambda m: size_name(int(m[1]), int(m[2])), g)
        if any(m[1] not in index for m in _NAMED_SIZE.finditer(g)):
            return None
        out.append(_NAMED_SIZE.sub(lambda m: size_name(index[m[1]], int(m[2])), g))
    return tuple(out)


def _call_name(func: ast.AST) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{func.value.id}.{func.attr}"
    return None


def _eval(node: ast.AST, env: dict[str, int]) -> Any:
    if isinstance(node, ast.Expression):
        return _eval(node.body, env)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
        return node.value
    if isinstance(node, ast.Name) and node.id in env:
        return env[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_eval(node.left, env), _eval(node.right, env))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, env)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _eval(node.operand, env)
    if isinstance(node, ast.BoolOp):
        values = (_eval(v, env) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        left = _eval(node.left, env)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = _eval(right_node, env)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Call) and _call_name(node.func) in _CALLS and not node.keywords:
        return _CALLS[_call_name(node.func)](*(_eval(a, env) for a in node.args))
    raise ValueError(f"unsupported guard syntax: {ast.dump(node)[:80]}")


_NODES = (
    ast.Expression, ast.Constant, ast.Name, ast.Load, ast.BinOp, ast.UnaryOp, ast.BoolOp,
    ast.Compare, ast.Call, ast.Attribute, ast.And, ast.Or, ast.Not, ast.USub,
    *_BINARY, *_COMPARE,
)  # fmt: skip


def _validate(tree: ast.AST) -> None:
    """Raise ValueError unless ``tree`` is shape arithmetic :func:`_eval` handles."""
    for node in ast.walk(tree):
        if not isinstance(node, _NODES):
            raise ValueError(f"unsupported guard syntax: {type(node).__name__}")
        if isinstance(node, ast.Call) and _call_name(node.func) not in _CALLS:
            raise ValueError(f"unsupported guard syntax: a call to {ast.unparse(node.func)}")
        if isinstance(node, ast.Constant) and type(node.value) not in (int, float, bool):
            raise ValueError(f"unsupported guard syntax: the constant {node.value!r}")


class Guards:
    """Compiled guards: ``first_violated(shapes)`` names the first that fails, or ``None``."""

    def __init__(self, guards: Sequence[str]) -> None:
        self.text = tuple(guards)
        # Raises ValueError on syntax the walker does not accept (checked once, here).
        self._trees = [ast.parse(g, mode="eval") for g in self.text]
        for tree in self._trees:
            _validate(tree)
        called = {
            id(n.func if isinstance(n.func, ast.Name) else n.func.value)
            for t in self._trees
            for n in ast.walk(t)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name | ast.Attribute)
        }
        self._names = sorted(
            {
                n.id
                for t in self._trees
                for n in ast.walk(t)
                if isinstance(n, ast.Name) and id(n) not in called
            }
        )
        self._cache: dict[tuple[tuple[int, ...], ...], str | None] = {}

    def first_violated(self, shapes: Sequence[Sequence[int]], cache: bool = True) -> str | None:
        key = tuple(tuple(int(d) for d in s) for s in shapes)
        if key in self._cache:
            return self._cache[key]
        env = {size_name(i, d): n for i, s in enumerate(key) for d, n in enumerate(s)}
        missing = [n for n in self._names if n not in env]
        if missing:
            raise ValueError(f"the guards use sizes {missing} that these inputs do not have")
        bad = next(
            (g for g, t in zip(self.text, self._trees, strict=True) if not _eval(t, env)), None
        )
        if cache and len(self._cache) < 4096:
            self._cache[key] = bad
        return bad


# -- the domain export proved: ranges per axis plus the guards -------------------------

AXIS_DIM = {"batch": 0, "height": 2, "width": 3}


def in_domain(
    shapes: Sequence[Sequence[int]],
    axes: tuple[str, ...],
    ranges: dict[str, tuple[int, int]],
    guards: Guards | None,
) -> str | None:
    """Why input ``shapes`` lie outside what export proved (ranges, guards), or ``None``."""
    for i, shape in enumerate(shapes):
        for axis in axes:
            d = AXIS_DIM[axis]
            if (d == 0 or (i == 0 and len(shape) == 4)) and d < len(shape):
                lo, hi = ranges[axis]
                if not lo <= shape[d] <= hi:
                    return f"{axis} {shape[d]} is outside {lo}..{hi}"
    bad = guards.first_violated(shapes) if guards is not None else None
    if bad is None:
        return None
    step = _STEP_GUARD.fullmatch(bad)
    if step:  # one of eager_size_guards'
        axis, n, r = step.group(1), int(step.group(2)), int(step.group(3))
        kind = f"multiples of {n}" if r == 0 else f"{r} + multiples of {n}"
        return (
            f"{axis} {shapes[0][AXIS_DIM[axis]]}: the model takes {axis}s that are {kind} "
            "(its own input check; pad or resize the frame)"
        )
    return f"the export guard {bad} does not hold" + _nearest(shapes, axes, ranges, guards)


def _nearest(
    shapes: Sequence[Sequence[int]],
    axes: tuple[str, ...],
    ranges: dict[str, tuple[int, int]],
    guards: Guards,
) -> str:
    """For a message: the nearest height/width (each changed alone, within 256 of the
    input's) that the ranges and guards admit — a guard reads as shape arithmetic, the
    size to send instead does not."""
    found = []
    for axis in ("height", "width"):
        if axis not in axes or len(shapes[0]) != 4:
            continue
        d, lo, hi = AXIS_DIM[axis], *ranges[axis]
        for delta in range(1, 257):
            hits = []
            for n in (shapes[0][d] - delta, shapes[0][d] + delta):
                trial = [list(s) for s in shapes]
                trial[0][d] = n
                if lo <= n <= hi and guards.first_violated(trial, cache=False) is None:
                    hits.append(str(n))
            if hits:
                found.append(f"{axis} {' or '.join(hits)}")
                break
    return f" (the nearest sizes this engine takes: {'; '.join(found)})" if found else ""


_STEP_GUARD = re.compile(r"(height|width) % (\d+) == (\d+)")


# Size changes tried for probes, per dynamic axis: odd steps first (they change
# parity and divisibility), then steps that keep a multiple of 16/32 (models that
# need one), then scalings. An int adds; a float scales.
GROW_STEPS: tuple[dict[str, int | float], ...] = (
    {"batch": 1, "height": 5, "width": 3},
    {"batch": 2, "height": 13, "width": 11},
    {"batch": 1, "height": 32, "width": 32},
    {"batch": 1, "height": 2.0, "width": 2.0},
)
SHRINK_STEPS: tuple[dict[str, int | float], ...] = (
    {"height": 0.5, "width": 0.5},
    {"height": 0.75, "width": 0.75},
    {"height": -16, "width": -16},
    {"height": -32, "width": -32},
)


def steps_for(
    guards: Guards | None, base: tuple[dict[str, int | float], ...], sign: int
) -> tuple[dict[str, int | float], ...]:
    """``base`` plus, for an axis a size guard steps (``width % 64 == 0``: see
    :func:`eager_size_guards`), one and two such steps (``sign`` +1 grows, −1 shrinks): the
    fixed steps of ``base`` may never land on a multiple of 48 or 64."""
    stepped: dict[str, int] = {}
    for text in guards.text if guards is not None else ():
        m = _STEP_GUARD.fullmatch(text)
        if m:
            stepped[m.group(1)] = max(stepped.get(m.group(1), 1), int(m.group(2)))
    if not stepped:
        return base
    return (*base, *({a: sign * k * n for a, n in stepped.items()} for k in (1, 2)))


def changed_shapes(
    example: list[tuple[int, ...]], axes: Sequence[str], step: dict[str, int | float]
) -> list[tuple[int, ...]]:
    shapes = []
    for i, shape in enumerate(example):
        s = list(shape)
        for axis in axes:
            d = AXIS_DIM[axis]
            if (d == 0 or (i == 0 and len(s) == 4)) and d < len(s) and axis in step:
                f = step[axis]
                s[d] = s[d] + f if isinstance(f, int) else int(s[d] * f) + (d == 3)
        shapes.append(tuple(s))
    return shapes


def refuse_pinned(
    inputs: tuple[torch.Tensor, ...],
    axes: tuple[str, ...],
    ranges: dict[str, tuple[int, int]],
    guards: Guards | None,
) -> None:
    """Refuse a dynamic axis the model fixes: no other size of it satisfies the guards.

    torch.export (2.13, Dim.AUTO) can keep an axis symbolic with a range of
    2..∞ yet record a guard such as ``height == 8`` (a reshape to a fixed size,
    or a second image input, whose height and width stay static, concatenated
    with the first). Each axis is varied on its own, and all together, over
    the probe steps.
    """
    example = [tuple(t.shape) for t in inputs]
    for axis in axes:
        for step in (*steps_for(guards, GROW_STEPS, 1), *steps_for(guards, SHRINK_STEPS, -1)):
            alone = {axis: step[axis]} if axis in step else None
            trials = [alone, step] if alone else [step]
            if any(
                (shapes := changed_shapes(example, axes, t)) != example
                and in_domain(shapes, axes, ranges, guards) is None
                for t in trials
            ):
                break
        else:
            raise UnsupportedModelError(
                f"the model fixes the input {axis} to {example[0][AXIS_DIM[axis]]} "
                "(torch.export's guards admit no other size: "
                + "; ".join((guards.text if guards else ())[:3])
                + "); it cannot be exported with a dynamic "
                + axis
                + (
                    " (dynamic height and width apply to the first input only; the other "
                    "inputs keep their example shape)"
                    if axis in ("height", "width") and any(t.dim() == 4 for t in inputs[1:])
                    else ""
                )
            )


# -- sizes the eager model refuses ---------------------------------------------------------

# Steps tried per spatial axis: the model is asked for example + 1 first (every model
# that takes any size takes that), then for each candidate step until one is accepted.
_STEPS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def _refusal(model: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> str | None:
    """Why the eager model refuses ``inputs`` (run on fake tensors: shapes only, no
    arithmetic), or None when it runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
            model(*(mode.from_tensor(t) for t in inputs))
    except Exception as exc:  # any: the model's own checks raise what they like
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {first[:200]}"
    return None


def eager_size_guards(
    model: Callable[..., Any], inputs: Sequence[torch.Tensor], axes: Sequence[str]
) -> tuple[tuple[str, ...], list[str]]:
    """Guards for the heights/widths the *eager model* refuses although its graph takes them.

    A model may check its input size in Python and skip the check while it is traced
    (segmentation_models_pytorch: ``if not torch.compiler.is_compiling():
    check_input_shape(x)`` — divisible by the encoder's output stride). The exported
    graph then runs any size and returns a map of another size than the input's (a
    PSPNet given 100×100 returns 104×104; a SegFormer given 97×131, 96×128) where the
    eager model raises. For each dynamic spatial axis the model runs on fake tensors
    (no arithmetic: ~0.1–0.4 s a run) at the example + 1; if it refuses, at the example
    + each of :data:`_STEPS` until it takes one, which becomes a guard
    ``height % step == example % step``. Returns (the guards, notes for the engine).
    """
    example = [tuple(t.shape) for t in inputs]
    if not example or len(example[0]) != 4:
        return (), []
    try:  # a copy: a module that caches shape-dependent tensors keeps fakes otherwise
        model = copy.deepcopy(model)
    except Exception as exc:  # any module: deepcopy runs its own __deepcopy__/pickling
        return (), [f"the eager model's accepted sizes not probed (it cannot be copied: {exc})"]
    guards: list[str] = []
    notes: list[str] = []
    spatial = [a for a in ("height", "width") if a in axes]

    def sized(sizes: dict[int, int]) -> list[torch.Tensor]:
        """The inputs with the first one's dims ``d`` at ``sizes[d]`` (shapes only)."""
        shape = [sizes.get(d, n) for d, n in enumerate(example[0])]
        first = torch.empty(shape, dtype=inputs[0].dtype, device=inputs[0].device)
        return [first, *inputs[1:]]

    grown = {AXIS_DIM[a]: example[0][AXIS_DIM[a]] + 1 for a in spatial}
    if not spatial or _refusal(model, sized(grown)) is None:  # one run for the common case
        return (), []
    for axis in spatial:
        d = AXIS_DIM[axis]
        size = example[0][d]

        def at(n: int, d: int = d) -> list[torch.Tensor]:
            return sized({d: n})

        why = _refusal(model, at(size + 1))
        if why is None:
            continue
        step = next((s for s in _STEPS if _refusal(model, at(size + s)) is None), None)
        if step is None:
            if _refusal(model, at(size)) is not None:  # fake tensors cannot run it at all
                notes.append(f"the eager model's accepted {axis}s not probed (fake tensors: {why})")
            else:
                notes.append(
                    f"the eager model refuses {axis} {size + 1} ({why}) and every probed "
                    f"{axis} up to {size + _STEPS[-1]}: only the export's ranges and guards "
                    "are enforced"
                )
            continue
        guards.append(f"{axis} % {step} == {size % step}")
        kind = (
            f"multiples of {step}" if size % step == 0 else f"{size % step} + multiples of {step}"
        )
        notes.append(
            f"the eager model takes {axis}s that are {kind} (it refuses {size + 1}: {why})"
        )
    return tuple(guards), notes
