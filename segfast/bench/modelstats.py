"""Static facts about a model on one input: parameters, FLOPs, activation memory.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add
counts as 2 FLOPs; convolutions, matrix products and their transposes are
counted, element-wise ops are not). Activation memory is measured by a dispatch
mode that watches every ATen op: *written* is the sum of the bytes of every
freshly allocated output (views and in-place results excluded), *peak* the
largest sum of activation bytes alive at one time (input included, weights not).
Both run on the ``meta`` device where every op supports it, so even a
1024×2048 FCN is analysed in well under a second; otherwise on the CPU.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from segfast._warnings import quiet_torch_internals


@dataclass(frozen=True)
class ModelStats:
    params: int
    param_bytes: int
    flops: int  # per forward of the given batch; 2 FLOPs per multiply-add
    activation_bytes_written: int
    activation_bytes_peak: int
    device: str  # where the analysis ran: "meta" or "cpu"

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


class _ActivationTracker(TorchDispatchMode):
    """Counts bytes of fresh op outputs and the peak of live activation bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.live = 0
        self.peak = 0

    def track(self, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._free, nbytes)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place result: no new memory
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.written += t.numel() * t.element_size()
                self.track(t)
        return out


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to_device(o, device) for o in obj)
    return obj


def _analyse(model: nn.Module, inputs: tuple[Any, ...]) -> tuple[int, int, int]:
    tracker = _ActivationTracker()
    flop_mode = FlopCounterMode(display=False)
    with torch.no_grad(), flop_mode, tracker:
        for t in tree_leaves(inputs):
            if isinstance(t, torch.Tensor):
                tracker.track(t)
        out = model(*inputs)
        del out
    return flop_mode.get_total_flops(), tracker.written, tracker.peak


def model_stats(model: nn.Module, inputs: tuple[Any, ...] | torch.Tensor) -> ModelStats:
    """Parameters, FLOPs and activation memory of ``model(*inputs)`` in eval mode.

    ``inputs`` is only used for its shapes and dtypes: the analysis runs on
    copies on the ``meta`` device when every op supports it.
    """
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    params = {id(p): p for p in model.parameters()}
    n_params = sum(p.numel() for p in params.values())
    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    was_training = model.training
    model.eval()
    try:
        try:
            meta_model = _meta_copy(model)
            flops, written, peak = _analyse(meta_model, _to_device(inputs, torch.device("meta")))
            where = "meta"
        except (NotImplementedError, RuntimeError):
            # An op without a meta kernel: measure on the CPU instead.
            cpu_inputs = _to_device(inputs, torch.device("cpu"))
            flops, written, peak = _analyse(model, cpu_inputs)
            where = "cpu"
    finally:
        model.train(was_training)
    return ModelStats(n_params, param_bytes, flops, written, peak, where)


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device."""
    import copy

    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        memo[id(t)] = (
            t.to("meta")
            if not isinstance(t, nn.Parameter)
            else nn.Parameter(t.detach().to("meta"), requires_grad=t.requires_grad)
        )
    with quiet_torch_internals():
        return copy.deepcopy(model, memo)
