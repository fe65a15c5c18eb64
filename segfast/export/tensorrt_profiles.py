"""An ONNX file's inputs, and the optimisation profiles and types a TensorRT build gives them.

:func:`onnx_inputs` reads a file's real inputs (dims, ``None`` where dynamic; numpy dtype
names) without its external weights; :func:`resolve_profiles` turns them, the example
shapes and the ranges the ONNX export proved into one (min, opt, max)
:class:`~segfast.edge.sidecar.Profile` per input; :func:`check_precision` refuses a
strongly typed build whose precision is not the graph's. Used by
:func:`segfast.export.tensorrt.build_engine`; runs without TensorRT.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from segfast.edge.sidecar import Profile
from segfast.errors import BackendUnavailable, InputError


@dataclass(frozen=True)
class OnnxInput:
    """A graph input of an ONNX file: name, dims (None where dynamic/symbolic), dtype."""

    name: str
    dims: tuple[int | None, ...]
    dtype: str


def _load_onnx(path: str | os.PathLike[str]) -> Any:
    """An ONNX file's graph and metadata, without its external weights."""
    try:
        import onnx
    except ImportError:
        raise BackendUnavailable(
            "reading ONNX files needs the onnx package: pip install 'segfast[onnx]'"
        ) from None
    return onnx.load(str(path), load_external_data=False)


def onnx_inputs(path: str | os.PathLike[str]) -> list[OnnxInput]:
    """The real inputs (not initializers) of an ONNX file, with numpy dtype names."""
    import onnx

    model = _load_onnx(path)
    init = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in init:
            continue
        t = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        out.append(OnnxInput(vi.name, dims, dtype))
    return out


def _as_profile(name: str, value: Profile | Sequence[Sequence[int]]) -> Profile:
    if isinstance(value, Profile):
        return value
    try:
        lo, opt, hi = value
        return Profile(*(tuple(int(d) for d in s) for s in (lo, opt, hi)))
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"profile for input {name!r} must be a Profile or (min, opt, max) shapes: {exc}"
        ) from None


_AXES = {0: "batch", 2: "height", 3: "width"}  # dim → the exporter's axis name (4-D inputs)


def _axis(rank: int, dim: int) -> str | None:
    if dim == 0:
        return "batch"
    return _AXES.get(dim) if rank == 4 else None


def resolve_profiles(
    inputs: Sequence[OnnxInput],
    opt_shapes: Mapping[str, Sequence[int]] | None = None,
    profiles: Mapping[str, Profile | Sequence[Sequence[int]]] | None = None,
    *,
    min_size: Sequence[int] | None = None,
    max_size: Sequence[int] | None = None,
    max_batch: int | None = None,
    ranges: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Profile]:
    """One :class:`Profile` per ONNX input.

    Static dims are fixed. An input named in ``profiles`` takes that (min, opt, max),
    which must keep the static dims. Otherwise a dynamic dim takes its opt from
    ``opt_shapes`` (the example input) and its range from: batch (dim 0) → 1 …
    ``max_batch`` (default: opt); height/width of a 4-D input (dims 2, 3) →
    ``min_size`` … ``max_size`` (default: half … twice the opt size); any other dim →
    fixed at opt. ``ranges`` ({"batch" / "height" / "width": (lo, hi)}, what the ONNX
    exporter proved the graph supports) bound the defaults, and a range reaching outside
    them is refused.
    """
    profiles = dict(profiles or {})
    ranges = {k: (int(v[0]), int(v[1])) for k, v in (ranges or {}).items()}
    unknown = set(profiles) - {i.name for i in inputs}
    if unknown:
        raise InputError(
            f"profiles name unknown inputs {sorted(unknown)}; inputs: {[i.name for i in inputs]}"
        )
    out = {}
    for inp in inputs:
        shown = ["?" if d is None else d for d in inp.dims]
        if inp.name in profiles:
            prof = _as_profile(inp.name, profiles[inp.name])
            if len(prof.min) != len(inp.dims) or any(
                d is not None and not lo == d == hi
                for d, lo, hi in zip(inp.dims, prof.min, prof.max, strict=True)
            ):
                raise InputError(
                    f"profile {prof.as_dict()} for input {inp.name!r} does not fit its ONNX "
                    f"shape {shown}"
                )
        elif all(d is not None for d in inp.dims):
            prof = Profile.fixed(inp.dims)  # type: ignore[arg-type]
        else:
            if opt_shapes is None or inp.name not in opt_shapes:
                raise InputError(
                    f"input {inp.name!r} has dynamic dims {shown}: give an example input (its "
                    "shape is the profile's opt) or a profile"
                )
            opt = tuple(int(d) for d in opt_shapes[inp.name])
            if len(opt) != len(inp.dims) or any(
                d is not None and d != o for d, o in zip(inp.dims, opt, strict=True)
            ):
                raise InputError(
                    f"example shape {list(opt)} of input {inp.name!r} does not fit its ONNX "
                    f"shape {shown}"
                )
            lo, hi = list(opt), list(opt)
            for i, d in enumerate(inp.dims):
                if d is not None:
                    continue
                axis = _axis(len(opt), i)
                r_lo, r_hi = ranges.get(axis, (1, 2**31 - 1)) if axis else (opt[i], opt[i])
                if axis == "batch":
                    lo[i], hi[i] = max(1, r_lo), max(opt[i], max_batch or opt[i])
                elif axis is not None:
                    j = i - 2
                    lo[i] = int(min_size[j]) if min_size is not None else max(r_lo, opt[i] // 2)
                    hi[i] = int(max_size[j]) if max_size is not None else min(r_hi, 2 * opt[i])
            try:
                prof = Profile(tuple(lo), opt, tuple(hi))
            except ValueError as exc:
                raise InputError(f"input {inp.name!r}: {exc}") from None
        for i, d in enumerate(inp.dims):
            axis = _axis(len(inp.dims), i)
            if d is None and axis in ranges:
                r_lo, r_hi = ranges[axis]
                if prof.min[i] < r_lo or prof.max[i] > r_hi:
                    raise InputError(
                        f"input {inp.name!r}: the profile's {axis} range {prof.min[i]}…"
                        f"{prof.max[i]} reaches outside {r_lo}…{r_hi}, the range the ONNX "
                        "export supports"
                    )
        out[inp.name] = prof
    return out


def check_precision(inputs: Sequence[OnnxInput], precision: str, where: str) -> None:
    """A strongly typed build runs in the graph's types: fp16 needs fp16 float inputs."""
    want = "float16" if precision == "fp16" else "float32"
    for i in inputs:
        if i.dtype in ("float16", "float32", "bfloat16") and i.dtype != want:
            raise InputError(
                f"{where}: input {i.name!r} is {i.dtype}, but precision={precision!r} needs a "
                f"{want} graph (TensorRT builds it strongly typed): export with "
                f"precision={precision!r}"
            )
