"""What an engine returns: the model's primary output, then the head reduction.

A leaf every layer shares: the compiler appends this reduction to the graph
(``segfast.head``), the exporters write it into ONNX, the runtimes read an
engine's output by it, and ``segfast.check`` judges engines against
:class:`WithHead` — one meaning of ``output=`` everywhere.

``primary_output`` picks one tensor from whatever a model returns (a tensor; a
dict — its ``"out"`` entry, as torchvision's segmentation models name it, else
its first value; a tuple or list — its first element). ``head_mode`` maps the
engine's ``output=`` to the reduction; binary models (one logit channel) get a
sigmoid and a 0.5 threshold instead of a softmax and an argmax.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

OUTPUTS = ("logits", "probs", "mask")


def primary_output(out: Any) -> torch.Tensor:
    while not isinstance(out, torch.Tensor):
        if isinstance(out, dict):
            if not out:
                raise ValueError("the model returned an empty dict")
            out = out["out"] if "out" in out else next(iter(out.values()))
        elif isinstance(out, list | tuple):
            if not out:
                raise ValueError("the model returned an empty sequence")
            out = out[0]
        else:
            raise TypeError(f"the model returned a {type(out).__name__}, not a tensor")
    return out


def head_mode(output: str, num_classes: int) -> str:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if output == "logits":
        return "logits"
    if output == "probs":
        return "sigmoid" if num_classes == 1 else "softmax"
    return "threshold" if num_classes == 1 else "argmax"


def mask_dtype(num_classes: int) -> str:
    return "uint8" if num_classes <= 256 else "int32"


def reduce_reference(logits: torch.Tensor, output: str, threshold: float = 0.5) -> torch.Tensor:
    """Plain PyTorch post-processing, identical in meaning to ``segfast.head``."""
    if output == "logits":
        return logits
    mode = head_mode(output, logits.shape[1])
    if mode == "softmax":
        return torch.softmax(logits, dim=1)
    if mode == "sigmoid":
        return torch.sigmoid(logits)
    dtype = torch.uint8 if logits.shape[1] <= 256 else torch.int32
    if mode == "argmax":
        return logits.argmax(dim=1).to(dtype)
    return (torch.sigmoid(logits[:, 0].float()) > threshold).to(dtype)


class WithHead(nn.Module):
    """``model`` followed by the primary-output selection and the reduction."""

    def __init__(self, model: nn.Module, output: str = "logits", threshold: float = 0.5) -> None:
        super().__init__()
        self.model = model
        self.output = output
        self.threshold = threshold

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return reduce_reference(primary_output(self.model(*inputs)), self.output, self.threshold)
