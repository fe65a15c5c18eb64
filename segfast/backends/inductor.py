"""``inductor``: ``torch.compile`` of the model (default mode) — the peer segfast
measures itself against. Compilation happens at build time (two warm-up calls),
so the engine's build seconds include it.

**Each engine gets a compile of its own.** TorchDynamo keeps its compiled frames
per *code object* and gives each at most ``recompile_limit`` (8) graphs before it
silently runs that code eagerly. Every engine's model arrives wrapped in the same
``WithHead.forward`` (and often in the same third-party ``forward``), so the ninth
model compiled in one process used to get no compile at all — and was timed as
``inductor``. The compiled entry point is therefore a function with a code object
of its own per engine (:func:`_own_code`), and the graphs Inductor actually
compiles are counted: a build that compiled no graph raises, and graph breaks are
reported in the engine's notes.
"""

from __future__ import annotations

import copy
import itertools
import types
from collections.abc import Callable
from typing import Any

import torch

from segfast.backends.base import Backend, BuildRequest, Runner, cast_inputs
from segfast.errors import BackendUnavailable

_ENGINES = itertools.count()


def _own_code(model: torch.nn.Module, tag: str) -> Callable[..., Any]:
    """``lambda *xs: model(*xs)`` with a code object no other function shares.

    Dynamo caches compiled frames on the code object; a fresh code object (a copy
    with its own name) gives this engine its own cache and its own recompile budget.
    """

    def forward(*inputs: torch.Tensor) -> Any:
        return model(*inputs)

    names = {"co_name": tag}
    if hasattr(forward.__code__, "co_qualname"):  # Python ≥ 3.11
        names["co_qualname"] = tag
    code = forward.__code__.replace(**names)
    return types.FunctionType(code, forward.__globals__, tag, None, forward.__closure__)


class InductorBackend(Backend):
    name = "inductor"
    propagates_nonfinite = True  # see Backend
    description = "torch.compile of the model (the peer to beat)"

    def availability(self, device: torch.device | None = None) -> tuple[bool, str]:
        if not hasattr(torch, "compile"):
            return False, "this PyTorch has no torch.compile"
        if device is not None and device.type == "cuda":
            try:
                import triton  # noqa: F401
            except ImportError:
                return False, "torch.compile on CUDA needs triton, which is not installed"
        return True, f"torch.compile in PyTorch {torch.__version__}"

    def build(self, req: BuildRequest) -> Runner:
        ok, why = self.availability(req.device)
        if not ok:
            raise BackendUnavailable(f"inductor: {why}")
        from torch._inductor.compile_fx import compile_fx

        model = req.model if req.dtype == torch.float32 else copy.deepcopy(req.model).to(req.dtype)
        graphs: list[int] = []  # op count of every graph Inductor compiled for this engine

        def inductor(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
            graphs.append(sum(n.op == "call_function" for n in gm.graph.nodes))
            return compile_fx(gm, example_inputs)

        entry = _own_code(model, f"segfast_inductor_engine_{next(_ENGINES)}")
        compiled = torch.compile(entry, backend=inductor, dynamic=bool(req.dynamic))
        dtype = req.dtype

        def run(*inputs: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return compiled(*cast_inputs(inputs, dtype))

        try:
            for _ in range(2):  # compile now, not on the user's first frame
                run(*req.inputs)
        except Exception as exc:  # torch.compile fails in many ways; report the cause
            raise BackendUnavailable(
                f"inductor: torch.compile failed on this model: {str(exc).splitlines()[0]}"
            ) from exc
        if not graphs:
            raise BackendUnavailable(
                "inductor: torch.compile compiled no graph for this model (TorchDynamo ran it "
                "eagerly: a recompile limit, or code it skips); it is not timed as inductor"
            )
        notes = ["torch.compile, default mode"]
        if len(graphs) > 1:
            notes.append(
                f"torch.compile split the model into {len(graphs)} graphs (graph breaks); "
                "the code between them runs eagerly"
            )
        return Runner(run, notes=notes, details={"inductor_graphs": list(graphs)})
