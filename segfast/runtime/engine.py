"""``Engine``: a compiled model — call it, read its summary, save it.

An engine has one backend, one precision, one output kind ("logits", "probs"
or "mask") and one device. Inputs are checked before they reach the backend:
count, type, dtype, rank, channels, device, and the shape of a static engine.

The runtime runs engines and builds none: an ``Engine`` is a backend's
:class:`~segfast.backends.base.Runner` plus the :class:`EngineInfo` the builder
(:func:`segfast.compile`) wrote down, and the :class:`EngineSource` that
``save`` writes. Loading a file rebuilds the engine, which is a build: that is
:func:`segfast.load`, beside ``compile``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from segfast.backends.base import Runner
from segfast.errors import EngineFileError, InputError
from segfast.precision import DTYPES, compute_dtype
from segfast.stats import format_bytes


@dataclass
class InputSpec:
    shape: tuple[int, ...]  # the example shape the engine was built with
    dtype: str  # torch dtype name, e.g. "float32" / "int64"
    # dynamic axes ("batch", "height", "width") -> (min, max) the engine accepts
    dynamic: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class EngineInfo:
    backend: str
    precision: str
    output: str
    device: str
    inputs: list[InputSpec]
    num_classes: int | None = None
    threshold: float = 0.5  # mask threshold of one-class models (sigmoid > threshold)
    build_seconds: float = 0.0
    passes: list[str] = field(default_factory=list)
    fusions: dict[str, int] = field(default_factory=dict)
    # fusion name -> "pattern  →  what replaced it", from the compiler's pattern table
    fusion_patterns: dict[str, str] = field(default_factory=dict)
    ops_before: int | None = None
    ops_after: int | None = None
    bytes_before: int | None = None
    bytes_after: int | None = None
    notes: list[str] = field(default_factory=list)
    choice: list[dict[str, Any]] = field(default_factory=list)  # auto: what was measured
    # int8 engines: every quantizable layer (name, kind, amax, int8, reason, sensitivity)
    int8_layers: list[dict[str, Any]] = field(default_factory=list)
    # int8 engines: what the rest runs in (fallback layers, head, resizes): fp32/fp16/bf16
    int8_float: str = "fp32"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EngineSource:
    """What ``Engine.save`` writes besides the info, so that ``segfast.load`` can rebuild.

    ``program`` returns the ``torch.export`` program the engine was built from. The
    builder hands it over: graph backends captured it already; for the others the
    builder's own capture runs on the first save (and only then), so the runtime
    writes a file without knowing how to build one.
    """

    program: Callable[[], torch.export.ExportedProgram]
    dynamic: tuple[str, ...] = ()  # the dynamic axes compile was asked for
    options: dict[str, Any] = field(default_factory=dict)  # the backend options
    model_spec: dict[str, Any] | None = None  # a zoo model's ``segfast_spec`` (name, options)


class Engine:
    """A compiled, checked model. Build with :func:`segfast.compile`, load with
    :func:`segfast.load`."""

    def __init__(
        self, runner: Runner, info: EngineInfo, source: EngineSource | None = None
    ) -> None:
        self._runner = runner
        self.info = info
        self.source = source  # what save() writes; None: the engine cannot be saved

    # -- properties -----------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self.info.backend

    @property
    def precision(self) -> str:
        return self.info.precision

    @property
    def output(self) -> str:
        return self.info.output

    @property
    def device(self) -> torch.device:
        return torch.device(self.info.device)

    @property
    def dtype(self) -> torch.dtype:
        if self.info.precision == "int8":  # the float part's dtype: what the output has
            return DTYPES[self.info.int8_float]
        return compute_dtype(self.info.precision)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.info.inputs[0].shape

    # -- running ----------------------------------------------------------------------
    def check_inputs(self, inputs: tuple[Any, ...]) -> None:
        """Raise :class:`InputError` naming the problem if ``inputs`` don't fit."""
        specs = self.info.inputs
        if len(inputs) != len(specs):
            raise InputError(f"engine takes {len(specs)} input(s), got {len(inputs)}")
        for i, (t, spec) in enumerate(zip(inputs, specs, strict=True)):
            name = f"input {i}" if len(specs) > 1 else "input"
            if not isinstance(t, torch.Tensor):
                hint = " (convert with torch.from_numpy)" if type(t).__module__ == "numpy" else ""
                raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}{hint}")
            want_float = spec.torch_dtype.is_floating_point
            if want_float and not t.is_floating_point():
                raise InputError(
                    f"{name} must be a floating-point tensor, got {t.dtype}"
                    + (
                        " (uint8 frames: normalise them first, e.g. segfast.kernels.preprocess)"
                        if t.dtype == torch.uint8
                        else ""
                    )
                )
            if not want_float and t.is_floating_point():
                raise InputError(f"{name} must be an integer tensor ({spec.dtype}), got {t.dtype}")
            if t.dim() != len(spec.shape):
                raise InputError(
                    f"{name} must be {len(spec.shape)}-D like {_fmt(spec.shape)}, "
                    f"got shape {_fmt(t.shape)}"
                )
            for d, (got, want) in enumerate(zip(t.shape, spec.shape, strict=True)):
                what = _dim_name(d)
                if what in spec.dynamic:
                    lo, hi = spec.dynamic[what]
                    if not lo <= got <= hi:
                        raise InputError(f"{name} {what} is {got}; this engine takes {lo} to {hi}")
                    continue
                if got != want:
                    extra = _static_hint(i, d, t.dim(), spec)
                    raise InputError(
                        f"{name} {what} is {got}, engine expects {want}: shape {_fmt(t.shape)} vs "
                        f"{_fmt(spec.shape)}{extra}"
                    )
            if t.device != self.device:
                raise InputError(
                    f"{name} is on {t.device}, the engine runs on {self.device}; move it first"
                )

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.check_inputs(inputs)
        return self._runner(*inputs)

    def run_unchecked(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Call the backend without input checks (hot loops that checked once)."""
        return self._runner(*inputs)

    def segment_large(self, image: Any, **kw: Any) -> Any:
        """Overlap-tile inference for images of any size; see :mod:`segfast.runtime.tiling`."""
        from segfast.runtime import tiling

        return tiling.segment_large(self, image, **kw)

    # -- reporting --------------------------------------------------------------------
    def summary(self) -> str:
        i = self.info
        lines = [
            f"segfast engine: backend {i.backend}, precision {i.precision}, output {i.output}, "
            f"device {i.device}",
        ]
        for k, spec in enumerate(i.inputs):
            dyn = (
                " (dynamic: "
                + ", ".join(f"{a} {lo}..{hi}" for a, (lo, hi) in spec.dynamic.items())
                + ")"
                if spec.dynamic
                else " (static)"
            )
            lines.append(f"input {k}: {_fmt(spec.shape)} {spec.dtype}{dyn}")
        if i.passes:
            lines.append("passes: " + ", ".join(i.passes))
        if i.fusions:
            lines.append("fusions fired:")
            for name, n in sorted(i.fusions.items()):
                lines.append(f"  {name:20s} {n:4d}  {i.fusion_patterns.get(name, '')}".rstrip())
        elif i.passes:
            lines.append("fusions fired: none")
        if i.ops_before is not None:
            lines.append(f"ops: {i.ops_before} → {i.ops_after}")
        if i.bytes_before is not None:
            lines.append(
                f"activation bytes read+written per run (estimated): "
                f"{format_bytes(i.bytes_before)} → {format_bytes(i.bytes_after or 0)}"
            )
        if i.int8_layers:
            floats = [x for x in i.int8_layers if not x["int8"]]
            lines.append(
                f"int8: {len(i.int8_layers) - len(floats)} of {len(i.int8_layers)} convolutions "
                f"on int8, the rest in {i.int8_float}"
                + (f"; kept in floating point ({i.int8_float}):" if floats else "")
            )
            for x in floats:
                lines.append(f"  {x['name']:28s} {x['kind']:32s} {x['reason']}")
        lines.append(f"build: {i.build_seconds:.2f} s")
        for c in i.choice:
            status = f"{c['ms']:.2f} ms" if c.get("ms") is not None else c.get("reason", "")
            mark = "*" if c.get("chosen") else " "
            lines.append(f" {mark} auto candidate {c['backend']:12s} {status}")
        for note in i.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    # -- files ------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save to one safetensors file (weights + JSON header; no pickle), atomically.

        See :mod:`segfast.runtime.engine_file` for the format; :func:`segfast.load`
        reads it back and says what loading checks.
        """
        from segfast.runtime import engine_file

        if self.source is None:
            raise EngineFileError(
                "this engine cannot be saved: it was not built by segfast.compile "
                "(it has no captured program to write)"
            )
        return engine_file.save(self, path)

    def fusion_counts(self) -> Counter[str]:
        return Counter(self.info.fusions)

    def __repr__(self) -> str:
        i = self.info
        return (
            f"Engine(backend={i.backend!r}, precision={i.precision!r}, output={i.output!r}, "
            f"device={i.device!r}, input={_fmt(self.input_shape)})"
        )


def _fmt(shape: Any) -> str:
    return "×".join(str(int(d)) for d in shape)


def _static_hint(index: int, d: int, ndim: int, spec: InputSpec) -> str:
    """How to compile an engine that takes other sizes of a static dimension ``d``."""
    if d == 0:
        return " (the batch is static: compile with dynamic=['batch', ...] for other batches)"
    if index == 0 and ndim == 4 and d >= 2:
        if spec.dynamic:
            what = _dim_name(d)
            return f" (the {what} is static: compile with dynamic=[..., {what!r}] for others)"
        return " (this engine is static: compile with dynamic=True for other sizes)"
    return ""


def _dim_name(d: int) -> str:
    return {0: "batch", 1: "channels", 2: "height", 3: "width"}.get(d, f"dim {d}")
