"""Exact forms for the calls whose ONNX translation does not compute what PyTorch does.

Found on torch 2.13 + onnxscript 0.7 + ONNX Runtime 1.32 (tests/export/test_onnx_resize.py
sweeps them):

* **nearest resize to a size**: ONNX ``Resize`` maps ``dst → floor(dst / (out/in))``,
  PyTorch ``floor(dst · float32(in/out))``; the two differ by one pixel where
  the product is an integer in exact arithmetic (9×13 → 4×6 at a 14×16 input:
  row 2 reads row 6 instead of 7), static or dynamic.
* **non-power-of-two scale factors**: PyTorch sizes the output as
  ``floor(in · s)`` in float64, ONNX Runtime in float32 (45 · 1.4 → 62 vs 63).
  And where an axis keeps its size (2 · 1.4 → 2) PyTorch's CPU bilinear kernel
  copies it, while ONNX Runtime — and PyTorch's own decomposition — resample
  it with ``1/s``: refused, there is no single result to match.
* **antialiased resize with a scale factor**: the exporter drops the factor and
  samples with ``in/out`` instead of PyTorch's ``1/s``.
* **adaptive average pooling with a dynamic height/width**: PyTorch's
  decomposition, which the exporter runs after ``torch.export``, branches on
  the example's ``H % out`` and bakes that branch (kernel, index tables) into
  the graph; a PSPNet exported at 48×64 fails or is wrong at 37×53. Same for
  adaptive max pooling (exported at 8×8 to 4×4, it returns 6×8 at 12×16).

:class:`ExportRewrites` is a ``TorchFunctionMode`` active while
``torch.export`` traces: it sees each ``F.interpolate`` /
``F.adaptive_avg_pool2d`` call with the user's arguments and either passes it
through (where the translation is exact) or substitutes an exact form built
from the same float32 arithmetic as PyTorch's CPU kernels (gathers at
computed indices; pooling matrices), or refuses with
:class:`~segfast.errors.UnsupportedModelError` naming the call and the
constraint. :func:`audit` then checks the exported program itself, so calls
that reached ATen another way (``torch._C._nn.*``) are held to the same rules.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from segfast.errors import UnsupportedModelError

aten = torch.ops.aten
_INTERPOLATE = inspect.signature(F.interpolate)


def is_power_of_two(s: float) -> bool:
    """``s == 2**k`` for an integer k (0.25, 0.5, 1, 2, 4 …): exact in float32 and float64."""
    return s > 0 and math.frexp(s)[0] == 0.5


def _static(*sizes: Any) -> bool:
    return all(isinstance(s, int) for s in sizes)


# -- nearest -----------------------------------------------------------------------------


def nearest_index(
    in_size: int | torch.SymInt,
    out_size: int | torch.SymInt,
    scale: float | None,
    exact: bool,
    device: torch.device,
) -> torch.Tensor:
    """Source index of each output pixel, as PyTorch's CPU kernel computes it.

    ``nearest``: ``min(floor(dst · s), in − 1)``; ``nearest-exact``:
    ``min(floor((dst + 0.5) · s), in − 1)``, with ``s = float32(1/scale)`` when
    a scale factor was given, else ``float32(in) / out`` — all in float32, the
    kernel's arithmetic. ``nearest`` also copies for ``out == in`` and halves
    for ``out == 2·in`` (the kernel's shortcuts; they only differ from the
    formula when an inexact scale factor is given, which needs static sizes).
    """
    # [out_size] int64
    if not exact and _static(in_size, out_size):
        if out_size == in_size:
            return torch.arange(out_size, device=device)
        if out_size == 2 * in_size:
            return torch.div(torch.arange(out_size, device=device), 2, rounding_mode="floor")
    dst = torch.arange(out_size, dtype=torch.float32, device=device)
    if exact:
        dst = dst + 0.5
    if scale is not None and scale > 0:
        s: Any = float(np.float32(1.0 / scale))
    elif _static(in_size, out_size):
        s = float(np.float32(in_size) / np.float32(out_size))
    else:  # symbolic sizes: the float32 division happens in the graph
        s = torch.scalar_tensor(in_size, dtype=torch.float32, device=device) / torch.scalar_tensor(
            out_size, dtype=torch.float32, device=device
        )
    return torch.floor(dst * s).to(torch.int64).clamp(max=in_size - 1)


def resize_nearest(
    x: torch.Tensor,
    size: tuple[Any, Any],
    scales: tuple[float, float] | None,
    exact: bool,
) -> torch.Tensor:
    """``F.interpolate(mode="nearest"/"nearest-exact")`` as two gathers (ONNX ``Gather``).

    # x: [N, C, H, W] -> [N, C, out_h, out_w]
    """
    sh, sw = scales if scales is not None else (None, None)
    rows = nearest_index(x.shape[-2], size[0], sh, exact, x.device)
    cols = nearest_index(x.shape[-1], size[1], sw, exact, x.device)
    return x.index_select(2, rows).index_select(3, cols)


# -- adaptive average pooling -------------------------------------------------------------


def pooling_matrix(
    size: int | torch.SymInt,
    bins: int | torch.SymInt,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """``[bins, size]`` averaging weights of adaptive pooling along one axis.

    Bin ``i`` averages ``[floor(i·size/bins), ceil((i+1)·size/bins))``, the
    definition of ``F.adaptive_avg_pool2d`` (bins overlap when the size is not
    a multiple, and repeat cells when ``size < bins``). Integer arithmetic on
    ``size`` only, so a symbolic size gives a graph valid for all sizes.
    """
    i = torch.arange(bins, device=device)  # [bins]
    start = torch.div(i * size, bins, rounding_mode="floor")
    end = torch.div((i + 1) * size + bins - 1, bins, rounding_mode="floor")
    j = torch.arange(size, device=device)  # [size]
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])  # [bins, size]
    return inside.to(dtype) / (end - start).to(dtype)[:, None]


def adaptive_avg_pool2d(x: torch.Tensor, output_size: Sequence[Any]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` as ``P_h @ x @ P_wᵀ`` — exact for every input size.

    # x: [N, C, H, W] -> [N, C, out_h, out_w]
    Costs ``2·N·C·H·W·out`` multiply-adds, small beside the convs around it
    (PSPNet's bins are at most 6). A 1×1 output stays a mean (ReduceMean).
    """
    out_h, out_w = output_size
    if _static(out_h, out_w) and out_h == 1 and out_w == 1:
        return x.mean(dim=(-2, -1), keepdim=True)
    ph = pooling_matrix(x.shape[-2], out_h, x.dtype, x.device)  # [out_h, H]
    pw = pooling_matrix(x.shape[-1], out_w, x.dtype, x.device)  # [out_w, W]
    return torch.matmul(torch.matmul(ph, x), pw.transpose(0, 1))


def _pair(v: Any) -> tuple[Any, Any]:
    if isinstance(v, Sequence):
        if len(v) != 2:
            raise ValueError(f"expected two values for a 2-D resize or pool, got {v!r}")
        return v[0], v[1]
    return v, v


# -- the mode -----------------------------------------------------------------------------


class ExportRewrites(TorchFunctionMode):
    """Active during ``torch.export``: exact substitutes, refusals with the reason.

    ``fired`` counts the substitutions made, by name, for the export's notes.
    """

    def __init__(self, dynamic_hw: bool) -> None:
        super().__init__()
        self.dynamic_hw = dynamic_hw
        self.fired: Counter[str] = Counter()

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.interpolate:
            return self._interpolate(func, args, kwargs)
        if func is F.adaptive_avg_pool2d and self.dynamic_hw:
            x, size = _INTERPOLATE_POOL.bind(*args, **kwargs).args
            if x.dim() == 4:
                oh, ow = _pair(size)
                oh = x.shape[-2] if oh is None else oh
                ow = x.shape[-1] if ow is None else ow
                if _static(oh, ow):
                    self.fired["adaptive_avg_pool2d as pooling matrices"] += 1
                    return adaptive_avg_pool2d(x, (oh, ow))
        return func(*args, **kwargs)

    def _interpolate(self, func: Any, args: Sequence[Any], kwargs: dict) -> Any:
        b = _INTERPOLATE.bind(*args, **kwargs)
        b.apply_defaults()
        a = b.arguments
        x, mode = a["input"], a["mode"]
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return func(*args, **kwargs)
        in_h, in_w = x.shape[-2], x.shape[-1]
        static = _static(in_h, in_w)
        call = f"F.interpolate(mode={mode!r}, size={a['size']}, scale_factor={a['scale_factor']})"
        scales: tuple[float, float] | None = None  # what PyTorch samples with (1/scale)
        if a["size"] is not None:
            size = _pair(a["size"])
        elif a["scale_factor"] is not None:
            factors = tuple(float(f) for f in _pair(a["scale_factor"]))
            pow2 = all(map(is_power_of_two, factors))
            if static:  # F.interpolate's own float64 arithmetic
                size = tuple(
                    math.floor(float(d) * f) for d, f in zip((in_h, in_w), factors, strict=True)
                )
            elif pow2:  # floor(d · 2**k) in integers: exact for symbolic d
                size = tuple(
                    d * int(f) if f >= 1 else d // round(1 / f)
                    for d, f in zip((in_h, in_w), factors, strict=True)
                )
            else:
                raise UnsupportedModelError(
                    f"{call} with a dynamic height/width: the output size floor(H·factor) is "
                    "computed in float32 by the ONNX graph/runtime and in float64 by PyTorch, "
                    "and they differ at some sizes (e.g. floor(45·1.4) = 63 vs 62). Use size=, "
                    "a power-of-two factor, or static shapes"
                )
            if a["recompute_scale_factor"] or mode == "area":
                # PyTorch samples with in/out of the computed size, as for size=; passing
                # that size also keeps float size arithmetic out of a dynamic graph.
                args, kwargs = (
                    (x,),
                    {
                        "size": size,
                        "mode": mode,
                        "align_corners": a["align_corners"],
                        "antialias": a["antialias"],
                    },
                )
            else:
                scales = factors  # type: ignore[assignment]
        else:
            return func(*args, **kwargs)  # F.interpolate raises its own error

        pow2_scales = scales is not None and all(map(is_power_of_two, scales))
        if mode in ("nearest", "nearest-exact"):
            if mode == "nearest" and pow2_scales:
                return func(*args, **kwargs)  # Resize with power-of-two scales: exact
            self.fired[f"{mode} resize as exact gathers"] += 1
            return resize_nearest(x, size, scales, exact=mode == "nearest-exact")
        if mode == "area":
            if self.dynamic_hw:
                self.fired["area resize as pooling matrices"] += 1
                return adaptive_avg_pool2d(x, size)
            return func(*args, **kwargs)
        if mode not in ("bilinear", "bicubic") or scales is None:
            return func(*args, **kwargs)  # sizes: the translation is exact
        if a["antialias"]:
            # torch.onnx drops the factor and samples with in/out: exact only when
            # in/out == 1/scale (upscaling by 2**k; or sizes that divide exactly).
            upscale = all(f >= 1 for f in scales) and pow2_scales
            divides = static and all(
                float(o) == float(d) * f for o, d, f in zip(size, (in_h, in_w), scales, strict=True)
            )
            if upscale or divides:
                return func(*args, **kwargs)
            raise UnsupportedModelError(
                f"{call} with antialias=True at {in_h}×{in_w}: torch.onnx drops the scale "
                "factor and resamples with in/out instead of PyTorch's 1/scale, a different "
                "result; pass size= (or recompute_scale_factor=True) instead"
            )
        if pow2_scales:
            return func(*args, **kwargs)  # Resize with power-of-two scales: exact
        kept = [d for d, o in zip((in_h, in_w), size, strict=True) if o == d]
        if mode == "bilinear" and not a["align_corners"] and kept:
            raise UnsupportedModelError(
                f"{call} at {in_h}×{in_w}: an axis keeps its size ({kept[0]} → {kept[0]}); "
                "PyTorch's CPU kernel then copies that axis while its decomposition and ONNX "
                "resample it with 1/scale_factor, so there is no one result to export. Pass "
                "size= instead"
            )
        # Static, non-power-of-two factor: PyTorch's own decomposition with the exact
        # (float64) output size and its 1/scale coordinates, as gathers and lerps.
        op = (
            aten.upsample_bilinear2d.default
            if mode == "bilinear"
            else aten.upsample_bicubic2d.default
        )
        decomposition = torch._decomp.decomposition_table[op]
        self.fired[f"{mode} resize by a non-power-of-two factor as gathers"] += 1
        return decomposition(x, list(size), bool(a["align_corners"]), scales[0], scales[1])


_INTERPOLATE_POOL = inspect.signature(lambda input, output_size: None)


# -- audit of the exported program ---------------------------------------------------------

_NEAREST = (
    aten.upsample_nearest2d.vec,
    aten.upsample_nearest2d.default,
    aten._upsample_nearest_exact2d.vec,
    aten._upsample_nearest_exact2d.default,
)
_ANTIALIAS = (
    aten._upsample_bilinear2d_aa.vec,
    aten._upsample_bilinear2d_aa.default,
    aten._upsample_bicubic2d_aa.vec,
    aten._upsample_bicubic2d_aa.default,
)
_LINEAR = (aten.upsample_bilinear2d.vec, aten.upsample_bicubic2d.vec)
_ADAPTIVE = (
    aten.adaptive_avg_pool2d.default,
    aten._adaptive_avg_pool2d.default,
    aten.adaptive_max_pool2d.default,
)


def _scale_args(node: torch.fx.Node) -> list[float] | None:
    """The scale factors an upsample node carries (``.vec``: a list; ``.default``: h, w)."""
    if node.target.overloadpacket in (  # type: ignore[union-attr]
        aten.upsample_nearest2d,
        aten._upsample_nearest_exact2d,
    ) and str(node.target).endswith(".vec"):
        s = node.args[2] if len(node.args) > 2 else node.kwargs.get("scale_factors")
        return list(s) if s is not None else None
    if str(node.target).endswith(".vec"):
        s = node.args[3] if len(node.args) > 3 else node.kwargs.get("scale_factors")
        return list(s) if s is not None else None
    tail = [a for a in node.args[2:] if isinstance(a, float)]
    return tail or None


def _where(node: torch.fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    return f" (at {lines[-2]}: {lines[-1]})" if len(lines) >= 2 else ""


def audit(program: torch.export.ExportedProgram, dynamic_hw: bool) -> None:
    """Refuse programs with a call whose ONNX translation is not PyTorch's (see the module doc)."""
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        if dynamic_hw and isinstance(node.meta.get("val"), torch.SymFloat):
            raise UnsupportedModelError(
                f"the model computes a shape with floating point ({node.target}){_where(node)}: "
                "with a dynamic height/width the ONNX graph evaluates it in float32 where "
                "PyTorch uses float64, and the sizes differ for some inputs (e.g. "
                "F.interpolate(recompute_scale_factor=True)); compute sizes with integers, or "
                "export static shapes"
            )
        target = node.target
        if target in _NEAREST:
            scales = _scale_args(node)
            plain = str(target).startswith("aten.upsample_nearest2d")
            if plain and scales is not None and all(map(is_power_of_two, scales)):
                continue
            raise UnsupportedModelError(
                f"{target}{_where(node)} reached ATen without segfast's exact rewrite "
                "(only F.interpolate is rewritten): ONNX Resize picks neighbouring source "
                "pixels where PyTorch rounds differently; call F.interpolate instead"
            )
        if target in _ANTIALIAS and _scale_args(node) is not None and dynamic_hw:
            raise UnsupportedModelError(
                f"{target}{_where(node)}: an antialiased resize by a scale factor with a dynamic "
                "height/width resamples with in/out instead of 1/scale in ONNX; pass size="
            )
        if target in _LINEAR and dynamic_hw:
            scales = _scale_args(node)
            if scales is not None and not all(map(is_power_of_two, scales)):
                raise UnsupportedModelError(
                    f"{target}{_where(node)} by {scales} with a dynamic height/width: the output "
                    "size is computed in float32 by ONNX Runtime and float64 by PyTorch; use "
                    "size= or a power-of-two factor"
                )
        if target in _ADAPTIVE and dynamic_hw and tuple(node.args[1]) != (1, 1):
            raise UnsupportedModelError(
                f"{target} to {tuple(node.args[1])}{_where(node)} with a dynamic height/width: "
                "its ONNX translation keeps the example's kernel and stride, a wrong result at "
                "other sizes"
                + (
                    ""
                    if target is aten.adaptive_max_pool2d.default
                    else " (segfast rewrites F.adaptive_avg_pool2d exactly; this call bypassed it)"
                )
                + "; export with static height/width"
            )
