"""Fused segmentation head: [1×1 conv] → [bilinear upsample] → argmax / softmax / sigmoid /
threshold, without ever writing full-resolution logits.

Logical shapes (PyTorch's, any strides):

    x       [N, C, h, w]   features (or K logits when ``weight`` is None)
    weight  [K, C] or [K, C, 1, 1],  bias [K]
    result  argmax / threshold: mask [N, H, W] (uint8 / int32 / int64)
            softmax / sigmoid / logits: [N, K, H, W], channels_last by default

(H, W) = ``out_size`` or (h, w). Two kernels' worth of work, one Triton kernel body
(``_seg_head_kernel``) launched through two autotuners:

* no upsample, with weight — ONE launch: a tile of BLOCK_P pixels × BLOCK_K classes is
  computed with ``tl.dot`` over C (fp32 accumulation; fp32 inputs with
  ``input_precision="ieee"``, never TF32), bias added, and the mode's reduction done in
  registers. Bytes: read N·h·w·C features + K·C weights; write N·h·w mask elements (or
  N·K·h·w probabilities). FLOPs: 2·N·h·w·C·K.
* upsample, with weight (FCN / PSPNet / DeepLab: logits at stride 4–8) — the 1×1 conv writes
  low-resolution fp32 logits [N, K, h, w] (channels_last scratch, small: K·h·w·4 bytes per
  image), then ONE gather launch blends, for every output pixel, the 4 low-resolution
  neighbours of all K logits in fp32 and reduces in registers. Bytes: read the scratch
  (mostly from L2: every low-resolution pixel serves up to (H/h)·(W/w) outputs); write
  N·H·W mask elements. E.g. 21 classes at 1024×2048 in fp16: upsample-then-argmax writes and
  reads 2 × 88 MB of logits (plus an 8-byte-per-pixel int64 index); the fused head writes
  2 MB of uint8 mask.
* upsample or identity, without weight — the gather launch alone, reading ``x`` directly.

Resampling follows ATen's ``upsample_bilinear2d`` exactly (fp32 source index, per-dimension
copy when a size does not change, ATen's ``scales`` when the graph used ``scale_factor``);
see ``bilinear_scale`` and ``_source_index`` (shared with ``kernels/preprocess.py``).

argmax picks the FIRST maximum like ``torch.argmax`` and, like it, treats NaN as larger than
everything: a pixel with NaN logits gets the index of its first NaN class. "threshold" is the
binary mask P(class 1) > threshold: sigmoid(logit) for K == 1, softmax(logits)[1] for K == 2.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ._common import (
    autotune_configs,
    check_device,
    check_float_dtype,
    dot_loop_shared_bytes,
    launch_target,
    next_power_of_2,
)

MODES: dict[str, int] = {"argmax": 0, "softmax": 1, "sigmoid": 2, "threshold": 3, "logits": 4}
_ARGMAX = tl.constexpr(0)
_SOFTMAX = tl.constexpr(1)
_SIGMOID = tl.constexpr(2)
_THRESHOLD = tl.constexpr(3)
_LOGITS = tl.constexpr(4)

MASK_DTYPES = (torch.uint8, torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Where the logits of a tile come from (constexpr SRC of the kernel).
_SRC_CONV = 0  # features @ weight (+ bias), output pixels == input pixels
_SRC_GATHER = 1  # logits tensor, bilinear (or identity) gather

# dtype of an int32 index larger than any real class count; "no NaN / no match" marker.
_BIG = tl.constexpr(2147483647)


# ---------------------------------------------------------------------------------------
# Bilinear source indices (ATen's area_pixel_compute_source_index + guard_index_and_lambda)
# ---------------------------------------------------------------------------------------


def bilinear_scale(in_size: int, out_size: int, align_corners: bool, scale: float | None) -> float:
    """The fp32 source-per-destination ratio ATen uses along one dimension.

    align_corners: (in−1)/(out−1) (0 when out == 1); otherwise 1/scale when a positive
    ``scale`` (the graph's scale_factor) is given, else in/out. A dimension whose size does
    not change is a copy in ATen's CPU kernel; ratio 1 reproduces it exactly (src = d).
    Rounded to fp32 like ATen's ``static_cast<float>`` (a double quotient rounded to fp32
    is the correctly rounded fp32 quotient).
    """
    if in_size == out_size:
        r = 1.0
    elif align_corners:
        r = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    elif scale is not None and scale > 0:
        r = 1.0 / scale
    else:
        r = in_size / out_size
    return float(np.float32(r))


@triton.jit
def _source_index(d, size_in, ratio, ALIGN: tl.constexpr):
    """Output indices ``d`` → (i0, i1, λ) along one dimension, in fp32 like ATen."""
    df = d.to(tl.float32)
    if ALIGN:
        src = ratio * df
    else:
        # ATen's ratio·(d + ½) − ½ is contracted to one fma by nvcc (CUDA) and by the
        # compiler of ATen's AVX2/AVX-512 CPU kernels; spelling it out keeps λ bit-exact.
        src = tl.maximum(tl.fma(ratio, df + 0.5, -0.5), 0.0)
    i0 = tl.minimum(src.to(tl.int32), size_in - 1)  # src ≥ 0: truncation is floor
    lam = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = tl.where(i0 < size_in - 1, i0 + 1, i0)
    return i0.to(tl.int64), i1.to(tl.int64), lam


@triton.jit
def _blend(x00, x01, x10, x11, h0, h1, w0, w1):
    """h0·(w0·x00 + w1·x01) + h1·(w0·x10 + w1·x11), ATen's CUDA expression, with the fmas
    nvcc contracts it to (LLVM folds ``a·b + c·d`` to fma(a, b, c·d)). Spelled out so the
    Triton compiler cannot contract it differently. ATen's CPU kernels round the blend
    differently (last ulp); the source indices and λ are bit-exact on both.
    """
    t0 = tl.fma(w0, x00, w1 * x01)
    t1 = tl.fma(w0, x10, w1 * x11)
    return tl.fma(h0, t0, h1 * t1)


# ---------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(
    src, s_n, s_c, s_y, s_x, w, w_k, w_c, bias, C, K, k0,
    n, iy0, iy1, ix0, ix1, ly, lx, pmask,
    SRC: tl.constexpr, UPSAMPLE: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """fp32 logits [BLOCK_P, BLOCK_K] of classes k0 … k0+BLOCK_K−1 (invalid classes: junk)."""
    k = k0 + tl.arange(0, BLOCK_K)
    kmask = k < K
    if SRC == 0:
        # 1×1 conv: x[p, :] @ w[k, :]^T over C in BLOCK_C chunks.
        base = n * s_n + iy0 * s_y + ix0 * s_x  # [BLOCK_P] int64
        acc = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < C
            a = tl.load(
                src + base[:, None] + c.to(tl.int64)[None, :] * s_c,
                mask=pmask[:, None] & cmask[None, :],
                other=0.0,
            )  # [BLOCK_P, BLOCK_C]
            b = tl.load(
                w + c[:, None] * w_c + k[None, :] * w_k,
                mask=cmask[:, None] & kmask[None, :],
                other=0.0,
            )  # [BLOCK_C, BLOCK_K]
            if DOT_FP32:
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        if HAS_BIAS:
            acc += tl.load(bias + k, mask=kmask, other=0.0).to(tl.float32)[None, :]
        v = acc
    else:
        koff = k.to(tl.int64)[None, :] * s_c
        m2 = pmask[:, None] & kmask[None, :]
        nb = n * s_n
        v00 = tl.load(src + (nb + iy0 * s_y + ix0 * s_x)[:, None] + koff, mask=m2, other=0.0)
        v00 = v00.to(tl.float32)
        if UPSAMPLE:
            v01 = tl.load(src + (nb + iy0 * s_y + ix1 * s_x)[:, None] + koff, mask=m2, other=0.0)
            v10 = tl.load(src + (nb + iy1 * s_y + ix0 * s_x)[:, None] + koff, mask=m2, other=0.0)
            v11 = tl.load(src + (nb + iy1 * s_y + ix1 * s_x)[:, None] + koff, mask=m2, other=0.0)
            h1 = ly[:, None]
            h0 = 1.0 - h1
            w1 = lx[:, None]
            w0 = 1.0 - w1
            v = _blend(
                v00, v01.to(tl.float32), v10.to(tl.float32), v11.to(tl.float32), h0, h1, w0, w1
            )
        else:
            v = v00
    return v, k, kmask


@triton.jit
def _argmax_update(best_v, best_i, best_nan, v, k, kmask):
    """Merge a [BLOCK_P, BLOCK_K] block into the running (max, first index, saw-NaN) state.

    NaN beats everything and the first NaN wins (torch.argmax); otherwise the first index
    of the maximum. Blocks come in class order, so a later block wins only when strictly
    greater (or when it holds the first NaN).
    """
    valid = kmask[None, :]
    isnan = (v != v) & valid
    nan_i = tl.min(tl.where(isnan, k[None, :], _BIG), axis=1)
    vv = tl.where(valid & (v == v), v, -float("inf"))
    blk_max = tl.max(vv, axis=1)
    blk_i = tl.min(tl.where((vv == blk_max[:, None]) & valid, k[None, :], _BIG), axis=1)
    blk_nan = (nan_i < _BIG).to(tl.int32)
    clean = best_nan == 0
    take_nan = clean & (blk_nan != 0)
    take_max = clean & (blk_nan == 0) & (blk_max > best_v)
    best_i = tl.where(take_nan, nan_i, tl.where(take_max, blk_i, best_i))
    best_v = tl.where(take_max, blk_max, best_v)
    return best_v, best_i, tl.maximum(best_nan, blk_nan)


@triton.jit
def _seg_head_kernel(
    src, s_n, s_c, s_y, s_x,          # features [N, C, h, w] (SRC 0) or logits [N, K, h, w] (SRC 1)
    w, w_k, w_c, bias,                # weight [K, C], bias [K] (SRC 0 only)
    out, o_n, o_k, o_y, o_x,          # mask [N, H, W] (o_k unused) or probabilities [N, K, H, W]
    C, K, h_in, w_in, H, W, total,    # total = N·H·W output pixels
    ratio_h, ratio_w, threshold,
    MODE: tl.constexpr, SRC: tl.constexpr, UPSAMPLE: tl.constexpr, ALIGN: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, ONE_BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # Output pixels flattened (n, oy, ox), ox fastest; int64 so N·H·W·K offsets never wrap.
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < total
    ox = p % W
    t = p // W
    oy = t % H
    n = t // H
    if UPSAMPLE:
        iy0, iy1, ly = _source_index(oy, h_in, ratio_h, ALIGN)
        ix0, ix1, lx = _source_index(ox, w_in, ratio_w, ALIGN)
    else:
        iy0 = oy
        iy1 = oy
        ix0 = ox
        ix1 = ox
        ly = tl.zeros([BLOCK_P], dtype=tl.float32)
        lx = ly
    o_pix = n * o_n + oy * o_y + ox * o_x  # [BLOCK_P] int64

    if MODE == _ARGMAX:
        best_v = tl.zeros([BLOCK_P], dtype=tl.float32) - float("inf")
        best_i = tl.zeros([BLOCK_P], dtype=tl.int32)
        best_nan = tl.zeros([BLOCK_P], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            v, k, kmask = _logits_tile(
                src, s_n, s_c, s_y, s_x, w, w_k, w_c, bias, C, K, k0,
                n, iy0, iy1, ix0, ix1, ly, lx, pmask,
                SRC, UPSAMPLE, HAS_BIAS, DOT_FP32, BLOCK_P, BLOCK_K, BLOCK_C,
            )  # fmt: skip
            best_v, best_i, best_nan = _argmax_update(best_v, best_i, best_nan, v, k, kmask)
        tl.store(out + o_pix, best_i.to(out.dtype.element_ty), mask=pmask)
    elif MODE == _THRESHOLD:
        # K ∈ {1, 2}: one class block.
        v, k, kmask = _logits_tile(
            src, s_n, s_c, s_y, s_x, w, w_k, w_c, bias, C, K, 0,
            n, iy0, iy1, ix0, ix1, ly, lx, pmask,
            SRC, UPSAMPLE, HAS_BIAS, DOT_FP32, BLOCK_P, BLOCK_K, BLOCK_C,
        )  # fmt: skip
        v = tl.where(kmask[None, :], v, -float("inf"))
        l0 = tl.sum(tl.where(k[None, :] == 0, v, 0.0), axis=1)
        p_sig = 1.0 / (1.0 + tl.exp(-l0))
        m = tl.max(v, axis=1)
        e = tl.exp(v - m[:, None])
        p_soft = tl.sum(tl.where(k[None, :] == 1, e, 0.0), axis=1) / tl.sum(e, axis=1)
        prob = tl.where(K == 1, p_sig, p_soft)
        tl.store(out + o_pix, (prob > threshold).to(out.dtype.element_ty), mask=pmask)
    elif MODE == _SOFTMAX:
        if ONE_BLOCK:
            v, k, kmask = _logits_tile(
                src, s_n, s_c, s_y, s_x, w, w_k, w_c, bias, C, K, 0,
                n, iy0, iy1, ix0, ix1, ly, lx, pmask,
                SRC, UPSAMPLE, HAS_BIAS, DOT_FP32, BLOCK_P, BLOCK_K, BLOCK_C,
            )  # fmt: skip
            v = tl.where(kmask[None, :], v, -float("inf"))
            e = tl.exp(v - tl.max(v, axis=1)[:, None])
            prob = e / tl.sum(e, axis=1)[:, None]
            o_ptr = out + o_pix[:, None] + k.to(tl.int64)[None, :] * o_k
            tl.store(o_ptr, prob.to(out.dtype.element_ty), mask=pmask[:, None] & kmask[None, :])
        else:
            # Pass 1: online max / sum of exponentials over class blocks; pass 2 recomputes
            # each block's logits (cheap next to writing K probabilities) and writes.
            m = tl.zeros([BLOCK_P], dtype=tl.float32) - float("inf")
            s = tl.zeros([BLOCK_P], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                v, k, kmask = _logits_tile(
                    src, s_n, s_c, s_y, s_x, w, w_k, w_c, bias, C, K, k0,
                    n, iy0, iy1, ix0, ix1, ly, lx, pmask,
                    SRC, UPSAMPLE, HAS_BIAS, DOT_FP32, BLOCK_P, BLOCK_K, BLOCK_C,
                )  # fmt: skip
                v = tl.where(kmask[None, :], v, -float("inf"))
                m_new = tl.maximum(m, tl.max(v, axis=1))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(v - m_new[:, None]), axis=1)
                m = m_new
            for k0 in range(0, K, BLOCK_K):
                v, k, kmask = _logits_tile(
                    src, s_n, s_c, s_y, s_x, w, w_k, w_c, bias, C, K, k0,
                    n, iy0, iy1, ix0, ix1, ly, lx, pmask,
                    SRC, UPSAMPLE, HAS_BIAS, DOT_FP32, BLOCK_P, BLOCK_K, BLOCK_C,
                )  # fmt: skip
                prob = tl.exp(v - m[:, None]) / s[:, None]
                o_ptr = out + o_pix[:, None] + k.to(tl.int64)[None, :] * o_k
                tl.store(o_ptr, prob.to(out.dtype.element_ty), mask=pmask[:, None] & kmask[None, :])
    else:  # sigmoid / logits: classes are independent
        for k0 in range(0, K, BLOCK_K):
            v, k, kmask = _logits_tile(
                src, s_n, s_c, s_y, s_x, w, w_k, w_c, bias, C, K, k0,
                n, iy0, iy1, ix0, ix1, ly, lx, pmask,
                SRC, UPSAMPLE, HAS_BIAS, DOT_FP32, BLOCK_P, BLOCK_K, BLOCK_C,
            )  # fmt: skip
            if MODE == _SIGMOID:
                v = 1.0 / (1.0 + tl.exp(-v))
            o_ptr = out + o_pix[:, None] + k.to(tl.int64)[None, :] * o_k
            tl.store(o_ptr, v.to(out.dtype.element_ty), mask=pmask[:, None] & kmask[None, :])


_KEY = ["C", "K", "h_in", "w_in", "H", "W", "total", "MODE"]


def _prune_conv_head(configs, named_args, **kwargs):
    """Keep the tiles that fit in registers and, on a GPU, in its shared memory.

    Measured with ptxas for sm_90 and sm_87 (``python benchmarks/compile_targets.py``),
    per thread (T = 32·warps threads):

    - at most 16 fp32 logits (BLOCK_P·BLOCK_K/T): at 64 (128 pixels × 64 classes on 4
      warps) the argmax / softmax reductions beside them spill 48–840 B, at 32 on sm_87
      8 B (Triton 3.6);
    - fp32 dots (no tensor cores) also hold the C-slab of both operands: 64 pixels on
      4 warps, 4 stages (128 pixels spill 4–28 B; on 8 warps, or at 3 stages, ptxas
      squeezes a thread's logits into 80–128 registers and spills 8–56 B);
    - 32-deep C chunks only when C ≤ 32: above, 64-deep chunks take half the trips, and
      the 32-deep ones land on ptxas' occupancy steps on sm_87 (4–24 B of spills at 72,
      80 or 128 registers).

    Shared memory as ``dot_loop_shared_bytes`` (at most ~100 KB here).
    """
    args = {**named_args, **kwargs}
    bk, fp32 = args["BLOCK_K"], args["DOT_FP32"]
    x = args["src"]
    target = launch_target(x.device)

    def fits(c) -> bool:
        bp, bc, threads = c.kwargs["BLOCK_P"], c.kwargs["BLOCK_C"], 32 * c.num_warps
        if bp * bk // threads > 16 or (bc < 64 and args["C"] > bc):
            return False
        if fp32 and (bp > 64 or threads > 128 or c.num_stages < 4):
            return False
        if target is None:
            return True
        shared = dot_loop_shared_bytes(
            bp, bk, bc, c.num_stages,
            elem_bytes=4 if fp32 else x.element_size(),
            wgmma=target.capability[0] >= 9 and not fp32,
        )  # fmt: skip
        return shared <= target.max_shared

    return [c for c in configs if fits(c)] or configs[:1]


# 1×1 conv launches: the pixel tile is tl.dot's M, classes its N (≥ 16), C its K dimension.
# BLOCK_C 32/64 covers typical head widths (64–512) in few steps; more stages hide the
# feature loads. Interpreter: 16-wide C chunks so small test C values still take 2 steps.
_conv_head = triton.autotune(
    configs=autotune_configs(
        [
            {"BLOCK_P": 64, "BLOCK_C": 32},
            {"BLOCK_P": 64, "BLOCK_C": 64},
            {"BLOCK_P": 128, "BLOCK_C": 32},
            {"BLOCK_P": 128, "BLOCK_C": 64},
        ],
        interpreter_config={"BLOCK_P": 64, "BLOCK_C": 16},
    ),
    key=_KEY,
    prune_configs_by={"early_config_prune": _prune_conv_head},
)(_seg_head_kernel)


def _prune_gather(configs, named_args, **kwargs):
    """Keep the pixel tiles whose neighbours fit in registers (same on sm_90 and sm_87).

    Each thread holds BLOCK_P·BLOCK_K/T logits of each bilinear neighbour (T = 32·warps
    threads), fp32 after the load, each with its own 64-bit address (a pixel's K logits
    are not 16-byte aligned for most K, so the loads are scalar): at most 8 per neighbour
    with the upsample — at 16 (BLOCK_P 64 on 4 warps, 32 classes) threads sit at 250–255
    registers and softmax over 150 classes spills 290–320 B, at 32 (BLOCK_P 256 on
    8 warps) every mode spills 0.8–1.3 KB — and at most 16 without it (one neighbour).
    """
    args = {**named_args, **kwargs}
    limit = 8 if args["UPSAMPLE"] else 16

    def per_thread(c) -> int:
        return c.kwargs["BLOCK_P"] * args["BLOCK_K"] // (32 * c.num_warps)

    return [c for c in configs if per_thread(c) <= limit] or [min(configs, key=per_thread)]


# Gather launches: no dot and no C loop (BLOCK_C unused); each pixel holds 4·BLOCK_K fp32
# neighbours in registers, so the pixel tile trades parallelism against register pressure
# (``_prune_gather``). Pipelining stages do not apply (no loop over memory): num_stages=(1,).
_gather_head = triton.autotune(
    configs=autotune_configs(
        [{"BLOCK_P": bp, "BLOCK_C": 16} for bp in (32, 64, 128, 256)],
        num_stages=(1,),
        interpreter_config={"BLOCK_P": 128, "BLOCK_C": 16},
        # 32 pixels over 8 warps: 4 logits a thread, and ptxas spills 4 B at 64 registers
        fits=lambda blocks, warps, stages: blocks["BLOCK_P"] >= 8 * warps,
    ),
    key=_KEY,
    prune_configs_by={"early_config_prune": _prune_gather},
)(_seg_head_kernel)


# ---------------------------------------------------------------------------------------
# Launcher and reference
# ---------------------------------------------------------------------------------------


class _Plan:
    """Validated arguments shared by ``seg_head`` and ``seg_head_reference``."""

    def __init__(
        self, x, weight, bias, out_size, align_corners, scales, mode, mask_dtype, out_dtype, out
    ):
        check_float_dtype("x", x)
        if x.dim() != 4:
            raise ValueError(f"x must be 4-D [N, C, h, w], got {tuple(x.shape)}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        self.N, self.C, self.h, self.w = (int(s) for s in x.shape)
        self.weight = None
        if weight is not None:
            check_float_dtype("weight", weight)
            if weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1):
                weight = weight[:, :, 0, 0]
            if weight.dim() != 2:
                raise ValueError(
                    f"weight must be [K, C] or [K, C, 1, 1], got {tuple(weight.shape)}"
                )
            if weight.shape[1] != self.C:
                raise ValueError(
                    f"weight has {weight.shape[1]} input channels but x has C={self.C} "
                    f"(weight {tuple(weight.shape)}, x {tuple(x.shape)})"
                )
            self.weight = weight  # [K, C] view
            self.K = int(weight.shape[0])
        else:
            self.K = self.C
        if bias is not None:
            if weight is None:
                raise ValueError("bias needs weight (without weight, x already holds the logits)")
            check_float_dtype("bias", bias)
            if tuple(bias.shape) != (self.K,):
                raise ValueError(f"bias must be [K]=[{self.K}], got {tuple(bias.shape)}")
        if self.K < 1:
            raise ValueError(f"need at least one class, got K={self.K}")
        if scales is not None and out_size is None:
            raise ValueError("scales needs out_size (the output size the graph computed)")
        if out_size is None:
            self.H, self.W = self.h, self.w
        else:
            if len(out_size) != 2 or min(int(s) for s in out_size) < 1:
                raise ValueError(f"out_size must be (H, W) with H, W ≥ 1, got {out_size}")
            self.H, self.W = int(out_size[0]), int(out_size[1])
        sh, sw = (None, None) if scales is None else scales
        self.scales = (sh, sw)
        self.align_corners = bool(align_corners)
        self.upsample = (self.h, self.w) != (self.H, self.W)
        self.ratio_h = bilinear_scale(self.h, self.H, self.align_corners, sh)
        self.ratio_w = bilinear_scale(self.w, self.W, self.align_corners, sw)
        self.mode = mode
        if mode in ("argmax", "threshold"):
            if mask_dtype not in MASK_DTYPES:
                raise TypeError(f"mask_dtype must be uint8, int32 or int64, got {mask_dtype}")
            if mode == "threshold" and self.K not in (1, 2):
                raise ValueError(
                    f"mode 'threshold' needs K=1 (sigmoid) or K=2 (softmax) classes, got K={self.K}"
                )
            if mask_dtype == torch.uint8 and self.K > 256:
                raise ValueError(
                    f"a uint8 mask holds at most 256 classes, got K={self.K}; "
                    "pass mask_dtype=torch.int32 or torch.int64"
                )
            self.out_dtype = mask_dtype
            self.out_shape = (self.N, self.H, self.W)
        else:
            self.out_dtype = x.dtype if out_dtype is None else out_dtype
            if self.out_dtype not in _FLOAT_DTYPES:
                raise TypeError(
                    f"out_dtype must be float32, float16 or bfloat16, got {self.out_dtype}"
                )
            self.out_shape = (self.N, self.K, self.H, self.W)
        if out is not None:
            if tuple(out.shape) != self.out_shape:
                raise ValueError(f"out must be {list(self.out_shape)}, got {tuple(out.shape)}")
            if out.dtype != self.out_dtype:
                raise TypeError(f"out must have dtype {self.out_dtype}, got {out.dtype}")

    def allocate(self, device: torch.device) -> torch.Tensor:
        if len(self.out_shape) == 3:
            return torch.empty(self.out_shape, dtype=self.out_dtype, device=device)
        return torch.empty(
            self.out_shape,
            dtype=self.out_dtype,
            device=device,
            memory_format=torch.channels_last,
        )


def seg_head(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    out_size: tuple[int, int] | None = None,
    align_corners: bool = False,
    scales: tuple[float | None, float | None] | None = None,
    mode: str = "argmax",
    threshold: float = 0.5,
    mask_dtype: torch.dtype = torch.uint8,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Segmentation head: [1×1 conv to K classes] → [bilinear upsample] → ``mode``.

    x: [N, C, h, w] features (or [N, K, h, w] logits when ``weight`` is None), any strides.
    weight: [K, C] or [K, C, 1, 1]; bias: [K]. out_size: (H, W) of a bilinear upsample of
    the logits (ATen semantics, ``scales`` = the graph's scale_factor per dimension).
    mode: "argmax" → [N, H, W] class ids (first maximum; NaN counts as the maximum);
    "threshold" → [N, H, W] 0/1 where P(class 1) > ``threshold`` (K == 1: sigmoid, K == 2:
    softmax); "softmax" / "sigmoid" / "logits" → [N, K, H, W] in ``out_dtype`` (default
    x.dtype), channels_last. Masks are ``mask_dtype`` (uint8 needs K ≤ 256). ``out`` may be
    any strided tensor of the result's shape and dtype. Full-resolution logits are never
    written unless mode is "logits".
    """
    device = check_device(x, weight, bias, out)
    plan = _Plan(x, weight, bias, out_size, align_corners, scales, mode, mask_dtype, out_dtype, out)
    if out is None:
        out = plan.allocate(device)
    if out.numel() == 0:
        return out
    K = plan.K
    common = {
        "MODE": MODES[mode],
        "ALIGN": plan.align_corners,
        "ONE_BLOCK": False,
    }
    o_k = out.stride(1) if out.dim() == 4 else 0
    o_n, o_y, o_x = (out.stride(0), out.stride(-2), out.stride(-1))
    total = plan.N * plan.H * plan.W
    w2 = plan.weight
    dot_fp32 = w2 is not None and not (
        x.dtype == w2.dtype and x.dtype in (torch.float16, torch.bfloat16)
    )
    # The 1×1 conv's class tile is tl.dot's N dimension: ≥ 16; it bounds the fp32
    # accumulator (BLOCK_P × classes) — more classes loop over class blocks. 64 classes
    # on tensor cores; 16 for fp32 dots, whose threads also hold the C-slab of both
    # operands (with 64 classes every fp32 tile spills 20–1800 B on sm_90 or sm_87, with
    # 32 the two-pass softmax still spills 80–120 B with Triton 3.6).
    conv_bk = 16 if dot_fp32 else min(max(next_power_of_2(K), 16), 64)
    # Gather: 4 neighbours × BLOCK_K fp32 per pixel live in registers; 32 classes
    # (VOC's 21, Cityscapes' 19) in one block, larger K loops.
    gather_bk = min(next_power_of_2(K), 32)

    if w2 is not None:
        bias_arg = bias if bias is not None else w2
        if plan.upsample:
            # Low-resolution fp32 logits, channels_last: each pixel's K logits contiguous
            # for the gather below. [N, K, h, w]; K·h·w·4 bytes per image.
            logits = torch.empty(
                (plan.N, K, plan.h, plan.w),
                dtype=torch.float32,
                device=device,
                memory_format=torch.channels_last,
            )
            low_total = plan.N * plan.h * plan.w
            _launch_conv(
                x, w2, bias_arg, bias is not None, logits,
                (logits.stride(0), logits.stride(1), logits.stride(2), logits.stride(3)),
                plan, low_total, plan.h, plan.w, threshold, dot_fp32, conv_bk,
                {**common, "MODE": MODES["logits"]},
            )  # fmt: skip
            src = logits
        else:
            _launch_conv(
                x, w2, bias_arg, bias is not None, out, (o_n, o_k, o_y, o_x),
                plan, total, plan.H, plan.W, threshold, dot_fp32, conv_bk,
                {**common, "ONE_BLOCK": conv_bk >= K},
            )  # fmt: skip
            return out
    else:
        src = x
    _gather_head[lambda meta: (triton.cdiv(total, meta["BLOCK_P"]),)](
        src, src.stride(0), src.stride(1), src.stride(2), src.stride(3),
        src, 0, 0, src,
        out, o_n, o_k, o_y, o_x,
        K, K, plan.h, plan.w, plan.H, plan.W, total,
        plan.ratio_h, plan.ratio_w, float(threshold),
        SRC=_SRC_GATHER, UPSAMPLE=plan.upsample, HAS_BIAS=False, DOT_FP32=True,
        BLOCK_K=gather_bk, **{**common, "ONE_BLOCK": gather_bk >= K},
    )  # fmt: skip
    return out


def _launch_conv(
    x, w2, bias_arg, has_bias, dst, dst_strides, plan, total, H, W, threshold, dot_fp32, bk, const
):
    _conv_head[lambda meta: (triton.cdiv(total, meta["BLOCK_P"]),)](
        x, x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        w2, w2.stride(0), w2.stride(1), bias_arg,
        dst, dst_strides[0], dst_strides[1], dst_strides[2], dst_strides[3],
        plan.C, plan.K, plan.h, plan.w, H, W, total,
        1.0, 1.0, float(threshold),
        SRC=_SRC_CONV, UPSAMPLE=False, HAS_BIAS=has_bias, DOT_FP32=dot_fp32,
        BLOCK_K=bk, **const,
    )  # fmt: skip


def upsample_argmax(
    logits: torch.Tensor,
    out_size: tuple[int, int],
    align_corners: bool = False,
    scales: tuple[float | None, float | None] | None = None,
    mask_dtype: torch.dtype = torch.uint8,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``argmax(upsample_bilinear2d(logits), dim=1)`` without the full-resolution logits:
    ``seg_head(logits, out_size=..., mode="argmax")``. logits [N, K, h, w] → mask [N, H, W]."""
    return seg_head(
        logits,
        out_size=out_size,
        align_corners=align_corners,
        scales=scales,
        mode="argmax",
        mask_dtype=mask_dtype,
        out=out,
    )


def seg_head_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    out_size: tuple[int, int] | None = None,
    align_corners: bool = False,
    scales: tuple[float | None, float | None] | None = None,
    mode: str = "argmax",
    threshold: float = 0.5,
    mask_dtype: torch.dtype = torch.uint8,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch ``seg_head``: fp32 1×1 conv (as a matmul) → aten.upsample_bilinear2d →
    argmax / softmax / sigmoid / threshold → cast."""
    plan = _Plan(x, weight, bias, out_size, align_corners, scales, mode, mask_dtype, out_dtype, out)
    y = x.float()  # [N, C, h, w]
    if plan.weight is not None:
        # The 1×1 conv as a matmul: on CUDA, F.conv2d in fp32 runs in TF32 by default
        # (cudnn.allow_tf32), a matmul in full fp32 (float32_matmul_precision "highest").
        y = torch.matmul(y.permute(0, 2, 3, 1), plan.weight.float().t())  # [N, h, w, K]
        if bias is not None:
            y = y + bias.float()
        y = y.permute(0, 3, 1, 2)  # [N, K, h, w]
    if out_size is not None:
        y = torch.ops.aten.upsample_bilinear2d.default(
            y, [plan.H, plan.W], plan.align_corners, *plan.scales
        )  # [N, K, H, W]
    if mode == "argmax":
        res = y.argmax(dim=1)
    elif mode == "threshold":
        prob = torch.sigmoid(y[:, 0]) if plan.K == 1 else torch.softmax(y, dim=1)[:, 1]
        res = prob > threshold
    elif mode == "softmax":
        res = torch.softmax(y, dim=1)
    elif mode == "sigmoid":
        res = torch.sigmoid(y)
    else:
        res = y
    res = res.to(plan.out_dtype)
    if res.dim() == 4:
        res = res.contiguous(memory_format=torch.channels_last)
    if out is not None:
        return out.copy_(res)
    return res
