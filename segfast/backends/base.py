"""The interface every backend implements.

A backend turns a :class:`BuildRequest` into a :class:`Runner`: a callable from
the engine's inputs to its single output tensor. Graph backends (``torch``,
``triton``) receive the fused graph; model backends (``eager``, ``inductor``,
``onnxruntime``, ``tensorrt``) receive the model wrapped with its head.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn


@dataclass
class BuildRequest:
    model: nn.Module  # the user's model wrapped with the head reduction (eval mode)
    inputs: tuple[torch.Tensor, ...]  # example inputs, on the engine's device
    device: torch.device
    dtype: torch.dtype  # compute precision
    output: str  # "logits" | "probs" | "mask"
    dynamic: tuple[str, ...]  # dynamic axes
    graph: fx.GraphModule | None = None  # the fused graph (graph backends only)
    # int8 for backends that run the model (onnxruntime, tensorrt): conv module name →
    # the amax its input is quantized at (None: kept in floating point)
    int8_layers: dict[str, float | None] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific
    # backends that export (onnxruntime, tensorrt): compare the exported file with the
    # eager model before building (False only for the int8 guard's fallback trials,
    # which it judges end to end itself)
    verify_export: bool = True


@dataclass
class Runner:
    fn: Callable[..., torch.Tensor]
    notes: list[str] = field(default_factory=list)  # facts for the summary
    cuda_graph: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    # this runner's answer to Backend.propagates_nonfinite, where it differs from its
    # backend's (an int8 engine of a backend whose float kernels propagate NaN: integers
    # carry no NaN); None: the backend's
    propagates_nonfinite: bool | None = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.fn(*inputs)


class Backend(ABC):
    name: str = ""
    uses_graph: bool = False  # needs capture + fusion passes
    slice_outputs: bool = False  # kernels write through arbitrary output strides
    # NaN and ±Inf in the inputs reach the output where the eager model puts them. False
    # for backends whose kernels compute max/min/clip by instructions that turn NaN into
    # a number (oneDNN's fused relu/clip post-ops, segfast's C kernels, ONNX Runtime's
    # and TensorRT's pooling): their engines run non-finite inputs through the eager
    # model instead (segfast.api's guard stage), so a corrupt frame never becomes a
    # confident mask.
    propagates_nonfinite: bool = False
    description: str = ""
    # The ``segfast.compile(..., options={...})`` keys this backend reads. Options are
    # shared by every backend (``auto`` hands them to each candidate), so a key another
    # backend reads is ignored here; a key no backend reads is refused at compile.
    options: tuple[str, ...] = ()

    @abstractmethod
    def availability(self, device: torch.device | None = None) -> tuple[bool, str]:
        """(can run here, one line saying why or why not)."""

    @abstractmethod
    def build(self, req: BuildRequest) -> Runner:
        """Build a runner; raise BackendUnavailable with the reason if it cannot."""


def cast_inputs(inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
