"""What the runtimes (video, tiling) need to know about an engine, read once.

An :class:`EngineIO` holds an engine's input geometry (channels, a static or
dynamic height/width, its batch) and output kind, and converts what the engine
returns into class probabilities or a class mask with the engine's own
semantics (:mod:`segfast.outputs`): softmax / argmax over the
class dimension, or, for one-class models, sigmoid / ``sigmoid > threshold``.

Any object with the :class:`~segfast.runtime.engine.Engine` attributes used
here (``info``, ``device``, ``__call__``) works, so wrappers around an engine
(a test's slowed-down engine, a user's instrumented one) run in the runtimes too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from segfast.errors import InputError
from segfast.outputs import OUTPUTS


@dataclass(frozen=True)
class EngineIO:
    """An engine's input geometry and output kind (see the module docstring)."""

    channels: int
    # (height, width) of a static engine; None where either axis is dynamic.
    static_hw: tuple[int, int] | None
    height_range: tuple[int, int]  # what the engine accepts (lo == hi when static)
    width_range: tuple[int, int]
    batch: int | None  # a static batch; None when the batch is dynamic
    batch_range: tuple[int, int]
    input_dtype: torch.dtype
    output: str  # "logits" | "probs" | "mask"
    num_classes: int | None
    threshold: float
    device: torch.device

    @classmethod
    def of(cls, engine: Any) -> EngineIO:
        """Read an engine's geometry; raise :class:`InputError` for engines the runtimes
        cannot drive (several inputs, not an image input)."""
        info = getattr(engine, "info", None)
        if info is None or not hasattr(info, "inputs"):
            raise InputError(
                f"engine must be a segfast.Engine (from segfast.compile or segfast.load), "
                f"got {type(engine).__name__}"
            )
        if len(info.inputs) != 1:
            raise InputError(
                f"the runtimes drive engines with one image input, this one takes "
                f"{len(info.inputs)}"
            )
        spec = info.inputs[0]
        if len(spec.shape) != 4:
            raise InputError(
                f"the runtimes need an engine with an N×C×H×W image input, this one takes "
                f"shape {tuple(spec.shape)}"
            )
        if info.output not in OUTPUTS:
            raise InputError(f"engine output must be one of {OUTPUTS}, got {info.output!r}")
        n, c, h, w = (int(d) for d in spec.shape)
        dyn = dict(spec.dynamic)
        h_rng = tuple(dyn["height"]) if "height" in dyn else (h, h)
        w_rng = tuple(dyn["width"]) if "width" in dyn else (w, w)
        b_rng = tuple(dyn["batch"]) if "batch" in dyn else (n, n)
        static = None if ("height" in dyn or "width" in dyn) else (h, w)
        return cls(
            channels=c,
            static_hw=static,
            height_range=(int(h_rng[0]), int(h_rng[1])),
            width_range=(int(w_rng[0]), int(w_rng[1])),
            batch=None if "batch" in dyn else n,
            batch_range=(int(b_rng[0]), int(b_rng[1])),
            input_dtype=spec.torch_dtype,
            output=info.output,
            num_classes=info.num_classes,
            threshold=engine_threshold(engine),
            device=torch.device(info.device),
        )

    def check_hw(self, hw: tuple[int, int], what: str) -> None:
        """Raise :class:`InputError` if the engine does not take an input of ``hw``."""
        (hlo, hhi), (wlo, whi) = self.height_range, self.width_range
        if not (hlo <= hw[0] <= hhi and wlo <= hw[1] <= whi):
            if self.static_hw is not None:
                raise InputError(
                    f"{what} is {hw[0]}×{hw[1]}, but this static engine takes only "
                    f"{self.static_hw[0]}×{self.static_hw[1]} inputs"
                )
            raise InputError(
                f"{what} is {hw[0]}×{hw[1]}; this engine takes heights {hlo}..{hhi} and "
                f"widths {wlo}..{whi}"
            )

    def to_probs(self, out: torch.Tensor) -> torch.Tensor:
        """Engine output [N, K, h, w] (logits or probs) → fp32 probabilities [N, K, h, w]."""
        if self.output == "mask":
            raise InputError(
                "this engine outputs class masks, not probabilities; compile it with "
                "output='probs' or output='logits'"
            )
        if out.dim() != 4:
            raise InputError(f"engine returned shape {tuple(out.shape)}, expected N×K×H×W")
        out = out.float()
        if self.output == "probs":
            return out
        return torch.sigmoid(out) if out.shape[1] == 1 else torch.softmax(out, dim=1)

    def to_mask(self, out: torch.Tensor, *, probs: bool = False) -> torch.Tensor:
        """Engine output → uint8 (int32 above 256 classes) class mask [N, h, w].

        ``probs=True`` says ``out`` holds probabilities already (from :meth:`to_probs`),
        whatever the engine's own output kind.
        """
        kind = "probs" if probs else self.output
        if kind == "mask":
            if out.dim() != 3:
                raise InputError(f"engine returned shape {tuple(out.shape)}, expected N×H×W")
            return out
        if out.dim() != 4:
            raise InputError(f"engine returned shape {tuple(out.shape)}, expected N×K×H×W")
        k = int(out.shape[1])
        dtype = torch.uint8 if k <= 256 else torch.int32
        if k > 1:
            return out.argmax(dim=1).to(dtype)
        if kind == "probs":
            return (out[:, 0].float() > self.threshold).to(dtype)
        # sigmoid(x) > t  ⇔  x > logit(t): no sigmoid over the whole map.
        t = self.threshold
        cut = math.inf if t >= 1.0 else -math.inf if t <= 0.0 else math.log(t / (1.0 - t))
        return (out[:, 0].float() > cut).to(dtype)


def engine_threshold(engine: Any) -> float:
    """The one-class probability threshold an engine was compiled with
    (``segfast.compile(threshold=)``, kept in ``EngineInfo`` and in engine files);
    objects that are not segfast engines use compile's default, 0.5."""
    info_t = getattr(getattr(engine, "info", None), "threshold", None)
    return 0.5 if info_t is None else float(info_t)
