"""Pooling on N×C×H×W tensors, with PyTorch's exact semantics:

- ``max_pool2d``: windowed max with −inf padding, stride, dilation, ceil_mode and
  optionally the int64 argmax ``indices`` (flat h·W + w within each (n, c)
  plane). Ties keep the first max in window scan order (row-major); NaN counts
  as the max, and of several NaNs the last one scanned is kept — both as ATen.
  # read ≤ KH·KW·N·C·Ho·Wo elements (each input ~once from DRAM when the
  # stride ≥ kernel); write N·C·Ho·Wo values (+ N·C·Ho·Wo int64 indices).
- ``max_unpool2d``: zero-fills the output, then scatters every input value to
  its index. Indices from a pool with stride ≥ kernel never collide; where they
  do, which value lands is undefined (as in PyTorch). Indices outside the
  output plane are skipped (ATen raises or asserts instead).
  # write N·C·Ho·Wo (zeros) + N·C·H·W scattered; read N·C·H·W values + indices.
- ``adaptive_avg_pool2d`` / ``global_avg_pool2d``: output bin i covers
  [floor(i·H/o), ceil((i+1)·H/o)) (exact integer arithmetic, as ATen), mean in
  fp32. # read N·C·Σbins elements (= N·C·H·W when o divides H); write N·C·Ho·Wo.
  ``global_avg_pool2d(x, stats=)``: the mean from the channel statistics the conv that
  wrote x produced (``conv2d(..., stats=)``): each tile's mean weighted by its pixel
  count, in a fixed order; x is not read. # read N·T·C fp32; write N·C.

Layouts: any strides in and out; outputs default to channels_last. Fast path:
channels_last (C stride 1), where each program holds a tile of up to 64
contiguous channels; other layouts run one channel per tile so neighbouring
lanes take neighbouring pixels.
"""

from __future__ import annotations

import operator

import torch
import triton
import triton.language as tl

from ._common import (
    STATS_BLOCK,
    autotune_configs,
    check_device,
    check_float_dtype,
    check_stats,
    next_power_of_2,
)


def _configs(interpreter_tile: int, tiles: tuple[int, ...] = (1024, 2048, 4096)):
    # Memory-bound gathers/reductions: a tile of TILE elements =
    # (TILE // BLOCK_C) pixels (or window taps) × BLOCK_C channels, BLOCK_C chosen
    # by the launcher from the layout. 1024-4096 elements keeps 4-16 values per
    # thread in flight at 4-8 warps; no K loop to pipeline, so one stage. At most
    # 16 per thread: at 32 (4096 on 4 warps) the max-pool with indices, holding an
    # int64 offset, a value and an index per element, spills 76-680 B (sm_90/sm_87).
    return autotune_configs(
        [{"TILE": t} for t in tiles],
        num_warps=(4, 8),
        num_stages=(1,),
        interpreter_config={"TILE": interpreter_tile},
        fits=lambda blocks, warps, stages: blocks["TILE"] <= 16 * 32 * warps,
    )


@triton.autotune(
    configs=_configs(1024),
    key=["N", "C", "H", "W", "Ho", "Wo", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW"],
)
@triton.jit
def _max_pool_kernel(
    x_ptr,  # [N, C, H, W], strides sx*
    y_ptr,  # [N, C, Ho, Wo], strides sy*
    i_ptr,  # [N, C, Ho, Wo] int64, strides si* (unused unless WITH_IDX)
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
    sin,
    sic,
    sih,
    siw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    WITH_IDX: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TILE: tl.constexpr,
):
    BLOCK_P: tl.constexpr = TILE // BLOCK_C
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < N * Ho * Wo
    c_ok = c < C
    ow = p % Wo
    t = p // Wo
    oh = t % Ho
    n = t // Ho
    x_nc = x_ptr + (n.to(tl.int64) * sxn)[:, None] + (c.to(tl.int64) * sxc)[None, :]
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    # ATen starts from the first in-bounds tap's index (it stays the answer when
    # every tap is -inf): step a negative window start forward by whole dilations.
    hf = tl.where(h0 < 0, h0 + ((DH - 1 - h0) // DH) * DH, h0)
    wf = tl.where(w0 < 0, w0 + ((DW - 1 - w0) // DW) * DW, w0)
    best = tl.full([BLOCK_P, BLOCK_C], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK_P, BLOCK_C], tl.int32) + (hf * W + wf)[:, None]
    for kh in tl.static_range(KH):
        ih = h0 + kh * DH
        h_ok = p_ok & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = w0 + kw * DW
            ok = h_ok & (iw >= 0) & (iw < W)
            off = (ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None]
            v = tl.load(x_nc + off, mask=ok[:, None] & c_ok[None, :], other=float("-inf"))
            v = v.to(tl.float32)
            # strict > keeps the first max; v != v (NaN) always takes over, as in ATen
            take = ok[:, None] & ((v > best) | (v != v))
            best = tl.where(take, v, best)
            if WITH_IDX:
                best_i = tl.where(take, (ih * W + iw)[:, None], best_i)
    mask = p_ok[:, None] & c_ok[None, :]
    n64 = n.to(tl.int64)
    oh64 = oh.to(tl.int64)
    ow64 = ow.to(tl.int64)
    c64 = c.to(tl.int64)[None, :]
    y_off = (n64 * syn + oh64 * syh + ow64 * syw)[:, None] + c64 * syc
    tl.store(y_ptr + y_off, best.to(y_ptr.dtype.element_ty), mask=mask)
    if WITH_IDX:
        i_off = (n64 * sin + oh64 * sih + ow64 * siw)[:, None] + c64 * sic
        tl.store(i_ptr + i_off, best_i.to(tl.int64), mask=mask)


@triton.autotune(configs=_configs(1024), key=["N", "C", "H", "W", "Ho", "Wo"])
@triton.jit
def _max_unpool_kernel(
    x_ptr,  # [N, C, H, W], strides sx*
    i_ptr,  # [N, C, H, W] int64, strides si*
    y_ptr,  # [N, C, Ho, Wo], strides sy*, already zero
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
    sin,
    sic,
    sih,
    siw,
    syn,
    syc,
    syh,
    syw,
    BLOCK_C: tl.constexpr,
    TILE: tl.constexpr,
):
    BLOCK_P: tl.constexpr = TILE // BLOCK_C
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < N * H * W
    c_ok = c < C
    w = p % W
    t = p // W
    h = t % H
    n = (t // H).to(tl.int64)
    c64 = c.to(tl.int64)[None, :]
    mask = p_ok[:, None] & c_ok[None, :]
    x_off = (n * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw)[:, None] + c64 * sxc
    i_off = (n * sin + h.to(tl.int64) * sih + w.to(tl.int64) * siw)[:, None] + c64 * sic
    v = tl.load(x_ptr + x_off, mask=mask, other=0.0)
    idx = tl.load(i_ptr + i_off, mask=mask, other=-1)
    ok = mask & (idx >= 0) & (idx < Ho * Wo)
    oh = idx // Wo
    ow = idx % Wo
    y_off = n[:, None] * syn + c64 * syc + oh * syh + ow * syw
    tl.store(y_ptr + y_off, v.to(y_ptr.dtype.element_ty), mask=ok)


# 256-element tiles too: small bins (adaptive pooling to more bins than 1-2 per
# pixel) would leave most lanes of a big tile idle.
@triton.autotune(configs=_configs(512, (256, 1024, 4096)), key=["N", "C", "H", "W", "Ho", "Wo"])
@triton.jit
def _adaptive_avg_pool_kernel(
    x_ptr,  # [N, C, H, W], strides sx*
    y_ptr,  # [N, C, Ho, Wo], strides sy*
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
    BLOCK_C: tl.constexpr,
    TILE: tl.constexpr,
):
    # One output pixel (bin) per program along axis 0; its window is walked as
    # flat taps j = 0 .. kh·kw − 1 in chunks of BLOCK_T taps × BLOCK_C channels.
    BLOCK_T: tl.constexpr = TILE // BLOCK_C
    pid = tl.program_id(0)
    ow = pid % Wo
    t = pid // Wo
    oh = t % Ho
    n = t // Ho
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    hs = (oh * H) // Ho
    he = ((oh + 1) * H + Ho - 1) // Ho
    ws = (ow * W) // Wo
    we = ((ow + 1) * W + Wo - 1) // Wo
    kw = we - ws
    count = (he - hs) * kw
    x_nc = x_ptr + n.to(tl.int64) * sxn + (c.to(tl.int64) * sxc)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    for j0 in range(0, count, BLOCK_T):
        j = j0 + tl.arange(0, BLOCK_T)
        ih = hs + j // kw
        iw = ws + j % kw
        off = (ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None]
        v = tl.load(x_nc + off, mask=(j < count)[:, None] & c_ok[None, :], other=0.0)
        acc += v.to(tl.float32)
    mean = tl.sum(acc, axis=0) / count.to(tl.float32)
    y_off = n.to(tl.int64) * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw
    tl.store(y_ptr + y_off + c.to(tl.int64) * syc, mean.to(y_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _mean_from_stats_kernel(
    mean_ptr,  # [N, T, C] fp32 per-tile means of STATS pixels (the last tile shorter)
    y_ptr,  # [N, C, 1, 1], strides syn, syc
    C, HW, T, syn, syc,
    STATS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc = tl.zeros([BLOCK_C], tl.float32)
    for t in range(0, T):
        cnt = tl.minimum(HW - t * STATS, STATS).to(tl.float32)
        acc += cnt * tl.load(mean_ptr + (n * T + t) * C + c, mask=c_ok, other=0.0)
    y = acc / HW.to(tl.float32)
    tl.store(y_ptr + n * syn + c * syc, y.to(y_ptr.dtype.element_ty), mask=c_ok)


# ----------------------------------------------------------------------------- helpers


def _pair(name: str, v: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    try:
        if isinstance(v, (tuple, list)):
            if len(v) == 1:
                return operator.index(v[0]), operator.index(v[0])
            if len(v) == 2:
                return operator.index(v[0]), operator.index(v[1])
        else:
            return operator.index(v), operator.index(v)
    except TypeError:
        pass
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


def _check_x(x: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, C, H, W], got {tuple(x.shape)}")
    check_float_dtype(name, x)
    if any(x.shape[d] == 0 for d in (1, 2, 3)):
        raise ValueError(f"{name} must have non-empty C, H and W, got {tuple(x.shape)}")


def _alloc_or_check(
    out: torch.Tensor | None,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, device=device, dtype=dtype, memory_format=torch.channels_last)
    if tuple(out.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {out.dtype}")
    return out


def _block_c(x: torch.Tensor, C: int, max_block: int = 64) -> int:
    # channels_last: up to 64 contiguous channels per tile (128 B of fp16);
    # other layouts: one channel per tile. Grid axis 1 (channel blocks) ≤ 65535.
    b = min(next_power_of_2(C), max_block) if x.stride(1) == 1 else 1
    return max(b, next_power_of_2(triton.cdiv(C, 65535)))


def _pool_out_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """ATen's ``pooling_output_shape``."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _max_pool_params(
    x: torch.Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None,
    padding: int | tuple[int, int],
    dilation: int | tuple[int, int],
    ceil_mode: bool,
) -> tuple[tuple[int, int], ...]:
    _check_x(x)
    k = _pair("kernel_size", kernel_size)
    s = k if stride is None or stride == () or stride == [] else _pair("stride", stride)
    p = _pair("padding", padding)
    d = _pair("dilation", dilation)
    if min(k) <= 0 or min(s) <= 0 or min(d) <= 0:
        raise ValueError(
            f"kernel_size, stride and dilation must be positive, got kernel_size={k}, "
            f"stride={s}, dilation={d}"
        )
    for i in range(2):
        if p[i] < 0 or p[i] > k[i] // 2 or p[i] > ((k[i] - 1) * d[i] + 1) // 2:
            raise ValueError(
                f"padding must be between 0 and half the (effective) kernel size, got "
                f"padding={p}, kernel_size={k}, dilation={d}"
            )
    H, W = x.shape[2], x.shape[3]
    o = (
        _pool_out_size(H, k[0], s[0], p[0], d[0], ceil_mode),
        _pool_out_size(W, k[1], s[1], p[1], d[1], ceil_mode),
    )
    if min(o) < 1:
        raise ValueError(f"output size {o} is too small for input {tuple(x.shape)} and kernel {k}")
    return k, s, p, d, o


# ----------------------------------------------------------------------------- max pool


def max_pool2d(
    x: torch.Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    ceil_mode: bool = False,
    *,
    return_indices: bool = False,
    out: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``F.max_pool2d`` on x [N, C, H, W] -> [N, C, Ho, Wo] (+ int64 indices).

    ``out`` is the values tensor (any strided view of the right shape and dtype,
    e.g. a channel slice of a concat buffer), or with ``return_indices`` a pair
    (values, indices); what is not given is allocated channels_last.
    """
    k, s, p, d, (Ho, Wo) = _max_pool_params(x, kernel_size, stride, padding, dilation, ceil_mode)
    out_i = None
    if isinstance(out, (tuple, list)):
        if not return_indices or len(out) != 2:
            raise ValueError("out may be a (values, indices) pair only with return_indices=True")
        out, out_i = out
    device = check_device(x, out, out_i)
    N, C, H, W = x.shape
    shape = (N, C, Ho, Wo)
    y = _alloc_or_check(out, "out", shape, x.dtype, device)
    idx = _alloc_or_check(out_i, "out indices", shape, torch.int64, device) if return_indices else y
    if N * Ho * Wo >= 2**31:
        raise ValueError(f"N*Ho*Wo must be < 2**31, got {N * Ho * Wo}")
    if N > 0:
        block_c = _block_c(x, C)

        def grid(meta):
            return (triton.cdiv(N * Ho * Wo, meta["TILE"] // block_c), triton.cdiv(C, block_c))

        _max_pool_kernel[grid](
            x,
            y,
            idx,
            N,
            C,
            H,
            W,
            Ho,
            Wo,
            *x.stride(),
            *y.stride(),
            *idx.stride(),
            KH=k[0],
            KW=k[1],
            SH=s[0],
            SW=s[1],
            PH=p[0],
            PW=p[1],
            DH=d[0],
            DW=d[1],
            WITH_IDX=return_indices,
            BLOCK_C=block_c,
        )
    return (y, idx) if return_indices else y


def max_pool2d_reference(
    x: torch.Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    ceil_mode: bool = False,
    *,
    return_indices: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``F.max_pool2d`` itself."""
    return torch.nn.functional.max_pool2d(
        x,
        kernel_size,
        stride if stride is not None else kernel_size,
        padding,
        dilation,
        ceil_mode=ceil_mode,
        return_indices=return_indices,
    )


# ----------------------------------------------------------------------------- max unpool


def _unpool_check(
    x: torch.Tensor, indices: torch.Tensor, output_size: tuple[int, int]
) -> tuple[int, int]:
    _check_x(x)
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {indices.dtype}")
    if tuple(indices.shape) != tuple(x.shape):
        raise ValueError(
            f"indices must have x's shape {tuple(x.shape)}, got {tuple(indices.shape)}"
        )
    Ho, Wo = _pair("output_size", output_size)
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"output_size must be positive, got {(Ho, Wo)}")
    return Ho, Wo


def max_unpool2d(
    x: torch.Tensor,
    indices: torch.Tensor,
    output_size: tuple[int, int],
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.max_unpool2d``: x, indices [N, C, H, W] -> zeros [N, C, Ho, Wo] with
    ``y[n, c].flatten()[indices[n, c, h, w]] = x[n, c, h, w]``.

    Colliding indices leave an undefined one of their values (as in PyTorch);
    indices outside [0, Ho·Wo) are skipped.
    """
    Ho, Wo = _unpool_check(x, indices, output_size)
    device = check_device(x, indices, out)
    N, C, H, W = x.shape
    y = _alloc_or_check(out, "out", (N, C, Ho, Wo), x.dtype, device)
    if N * H * W >= 2**31:
        raise ValueError(f"N*H*W must be < 2**31, got {N * H * W}")
    y.zero_()
    if N > 0:
        block_c = _block_c(x, C)

        def grid(meta):
            return (triton.cdiv(N * H * W, meta["TILE"] // block_c), triton.cdiv(C, block_c))

        _max_unpool_kernel[grid](
            x,
            indices,
            y,
            N,
            C,
            H,
            W,
            Ho,
            Wo,
            *x.stride(),
            *indices.stride(),
            *y.stride(),
            BLOCK_C=block_c,
        )
    return y


def max_unpool2d_reference(
    x: torch.Tensor, indices: torch.Tensor, output_size: tuple[int, int]
) -> torch.Tensor:
    """ATen's ``max_unpool2d`` (what ``F.max_unpool2d`` calls once it has the size)."""
    Ho, Wo = _unpool_check(x, indices, output_size)
    return torch.ops.aten.max_unpool2d.default(x, indices, [Ho, Wo])


# ----------------------------------------------------------------------------- average pools


def _adaptive_size(x: torch.Tensor, output_size) -> tuple[int, int]:
    if isinstance(output_size, (tuple, list)) and len(output_size) == 2:
        sizes = [x.shape[2 + i] if v is None else v for i, v in enumerate(output_size)]
    else:
        sizes = [output_size, output_size]
    try:
        Ho, Wo = (operator.index(v) for v in sizes)
    except TypeError:
        raise ValueError(
            f"output_size must be an int or a pair of ints/None, got {output_size!r}"
        ) from None
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"output_size must be positive, got {(Ho, Wo)}")
    return Ho, Wo


def adaptive_avg_pool2d(
    x: torch.Tensor,
    output_size: int | tuple[int | None, int | None],
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.adaptive_avg_pool2d``: x [N, C, H, W] -> [N, C, Ho, Wo], fp32 accumulation."""
    _check_x(x)
    Ho, Wo = _adaptive_size(x, output_size)
    device = check_device(x, out)
    N, C, H, W = x.shape
    y = _alloc_or_check(out, "out", (N, C, Ho, Wo), x.dtype, device)
    if N * Ho * Wo >= 2**31:
        raise ValueError(f"N*Ho*Wo must be < 2**31, got {N * Ho * Wo}")
    if N > 0:
        block_c = _block_c(x, C)
        # Few bins (global pooling, PSPNet's 1×1 and 2×2): narrow the channel
        # block so ≥ ~512 programs keep every SM busy, but no narrower than 16
        # channels (32 B of fp16: one DRAM sector per tap).
        while block_c > 16 and N * Ho * Wo * triton.cdiv(C, block_c) < 512:
            block_c //= 2
        grid = (N * Ho * Wo, triton.cdiv(C, block_c))
        _adaptive_avg_pool_kernel[grid](
            x, y, N, C, H, W, Ho, Wo, *x.stride(), *y.stride(), BLOCK_C=block_c
        )
    return y


def adaptive_avg_pool2d_reference(
    x: torch.Tensor, output_size: int | tuple[int | None, int | None]
) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` itself."""
    return torch.nn.functional.adaptive_avg_pool2d(x, output_size)


def global_avg_pool2d(
    x: torch.Tensor, *, stats: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over H×W: x [N, C, H, W] -> [N, C, 1, 1], fp32 accumulation.

    ``stats``: x's per-tile channel statistics as the conv that wrote x produced them
    (``segfast.kernels.conv2d.conv2d(..., stats=)``); then x is not read."""
    if stats is None:
        return adaptive_avg_pool2d(x, 1, out=out)
    _check_x(x)
    device = check_device(x, stats, out)
    N, C, H, W = x.shape
    check_stats(stats, N, H * W, C)
    y = _alloc_or_check(out, "out", (N, C, 1, 1), x.dtype, device)
    if N > 0:
        block_c = min(128, next_power_of_2(C))
        _mean_from_stats_kernel[(N, triton.cdiv(C, block_c))](
            stats, y, C, H * W, stats.shape[2], y.stride(0), y.stride(1),
            STATS=STATS_BLOCK, BLOCK_C=block_c, num_warps=4,
        )  # fmt: skip
    return y


def global_avg_pool2d_reference(x: torch.Tensor) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, 1)``."""
    return torch.nn.functional.adaptive_avg_pool2d(x, 1)
