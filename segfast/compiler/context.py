"""State shared by the passes of one compilation."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx

from segfast.compiler.patterns import FUSIONS


@dataclass
class PassContext:
    gm: fx.GraphModule
    output: str = "logits"  # "logits" | "probs" | "mask"
    dtype: torch.dtype = torch.float32  # compute precision
    # What the backend that will run the graph can take (see backends/base.py).
    slice_outputs: bool = False  # producers may write into channel slices of a buffer
    fired: Counter[str] = field(default_factory=Counter)
    passes_run: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def record(self, fusion: str, n: int = 1) -> None:
        if fusion not in FUSIONS:
            raise KeyError(f"fusion {fusion!r} is not in the pattern table")
        self.fired[fusion] += n
