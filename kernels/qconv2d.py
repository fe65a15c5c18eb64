"""int8 2-D convolution (``segfast::qconv2d``): int8 × int8 → int32 on the tensor cores.

Computes, for a float x: [N, C1, H, W] (and optionally x2: [N, C2, H2, W2]), an int8
weight: [Cout, Cin, KH, KW] with one fp32 scale per output channel ``w_scale``::

    inp = cat([x, up(x2)], 1)            # or cat([up(x2), x]) with x2_first; up = resize to H×W
    q   = clamp(round_half_even(inp / x_scale), −128, 127)            # int8, one shared scale
    acc = conv2d(q, weight, stride, padding, dilation)                 # int32, exact
    y   = acc · x_scale · w_scale[c] + bias[c]                         # fp32
    y   = act(y + residual)   or   act(y) + residual                   # residual_after_act
    out = y.to(x.dtype)       or   clamp(round(y / out_scale), −128, 127) as int8 (out_scale)

Its exact meaning is :func:`segfast.compiler.ops.qconv2d_impl` (the composite the
tests compare against; ``kernels/`` does not import the compiler, so it is not
imported here). The composite sums fp32 products of the same integers; the kernel sums
the integers exactly, so the two agree to fp32 rounding.

Quantization follows ATen's arithmetic on the device the kernel runs on, as the
composite does there: ``x / x_scale`` is a true fp32 division on the CPU (the
interpreter) and ``x · fp32(1 / x_scale)`` on CUDA (ATen multiplies by the reciprocal of
a scalar divisor); the quotient is rounded to x's dtype (what ``x / x_scale`` stores for
fp16/bf16), then to the nearest integer, ties to even. ±Inf saturate to 127/−128 as in
the composite; NaN becomes 0 (the composite keeps NaN: an int8 tensor cannot — the
triton backend runs inputs holding NaN/Inf through the eager model instead).

Kernels:

- ``_qconv2d_kernel`` (groups=1): implicit GEMM, M = N·Ho·Wo, Nd = Cout,
  K = KH·KW·Cin, as in :mod:`segfast.kernels.conv2d`: a K-tile is one filter tap × a
  block of BLOCK_K channels (flat (kh, kw, c) K-tiles for C1 ≤ 16), the float A tile is
  loaded and quantized in registers (the prologue), the int8 B tile comes from a
  :func:`pack_qconv_weight` weight (K-major: both int8 MMA operands contiguous along K,
  the layout the int8 tensor-core instructions read), ``tl.dot(..., out_dtype=int32)``.
  The two-source prologue gathers x2 (nearest, or the four bilinear neighbours blended
  in fp32 and rounded once to the storage dtype, as PyTorch materialises ``up(x2)``)
  and quantizes after the resize, at the one shared scale.
- ``_qdw_conv2d_kernel`` (depthwise, groups == Cin == Cout, weight [C, 1, KH, KW]):
  direct, [BLOCK_P pixels × BLOCK_C channels], int32 multiply-adds, same epilogue.

Not covered (the callers keep the composite): grouped convs other than depthwise,
split-K for grids too small to fill the GPU (ASPP at output stride 16 runs with the
autotuner's 64-wide tiles), an int8 input (already quantized) — the ``out_scale``
int8 output is written for such consumers.

Traffic and work (elements; multiply by the element size for bytes):
    GEMM:       read N·H·W·C1 + N·H2·W2·C2 (float) + Cout·Cin·KH·KW (int8)
                (+ N·Ho·Wo·Cout residual) + 2·Cout fp32 (w_scale, bias);
                write N·Ho·Wo·Cout (x's dtype, or int8). Int8 ops 2·N·Ho·Wo·Cout·Cin·KH·KW.
                Quantize-on-load costs ~5 ALU instructions per A element, and each
                input element is quantized KH·KW·⌈Cout/BLOCK_N⌉ times (once per tap
                and per column tile): a 3×3 layer spends more issue slots on the
                prologue than the int8 MMA needs, so wide BLOCK_N tiles are preferred.
    depthwise:  read N·H·W·C + C·KH·KW; write N·Ho·Wo·C. Ops 2·N·Ho·Wo·C·KH·KW.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._common import (
    GpuTarget,
    act_code,
    autotune_configs,
    check_device,
    check_float_dtype,
    launch_target,
    next_power_of_2,
)
from ._epilogue import activate
from .conv2d import _RESIZE_CODES, _check_shape, _idx, _pair, _resample_steps, _span

# Offsets are int32 unless a tensor spans more elements (then IDX64); tests lower it.
_INT32_MAX = 2**31 - 1

# Flat (kh, kw, c) K-tiles serve inputs with at most this many channels: the int8 MMA
# takes K in steps of 32, so a per-tap block of ≤ 16 channels would be ≥ half zeros
# (the grey U-Net stem: 1/32 useful), while 3×3×16 = 144 flat is 5 tiles, 90 % useful.
_FLAT_K_MAX_CHANNELS = 16

# 1.5·2²³: for |v| ≤ 2²², (v + s) − s is v rounded to an integer, ties to even, in IEEE
# fp32 arithmetic (the interpreter's rounding; the GPU uses cvt.rni instead).
_RNE_SHIFT = tl.constexpr(12582912.0)

_GEOMETRY_KEYS = ["N", "H", "W", "KH", "KW", "Ho", "Wo", "SH", "SW", "PH", "PW", "DH", "DW"]


# --------------------------------------------------------------------------- device code


@triton.jit
def _quantize(v, q, DTYPE: tl.constexpr, QUANT_CPU: tl.constexpr):
    """``clamp(round_half_even(v / scale), −128, 127)`` as int8, with ATen's arithmetic.

    ``QUANT_CPU`` (the interpreter): q = scale, a true fp32 division; otherwise (CUDA)
    q = fp32(1 / scale), a multiply — what ``torch.round(x / scale)`` computes on each
    device. The quotient is rounded to ``DTYPE`` (x's dtype) first, as torch stores it.
    """
    v = v.to(tl.float32)
    if QUANT_CPU:
        v = v / q
    else:
        v = v * q
    v = v.to(DTYPE).to(tl.float32)
    if QUANT_CPU:
        v = tl.where(v == v, v, 0.0)  # NaN → 0, as cvt.rni does on the GPU
        v = tl.minimum(tl.maximum(v, -128.0), 127.0)
        v = (v + _RNE_SHIFT) - _RNE_SHIFT
        r = v.to(tl.int8)
    else:
        # cvt.rni.s32.f32: round half to even in one instruction (NaN → 0, ±Inf saturate)
        i = libdevice.float2int_rn(v)
        r = tl.minimum(tl.maximum(i, -128), 127).to(tl.int8)
    return r


@triton.jit
def _qepilogue(
    acc,  # [BM, BC] int32: rows = output pixels, columns = output channels
    co,  # [BC] output channel
    mask_m,  # [BM]
    mask_c,  # [BC]
    x_ptr,  # only its dtype: the float dtype y is rounded to before requantization
    out_ptr,
    out_row,  # [BM]
    so_c,
    res_ptr,
    res_row,  # [BM]
    sr_c,
    ws_ptr,
    s_ws,
    bias_ptr,
    s_bias,
    x_scale,
    q_out,
    act_param,
    HAS_BIAS: tl.constexpr,
    RES_MODE: tl.constexpr,  # 0: none, 1: before the activation, 2: after it
    ACT: tl.constexpr,
    IDX64: tl.constexpr,
    OUT_INT8: tl.constexpr,
    QUANT_CPU: tl.constexpr,
):
    """y = acc · x_scale · w_scale + bias, residual, activation in fp32; one store."""
    ws = tl.load(ws_ptr + co * s_ws, mask=mask_c, other=0.0).to(tl.float32) * x_scale
    y = acc.to(tl.float32) * ws[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + co * s_bias, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_c[None, :]
    c = _idx(co, IDX64)
    if RES_MODE == 1:
        y = y + tl.load(res_ptr + res_row[:, None] + c[None, :] * sr_c, mask=mask).to(tl.float32)
    y = activate(y, ACT, act_param)
    if RES_MODE == 2:
        y = y + tl.load(res_ptr + res_row[:, None] + c[None, :] * sr_c, mask=mask).to(tl.float32)
    if OUT_INT8:
        # exactly the float output quantized at out_scale: rounded to x's dtype first
        fdt = x_ptr.dtype.element_ty
        v = _quantize(y.to(fdt), q_out, fdt, QUANT_CPU)
    else:
        v = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_row[:, None] + c[None, :] * so_c, v, mask=mask)


def _qconv_configs():
    """Autotune space of the int8 implicit-GEMM kernel (one factory; see autotune_configs).

    int8 tensor-core MMAs take K in steps of 32 (mma.sync m16n8k32 on sm_87, wgmma
    m64nNk32 on sm_90), so BLOCK_K ∈ {32, 64}; 128-deep K-tiles would double the float
    A tile each thread quantizes in registers (fp32: 64 values per thread at 128×128 on
    4 warps) for no MMA gain. 128×128×64 is the large-layer tile (int8 operands are half
    the bytes of fp16, so 4 stages fit); BLOCK_N 128 first because every column tile
    quantizes the A tile again (the prologue, not the MMA, bounds 3×3 layers); 64-wide
    tiles serve small feature maps; BLOCK_N=32 narrow Cout (class heads); BLOCK_K=32
    few input channels and the flat-K stem. At most 64 int32 accumulators per thread
    on 4 warps (128×128 runs on 8): the fp32 epilogue converts them in place and the
    quantized A tile lives beside them. ``_prune_qconv_configs`` drops what the shape
    cannot use and what does not fit the dtype and the GPU (``_qgemm_fits``).
    """
    space = [
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64},
        {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64},
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32},
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32},
        {"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 64},
        {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32},
    ]
    # Interpreter: one config; 64×32×32 is the smallest tile the int8 dot takes.
    return autotune_configs(
        space,
        interpreter_config={"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32},
        fits=lambda b, warps, stages: b["BLOCK_M"] * b["BLOCK_N"] <= 64 * 32 * warps,
    )


def _qgemm_fits(
    config, *, bilinear: bool, residual: bool, idx64: bool, elem_bytes: int, target: GpuTarget
) -> bool:
    """Whether an int8 implicit-GEMM tile compiles for ``target`` without spilling
    registers or overflowing shared memory. The budgets come from compiling every config
    of the space for sm_90 and sm_87 with ptxas (``segfast.kernels.compile_check``, 1558
    kernel × case × config × target × dtype combinations); T = 32·warps threads:

    - registers: the int32 accumulators BM·BN/T plus the float A tile being quantized,
      BM·BK·elem_bytes/(4·T) (bilinear: its four neighbour tiles) ≤ 96; ≤ 64 with int64
      offsets, with a residual tile, and for a bilinear x2 (sm_87: 64×64×64 fp16 on 4
      warps and 64×128×64 fp32 on 8, both at 96, spilled 4–12 B; sm_90: 64×64×64 fp16
      on 4 warps at 4 stages spilled 4 B in the full sweep). 255 registers without
      spilling occur (fp32 tiles at 96): occupancy, not correctness.
    - shared memory, as compiled (exact for every config measured): (stages − 1) buffered
      float A tiles (bilinear: four) and int8 B tiles, the quantized int8 A tile staged
      for the dot, and on sm_90 wgmma's B operand: ≤ the block maximum.
    """
    bm, bn, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    threads = 32 * config.num_warps
    loads = 4 if bilinear else 1
    wgmma = target.capability[0] >= 9
    regs = bm * bn // threads + loads * bm * bk * elem_bytes // (4 * threads)
    regs_ok = regs <= (64 if idx64 or residual or bilinear else 96)
    shared = (config.num_stages - 1) * (loads * bm * bk * elem_bytes + bk * bn)
    shared += bm * bk + (bk * bn if wgmma else 0)
    return regs_ok and shared <= target.max_shared


def _prune_qconv_configs(configs, named_args, **kwargs):
    """Drop tiles wider than the shape (BLOCK_N beyond Cout, BLOCK_K beyond the channels
    of both sources or KH·KW·C1 flat, BLOCK_M beyond the pixels) and the 32-wide column
    tile above 64 output channels (wider tiles serve them, and it spilled 12 B on sm_87
    beside a residual); then, on a GPU, the tiles that would spill or overflow shared
    memory there (``_qgemm_fits``)."""
    args = {**named_args, **kwargs}
    m = args["N"] * args["Ho"] * args["Wo"]
    k = args["KH"] * args["KW"] * args["C1"] if args["FLAT_K"] else max(args["C1"], args["C2"])
    cout = next_power_of_2(args["Cout"])
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_N"] <= max(32, cout)
        and (c.kwargs["BLOCK_N"] > 32 or cout <= 64)
        and c.kwargs["BLOCK_K"] <= max(32, next_power_of_2(k))
        and c.kwargs["BLOCK_M"] <= max(64, next_power_of_2(m))
    ] or configs
    x = args["x_ptr"]
    target = launch_target(x.device)
    if target is None:  # the interpreter: one config, nothing to fit
        return kept

    def fits(c) -> bool:
        return _qgemm_fits(
            c,
            bilinear=args["RESIZE"] == 2,
            residual=args["RES_MODE"] != 0,
            idx64=args["IDX64"],
            elem_bytes=x.element_size(),
            target=target,
        )

    return [c for c in kept if fits(c)] or [c for c in configs if fits(c)] or kept


@triton.autotune(
    configs=_qconv_configs(),
    key=[
        *_GEOMETRY_KEYS,
        "C1",
        "C2",
        "H2",
        "W2",
        "Cout",
        "RESIZE",
        "FLAT_K",
        "IDX64",
        "RES_MODE",
        "OUT_INT8",
    ],
    prune_configs_by={"early_config_prune": _prune_qconv_configs},
)
@triton.jit
def _qconv2d_kernel(
    x_ptr,  # [N, C1, H, W] float, any strides
    x2_ptr,  # [N, C2, H2, W2] float (a dummy when HAS_X2 is False)
    w_ptr,  # [Cout, C1 + C2, KH, KW] int8, any strides (packed: Cin stride 1)
    ws_ptr,  # [Cout] w_scale
    bias_ptr,  # [Cout]
    res_ptr,  # [N, Cout, Ho, Wo]
    out_ptr,  # [N, Cout, Ho, Wo] float or int8
    N, C1, C2, H, W, H2, W2, Cout, KH, KW, Ho, Wo,
    SH, SW, PH, PW, DH, DW,
    step_h, step_w,  # fp32 source steps of the x2 resize (conv2d._resample_steps)
    wc_x, wc_x2,  # first weight input channel of x's / x2's channels
    sx_n, sx_c, sx_h, sx_w,
    s2_n, s2_c, s2_h, s2_w,
    sw_o, sw_i, sw_h, sw_w,
    s_ws, s_bias,
    sr_n, sr_c, sr_h, sr_w,
    so_n, so_c, so_h, so_w,
    x_scale,  # fp32: dequantization
    q_in,  # fp32: x_scale (QUANT_CPU: divide) or its fp32 reciprocal (multiply)
    q_out,  # the same for out_scale (OUT_INT8)
    act_param,
    HAS_X2: tl.constexpr,
    RESIZE: tl.constexpr,  # 0 none (x2 is H×W), 1 nearest, 2 bilinear
    ALIGN_CORNERS: tl.constexpr,
    FLAT_K: tl.constexpr,  # x's K loop over flattened (kh, kw, c); for C1 ≤ 16
    HAS_BIAS: tl.constexpr,
    RES_MODE: tl.constexpr,
    ACT: tl.constexpr,
    IDX64: tl.constexpr,
    OUT_INT8: tl.constexpr,
    QUANT_CPU: tl.constexpr,  # ATen's CPU quantization arithmetic (the interpreter)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Tile order as in conv2d: the Cout tiles of one pixel tile are consecutive programs,
    # so the float pixel tile gathered by the first is hit in L2 by the others.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(Cout, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid - pid_m * num_pid_n

    # Output pixels: m → (n, oh, ow), int32 (M < 2³¹, checked); rows past M clamped.
    M = N * Ho * Wo
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    m = tl.minimum(offs_m, M - 1)
    ow = m % Wo
    t = m // Wo
    oh = t % Ho
    n = _idx(t // Ho, IDX64)
    ih0 = oh * SH - PH  # [BM] input row of tap (0, 0); may be negative (padding)
    iw0 = ow * SW - PW

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < Cout
    w_col = offs_n * sw_o  # [BN] (columns not clamped: see conv2d)
    mask_wn = mask_n[None, :]
    offs_k = tl.arange(0, BLOCK_K)
    fdt = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)

    # ---- source 1: x ------------------------------------------------------------------
    x_row = n * sx_n  # [BM]
    if FLAT_K:
        K = KH * KW * C1
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k  # [BK], (kh, kw, c) order
            mask_k = k < K
            r = k // C1
            c = k - r * C1
            kh = r // KW
            kw = r - kh * KW
            ih = ih0[:, None] + (kh * DH)[None, :]  # [BM, BK]
            iw = iw0[:, None] + (kw * DW)[None, :]
            ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            ok = ok & mask_m[:, None] & mask_k[None, :]
            ih = tl.minimum(tl.maximum(ih, 0), H - 1)
            iw = tl.minimum(tl.maximum(iw, 0), W - 1)
            a_off = (
                x_row[:, None]
                + _idx(ih, IDX64) * sx_h
                + _idx(iw, IDX64) * sx_w
                + _idx(c, IDX64)[None, :] * sx_c
            )
            a = _quantize(tl.load(x_ptr + a_off, mask=ok, other=0.0), q_in, fdt, QUANT_CPU)
            w_row = (wc_x + c) * sw_i + kh * sw_h + kw * sw_w  # [BK]
            b = tl.load(
                w_ptr + w_row[:, None] + w_col[None, :], mask=mask_k[:, None] & mask_wn, other=0
            )
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    else:
        # one flat loop over (tap, channel block): see conv2d (the pipeliner overlaps
        # only the innermost loop)
        nc = tl.cdiv(C1, BLOCK_K)
        for it in range(0, KH * KW * nc):
            r = it // nc
            c0 = (it - r * nc) * BLOCK_K
            kh = r // KW
            kw = r - kh * KW
            ih = ih0 + kh * DH  # [BM]
            iw = iw0 + kw * DW
            ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            ih = tl.minimum(tl.maximum(ih, 0), H - 1)
            iw = tl.minimum(tl.maximum(iw, 0), W - 1)
            c = c0 + offs_k  # [BK]
            mask_c = c < C1
            a_row = x_row + _idx(ih, IDX64) * sx_h + _idx(iw, IDX64) * sx_w
            # channels_last: sx_c == 1, contiguous channel runs; quantized in registers
            a = tl.load(
                x_ptr + a_row[:, None] + _idx(c, IDX64)[None, :] * sx_c,
                mask=ok[:, None] & mask_c[None, :],
                other=0.0,
            )
            a = _quantize(a, q_in, fdt, QUANT_CPU)
            # packed weight: sw_i == 1, a [BK, BN] tile of contiguous K runs per column
            w_row = (wc_x + c) * sw_i + kh * sw_h + kw * sw_w
            b = tl.load(
                w_ptr + w_row[:, None] + w_col[None, :], mask=mask_c[:, None] & mask_wn, other=0
            )
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)

    # ---- source 2: x2, resized to H×W on the fly, quantized after the resize ------------
    if HAS_X2:
        x2_row = n * s2_n  # [BM]
        nc2 = tl.cdiv(C2, BLOCK_K)
        for it in range(0, KH * KW * nc2):
            r = it // nc2
            c0 = (it - r * nc2) * BLOCK_K
            kh = r // KW
            kw = r - kh * KW
            ih = ih0 + kh * DH  # [BM] row in the (virtual) resized H×W image
            iw = iw0 + kw * DW
            ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            ih = tl.minimum(tl.maximum(ih, 0), H - 1)
            iw = tl.minimum(tl.maximum(iw, 0), W - 1)
            c = c0 + offs_k
            mask_c = c < C2
            c_off = _idx(c, IDX64)[None, :] * s2_c  # [1, BK]
            mask_a = ok[:, None] & mask_c[None, :]
            if RESIZE == 0:
                a_row = x2_row + _idx(ih, IDX64) * s2_h + _idx(iw, IDX64) * s2_w
                a = tl.load(x2_ptr + a_row[:, None] + c_off, mask=mask_a, other=0.0)
            elif RESIZE == 1:
                # ATen "nearest": src = min(floor(d·step), in−1) in fp32
                hs = tl.minimum((ih.to(tl.float32) * step_h).to(tl.int32), H2 - 1)
                ws = tl.minimum((iw.to(tl.float32) * step_w).to(tl.int32), W2 - 1)
                a_row = x2_row + _idx(hs, IDX64) * s2_h + _idx(ws, IDX64) * s2_w
                a = tl.load(x2_ptr + a_row[:, None] + c_off, mask=mask_a, other=0.0)
            else:
                # ATen bilinear (area_pixel_compute_source_index), as in conv2d
                if ALIGN_CORNERS:
                    src_h = ih.to(tl.float32) * step_h
                    src_w = iw.to(tl.float32) * step_w
                else:
                    src_h = tl.maximum((ih.to(tl.float32) + 0.5) * step_h - 0.5, 0.0)
                    src_w = tl.maximum((iw.to(tl.float32) + 0.5) * step_w - 0.5, 0.0)
                h0 = tl.minimum(src_h.to(tl.int32), H2 - 1)
                w0 = tl.minimum(src_w.to(tl.int32), W2 - 1)
                h1 = tl.minimum(h0 + 1, H2 - 1)
                w1 = tl.minimum(w0 + 1, W2 - 1)
                lh = tl.minimum(src_h - h0.to(tl.float32), 1.0)[:, None]  # [BM, 1]
                lw = tl.minimum(src_w - w0.to(tl.float32), 1.0)[:, None]
                r0 = x2_row + _idx(h0, IDX64) * s2_h
                r1 = x2_row + _idx(h1, IDX64) * s2_h
                q0 = _idx(w0, IDX64) * s2_w
                q1 = _idx(w1, IDX64) * s2_w
                v00 = tl.load(x2_ptr + (r0 + q0)[:, None] + c_off, mask=mask_a, other=0.0)
                v01 = tl.load(x2_ptr + (r0 + q1)[:, None] + c_off, mask=mask_a, other=0.0)
                v10 = tl.load(x2_ptr + (r1 + q0)[:, None] + c_off, mask=mask_a, other=0.0)
                v11 = tl.load(x2_ptr + (r1 + q1)[:, None] + c_off, mask=mask_a, other=0.0)
                # blended in fp32 in ATen's order, rounded once to the storage dtype (the
                # materialised up(x2) the composite quantizes)
                top = (1.0 - lw) * v00.to(tl.float32) + lw * v01.to(tl.float32)
                bot = (1.0 - lw) * v10.to(tl.float32) + lw * v11.to(tl.float32)
                a = ((1.0 - lh) * top + lh * bot).to(fdt)
            a = _quantize(a, q_in, fdt, QUANT_CPU)
            w_row = (wc_x2 + c) * sw_i + kh * sw_h + kw * sw_w
            b = tl.load(
                w_ptr + w_row[:, None] + w_col[None, :], mask=mask_c[:, None] & mask_wn, other=0
            )
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)

    # ---- epilogue: dequantize, bias, residual, activation in fp32; one write ---------------
    ohi = _idx(oh, IDX64)
    owi = _idx(ow, IDX64)
    out_row = n * so_n + ohi * so_h + owi * so_w
    res_row = n * sr_n + ohi * sr_h + owi * sr_w
    _qepilogue(
        acc, offs_n, mask_m, mask_n, x_ptr, out_ptr, out_row, so_c, res_ptr, res_row, sr_c,
        ws_ptr, s_ws, bias_ptr, s_bias, x_scale, q_out, act_param,
        HAS_BIAS, RES_MODE, ACT, IDX64, OUT_INT8, QUANT_CPU,
    )  # fmt: skip


def _qdw_configs():
    """Autotune space of the int8 depthwise kernel (one factory; see autotune_configs).

    Direct and memory bound like conv2d's depthwise kernel (the same tiles and the
    same limit of 32 accumulators per thread: int32 here, converted to fp32 in place in
    the epilogue), with the quantization of every tap's [BLOCK_P, BLOCK_C] load on
    top; no tl.dot, so stages 1–2.
    """
    space = [
        {"BLOCK_P": 64, "BLOCK_C": 64},
        {"BLOCK_P": 32, "BLOCK_C": 128},
        {"BLOCK_P": 128, "BLOCK_C": 32},
        {"BLOCK_P": 128, "BLOCK_C": 64},
        {"BLOCK_P": 256, "BLOCK_C": 16},
    ]
    return autotune_configs(
        space,
        num_warps=(4, 8),
        num_stages=(1, 2),
        interpreter_config={"BLOCK_P": 64, "BLOCK_C": 16},
        fits=lambda b, warps, stages: b["BLOCK_P"] * b["BLOCK_C"] <= 32 * 32 * warps,
    )


def _prune_qdw_configs(configs, named_args, **kwargs):
    """Drop channel tiles wider than C (they would be mostly padding)."""
    args = {**named_args, **kwargs}
    kept = [c for c in configs if c.kwargs["BLOCK_C"] <= max(16, next_power_of_2(args["C"]))]
    return kept or configs


@triton.autotune(
    configs=_qdw_configs(),
    key=[*_GEOMETRY_KEYS, "C", "IDX64", "RES_MODE", "OUT_INT8"],
    prune_configs_by={"early_config_prune": _prune_qdw_configs},
)
@triton.jit
def _qdw_conv2d_kernel(
    x_ptr,  # [N, C, H, W] float, any strides
    w_ptr,  # [C, 1, KH, KW] int8, any strides (packed depthwise: C stride 1)
    ws_ptr,  # [C]
    bias_ptr,  # [C]
    res_ptr,  # [N, C, Ho, Wo]
    out_ptr,  # [N, C, Ho, Wo]
    N, C, H, W, KH, KW, Ho, Wo,
    SH, SW, PH, PW, DH, DW,
    sx_n, sx_c, sx_h, sx_w,
    sw_o, sw_h, sw_w,
    s_ws, s_bias,
    sr_n, sr_c, sr_h, sr_w,
    so_n, so_c, so_h, so_w,
    x_scale, q_in, q_out, act_param,
    HAS_BIAS: tl.constexpr,
    RES_MODE: tl.constexpr,
    ACT: tl.constexpr,
    IDX64: tl.constexpr,
    OUT_INT8: tl.constexpr,
    QUANT_CPU: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_pid_c = tl.cdiv(C, BLOCK_C)
    pid_p = pid // num_pid_c
    pid_c = pid - pid_p * num_pid_c

    M = N * Ho * Wo
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < M
    m = tl.minimum(offs_p, M - 1)
    ow = m % Wo
    t = m // Wo
    oh = t % Ho
    n = _idx(t // Ho, IDX64)
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW

    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    c_off = _idx(offs_c, IDX64)[None, :] * sx_c  # [1, BC]
    w_c = offs_c * sw_o  # [BC]
    fdt = x_ptr.dtype.element_ty

    x_row = n * sx_n
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.int32)
    for r in range(0, KH * KW):
        kh = r // KW
        kw = r - kh * KW
        ih = ih0 + kh * DH
        iw = iw0 + kw * DW
        ok = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        ih = tl.minimum(tl.maximum(ih, 0), H - 1)
        iw = tl.minimum(tl.maximum(iw, 0), W - 1)
        a_row = x_row + _idx(ih, IDX64) * sx_h + _idx(iw, IDX64) * sx_w
        xv = tl.load(x_ptr + a_row[:, None] + c_off, mask=ok[:, None] & mask_c[None, :], other=0.0)
        xq = _quantize(xv, q_in, fdt, QUANT_CPU)
        wv = tl.load(w_ptr + w_c + kh * sw_h + kw * sw_w, mask=mask_c, other=0)  # [BC] int8
        acc += xq.to(tl.int32) * wv.to(tl.int32)[None, :]

    ohi = _idx(oh, IDX64)
    owi = _idx(ow, IDX64)
    out_row = n * so_n + ohi * so_h + owi * so_w
    res_row = n * sr_n + ohi * sr_h + owi * sr_w
    _qepilogue(
        acc, offs_c, mask_p, mask_c, x_ptr, out_ptr, out_row, so_c, res_ptr, res_row, sr_c,
        ws_ptr, s_ws, bias_ptr, s_bias, x_scale, q_out, act_param,
        HAS_BIAS, RES_MODE, ACT, IDX64, OUT_INT8, QUANT_CPU,
    )  # fmt: skip


# --------------------------------------------------------------------------- host code


def pack_qconv_weight(weight: torch.Tensor) -> torch.Tensor:
    """The int8 conv weight in the layout the kernels read fastest, same logical shape.

    Dense weight [Cout, Cin, KH, KW] → memory [Cout, KH, KW, Cin] (channels_last): the
    GEMM's B operand K-major, as the int8 MMAs read both operands (8-bit operands are
    not transposed on the fly by ldmatrix / wgmma). Depthwise [C, 1, KH, KW] → memory
    [KH, KW, C]: each tap's channel vector contiguous. ``qconv2d`` accepts any weight
    strides, so this is an optimisation: pack once at build time.
    """
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [Cout, Cin, KH, KW], got {tuple(weight.shape)}")
    if weight.shape[1] == 1 and weight.shape[0] > 1:  # depthwise (or a 1-channel stem)
        return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    return weight.contiguous(memory_format=torch.channels_last)


@dataclass(frozen=True)
class _QConv:
    """A validated qconv2d call: every shape the kernels take."""

    N: int
    C1: int
    C2: int
    H: int
    W: int
    H2: int
    W2: int
    Cout: int
    KH: int
    KW: int
    Ho: int
    Wo: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    depthwise: bool
    out_dtype: torch.dtype


def _positive_scale(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    f = float(v)
    if not (np.isfinite(f) and np.float32(f) > 0):
        raise ValueError(f"{name} must be a finite float > 0 (in fp32), got {v!r}")
    return f


def _check(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: float,
    w_scale: torch.Tensor,
    stride: int | tuple[int, int],
    padding: int | tuple[int, int],
    dilation: int | tuple[int, int],
    groups: int,
    act: str,
    residual: torch.Tensor | None,
    x2: torch.Tensor | None,
    x2_resize: str,
    x2_align_corners: bool,
    x2_scales: tuple[float, float] | None,
    x2_first: bool,
    out_scale: float | None,
    out: torch.Tensor | None,
    out_dtype: torch.dtype | None,
) -> _QConv:
    """Validate a qconv2d call; every error names the argument, what it must be and what came."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W], got {tuple(x.shape)}")
    check_float_dtype("x", x)
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [Cout, Cin, KH, KW], got {tuple(weight.shape)}")
    if weight.dtype != torch.int8:
        raise TypeError(
            f"weight must be int8 (quantized per output channel, see "
            f"segfast.compiler.quant.apply.quantize_weight), got {weight.dtype}"
        )
    _positive_scale("x_scale", x_scale)
    act_code(act)
    sh, sw = _pair("stride", stride, 1)
    ph, pw = _pair("padding", padding, 0)
    dh, dw = _pair("dilation", dilation, 1)
    N, C1, H, W = x.shape
    Cout, Cin, KH, KW = weight.shape
    if min(N, C1, H, W, Cout, KH, KW) < 1:
        raise ValueError(
            f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must have no empty dims"
        )
    if not isinstance(w_scale, torch.Tensor) or w_scale.dtype != torch.float32:
        what = w_scale.dtype if isinstance(w_scale, torch.Tensor) else type(w_scale).__name__
        raise TypeError(f"w_scale must be a float32 tensor [Cout], got {what}")
    _check_shape("w_scale", w_scale, (Cout,), "[Cout]")

    if x2_resize not in _RESIZE_CODES:
        raise ValueError(f"x2_resize must be one of {sorted(_RESIZE_CODES)}, got {x2_resize!r}")
    C2, H2, W2 = 0, H, W
    if x2 is None:
        if x2_resize != "none" or x2_scales is not None or x2_first or x2_align_corners:
            raise ValueError("x2_resize, x2_scales, x2_first and x2_align_corners need x2")
    else:
        if x2.dim() != 4:
            raise ValueError(f"x2 must be 4-D [N, C2, H2, W2], got {tuple(x2.shape)}")
        if x2.dtype != x.dtype:
            raise TypeError(f"x2 must have x's dtype {x.dtype}, got {x2.dtype}")
        if x2.shape[0] != N:
            raise ValueError(f"x2 must have x's batch size {N}, got {x2.shape[0]}")
        C2, H2, W2 = x2.shape[1:]
        if min(C2, H2, W2) < 1:
            raise ValueError(f"x2 must have no empty dims, got {tuple(x2.shape)}")
        if x2_resize == "none" and (H2, W2) != (H, W):
            raise ValueError(f"x2 must be x's size {(H, W)} when x2_resize='none', got {(H2, W2)}")
        if x2_align_corners and x2_resize != "bilinear":
            raise ValueError(f"x2_align_corners needs x2_resize='bilinear', got {x2_resize!r}")
        if x2_scales is not None:
            if x2_resize == "none":
                raise ValueError("x2_scales needs x2_resize='nearest' or 'bilinear'")
            if len(x2_scales) != 2 or any(float(s) <= 0 for s in x2_scales):
                raise ValueError(f"x2_scales must be two positive floats, got {x2_scales!r}")

    depthwise = groups != 1
    if depthwise:
        if not (groups == C1 == Cout and Cin == 1):
            raise ValueError(
                f"groups must be 1 or equal to Cin == Cout with weight [C, 1, KH, KW] "
                f"(depthwise); got groups={groups}, x channels {C1}, weight "
                f"{tuple(weight.shape)} (other grouped int8 convs run as the composite "
                "segfast.compiler.ops.qconv2d_impl)"
            )
        if x2 is not None:
            raise ValueError("x2 (two-source input) is only supported with groups=1")
    elif Cin != C1 + C2:
        raise ValueError(
            f"weight must have Cin = C1 + C2 = {C1} + {C2} = {C1 + C2} input channels, "
            f"got {Cin} (weight {tuple(weight.shape)})"
        )

    Ho = (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"x of size {(H, W)} with padding {(ph, pw)} is smaller than the dilated "
            f"kernel {(dh * (KH - 1) + 1, dw * (KW - 1) + 1)}"
        )
    if bias is not None:
        check_float_dtype("bias", bias)
        _check_shape("bias", bias, (Cout,), "[Cout]")
    oshape = (N, Cout, Ho, Wo)
    if residual is not None:
        check_float_dtype("residual", residual)
        _check_shape("residual", residual, oshape, "[N, Cout, Ho, Wo]")
    if out_scale is not None:
        _positive_scale("out_scale", out_scale)
        odt = torch.int8
        if out_dtype not in (None, torch.int8):
            raise TypeError(
                f"out_scale writes int8: out_dtype must be None or int8, got {out_dtype}"
            )
        if out is not None and out.dtype != torch.int8:
            raise TypeError(f"out_scale writes int8: out must be int8, got {out.dtype}")
    else:
        if out_dtype is not None and out_dtype not in (
            torch.float32,
            torch.float16,
            torch.bfloat16,
        ):
            raise TypeError(
                f"out_dtype must be float32, float16 or bfloat16 (int8 needs out_scale), "
                f"got {out_dtype}"
            )
        if out is not None:
            check_float_dtype("out", out)
            if out_dtype is not None and out.dtype != out_dtype:
                raise TypeError(f"out has dtype {out.dtype} but out_dtype is {out_dtype}")
        odt = out.dtype if out is not None else (out_dtype or x.dtype)
    if out is not None:
        _check_shape("out", out, oshape, "[N, Cout, Ho, Wo]")
    return _QConv(
        N, C1, C2, H, W, H2, W2, Cout, KH, KW, Ho, Wo, (sh, sw), (ph, pw), (dh, dw), depthwise, odt
    )


def _quant_param(scale: float, on_cpu: bool) -> float:
    """What ``_quantize`` takes for ``scale``: ATen's CPU divides by fp32(scale); CUDA
    multiplies by fp32(1) / fp32(scale) (``div_true_kernel_cuda``'s CPU-scalar path)."""
    s = np.float32(scale)
    return float(s if on_cpu else np.float32(1.0) / s)


def qconv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    x_scale: float,
    w_scale: torch.Tensor,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    act: str = "none",
    act_param: float = 0.01,
    residual: torch.Tensor | None = None,
    residual_after_act: bool = False,
    x2: torch.Tensor | None = None,
    x2_resize: str = "none",
    x2_align_corners: bool = False,
    x2_scales: tuple[float, float] | None = None,
    x2_first: bool = False,
    out_scale: float | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """int8 fused conv2d (``segfast::qconv2d``) → [N, Cout, Ho, Wo].

    The arguments of :func:`segfast.compiler.ops.qconv2d_impl` (its exact meaning and
    the reference this is tested against), in the keyword style of
    :func:`segfast.kernels.conv2d.conv2d`: x: [N, C1, H, W] float (fp32/fp16/bf16),
    quantized per tensor at ``x_scale`` on load (zero point 0, round half to even, clamp
    to [−128, 127]); weight: int8 [Cout, C1 + C2, KH, KW] (depthwise, groups == C1 ==
    Cout: [C, 1, KH, KW]; other grouped convs are refused — they run as the composite);
    w_scale: fp32 [Cout]; bias: [Cout] or None; residual: [N, Cout, Ho, Wo], added
    before the activation or after it (``residual_after_act``); x2: [N, C2, H2, W2]
    resized to H×W (nearest/bilinear, ATen semantics; ``x2_scales`` the graph's scale
    factors) and joined after x (before it with ``x2_first``), quantized at the same
    ``x_scale`` after the resize.

    Output: a new channels_last tensor of ``out_dtype`` (default x.dtype), or ``out``
    (any strided view, e.g. a channel slice of a concat buffer). With ``out_scale`` the
    output is int8 instead: the float result quantized at ``out_scale`` (for an int8
    consumer). The fast path is channels_last x and a :func:`pack_qconv_weight` weight.
    """
    device = check_device(x, weight, bias, w_scale, residual, x2, out)
    p = _check(
        x, weight, bias, x_scale, w_scale, stride, padding, dilation, groups, act, residual,
        x2, x2_resize, x2_align_corners, x2_scales, x2_first, out_scale, out, out_dtype,
    )  # fmt: skip
    if out is None:
        out = torch.empty(
            (p.N, p.Cout, p.Ho, p.Wo),
            dtype=p.out_dtype,
            device=device,
            memory_format=torch.channels_last,
        )
    M = p.N * p.Ho * p.Wo
    if M > 2**31 - 1:
        raise ValueError(f"N·Ho·Wo = {M} output pixels exceed 2**31 - 1")
    if _span(weight) > 2**31 - 1:
        raise ValueError(f"weight {tuple(weight.shape)} exceeds 2**31 elements")
    idx64 = max(_span(t) for t in (x, x2, residual, out) if t is not None) > _INT32_MAX
    on_cpu = device.type == "cpu"
    q_in = _quant_param(x_scale, on_cpu)
    q_out = _quant_param(out_scale, on_cpu) if out_scale is not None else 1.0
    # Absent optional tensors: any valid pointer; the constexpr flags keep it unread.
    bias_t = bias if bias is not None else w_scale
    res_t = residual if residual is not None else out
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    res_mode = 0 if residual is None else (2 if residual_after_act else 1)
    s_bias = bias.stride(0) if bias is not None else 0
    (sh, sw), (ph, pw), (dh, dw) = p.stride, p.padding, p.dilation
    common = {
        "HAS_BIAS": bias is not None,
        "RES_MODE": res_mode,
        "ACT": act_code(act),
        "IDX64": idx64,
        "OUT_INT8": out_scale is not None,
        "QUANT_CPU": on_cpu,
    }

    if p.depthwise:

        def dw_grid(meta):
            return (triton.cdiv(M, meta["BLOCK_P"]) * triton.cdiv(p.Cout, meta["BLOCK_C"]),)

        _qdw_conv2d_kernel[dw_grid](
            x, weight, w_scale, bias_t, res_t, out,
            p.N, p.C1, p.H, p.W, p.KH, p.KW, p.Ho, p.Wo,
            sh, sw, ph, pw, dh, dw,
            *x.stride(),
            weight.stride(0), weight.stride(2), weight.stride(3),
            w_scale.stride(0), s_bias,
            *res_strides,
            *out.stride(),
            float(np.float32(x_scale)), q_in, q_out, float(act_param),
            **common,
        )  # fmt: skip
        return out

    resize = _RESIZE_CODES[x2_resize] if x2 is not None else 0
    step_h, step_w = _resample_steps((p.H2, p.W2), (p.H, p.W), x2_resize, x2_align_corners,
                                     x2_scales, on_cpu)  # fmt: skip
    x2_t = x2 if x2 is not None else x
    wc_x, wc_x2 = (p.C2, 0) if x2_first else (0, p.C1)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(p.Cout, meta["BLOCK_N"]),)

    _qconv2d_kernel[grid](
        x, x2_t, weight, w_scale, bias_t, res_t, out,
        p.N, p.C1, p.C2, p.H, p.W, p.H2, p.W2, p.Cout, p.KH, p.KW, p.Ho, p.Wo,
        sh, sw, ph, pw, dh, dw,
        step_h, step_w,
        wc_x, wc_x2,
        *x.stride(),
        *x2_t.stride(),
        *weight.stride(),
        w_scale.stride(0), s_bias,
        *res_strides,
        *out.stride(),
        float(np.float32(x_scale)), q_in, q_out, float(act_param),
        HAS_X2=x2 is not None,
        RESIZE=resize,
        ALIGN_CORNERS=bool(x2_align_corners),
        FLAT_K=p.C1 <= _FLAT_K_MAX_CHANNELS,
        **common,
    )  # fmt: skip
    return out
