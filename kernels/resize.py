"""Resize an N×C×H×W tensor to N×C×Ho×Wo: bilinear, nearest and nearest-exact,
index-for-index compatible with ATen's ``upsample_bilinear2d`` /
``upsample_nearest2d`` / ``_upsample_nearest_exact2d`` on the same device.

For output index d along one dimension (input size ``in``, output size ``o``),
with ``s`` the fp32 source step ATen uses (``1/scales`` when the graph passed a
``scale_factor``, else ``in/o``; ``(in-1)/(o-1)`` for bilinear align_corners):

- bilinear, align_corners=True:  src = d·s (s = 0 when o == 1)
- bilinear, align_corners=False: src = max((d + 0.5)·s − 0.5, 0)
  then i0 = min(floor(src), in−1), i1 = min(i0+1, in−1), λ = clamp(src − i0, 0, 1)
- nearest:       i = min(floor(d·s), in−1)
- nearest-exact: i = min(floor((d + 0.5)·s), in−1)

All index arithmetic is fp32 (as ATen does for fp32/fp16/bf16), the blend is fp32.

ATen's CPU and CUDA kernels take different shortcuts, and this module follows
the one of the device it runs on (see ``_aten_steps``):

- CPU: a dimension with in == o is copied (bilinear, nearest); nearest with
  o == 2·in reads d >> 1. Both ignore a given ``scales``.
- CUDA: bilinear is a copy only when both H and W are unchanged; nearest and
  nearest-exact copy a dimension with in == o.

They only differ from the formulas above when ``scales`` disagrees with in/o
(e.g. ``scale_factor=1.1`` on a size-7 dimension gives o = 7).

Layouts: any strides in and out. Fast path: channels_last (C stride 1), where a
program handles a [BLOCK_P pixels, BLOCK_C channels] tile and every load and
store is contiguous along C; otherwise BLOCK_C = 1 and neighbouring lanes take
neighbouring output pixels.

``residual`` (an optional tensor of the output's shape, any strides) is added as each
output element is stored: ``resize(x) + r`` in one pass, blended and summed in fp32 and
rounded once (the Triton backend folds ``add(resize(x), r)`` into it — FPN merges).

Bytes: read ≤ 4·N·Ho·Wo·C elements (bilinear corners; on upsampling these are
cache hits and DRAM traffic approaches N·H·W·C), plus N·Ho·Wo·C with a residual;
write N·Ho·Wo·C elements. FLOPs: ~8 per output element (bilinear), none for nearest
(one more with a residual).
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import triton
import triton.language as tl

from ._common import autotune_configs, check_device, check_float_dtype, next_power_of_2

MODES: dict[str, int] = {"bilinear": 0, "nearest": 1, "nearest-exact": 2}


def _configs():
    # A tile is TILE elements = (TILE // BLOCK_C) pixels × BLOCK_C channels; the
    # kernel is a gather + store, so only the tile size and the warps matter
    # (no K loop: one pipeline stage). 1024-4096 elements keeps 4-16 values per
    # thread in flight at 4-8 warps. At most 16 per thread: at 32 (4096 on 4 warps)
    # bilinear, with four int64 neighbour offsets per element, spills 312-392 B.
    return autotune_configs(
        [{"TILE": 1024}, {"TILE": 2048}, {"TILE": 4096}],
        num_warps=(4, 8),
        num_stages=(1,),
        interpreter_config={"TILE": 2048},
        fits=lambda blocks, warps, stages: blocks["TILE"] <= 16 * 32 * warps,
    )


def _prune_configs(configs, named_args, **kwargs):
    """NCHW (BLOCK_C = 1, a pixel per lane) tiles only on 8 warps: each pixel carries its
    own int64 neighbour offsets, and on 4 warps threads hold 8–16 pixels at 80–210
    registers (ptxas spills 16 B at 80 on sm_90 for fp16); 8 warps halve that."""
    if {**named_args, **kwargs}["BLOCK_C"] > 1:
        return configs
    return [c for c in configs if c.num_warps >= 8] or configs


@triton.autotune(
    configs=_configs(),
    key=["N", "C", "H", "W", "Ho", "Wo", "BLOCK_C", "HAS_RES"],  # BLOCK_C: the layout
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _resize_kernel(
    x_ptr,  # [N, C, H, W], strides sx*
    y_ptr,  # [N, C, Ho, Wo], strides sy*
    r_ptr,  # the residual [N, C, Ho, Wo], strides rs* (read only when HAS_RES)
    N,
    C,
    H,
    W,
    Ho,
    Wo,
    sxn,
    sxc,
    sxh,
    sxw,
    syn,
    syc,
    syh,
    syw,
    rsn,
    rsc,
    rsh,
    rsw,
    step_h,  # fp32 source step per output step (see _aten_steps)
    step_w,
    MODE: tl.constexpr,  # 0 bilinear, 1 nearest, 2 nearest-exact
    ALIGN: tl.constexpr,  # bilinear align_corners
    HAS_RES: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TILE: tl.constexpr,
):
    BLOCK_P: tl.constexpr = TILE // BLOCK_C
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # flat output pixel
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < N * Ho * Wo
    c_ok = c < C
    ow = p % Wo
    t = p // Wo
    oh = t % Ho
    n = t // Ho
    mask = p_ok[:, None] & c_ok[None, :]
    x_nc = x_ptr + (n.to(tl.int64) * sxn)[:, None] + (c.to(tl.int64) * sxc)[None, :]
    y_off = (n.to(tl.int64) * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw)[:, None] + (
        c.to(tl.int64) * syc
    )[None, :]
    ohf = oh.to(tl.float32)
    owf = ow.to(tl.float32)
    if MODE == 0:
        if ALIGN:
            src_h = step_h * ohf
            src_w = step_w * owf
        else:
            src_h = tl.maximum(step_h * (ohf + 0.5) - 0.5, 0.0)
            src_w = tl.maximum(step_w * (owf + 0.5) - 0.5, 0.0)
        # src >= 0, so truncation is floor
        h0 = tl.minimum(src_h.to(tl.int32), H - 1)
        w0 = tl.minimum(src_w.to(tl.int32), W - 1)
        h1 = tl.minimum(h0 + 1, H - 1)
        w1 = tl.minimum(w0 + 1, W - 1)
        lh = tl.minimum(tl.maximum(src_h - h0.to(tl.float32), 0.0), 1.0)
        lw = tl.minimum(tl.maximum(src_w - w0.to(tl.float32), 0.0), 1.0)
        rh0 = (h0.to(tl.int64) * sxh)[:, None]
        rh1 = (h1.to(tl.int64) * sxh)[:, None]
        cw0 = (w0.to(tl.int64) * sxw)[:, None]
        cw1 = (w1.to(tl.int64) * sxw)[:, None]
        v00 = tl.load(x_nc + rh0 + cw0, mask=mask, other=0.0).to(tl.float32)
        v01 = tl.load(x_nc + rh0 + cw1, mask=mask, other=0.0).to(tl.float32)
        v10 = tl.load(x_nc + rh1 + cw0, mask=mask, other=0.0).to(tl.float32)
        v11 = tl.load(x_nc + rh1 + cw1, mask=mask, other=0.0).to(tl.float32)
        lw_ = lw[:, None]
        lh_ = lh[:, None]
        top = (1.0 - lw_) * v00 + lw_ * v01
        bot = (1.0 - lw_) * v10 + lw_ * v11
        val = (1.0 - lh_) * top + lh_ * bot
    else:
        if MODE == 1:
            src_h = step_h * ohf
            src_w = step_w * owf
        else:
            src_h = step_h * (ohf + 0.5)
            src_w = step_w * (owf + 0.5)
        ih = tl.minimum(src_h.to(tl.int32), H - 1)
        iw = tl.minimum(src_w.to(tl.int32), W - 1)
        src = x_nc + (ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None]
        val = tl.load(src, mask=mask, other=0.0)
    if HAS_RES:
        r_off = (n.to(tl.int64) * rsn + oh.to(tl.int64) * rsh + ow.to(tl.int64) * rsw)[:, None] + (
            c.to(tl.int64) * rsc
        )[None, :]
        res = tl.load(r_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
        val = val.to(tl.float32) + res
    tl.store(y_ptr + y_off, val.to(y_ptr.dtype.element_ty), mask=mask)


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' storages are the same allocation."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _f32(v: float) -> float:
    """``v`` rounded to fp32 (exactly representable again as a Python float)."""
    return float(np.float32(v))


def _aten_step(in_size: int, out_size: int, align_corners: bool, scale: float | None) -> float:
    """ATen's ``area_pixel_compute_scale`` / ``compute_scales_value`` in fp32."""
    if align_corners:
        if out_size > 1:
            return float(np.float32(in_size - 1) / np.float32(out_size - 1))
        return 0.0
    if scale is not None and scale > 0:
        return _f32(1.0 / scale)
    return float(np.float32(in_size) / np.float32(out_size))


def _aten_steps(
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
    mode: str,
    align_corners: bool,
    scales: tuple[float | None, float | None],
    device_type: str,
) -> tuple[float, float]:
    """The fp32 source steps (h, w) ATen's kernel on ``device_type`` uses.

    A step of 1 makes the kernel copy that dimension (all three formulas give
    i = d), and 0.5 makes nearest read d >> 1: that is how ATen's shortcuts
    (module docstring) are reproduced.
    """
    steps = [
        _aten_step(i, o, align_corners and mode == "bilinear", s)
        for i, o, s in zip(in_hw, out_hw, scales, strict=True)
    ]
    same = [i == o for i, o in zip(in_hw, out_hw, strict=True)]
    for d in range(2):
        if device_type == "cuda":
            if (mode != "bilinear" and same[d]) or (mode == "bilinear" and all(same)):
                steps[d] = 1.0
        elif mode in ("bilinear", "nearest") and same[d]:
            steps[d] = 1.0
        elif mode == "nearest" and out_hw[d] == 2 * in_hw[d]:
            steps[d] = 0.5
    return steps[0], steps[1]


def _check_args(
    x: torch.Tensor,
    size: tuple[int, int],
    mode: str,
    align_corners: bool,
    scales: tuple[float | None, float | None] | None,
) -> tuple[tuple[int, int], tuple[float | None, float | None]]:
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W], got {tuple(x.shape)}")
    check_float_dtype("x", x)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    if align_corners and mode != "bilinear":
        raise ValueError(f"align_corners can only be set with mode='bilinear', got mode={mode!r}")
    try:
        ho, wo = (operator.index(s) for s in size)
    except (TypeError, ValueError):
        ho = wo = 0
    if ho <= 0 or wo <= 0:
        raise ValueError(f"size must be two positive ints (Ho, Wo), got {size!r}")
    if scales is None:
        scales = (None, None)
    if not isinstance(scales, (tuple, list)) or len(scales) != 2:
        raise ValueError(f"scales must be None or a pair (scale_h, scale_w), got {scales!r}")
    if any(x.shape[d] == 0 for d in (1, 2, 3)):
        raise ValueError(f"x must have non-empty C, H and W, got {tuple(x.shape)}")
    return (ho, wo), (scales[0], scales[1])


def resize(
    x: torch.Tensor,
    size: tuple[int, int],
    mode: str = "bilinear",
    align_corners: bool = False,
    scales: tuple[float | None, float | None] | None = None,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Resize ``x`` [N, C, H, W] to [N, C, Ho, Wo] like ATen's upsample ops.

    ``scales`` are ATen's ``scales_h, scales_w`` arguments: the ``scale_factor``
    (output/input) a graph passed to ``F.interpolate``, or None; the source step
    is then ``1/scale`` instead of in/o, exactly as in ATen. ``out`` may be any
    strided view of the right shape (e.g. a channel slice of a concat buffer)
    and must not overlap ``x``; otherwise the output is allocated channels_last
    in ``out_dtype`` (default: ``x.dtype``). ``residual`` (the output's shape, any
    float dtype and strides) is added in fp32 before the one rounding to the output
    dtype; it must not share memory with ``out`` (on a GPU the autotuner runs the
    kernel repeatedly on the same buffers: an in-place sum would add it again each time).
    """
    (Ho, Wo), sc = _check_args(x, size, mode, align_corners, scales)
    device = check_device(x, out, residual)
    N, C, H, W = x.shape
    shape = (N, C, Ho, Wo)
    if residual is not None:
        if tuple(residual.shape) != shape:
            raise ValueError(f"residual must have the output's shape {shape}, "
                             f"got {tuple(residual.shape)}")  # fmt: skip
        check_float_dtype("residual", residual)
    if out is None:
        dtype = out_dtype or x.dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {dtype}")
        out = torch.empty(shape, device=device, dtype=dtype, memory_format=torch.channels_last)
    else:
        if residual is not None and _shares_memory(residual, out):
            raise ValueError("residual must not share memory with out")
        if tuple(out.shape) != shape:
            raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
        check_float_dtype("out", out)
        if out_dtype is not None and out_dtype != out.dtype:
            raise TypeError(f"out_dtype {out_dtype} disagrees with out.dtype {out.dtype}")
    if N == 0:
        return out
    if N * Ho * Wo >= 2**31:
        raise ValueError(f"N*Ho*Wo must be < 2**31, got {N * Ho * Wo}")
    step_h, step_w = _aten_steps((H, W), (Ho, Wo), mode, align_corners, sc, device.type)
    # channels_last: a tile spans up to 64 channels (128 B of fp16 per pixel row);
    # other layouts: one channel per tile, so lanes walk along W.
    block_c = min(next_power_of_2(C), 64) if x.stride(1) == 1 else 1
    block_c = max(block_c, next_power_of_2(triton.cdiv(C, 65535)))  # grid axis 1 ≤ 65535

    def grid(meta):
        return (triton.cdiv(N * Ho * Wo, meta["TILE"] // block_c), triton.cdiv(C, block_c))

    res = out if residual is None else residual  # never read without HAS_RES
    _resize_kernel[grid](
        x,
        out,
        res,
        N,
        C,
        H,
        W,
        Ho,
        Wo,
        *x.stride(),
        *out.stride(),
        *res.stride(),
        step_h,
        step_w,
        MODE=MODES[mode],
        ALIGN=bool(align_corners),
        HAS_RES=residual is not None,
        BLOCK_C=block_c,
    )
    return out


def resize_reference(
    x: torch.Tensor,
    size: tuple[int, int],
    mode: str = "bilinear",
    align_corners: bool = False,
    scales: tuple[float | None, float | None] | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """ATen's upsample op on ``x``'s device, with ``scales`` passed through, then
    ``+ residual`` (the sum in fp32, rounded once, as the kernel does)."""
    (Ho, Wo), (sh, sw) = _check_args(x, size, mode, align_corners, scales)
    aten = torch.ops.aten
    if mode == "bilinear":
        y = aten.upsample_bilinear2d.default(x, [Ho, Wo], bool(align_corners), sh, sw)
    elif mode == "nearest":
        y = aten.upsample_nearest2d.default(x, [Ho, Wo], sh, sw)
    else:
        y = aten._upsample_nearest_exact2d.default(x, [Ho, Wo], sh, sw)
    dtype = out_dtype or x.dtype
    if residual is not None:
        return (y.float() + residual.float()).to(dtype)
    return y.to(dtype)
