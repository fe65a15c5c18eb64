"""Calibration: run the fused graph over example inputs and observe every quantizable
layer's input.

The graph runs in fp32 with its composite implementations (any device). For a
two-source conv the observer sees what the conv reads — ``x`` and the resized
``x2`` — so the one scale covers the joined input.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx

from segfast.compiler import ops
from segfast.compiler.quant.apply import quantizable
from segfast.compiler.quant.observers import Observer, make_observer

segfast = torch.ops.segfast


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, observers: dict[str, Observer]) -> None:
        super().__init__(gm)
        self.observers = observers

    def run_node(self, n: fx.Node) -> Any:
        obs = self.observers.get(n.name)
        if obs is not None:
            args, _ = self.fetch_args_kwargs_from_env(n)
            x = args[0]
            obs.update(x)
            if n.target is segfast.conv2d.default and args[11] is not None:
                x2, resize, align, sh, sw = args[11], args[12], args[13], args[14], args[15]
                if resize != "none":
                    x2 = ops.resize_like_aten(x2, x.shape[-2:], resize, align, sh, sw)
                obs.update(x2)
        return super().run_node(n)


def calibrate(
    gm: fx.GraphModule,
    sets: Iterable[Sequence[torch.Tensor]],
    *,
    method: str = "percentile",
    percentile: float = 99.99,
) -> tuple[dict[str, float], int]:
    """Run ``gm`` on every input set; return ({layer: amax of its input}, sets seen)."""
    observers = {
        n.name: make_observer(method, percentile) for n in gm.graph.nodes if quantizable(n)
    }
    seen = 0
    recorder = _Recorder(gm, observers)
    with torch.inference_mode():
        for s in sets:
            recorder.run(*s)
            seen += 1
    return {name: o.amax() for name, o in observers.items()}, seen
