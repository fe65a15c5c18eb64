"""Helpers for reading and rewriting the captured FX graph.

The compiler works on the *unlifted* ``GraphModule`` of a ``torch.export``
program: parameters and buffers are ``get_attr`` nodes, every node carries a
fake tensor in ``meta["val"]``, and the graph is core ATen (functional, no
in-place ops) except for the ops the capture keeps whole (see capture.py).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor

aten = torch.ops.aten


def is_call(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def val(node: fx.Node) -> Any:
    """The fake value (tensor or tuple) export recorded for ``node``."""
    return node.meta.get("val")


def shape(node: fx.Node) -> tuple[Any, ...]:
    v = val(node)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"node {node.name} carries no tensor value")
    return tuple(v.shape)


def get_tensor(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The real tensor behind a ``get_attr`` node."""
    if node.op != "get_attr":
        raise TypeError(f"node {node.name} is not a constant (op {node.op})")
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def set_constant(gm: fx.GraphModule, target: str, tensor: torch.Tensor) -> None:
    """Replace the tensor a ``get_attr`` target names, keeping what it is: a parameter
    (frozen), a buffer, or a plain attribute (``torch.export``'s lifted constants)."""
    owner_path, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        setattr(owner, leaf, tensor)


def add_constant(
    gm: fx.GraphModule,
    tensor: torch.Tensor,
    hint: str,
    before: fx.Node,
    source: Any = None,
) -> fx.Node:
    """Register ``tensor`` as a buffer of ``gm`` and return a ``get_attr`` node for it.

    ``source``: the constant (its ``get_attr`` node or target) this one was derived from
    — a folded or sliced weight remembers the model parameter it came from
    (:func:`constant_source`)."""
    base = "_sf_" + "".join(c if c.isalnum() else "_" for c in hint)
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, tensor.detach().contiguous(), persistent=True)
    if source is not None:
        src = str(source.target) if isinstance(source, fx.Node) else str(source)
        sources = gm.meta.setdefault("sf_sources", {})
        sources[name] = sources.get(src, src)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    mode = fake_mode_of(gm)
    if mode is not None:
        node.meta["val"] = mode.from_tensor(getattr(gm, name), static_shapes=True)
    return node


def constant_source(gm: fx.GraphModule, node: Any) -> str | None:
    """The model parameter a ``get_attr`` constant derives from (its own target for an
    original one), or None for something that is not a constant."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    target = str(node.target)
    return gm.meta.get("sf_sources", {}).get(target, target)


def fake_mode_of(gm: fx.GraphModule) -> Any:
    """The fake mode of ``gm``'s values (the tracing context's or an active one first, as
    ``detect_fake_mode`` has it). One fake value says which: every pass that adds a
    constant or infers a value asks, and handing ``detect_fake_mode`` every value of the
    graph each time made those passes quadratic (4 of the 16 s of an int8 DeepLab v3+
    compile)."""
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, FakeTensor):
            return detect_fake_mode([v])
    return detect_fake_mode([])


def _to_fake(x: Any) -> Any:
    if isinstance(x, fx.Node):
        return x.meta.get("val")
    if isinstance(x, list | tuple):
        return type(x)(_to_fake(v) for v in x)
    return x


def infer_val(gm: fx.GraphModule, node: fx.Node) -> None:
    """Compute ``meta["val"]`` of a new call_function node from its inputs' fake values."""
    mode = fake_mode_of(gm)
    args = _to_fake(node.args)
    kwargs = {k: _to_fake(v) for k, v in node.kwargs.items()}
    if mode is None:
        raise RuntimeError("the graph carries no fake values; cannot infer shapes")
    # The Python dispatcher gives ops with symbolic sizes the same meta kernels
    # torch.export used (some C++ composites need concrete sizes otherwise).
    with enable_python_dispatcher(), mode:
        node.meta["val"] = node.target(*args, **kwargs)


def replace_chain(
    gm: fx.GraphModule,
    last: fx.Node,
    target: Callable[..., Any],
    args: tuple[Any, ...],
    absorbed: Iterable[fx.Node],
) -> fx.Node:
    """Insert ``target(*args)`` before ``last``, route ``last``'s users to it, erase ``absorbed``.

    ``absorbed`` lists the replaced nodes (``last`` included) in any order; each
    must have no users left outside the chain once ``last`` is rerouted.
    """
    with gm.graph.inserting_before(last):
        new = gm.graph.call_function(target, args)
    new.meta.update({k: v for k, v in last.meta.items() if k in ("stack_trace", "nn_module_stack")})
    infer_val(gm, new)
    last.replace_all_uses_with(new)
    erase_dead(gm, absorbed)
    return new


def erase_dead(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> None:
    """Erase the given nodes that have no users, repeatedly (reverse topological)."""
    pending = list(nodes)
    changed = True
    while changed:
        changed = False
        for n in list(pending):
            if not n.users and n.graph is gm.graph:
                gm.graph.erase_node(n)
                pending.remove(n)
                changed = True


def single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def getitem_users(node: fx.Node, index: int) -> list[fx.Node]:
    return [u for u in node.users if u.target is operator.getitem and u.args[1] == index]


def _bookkeeping(node: fx.Node) -> bool:
    """Nodes that move no data: tuple indexing, and layout fixes that are no-ops
    whenever the op before them already wrote NHWC (see passes/layout.py)."""
    from segfast.compiler.ops import to_nhwc

    return node.target is operator.getitem or node.target is to_nhwc


def call_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes that do work (call_function other than bookkeeping)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and not _bookkeeping(n)]


def concrete(x: Any) -> int:
    """An int from an int or a SymInt (its hint, for dynamic shapes)."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        hint = x.node.hint
        if hint is None:
            raise ValueError(f"symbolic size {x} has no hint")
        return int(hint)
    return int(x)


def nbytes(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        n = 1
        for d in v.shape:
            n *= concrete(d)
        return n * v.element_size()
    if isinstance(v, list | tuple):
        return sum(nbytes(x) for x in v)
    return 0


def _is_view(node: fx.Node) -> bool:
    if _bookkeeping(node):
        return True
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def activation_bytes(gm: fx.GraphModule) -> int:
    """Estimated activation bytes read + written by one run of the graph.

    Each op reads its tensor inputs that are activations (not constants) and
    writes its outputs; views move no bytes. Derived from shapes and dtypes.
    """
    total = 0
    for n in gm.graph.nodes:
        if n.op != "call_function" or _is_view(n):
            continue
        total += nbytes(val(n))
        for a in n.all_input_nodes:
            if a.op != "get_attr":
                total += nbytes(val(a))
    return total
