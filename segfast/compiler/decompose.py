"""Core-ATen lowering of an exported program without re-tracing it, where that is exact.

``ExportedProgram.run_decompositions`` re-traces the whole program through
functionalization and fake tensors: for the graphs segmentation networks make
(convolutions, batch norms, activations, pools, resizes) it was most of a compile — for
the tiny DeepLab v3+ 1.5 s with a static input and 3.8 s with a dynamic height and width
(a whole repeat compile took 3.6 s; 0.8 s with this module), and every
:func:`segfast.load` paid it again.

Those graphs need only a handful of one-to-one rewrites: ``conv2d`` → ``convolution``,
``batch_norm`` (inference) → ``_native_batch_norm_legit_no_training``, ``max_pool2d`` →
``max_pool2d_with_indices``, ``linear`` on a matrix → ``addmm`` of the transposed weight,
``reshape`` of a contiguous tensor → ``view``, in-place activations → their functional
form, and so on.
:func:`lower` does exactly those rewrites on ``program.module()`` and keeps every op that
``run_decompositions`` keeps; it gives up (returns ``None``, and the caller runs
``run_decompositions``) on the first node it does not know to be exact: an op it has no
rule for, an in-place op whose input is read again or aliased, a batch norm in training
mode, a symbolic shape where a rule needs a concrete one. What it produces is the graph
``run_decompositions`` produces — the same ops with the same arguments, checked op for op
on the zoo and the edge networks by ``tests/compiler/test_decompose.py``; the one
difference, a GroupNorm whose sizes are symbolic reading them off its input with
``sym_size`` nodes, gives the same values — so the passes see no difference.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch._ops import OpOverload
from torch.export import ExportedProgram

from segfast.compiler.graph import fake_mode_of

aten = torch.ops.aten

# Python-level arithmetic on shapes (SymInts) that export records as is.
_SHAPE_ARITHMETIC = frozenset(
    {
        operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
        operator.mod, operator.neg, operator.pow, operator.eq, operator.ne, operator.lt,
        operator.le, operator.gt, operator.ge, operator.getitem,
        torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not,
    }
)  # fmt: skip

# Kept by run_decompositions although composite: reading a size.
_SHAPE_OPS = frozenset({aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int})


class _GiveUp(Exception):
    """A node :func:`lower` cannot rewrite exactly."""


def _is_composite(op: OpOverload) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")


def _kept(op: Any, table: dict[Any, Any], keep: frozenset[Any]) -> bool:
    """Whether run_decompositions leaves ``op`` as it is (given the table it would use)."""
    if op in keep or op in _SHAPE_OPS:
        return True
    if not isinstance(op, OpOverload):
        return False
    return op not in table and not _is_composite(op) and not op._schema.is_mutable


def _val(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, fx.Node) else arg


def _pair(v: Any) -> list[Any]:
    if isinstance(v, Sequence):
        if len(v) == 1:
            return [v[0], v[0]]
        if len(v) == 2:
            return list(v)
        raise _GiveUp(f"expected 1 or 2 values, got {v!r}")
    return [v, v]


def _full_args(node: fx.Node, op: OpOverload) -> list[Any]:
    """``node``'s arguments in schema order, defaults filled in."""
    out: list[Any] = []
    for i, a in enumerate(op._schema.arguments):
        if i < len(node.args):
            out.append(node.args[i])
        elif a.name in node.kwargs:
            out.append(node.kwargs[a.name])
        elif a.has_default_value():
            out.append(a.default_value)
        else:
            raise _GiveUp(f"{op} lacks argument {a.name}")
    return out


# -- rewrites: each returns (op, args, result): the node's value is the op's output
# -- ("same") or item 0 of its tuple output ("getitem0"); an argument may be an _Emit, a
# -- node inserted first (linear's transposed weight) ---------------------------------------
Rewrite = tuple[OpOverload, tuple[Any, ...], str]


class _Emit:
    """An op call to insert before the rewritten node, used as one of its arguments."""

    def __init__(self, op: OpOverload, args: tuple[Any, ...]) -> None:
        self.op, self.args = op, args


def _conv2d(node: fx.Node) -> Rewrite:
    x, w, b, stride, padding, dilation, groups = _full_args(node, aten.conv2d.default)
    if getattr(_val(x), "dim", lambda: 0)() != 4:
        raise _GiveUp("conv2d on an unbatched input")
    args = (x, w, b, _pair(stride), _pair(padding), _pair(dilation), False, [0, 0], groups)
    return aten.convolution.default, args, "same"


def _conv_transpose2d(node: fx.Node) -> Rewrite:
    x, w, b, stride, padding, out_pad, groups, dilation = _full_args(
        node, aten.conv_transpose2d.input
    )
    if getattr(_val(x), "dim", lambda: 0)() != 4:
        raise _GiveUp("conv_transpose2d on an unbatched input")
    args = (x, w, b, _pair(stride), _pair(padding), _pair(dilation), True, _pair(out_pad), groups)
    return aten.convolution.default, args, "same"


def _batch_norm(node: fx.Node) -> Rewrite:
    x, w, b, mean, var, training, momentum, eps, _cudnn = _full_args(node, aten.batch_norm.default)
    if training is not False or mean is None or var is None:
        raise _GiveUp("batch_norm in training mode or without running statistics")
    args = (x, w, b, mean, var, momentum, eps)
    return aten._native_batch_norm_legit_no_training.default, args, "getitem0"


def _max_pool2d(node: fx.Node) -> Rewrite:
    if node.kwargs:
        raise _GiveUp("max_pool2d with keyword arguments")
    return aten.max_pool2d_with_indices.default, tuple(node.args), "getitem0"


def _adaptive_avg_pool2d(node: fx.Node) -> Rewrite:
    x, size = _full_args(node, aten.adaptive_avg_pool2d.default)
    xv = _val(x)
    if not isinstance(xv, torch.Tensor) or xv.dim() != 4:
        raise _GiveUp("adaptive_avg_pool2d on an unbatched input")
    if list(size) == [1, 1]:
        # ATen's composite takes the mean over H and W, and restrides the result when
        # the input is channels-last: leave that case to run_decompositions.
        try:
            contiguous = xv.is_contiguous()
        except Exception as exc:  # a data-dependent stride question
            raise _GiveUp("unknown layout") from exc
        if not contiguous:
            raise _GiveUp("adaptive_avg_pool2d of a non-contiguous input")
        return aten.mean.dim, (x, [-1, -2], True), "same"
    return aten._adaptive_avg_pool2d.default, (x, list(size)), "same"


def _dropout(node: fx.Node) -> Rewrite:
    x, _p, train = _full_args(node, aten.dropout.default)
    if train is not False:
        raise _GiveUp("dropout in training mode")
    return aten.clone.default, (x,), "same"


def _pad(node: fx.Node) -> Rewrite:
    x, pad, mode, value = _full_args(node, aten.pad.default)
    if mode != "constant":
        raise _GiveUp(f"pad mode {mode!r}")
    return aten.constant_pad_nd.default, (x, pad, 0.0 if value is None else value), "same"


def _size(x: fx.Node, dim: int) -> Any:
    """Size ``dim`` of ``x``: an int, or a ``sym_size`` node where it is symbolic."""
    s = _val(x).shape[dim]
    return s if isinstance(s, int) else _Emit(aten.sym_size.int, (x, dim))


def _group_norm(node: fx.Node) -> Rewrite:
    x, groups, w, b, eps, _cudnn = _full_args(node, aten.group_norm.default)
    xv = _val(x)
    if not isinstance(xv, torch.Tensor) or xv.dim() < 2:
        raise _GiveUp("group_norm input")
    hw: Any = 1  # H × W, as an int or as nodes multiplying symbolic sizes
    for d in range(2, xv.dim()):
        s = _size(x, d)
        if isinstance(hw, int) and isinstance(s, int):
            hw *= s
        else:
            hw = s if isinstance(hw, int) and hw == 1 else _Emit(operator.mul, (hw, s))
    args = (x, w, b, _size(x, 0), _size(x, 1), hw, groups, eps)
    return aten.native_group_norm.default, args, "getitem0"


def _softmax(node: fx.Node) -> Rewrite:
    op = node.target
    x, dim, dtype = _full_args(node, op)
    if dtype is not None:
        raise _GiveUp(f"{op} with a dtype")
    inner = aten._softmax.default if op is aten.softmax.int else aten._log_softmax.default
    return inner, (x, dim, False), "same"


def _linear(node: fx.Node) -> Rewrite:
    x, w, b = _full_args(node, aten.linear.default)
    xv = _val(x)
    if not isinstance(xv, torch.Tensor) or xv.dim() != 2:
        raise _GiveUp("linear on other than a matrix")  # ATen reshapes around mm there
    wt = _Emit(aten.permute.default, (w, [1, 0]))
    if b is None:
        return aten.mm.default, (x, wt), "same"
    return aten.addmm.default, (b, x, wt), "same"


def _reshape(node: fx.Node) -> Rewrite:
    x, shape = _full_args(node, aten.reshape.default)
    xv = _val(x)
    try:
        contiguous = isinstance(xv, torch.Tensor) and xv.is_contiguous()
    except Exception as exc:  # a data-dependent stride question
        raise _GiveUp("unknown layout") from exc
    if not contiguous:
        raise _GiveUp("reshape of a non-contiguous tensor")  # may copy
    return aten.view.default, (x, shape), "same"


_REWRITES: dict[OpOverload, Callable[[fx.Node], Rewrite]] = {
    aten.softmax.int: _softmax,
    aten.log_softmax.int: _softmax,
    aten.linear.default: _linear,
    aten.reshape.default: _reshape,
    aten.conv2d.default: _conv2d,
    aten.conv_transpose2d.input: _conv_transpose2d,
    aten.batch_norm.default: _batch_norm,
    aten.max_pool2d.default: _max_pool2d,
    aten.adaptive_avg_pool2d.default: _adaptive_avg_pool2d,
    aten.dropout.default: _dropout,
    aten.pad.default: _pad,
    aten.group_norm.default: _group_norm,
}


def _returns_fresh(op: Any) -> bool:
    """The op's outputs alias none of its inputs."""
    return isinstance(op, OpOverload) and all(r.alias_info is None for r in op._schema.returns)


def _functional(op: OpOverload) -> OpOverload | None:
    """The out-of-place overload of an in-place ``op`` (``relu_`` → ``relu``), if any."""
    schema = op._schema
    name = schema.name.split("::")[-1]
    if not name.endswith("_") or name.startswith("_"):
        return None
    arguments = schema.arguments
    written = [i for i, a in enumerate(arguments) if a.alias_info and a.alias_info.is_write]
    if written != [0]:  # only ``self`` is written
        return None
    packet = getattr(aten, name[:-1], None)
    overload = getattr(packet, op._overloadname, None) if packet is not None else None
    if not isinstance(overload, OpOverload) or overload._schema.is_mutable:
        return None
    if len(overload._schema.arguments) != len(arguments):
        return None
    return overload


def _fake_run(
    mode: Any, op: OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
) -> Any:
    """``op`` on the fake tensor values of its arguments (the value of a new node), as
    :func:`segfast.compiler.graph.infer_val` computes one."""
    vals = fx.node.map_aggregate(args, _val)
    kvals = fx.node.map_aggregate(kwargs or {}, _val)
    with enable_python_dispatcher(), mode:
        return op(*vals, **kvals)


def _same_result(mode: Any, functional: OpOverload, node: fx.Node) -> bool:
    """Whether ``functional`` on ``node``'s arguments gives a tensor of the in-place
    result's dtype and shape (an in-place op never changes either; its functional form
    can promote or broadcast)."""
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return False
    others = [_val(a) for a in (*node.args[1:], *node.kwargs.values())]
    if all(
        (isinstance(v, torch.Tensor) and v.dtype == out.dtype and v.shape == out.shape)
        or (isinstance(v, float) and out.dtype.is_floating_point)
        or isinstance(v, bool | str | None)
        or (isinstance(v, int) and not isinstance(v, bool) and out.dtype != torch.bool)
        for v in others
    ):
        return True  # no promotion, no broadcast: no need to ask the fake tensors
    new = _fake_run(mode, functional, tuple(node.args), dict(node.kwargs))
    return isinstance(new, torch.Tensor) and new.dtype == out.dtype and new.shape == out.shape


def _plan(gm: fx.GraphModule, table: dict[Any, Any], keep: frozenset[Any], mode: Any) -> list[Any]:
    """What to do with each node, or raise :class:`_GiveUp` before anything changes."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    fresh: set[fx.Node] = set()  # nodes whose tensor is not a view of anything
    plan: list[Any] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if node.op == "call_module" and node.target == "_guards_fn":
            continue  # the input-shape check ExportedProgram.module() adds: kept as is
        if node.op != "call_function":
            raise _GiveUp(f"{node.op} node {node.target}")
        op = node.target
        if op in _SHAPE_ARITHMETIC:
            if op is operator.getitem and node.args[0] in fresh:
                fresh.add(node)
            continue
        if not isinstance(op, OpOverload):
            raise _GiveUp(f"call to {op}")
        if op._schema.is_mutable:
            functional = _functional(op)
            if functional is None or not _kept(functional, table, keep):
                raise _GiveUp(f"in-place {op}")
            target = node.args[0]
            if not isinstance(target, fx.Node) or target not in fresh:
                raise _GiveUp(f"{op} writes to an input, a buffer or a view")
            for user in target.users:
                if user is node:
                    continue
                if order[user] > order[node] or not _returns_fresh(user.target):
                    raise _GiveUp(f"{op} writes to a tensor read again or aliased")
            if not _same_result(mode, functional, node):
                raise _GiveUp(f"{op} out of place changes dtype or shape")
            plan.append((node, functional, tuple(node.args), dict(node.kwargs), "same"))
            fresh.add(node)
            continue
        rule = _REWRITES.get(op)
        if rule is not None:
            new_op, args, result = rule(node)
            for step in (new_op, *_emitted_ops(args)):
                if step not in _SHAPE_ARITHMETIC and not _kept(step, table, keep):
                    raise _GiveUp(f"{op} lowers to {step}, which would be decomposed further")
            plan.append((node, new_op, args, {}, result))
            fresh.add(node)
            continue
        if not _kept(op, table, keep):
            raise _GiveUp(f"{op} has no exact rewrite here")
        if _returns_fresh(op):
            fresh.add(node)
    return plan


def _tuple_value(mode: Any, op: OpOverload, args: tuple[Any, ...], out: Any, cache: dict) -> Any:
    """The fake value of a tuple-returning ``op`` whose item 0 is ``out``.

    An inference batch norm's other two outputs are empty: their values depend only on
    the dtypes and device, so one fake run serves every batch norm of the graph (a fake
    run with symbolic shapes costs milliseconds; a MobileNet has dozens of them)."""
    if op is aten._native_batch_norm_legit_no_training.default and isinstance(out, torch.Tensor):
        vals = [_val(a) for a in args[:5]]
        key = tuple((v.dtype, v.device) if isinstance(v, torch.Tensor) else None for v in vals)
        if key not in cache:
            cache[key] = tuple(_fake_run(mode, op, args)[1:])
        return (out, *cache[key])
    return _fake_run(mode, op, args)


def _emit(
    mode: Any, graph: fx.Graph, node: fx.Node, arg: Any, replaced: dict[fx.Node, fx.Node]
) -> Any:
    """``arg`` with each :class:`_Emit` in it inserted as a node (before ``node``)."""
    if isinstance(arg, list | tuple):
        return type(arg)(_emit(mode, graph, node, a, replaced) for a in arg)
    if isinstance(arg, fx.Node):
        return replaced.get(arg, arg)
    if not isinstance(arg, _Emit):
        return arg
    args = tuple(_emit(mode, graph, node, a, replaced) for a in arg.args)
    step = graph.call_function(arg.op, args)
    step.meta.update({k: v for k, v in node.meta.items() if k != "val"})
    if arg.op in _SHAPE_OPS or arg.op in _SHAPE_ARITHMETIC:  # sizes: plain (Sym)int math
        step.meta["val"] = arg.op(*fx.node.map_aggregate(args, _val))
    else:
        step.meta["val"] = _fake_run(mode, arg.op, args)
    return step


def _emitted_ops(args: Any) -> list[Any]:
    if isinstance(args, list | tuple):
        return [op for a in args for op in _emitted_ops(a)]
    if isinstance(args, _Emit):
        return [args.op, *_emitted_ops(args.args)]
    return []


def _apply(gm: fx.GraphModule, plan: list[Any], mode: Any) -> None:
    graph = gm.graph
    replaced: dict[fx.Node, fx.Node] = {}
    stats: dict[Any, tuple[Any, ...]] = {}
    for node, op, args, kwargs, result in plan:
        kwargs = fx.node.map_arg(kwargs, lambda n: replaced.get(n, n))
        with graph.inserting_before(node):
            args = _emit(mode, graph, node, tuple(args), replaced)
            new = graph.call_function(op, args, kwargs)
            meta = {k: v for k, v in node.meta.items() if k != "val"}
            if result == "getitem0":
                new.meta.update(meta)
                new.meta["val"] = _tuple_value(mode, op, args, node.meta.get("val"), stats)
                item = graph.call_function(operator.getitem, (new, 0))
                item.meta.update(meta)
                item.meta["val"] = node.meta.get("val")
                out = item
            else:
                new.meta.update(node.meta)
                out = new
        node.replace_all_uses_with(out)
        replaced[node] = out
        graph.erase_node(node)
    graph.lint()
    gm.recompile()


def lower(
    program: ExportedProgram, table: dict[Any, Any], keep: Sequence[Any]
) -> fx.GraphModule | None:
    """``program`` unlifted and lowered to the ops ``run_decompositions(table)`` would
    give, or ``None`` where that cannot be done exactly without re-tracing.

    ``keep`` are the ops removed from the default table (kept whole)."""
    gm = program.module()  # a copy: giving up at any point leaves the program as it was
    try:
        mode = fake_mode_of(gm)
        if mode is None:
            return None  # no fake values to build new ones from
        _apply(gm, _plan(gm, table, frozenset(keep), mode), mode)
    except Exception:  # _GiveUp, or e.g. another torch's fake tensors refusing a value:
        return None  # re-trace (the tests assert the rewrite fires on the zoo: nothing hides)
    return gm
