"""2-D convolution with a fused per-channel epilogue and a fused two-source prologue.

Computes, for x: [N, C1, H, W] (and optionally x2: [N, C2, H2, W2]) and
weight: [Cout, Cin, KH, KW]::

    inp = cat([x, up(x2)], 1)            # or cat([up(x2), x]) with x2_first; up = resize to H×W
    y   = conv2d(inp, weight, stride, padding, dilation)          # y: [N, Cout, Ho, Wo]
    y   = y * scale[c] + shift[c]                                  # folded BN / conv bias
    y   = act(y + residual)   or   act(y) + residual               # residual_after_act
    out = y.to(out_dtype)                                          # written through out's strides

``up`` (nearest or bilinear, ATen semantics, both align_corners) and the concatenation
are never materialised: the kernel gathers the x2 part of every K-tile straight from
x2 and blends the bilinear neighbours in registers.

Kernels:

- ``_conv2d_kernel`` (groups=1): implicit GEMM with M = N·Ho·Wo output pixels,
  Nd = Cout, K = KH·KW·Cin, fp32 accumulation in ``tl.dot``. A K-tile is one
  (kh, kw) filter tap × a block of BLOCK_K input channels, so on the fast path —
  channels_last input (C stride 1) and a packed weight (:func:`pack_conv_weight`,
  Cout stride 1) — both operand tiles are contiguous loads. Inputs with very few
  channels (C1 ≤ 8: the RGB stem, grayscale U-Net inputs) use a flat K loop
  instead, where one K-tile spans several taps × all channels. When a layer has too
  few output tiles to fill the GPU (DeepLab's ASPP at 32×32: M = 1024, K = 18432),
  the K reduction is split over programs (split-K) into an fp32 workspace that
  ``_splitk_epilogue_kernel`` sums in a fixed order (deterministic) before the epilogue.
- ``_dw_conv2d_kernel`` (groups == Cin == Cout, weight [C, 1, KH, KW]): a direct
  depthwise convolution vectorised over [BLOCK_P pixels × BLOCK_C channels], with
  the same epilogue.

Channel statistics (``stats=``, both kernels): tiles then cover the pixels of one image
only (program → (image, tile of STATS_BLOCK = 64 output pixels), never straddling two
images), and each tile also writes, per output channel, the mean and the sum of squared
deviations (M2) of the values it stored — as rounded to out's dtype, the tensor a
consumer reads — into a [2, N, T, Cout] fp32 buffer (T = ⌈Ho·Wo / 64⌉). GroupNorm
(:func:`segfast.kernels.group_norm.group_norm`) and the squeeze-excitation gate
(:func:`segfast.kernels.squeeze_excite.se_gate`) take it instead of reading the map
again for their statistics. Within a tile: shifted by the tile's first pixel, then
two passes over the registers (no Σx² cancellation). Bytes: + 2·N·T·Cout fp32
(1/32 of an fp32 output, 1/16 of fp16).

Every tensor may have any strides (they are kernel arguments); outputs default to
channels_last, and ``out=`` may be any strided view, e.g. a channel slice of a larger
channels_last buffer.

Precision: tl.dot takes fp16/bf16 tiles in the storage dtype and accumulates in fp32;
fp32 tiles use ``input_precision="ieee"`` (never TF32). The bilinear x2 tile is blended
in fp32 and rounded once to the storage dtype before tl.dot — the same rounding PyTorch
applies when it materialises the upsampled tensor. The epilogue runs in fp32 and rounds
once into out's dtype.

Traffic and work (elements; multiply by the element size for bytes):
    GEMM path:  read N·H·W·C1 + N·H2·W2·C2 + Cout·Cin·KH·KW (+ N·Ho·Wo·Cout residual)
                (+ 2·Cout scale/shift); write N·Ho·Wo·Cout.
                FLOPs 2·N·Ho·Wo·Cout·Cin·KH·KW.
                (The compulsory traffic: an input tile is re-read by each of the
                cdiv(Cout, BLOCK_N) column tiles and by the KH×KW overlapping taps, but
                those re-reads hit L2 because neighbouring programs share them.)
                Split-K adds SPLIT_K·M·Cout fp32 written and read once.
    depthwise:  read N·H·W·C + C·KH·KW (+ N·Ho·Wo·C residual); write N·Ho·Wo·C.
                FLOPs 2·N·Ho·Wo·C·KH·KW.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (  # noqa: F401  (re-exported)
    STATS_BLOCK,
    GpuTarget,
    act_code,
    apply_activation_reference,
    autotune_configs,
    check_device,
    check_float_dtype,
    check_stats,
    dot_loop_shared_bytes,
    launch_target,
    next_power_of_2,
    stats_buffer,
)
from ._epilogue import activate

# Offsets are computed in int32 unless some tensor spans more elements than this;
# then the kernels are compiled with IDX64=True and every offset is int64. (int32
# offset arithmetic is about half the integer work of int64 in the K loop.) Tests
# lower it to force the int64 path on small tensors.
_INT32_MAX = 2**31 - 1

# The flat-K loop (one K-tile spans several filter taps) serves inputs with at most
# this many channels: with fewer, a per-tap channel block of the smallest tl.dot
# width (16) would be more than half zeros (the 3-channel stem: 3/16 useful).
_FLAT_K_MAX_CHANNELS = 8

_RESIZE_CODES = {"none": 0, "nearest": 1, "bilinear": 2}

# Split-K (see _split_k_for). Split only when even 128×128 output tiles cannot fill half
# the SMs (the autotuner's smaller tiles recover up to 4× more programs on their own);
# at most 16 splits, each keeping ≥ 8 K iterations of 64 channels so its software
# pipeline still fills. Partial sums go through a [SPLIT_K, M, Cout] fp32 workspace.
_SPLIT_TILE = 128
_SPLIT_MAX = 16
_SPLIT_MIN_ITERS = 8
# Tile of the split-K epilogue kernel: an elementwise pass over a small fp32 workspace
# (split outputs have fewer than ~SMs·128² elements), not worth autotuning.
_SPLIT_EPILOGUE_BLOCK = 64

# Tiles tried only by statistics launches (STATS_BLOCK rows; fp32 needs BLOCK_K ≤ 32 and
# narrow heads BLOCK_N = 32, which the general space has only at 128 rows).
_STATS_ONLY = {(64, 64, 32), (64, 32, 32)}
_DW_STATS_ONLY = {(64, 16), (64, 32)}


# Autotune keys shared by both kernels: every geometry argument (plus, per kernel, the
# channel counts and the constexprs that change the loop structure).
_GEOMETRY_KEYS = ["N", "H", "W", "KH", "KW", "Ho", "Wo", "SH", "SW", "PH", "PW", "DH", "DW"]


# --------------------------------------------------------------------------- device code


@triton.jit
def _idx(v, IDX64: tl.constexpr):
    """Widen an index tensor to int64 before it meets a stride (large tensors only)."""
    if IDX64:
        v = v.to(tl.int64)
    return v


@triton.jit
def _pixel_tile(pid, M, HW, BLOCK: tl.constexpr, STATS: tl.constexpr):
    """(flat output pixels n·HW + p, which are real) of pixel tile ``pid``: tiles of the
    flattened N·HW pixels, or with STATS tiles within one image (pid = image·T + tile,
    never straddling two images; rows past the image repeat its last pixel, masked)."""
    if STATS:
        T = tl.cdiv(HW, BLOCK)
        local = (pid % T) * BLOCK + tl.arange(0, BLOCK)
        mask = local < HW
        offs = (pid // T) * HW + tl.minimum(local, HW - 1)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M
    return offs, mask


@triton.jit
def _epilogue(
    acc,  # [BM, BC] fp32: rows = output pixels, columns = output channels
    co,  # [BC] output channel
    mask_m,  # [BM]
    mask_c,  # [BC]
    out_ptr,
    out_row,  # [BM] offset of each pixel in out (channel 0)
    so_c,
    res_ptr,
    res_row,  # [BM] offset of each pixel in residual
    sr_c,
    scale_ptr,
    s_scale,
    shift_ptr,
    s_shift,
    act_param,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    RES_MODE: tl.constexpr,  # 0: none, 1: before the activation, 2: after it
    ACT: tl.constexpr,
    IDX64: tl.constexpr,
):
    """y = acc·scale + shift, residual, activation, cast, one masked store. Returns the
    stored values back in fp32 (for the channel statistics; dead code otherwise)."""
    y = acc
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + co * s_scale, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        y = y + tl.load(shift_ptr + co * s_shift, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_c[None, :]
    c = _idx(co, IDX64)
    if RES_MODE == 1:
        y = y + tl.load(res_ptr + res_row[:, None] + c[None, :] * sr_c, mask=mask).to(tl.float32)
    y = activate(y, ACT, act_param)
    if RES_MODE == 2:
        y = y + tl.load(res_ptr + res_row[:, None] + c[None, :] * sr_c, mask=mask).to(tl.float32)
    stored = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_row[:, None] + c[None, :] * so_c, stored, mask=mask)
    return stored.to(tl.float32)


@triton.jit
def _tile_stats(
    y,  # [BM, BC] fp32: the values the tile stored
    co,  # [BC] output channel
    mask_m,  # [BM] rows of this image's tile (row 0 always valid)
    mask_c,  # [BC]
    stats_ptr,  # [2, slots, C] fp32: means, then M2s
    slot,  # this tile's slot: image·T + tile
    slots,
    C,
    BLOCK_M: tl.constexpr,
    IDX64: tl.constexpr,
):
    """Per-channel mean and M2 of the tile's valid rows, shifted by row 0."""
    mask = mask_m[:, None] & mask_c[None, :]
    shift = tl.sum(tl.where((tl.arange(0, BLOCK_M) == 0)[:, None], y, 0.0), axis=0)
    v = tl.where(mask, y - shift[None, :], 0.0)
    count = tl.sum(mask_m.to(tl.float32), axis=0)
    mean = tl.sum(v, axis=0) / count
    d = tl.where(mask, v - mean[None, :], 0.0)
    m2 = tl.sum(d * d, axis=0)
    base = _idx(slot, IDX64) * C + _idx(co, IDX64)
    tl.store(stats_ptr + base, shift + mean, mask=mask_c)
    tl.store(stats_ptr + _idx(slots, IDX64) * C + base, m2, mask=mask_c)


def _conv_configs():
    """Autotune space of the implicit-GEMM kernel (one factory; see autotune_configs).

    128×128×64 fp16 tiles are the H100/A100 sweet spot for tensor-core GEMMs of these
    sizes (32 KiB of operands per stage, 3–4 stages fit in shared memory); 64-wide
    variants serve small feature maps where 128×128 tiles leave SMs idle; BLOCK_N=32
    serves narrow Cout (class heads); BLOCK_K=32/16 serves few input channels, where
    a 64-deep channel block would be mostly padding. At most 64 fp32 accumulators per
    thread, whatever the dtype and GPU: 128×128 on 4 warps (128) spills 4–550 B with a
    residual, a second source or mma.sync, and 48–56 B in plain fp16/bf16 convs on sm_90
    with Triton 3.6; 128×256 (the wgmma favourite) would need 16 warps, so it is gone
    (on 4 warps it spilled 2–19 KB). ``_prune_conv_configs`` drops the tiles a given
    shape cannot use and those that do not fit the dtype and the GPU (``_gemm_fits``).
    """
    space = [
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64},
        {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64},
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32},
        {"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32},
        {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16},
        *(dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), t, strict=True)) for t in _STATS_ONLY),
    ]
    # Interpreter: one config; 64×32×32 keeps the program count (each program and K
    # iteration costs interpreter time: 32 deep took a tiny LR-ASPP's Triton test from 33
    # to 27 s against 16) and the padding of the odd test sizes both small, and the test
    # shapes still span several tiles on every axis (channels 37–70: several K blocks).
    return autotune_configs(
        space,
        interpreter_config={"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32},
        fits=lambda b, warps, stages: b["BLOCK_M"] * b["BLOCK_N"] <= 64 * 32 * warps,
    )


def _gemm_fits(
    config,
    *,
    ieee: bool,
    bilinear: bool,
    idx64: bool,
    flat_k: bool,
    elem_bytes: int,
    target: GpuTarget,
    gate: bool = False,
    stats: bool = False,
) -> bool:
    """Whether an implicit-GEMM tile compiles for ``target`` without spilling registers or
    overflowing shared memory (beyond the space's ≤ 64 accumulators per thread).

    The budgets come from compiling every config for sm_90 and sm_87 with ptxas, Triton
    3.9 and 3.6 (``python benchmarks/compile_targets.py``); per thread (T = 32·warps):

    - fp32 (``ieee`` dots, no tensor cores): each thread also holds its K-slab of both
      operands: BM·BN·BK/T ≤ 2048 and BK ≤ 32 (128×128×64 on 4 warps: 40–90 KB of
      spills; 64×64×64: 4–40 B); on 8 warps at least 32 accumulators — smaller tiles
      need just over 128 registers, and ptxas spills 4–24 B to keep two 256-thread
      blocks per SM (128×32×32, the flat-K stem).
    - int64 offsets (IDX64) outside wgmma: ≤ 32 accumulators (128×64×16 on 4 warps
      spills 24–32 B on sm_87).
    - the flat-K loop (per-element [BM, BK] tap coordinates) on tensor cores: 8 warps
      (128×32×32 on 4 warps spills 4 B on sm_87).
    - bilinear x2: the four neighbour tiles BM·BK (in the storage dtype, two fp16 per
      register) are live with the accumulators until blended: accumulators + neighbours
      ≤ 96 registers (128×128×64 fp16 on 4 warps: 300–1000 B of spills).

    Shared memory (``dot_loop_shared_bytes``: a bilinear x2 pipelines each of its four
    neighbour loads and stages the blended tile for the dot) must fit the block's
    maximum (sm_90: 227 KB, sm_87: 163 KB): 128×128×64 bilinear at 4 stages needs
    264–272 KB in fp16, 512 KB in fp32. A gated input (squeeze-excitation) is a second
    pipelined [BM, BK] load, multiplied in registers and staged for the dot: counted
    like a two-tile bilinear, with a tighter register budget (80).

    Channel statistics (``stats``) in fp32 below sm_90: BM·BN·BK/T < 1024 (the
    statistics epilogue's registers: 64×64×32 on 4 warps spilled 8 B on sm_87 at 3
    stages, where ptxas held the kernel to 96 registers).
    """
    bm, bn, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    threads = 32 * config.num_warps
    acc = bm * bn // threads
    wgmma = target.capability[0] >= 9 and not ieee
    regs_ok = acc <= (32 if idx64 and not wgmma else 64)
    if ieee:
        regs_ok = regs_ok and bm * bn * bk // threads <= 2048 and bk <= 32
        regs_ok = regs_ok and (threads < 256 or acc >= 32)
        if stats and target.capability[0] < 9:
            regs_ok = regs_ok and bm * bn * bk // threads < 1024
    elif flat_k:
        regs_ok = regs_ok and threads >= 256
    tiles = 4 if bilinear else 2 if gate else 1
    if tiles > 1:
        # the gated tiles' budget is lower: the gate's [BM, BK] offsets (image index ×
        # stride) stay live beside it (96 spilled 12 B at 64×128×64 fp16 on sm_87 and
        # 28–184 B in fp32 at 128×64×16 and 128×32×32)
        budget = 80 if gate else 96
        regs_ok = regs_ok and acc + tiles * bm * bk * elem_bytes // 4 // threads <= budget
    shared = dot_loop_shared_bytes(
        bm, bn, bk, config.num_stages, elem_bytes=elem_bytes, wgmma=wgmma,
        a_loads=tiles, staged_a=tiles > 1,
    )  # fmt: skip
    return regs_ok and shared <= target.max_shared


def _stats_tiles(configs, stats: bool, rows: str, only: set, cols: tuple[str, ...]):
    """A statistics launch tunes over STATS_BLOCK-row tiles only; any other launch never
    sees the tiles added for statistics (the interpreter's one config serves both)."""
    if len(configs) == 1:
        return configs
    if stats:
        return [c for c in configs if c.kwargs[rows] == STATS_BLOCK]
    return [c for c in configs if (c.kwargs[rows], *(c.kwargs[k] for k in cols)) not in only]


def _prune_conv_configs(configs, named_args, **kwargs):
    """Drop tiles wider than the shape: BLOCK_N beyond Cout, BLOCK_K beyond the channel
    count of either source (or beyond KH·KW·C1 for the flat-K loop), BLOCK_M beyond
    the pixel count — padding-only tiles cost the same time and add nothing — and the
    32-wide column tile above 64 output channels, where wider tiles serve (and it spills
    8 B on sm_87 in fp16, 4 B on sm_90 in fp32); then, on a GPU, the tiles that would
    spill or overflow shared memory there (``_gemm_fits``)."""
    args = {**named_args, **kwargs}
    configs = _stats_tiles(configs, args["STATS"], "BLOCK_M", _STATS_ONLY, ("BLOCK_N", "BLOCK_K"))
    m = args["N"] * args["Ho"] * args["Wo"]
    k = args["KH"] * args["KW"] * args["C1"] if args["FLAT_K"] else max(args["C1"], args["C2"])
    cout = next_power_of_2(args["Cout"])
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_N"] <= max(32, cout)
        and (c.kwargs["BLOCK_N"] > 32 or cout <= 64)
        and c.kwargs["BLOCK_K"] <= max(16, next_power_of_2(k))
        and c.kwargs["BLOCK_M"] <= max(64, next_power_of_2(m))
    ] or configs
    x = args["x_ptr"]
    target = launch_target(x.device)
    if target is None:  # the interpreter: one config, nothing to fit
        return kept

    def fits(c) -> bool:
        return _gemm_fits(
            c,
            ieee=args["DOT_PRECISION"] == "ieee",
            bilinear=args["RESIZE"] == 2,
            idx64=args["IDX64"],
            flat_k=args["FLAT_K"],
            elem_bytes=x.element_size(),
            target=target,
            gate=args["HAS_GATE"],
            stats=args["STATS"],
        )

    return [c for c in kept if fits(c)] or [c for c in configs if fits(c)] or kept


@triton.autotune(
    configs=_conv_configs(),
    key=[
        *_GEOMETRY_KEYS,
        "C1",
        "C2",
        "H2",
        "W2",
        "Cout",
        "RESIZE",
        "FLAT_K",
        "HAS_GATE",
        "IDX64",
        "DOT_PRECISION",
        "SPLIT_K",
        "STATS",
    ],
    prune_configs_by={"early_config_prune": _prune_conv_configs},
)
@triton.jit
def _conv2d_kernel(
    x_ptr,  # [N, C1, H, W] any strides
    x2_ptr,  # [N, C2, H2, W2] any strides (a dummy when HAS_X2 is False)
    w_ptr,  # [Cout, C1 + C2, KH, KW] any strides (packed: Cout stride 1)
    scale_ptr,  # [Cout]
    shift_ptr,  # [Cout]
    res_ptr,  # [N, Cout, Ho, Wo]
    out_ptr,  # [N, Cout, Ho, Wo]
    ws_ptr,  # [SPLIT_K, N·Ho·Wo, Cout] fp32 partial sums (split-K only; else a dummy)
    gate_ptr,  # [N, C1] per-image input-channel scale (HAS_GATE only; else a dummy)
    stats_ptr,  # [2, N·T, Cout] fp32 channel statistics (STATS only; else a dummy)
    N, C1, C2, H, W, H2, W2, Cout, KH, KW, Ho, Wo,
    SH, SW, PH, PW, DH, DW,
    step_h,  # fp32 source step of the x2 resize along h (ATen's scale), see _resample_steps
    step_w,
    wc_x,  # first weight input channel of x's channels (0, or C2 with x2_first)
    wc_x2,  # first weight input channel of x2's channels (C1, or 0 with x2_first)
    sx_n, sx_c, sx_h, sx_w,
    s2_n, s2_c, s2_h, s2_w,
    sw_o, sw_i, sw_h, sw_w,
    s_scale, s_shift,
    sr_n, sr_c, sr_h, sr_w,
    so_n, so_c, so_h, so_w,
    sg_n, sg_c,
    act_param,
    HAS_X2: tl.constexpr,
    RESIZE: tl.constexpr,  # 0 none (x2 is H×W), 1 nearest, 2 bilinear
    ALIGN_CORNERS: tl.constexpr,
    FLAT_K: tl.constexpr,  # x's K loop runs over flattened (kh, kw, c); for C1 ≤ 8
    HAS_GATE: tl.constexpr,  # x · gate[n, c] as x is read (squeeze-excitation), x2 absent
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    RES_MODE: tl.constexpr,
    ACT: tl.constexpr,
    IDX64: tl.constexpr,
    # "ieee" for fp32 operands (exact fp32 products, never TF32); "tf32" (the target's
    # default, which fp16/bf16 operands ignore) otherwise.
    DOT_PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr,  # > 1: K split over programs, _splitk_epilogue_kernel finishes
    STATS: tl.constexpr,  # tiles within one image, each writing its channel statistics
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Tile order: the Cout tiles of one pixel tile are consecutive programs. The weight
    # (≤ 9.4 MB for 2048→256 3×3 in fp16) stays resident in L2 for the whole launch, so
    # the operand worth sharing is the pixel tile: gathered from DRAM by the first of
    # its column programs, hit in L2 by the others running beside it. Neighbouring pixel
    # tiles also share the halo rows of the KH×KW window. Axis 0 only: it allows 2³¹−1
    # programs, far beyond any realistic M·Cout tile count (axes 1/2 stop at 65535).
    # With split-K, the SPLIT_K programs of one output tile are consecutive too; program
    # pid_k takes every SPLIT_K-th K iteration (so each split sees every tap and source).
    pid = tl.program_id(0)
    pid_k = pid % SPLIT_K
    pid = pid // SPLIT_K
    num_pid_n = tl.cdiv(Cout, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid - pid_m * num_pid_n

    # Output pixels of this tile: m → (n, oh, ow). M = N·Ho·Wo < 2³¹ (checked by the
    # launcher), so this index math is int32; rows past M are clamped onto M-1 so that
    # every address the tile forms is in bounds (their results are masked at the store).
    M = N * Ho * Wo
    offs_m, mask_m = _pixel_tile(pid_m, M, Ho * Wo, BLOCK_M, STATS)
    m = tl.minimum(offs_m, M - 1)
    ow = m % Wo
    t = m // Wo
    oh = t % Ho
    n = _idx(t // Ho, IDX64)
    ih0 = oh * SH - PH  # [BM] input row of tap (0, 0); may be negative (padding)
    iw0 = ow * SW - PW

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < Cout
    # Columns are NOT clamped (unlike rows): Triton's axis analysis loses the contiguity
    # of offs_n through tl.minimum, which would turn the weight loads and the output
    # stores — contiguous along Cout — into scalar accesses. Masks guard them instead.
    w_col = offs_n * sw_o  # [BN]; the weight is small: int32 offsets (checked by the launcher)
    mask_wn = mask_n[None, :]
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # ---- source 1: x ------------------------------------------------------------------
    x_row = n * sx_n  # [BM]
    if FLAT_K:
        # K = KH·KW·C1 flattened in (kh, kw, c) order; each K-tile spans several taps.
        # Per-element index math ([BM, BK] tiles of coordinates) is the price of not
        # padding 3 channels to a 16-wide K block; worth it only for tiny C1.
        K = KH * KW * C1
        for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
            k = k0 + offs_k  # [BK]
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
            a = tl.load(x_ptr + a_off, mask=ok, other=0.0)
            if HAS_GATE:
                g = tl.load(gate_ptr + n[:, None] * sg_n + c[None, :] * sg_c, mask=ok, other=0.0)
                a = (a.to(tl.float32) * g.to(tl.float32)).to(x_ptr.dtype.element_ty)
            w_row = (wc_x + c) * sw_i + kh * sw_h + kw * sw_w  # [BK]
            b = tl.load(
                w_ptr + w_row[:, None] + w_col[None, :], mask=mask_k[:, None] & mask_wn, other=0.0
            )
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    else:
        # One flat loop over (tap, channel block) rather than nested tap/channel loops:
        # the software pipeliner (num_stages) overlaps loads only within the innermost
        # loop, and a nested channel loop of 1–2 iterations (Cin = 64 at BLOCK_K = 64)
        # would never overlap. The per-iteration cost of recomputing the tap's
        # coordinates is a few [BM] integer ops, small beside a BM×BN×BK tl.dot.
        nc = tl.cdiv(C1, BLOCK_K)
        for it in range(pid_k, KH * KW * nc, SPLIT_K):
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
            # channels_last: sx_c == 1 (Triton specialises it), a [BM, BK] tile of
            # contiguous channel runs: vectorised, coalesced loads.
            a = tl.load(
                x_ptr + a_row[:, None] + _idx(c, IDX64)[None, :] * sx_c,
                mask=ok[:, None] & mask_c[None, :],
                other=0.0,
            )
            if HAS_GATE:
                # the gated input x·g rounded to the storage dtype, as the eager model
                # materialises it; g is an [N, C1] table, resident in L1/L2
                g = tl.load(
                    gate_ptr + n[:, None] * sg_n + c[None, :] * sg_c,
                    mask=ok[:, None] & mask_c[None, :],
                    other=0.0,
                )
                a = (a.to(tl.float32) * g.to(tl.float32)).to(x_ptr.dtype.element_ty)
            # packed weight: sw_o == 1, a [BK, BN] tile of contiguous Cout runs.
            w_row = (wc_x + c) * sw_i + kh * sw_h + kw * sw_w
            b = tl.load(
                w_ptr + w_row[:, None] + w_col[None, :], mask=mask_c[:, None] & mask_wn, other=0.0
            )
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    # ---- source 2: x2, resized to H×W on the fly ---------------------------------------
    # A second K loop over x2's channels (no per-element branch on the channel index);
    # x2_first only changes which weight rows (wc_x2) these channels meet.
    if HAS_X2:
        x2_row = n * s2_n  # [BM]
        nc2 = tl.cdiv(C2, BLOCK_K)
        for it in range(pid_k, KH * KW * nc2, SPLIT_K):
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
                # ATen "nearest": src = min(floor(d·step), in-1) in fp32 (d ≥ 0, so the
                # truncating cast is the floor).
                hs = tl.minimum((ih.to(tl.float32) * step_h).to(tl.int32), H2 - 1)
                ws = tl.minimum((iw.to(tl.float32) * step_w).to(tl.int32), W2 - 1)
                a_row = x2_row + _idx(hs, IDX64) * s2_h + _idx(ws, IDX64) * s2_w
                a = tl.load(x2_ptr + a_row[:, None] + c_off, mask=mask_a, other=0.0)
            else:
                # ATen bilinear (area_pixel_compute_source_index): fp32 source coordinate,
                # i0 = min(floor(src), in-1), i1 = min(i0+1, in-1), λ = clamp(src-i0, 0, 1).
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
                # Blend in fp32 in ATen's order, then round once to the storage dtype so
                # that tl.dot sees the same operand type as for x: for fp16/bf16 this is
                # exactly the rounding PyTorch does when it materialises the upsampled
                # tensor; for fp32 there is no rounding.
                top = (1.0 - lw) * v00.to(tl.float32) + lw * v01.to(tl.float32)
                bot = (1.0 - lw) * v10.to(tl.float32) + lw * v11.to(tl.float32)
                a = ((1.0 - lh) * top + lh * bot).to(x2_ptr.dtype.element_ty)
            w_row = (wc_x2 + c) * sw_i + kh * sw_h + kw * sw_w
            b = tl.load(
                w_ptr + w_row[:, None] + w_col[None, :], mask=mask_c[:, None] & mask_wn, other=0.0
            )
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    # ---- epilogue: in registers, one write ---------------------------------------------
    if SPLIT_K == 1:
        ohi = _idx(oh, IDX64)
        owi = _idx(ow, IDX64)
        out_row = n * so_n + ohi * so_h + owi * so_w
        res_row = n * sr_n + ohi * sr_h + owi * sr_w
        y = _epilogue(
            acc, offs_n, mask_m, mask_n, out_ptr, out_row, so_c, res_ptr, res_row, sr_c,
            scale_ptr, s_scale, shift_ptr, s_shift, act_param,
            HAS_SCALE, HAS_SHIFT, RES_MODE, ACT, IDX64,
        )  # fmt: skip
        if STATS:
            _tile_stats(y, offs_n, mask_m, mask_n, stats_ptr, pid_m,
                        N * tl.cdiv(Ho * Wo, BLOCK_M), Cout, BLOCK_M, IDX64)  # fmt: skip
    else:
        # fp32 partial sums; the launcher only splits small outputs (fewer tiles than
        # SMs), so the workspace offsets fit int32.
        ws = ws_ptr + pid_k * M * Cout + offs_m[:, None] * Cout + offs_n[None, :]
        tl.store(ws, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _splitk_epilogue_kernel(
    ws_ptr,  # [SPLIT_K, N·Ho·Wo, Cout] fp32 partial sums
    scale_ptr,
    shift_ptr,
    res_ptr,
    out_ptr,  # [N, Cout, Ho, Wo] any strides
    N, Cout, Ho, Wo,
    s_scale, s_shift,
    sr_n, sr_c, sr_h, sr_w,
    so_n, so_c, so_h, so_w,
    act_param,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    RES_MODE: tl.constexpr,
    ACT: tl.constexpr,
    IDX64: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Sum the split-K partials of one output tile (fixed order: deterministic) and
    apply the conv epilogue. Reads SPLIT_K·M·Cout fp32, writes M·Cout elements."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(Cout, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid - pid_m * num_pid_n
    M = N * Ho * Wo
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    m = tl.minimum(offs_m, M - 1)
    ow = m % Wo
    t = m // Wo
    oh = t % Ho
    n = _idx(t // Ho, IDX64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < Cout
    mask = mask_m[:, None] & mask_n[None, :]
    ws = ws_ptr + offs_m[:, None] * Cout + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws + s * M * Cout, mask=mask, other=0.0)
    ohi = _idx(oh, IDX64)
    owi = _idx(ow, IDX64)
    out_row = n * so_n + ohi * so_h + owi * so_w
    res_row = n * sr_n + ohi * sr_h + owi * sr_w
    _epilogue(
        acc, offs_n, mask_m, mask_n, out_ptr, out_row, so_c, res_ptr, res_row, sr_c,
        scale_ptr, s_scale, shift_ptr, s_shift, act_param,
        HAS_SCALE, HAS_SHIFT, RES_MODE, ACT, IDX64,
    )  # fmt: skip


def _dw_configs():
    """Autotune space of the depthwise kernel (one factory; see autotune_configs).

    A direct kernel is memory bound: tiles of 4–8 K elements spread over 128–256
    threads, wide along channels (contiguous in channels_last: 128-byte lines at
    64 fp16 channels) for wide MobileNet layers, narrow for the 16/24/32-channel ones.
    No tl.dot, so software pipelining gains little: stages 1–2. At most 32 fp32
    accumulators per thread: at 64 (a 4 K tile on 2 warps, 8 K on 4) a thread also
    holds a tile of loads and its offsets — 240–255 registers, and 220–1170 B of
    spills with the 8 K tile (sm_90 and sm_87, every dtype).
    """
    space = [
        {"BLOCK_P": 64, "BLOCK_C": 64},
        {"BLOCK_P": 32, "BLOCK_C": 128},
        {"BLOCK_P": 128, "BLOCK_C": 32},
        {"BLOCK_P": 128, "BLOCK_C": 64},
        {"BLOCK_P": 256, "BLOCK_C": 16},
        *({"BLOCK_P": p, "BLOCK_C": c} for p, c in _DW_STATS_ONLY),
    ]
    return autotune_configs(
        space,
        num_warps=(4, 8),
        num_stages=(1, 2),
        # interpreter: 32 channels per program (16 took a tiny DeepLabV3-MobileNetV3's
        # Triton test from 18 to 27 s); the tests' 40-channel case still spans two tiles
        interpreter_config={"BLOCK_P": 64, "BLOCK_C": 32},
        fits=lambda b, warps, stages: b["BLOCK_P"] * b["BLOCK_C"] <= 32 * 32 * warps,
    )


def _prune_dw_configs(configs, named_args, **kwargs):
    """Drop channel tiles wider than C (they would be mostly padding)."""
    args = {**named_args, **kwargs}
    configs = _stats_tiles(configs, args["STATS"], "BLOCK_P", _DW_STATS_ONLY, ("BLOCK_C",))
    kept = [c for c in configs if c.kwargs["BLOCK_C"] <= max(16, next_power_of_2(args["C"]))]
    return kept or configs


@triton.autotune(
    configs=_dw_configs(),
    key=[*_GEOMETRY_KEYS, "C", "IDX64", "STATS"],
    prune_configs_by={"early_config_prune": _prune_dw_configs},
)
@triton.jit
def _dw_conv2d_kernel(
    x_ptr,  # [N, C, H, W] any strides
    w_ptr,  # [C, 1, KH, KW] any strides (packed: C stride 1)
    scale_ptr,  # [C]
    shift_ptr,  # [C]
    res_ptr,  # [N, C, Ho, Wo]
    out_ptr,  # [N, C, Ho, Wo]
    stats_ptr,  # [2, N·T, C] fp32 channel statistics (STATS only; else a dummy)
    N, C, H, W, KH, KW, Ho, Wo,
    SH, SW, PH, PW, DH, DW,
    sx_n, sx_c, sx_h, sx_w,
    sw_o, sw_h, sw_w,
    s_scale, s_shift,
    sr_n, sr_c, sr_h, sr_w,
    so_n, so_c, so_h, so_w,
    act_param,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    RES_MODE: tl.constexpr,
    ACT: tl.constexpr,
    IDX64: tl.constexpr,
    STATS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    # Channel tiles of one pixel tile are consecutive programs (same L2 argument as
    # the GEMM kernel); everything on axis 0.
    pid = tl.program_id(0)
    num_pid_c = tl.cdiv(C, BLOCK_C)
    pid_p = pid // num_pid_c
    pid_c = pid - pid_p * num_pid_c

    M = N * Ho * Wo
    offs_p, mask_p = _pixel_tile(pid_p, M, Ho * Wo, BLOCK_P, STATS)
    m = tl.minimum(offs_p, M - 1)
    ow = m % Wo
    t = m // Wo
    oh = t % Ho
    n = _idx(t // Ho, IDX64)
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW

    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    # not clamped: channels are the contiguous (vectorised) axis; see _conv2d_kernel
    c_off = _idx(offs_c, IDX64)[None, :] * sx_c  # [1, BC]
    w_c = offs_c * sw_o  # [BC]

    x_row = n * sx_n
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
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
        wv = tl.load(w_ptr + w_c + kh * sw_h + kw * sw_w, mask=mask_c, other=0.0)  # [BC]
        acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]

    ohi = _idx(oh, IDX64)
    owi = _idx(ow, IDX64)
    out_row = n * so_n + ohi * so_h + owi * so_w
    res_row = n * sr_n + ohi * sr_h + owi * sr_w
    y = _epilogue(
        acc, offs_c, mask_p, mask_c, out_ptr, out_row, so_c, res_ptr, res_row, sr_c,
        scale_ptr, s_scale, shift_ptr, s_shift, act_param,
        HAS_SCALE, HAS_SHIFT, RES_MODE, ACT, IDX64,
    )  # fmt: skip
    if STATS:
        _tile_stats(y, offs_c, mask_p, mask_c, stats_ptr, pid_p,
                    N * tl.cdiv(Ho * Wo, BLOCK_P), C, BLOCK_P, IDX64)  # fmt: skip


# --------------------------------------------------------------------------- host code


def pack_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """The conv weight in the layout the kernels read fastest, same logical shape.

    weight: [Cout, Cin, KH, KW] (depthwise: [C, 1, KH, KW]) → a tensor of the SAME
    logical shape whose memory is [KH, KW, Cin, Cout] contiguous, i.e. the GEMM's B
    matrix [KH·KW·Cin, Cout] row-major (Cout stride 1). ``conv2d`` accepts any weight
    strides, so this is an optimisation, not a format flag: pack once at build time
    and pass the packed tensor on every call. (``F.conv2d`` accepts it too.)
    """
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [Cout, Cin, KH, KW], got {tuple(weight.shape)}")
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def _pair(name: str, v: int | tuple[int, int], minimum: int) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        pair = (v, v)
    elif (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and all(isinstance(e, int) and not isinstance(e, bool) for e in v)
    ):
        pair = (int(v[0]), int(v[1]))
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return pair


def _padding(v: int | tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, left), (bottom, right)) of an int, an (h, w) pair or a (top, bottom,
    left, right) quadruple (asymmetric, as TensorFlow-style "same" padding needs)."""
    if isinstance(v, (tuple, list)) and len(v) == 4:
        if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in v):
            raise ValueError(f"padding must be four ints >= 0, got {v!r}")
        top, bottom, left, right = (int(e) for e in v)
        return (top, left), (bottom, right)
    ph, pw = _pair("padding", v, 0)
    return (ph, pw), (ph, pw)


def output_size(
    hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: int | tuple[int, ...],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """(Ho, Wo) of a convolution of an H×W map (``padding`` as :func:`conv2d` takes it)."""
    (ph, pw), (pb, pr) = _padding(padding)
    ho = (hw[0] + ph + pb - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (hw[1] + pw + pr - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return ho, wo


@dataclass(frozen=True)
class _Conv:
    """A validated conv2d call: every shape the kernels take."""

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
    padding: tuple[int, int]  # (top, left): where the kernels start reading
    dilation: tuple[int, int]
    depthwise: bool
    out_dtype: torch.dtype
    pad_end: tuple[int, int]  # (bottom, right); equal to padding unless asymmetric


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must be {what} = {shape}, got {tuple(t.shape)}")


def _check(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    stride: int | tuple[int, int],
    padding: int | tuple[int, ...],
    dilation: int | tuple[int, int],
    groups: int,
    act: str,
    residual: torch.Tensor | None,
    x2: torch.Tensor | None,
    x2_resize: str,
    x2_align_corners: bool,
    x2_scales: tuple[float, float] | None,
    x2_first: bool,
    out: torch.Tensor | None,
    out_dtype: torch.dtype | None,
) -> _Conv:
    """Validate a conv2d call (shared by the launcher and the reference)."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W], got {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [Cout, Cin, KH, KW], got {tuple(weight.shape)}")
    check_float_dtype("x", x)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    act_code(act)
    sh, sw = _pair("stride", stride, 1)
    (ph, pw), (pb, pr) = _padding(padding)
    dh, dw = _pair("dilation", dilation, 1)
    N, C1, H, W = x.shape
    Cout, Cin, KH, KW = weight.shape
    if min(N, C1, H, W, Cout, KH, KW) < 1:
        raise ValueError(
            f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must have no empty dims"
        )

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
                f"{tuple(weight.shape)} (other grouped convs stay on PyTorch)"
            )
        if x2 is not None:
            raise ValueError("x2 (two-source input) is only supported with groups=1")
    elif Cin != C1 + C2:
        raise ValueError(
            f"weight must have Cin = C1 + C2 = {C1} + {C2} = {C1 + C2} input channels, "
            f"got {Cin} (weight {tuple(weight.shape)})"
        )

    Ho, Wo = output_size((H, W), (KH, KW), (sh, sw), padding, (dh, dw))
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"x of size {(H, W)} with padding {padding} is smaller than the dilated "
            f"kernel {(dh * (KH - 1) + 1, dw * (KW - 1) + 1)}"
        )

    for name, v in (("scale", scale), ("shift", shift)):
        if v is not None:
            check_float_dtype(name, v)
            _check_shape(name, v, (Cout,), "[Cout]")
    oshape = (N, Cout, Ho, Wo)
    if residual is not None:
        check_float_dtype("residual", residual)
        _check_shape("residual", residual, oshape, "[N, Cout, Ho, Wo]")
    if out_dtype is not None and out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if out is not None:
        check_float_dtype("out", out)
        _check_shape("out", out, oshape, "[N, Cout, Ho, Wo]")
        if out_dtype is not None and out.dtype != out_dtype:
            raise TypeError(f"out has dtype {out.dtype} but out_dtype is {out_dtype}")
        odt = out.dtype
    else:
        odt = out_dtype or x.dtype
    return _Conv(
        N, C1, C2, H, W, H2, W2, Cout, KH, KW, Ho, Wo, (sh, sw), (ph, pw), (dh, dw), depthwise, odt,
        (pb, pr),
    )  # fmt: skip


def _resample_steps(
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
    mode: str,
    align_corners: bool,
    scales: tuple[float, float] | None,
    on_cpu: bool,
) -> tuple[float, float]:
    """ATen's fp32 source steps (h, w) for resizing in_hw → out_hw, per device.

    ``area_pixel_compute_scale`` / ``compute_scales_value`` in fp32 (ATen's accumulate
    type for fp32/fp16/bf16): (in-1)/(out-1) with align_corners (0 if out == 1),
    otherwise 1/scale when the graph gave a scale factor, else in/out. On top of that
    ATen short-cuts some sizes whatever the scale, differently per device, and the
    kernel follows the device it runs on: equal sizes copy (step 1: the CPU kernels
    per dim, CUDA nearest per dim, CUDA bilinear only when both dims are equal), and the
    CPU nearest kernel halves at exactly 2× (step 0.5, i.e. d >> 1). These only matter
    when a given scale disagrees with the sizes (e.g. scale_factor 2.05 on 7 → 14).
    """
    f32 = np.float32
    steps = []
    for n_in, n_out, scale in zip(in_hw, out_hw, scales or (None, None), strict=True):
        if n_out == n_in and (in_hw == out_hw or on_cpu or mode == "nearest"):
            steps.append(1.0)
        elif mode == "nearest" and n_out == 2 * n_in and on_cpu:
            steps.append(0.5)
        elif mode == "bilinear" and align_corners:
            steps.append(float(f32(n_in - 1) / f32(n_out - 1)) if n_out > 1 else 0.0)
        elif scale is not None:
            steps.append(float(f32(1.0 / float(scale))))
        else:
            steps.append(float(f32(n_in) / f32(n_out)))
    return steps[0], steps[1]


def _check_gate(
    gate: torch.Tensor, p: _Conv, x: torch.Tensor, x2: torch.Tensor | None
) -> torch.Tensor:
    """The gate as an [N, C1] view, validated (groups 1, one source, x's dtype)."""
    if p.depthwise or x2 is not None:
        raise ValueError("gate needs groups=1 and no x2 (a one-source dense conv)")
    if gate.dtype != x.dtype:
        raise TypeError(f"gate must have x's dtype {x.dtype}, got {gate.dtype}")
    if gate.dim() == 4 and tuple(gate.shape[2:]) == (1, 1):
        gate = gate[:, :, 0, 0]
    _check_shape("gate", gate, (p.N, p.C1), "[N, C1] (or [N, C1, 1, 1])")
    return gate


def _split_k_for(m: int, cout: int, k_iters: int, n_sm: int) -> int:
    """How many programs share the K reduction of one output tile.

    ``k_iters`` counts K iterations of 64 channels. DeepLab's ASPP at 32×32 (M = 1024,
    Cout = 256, K = 9·2048) has 16 tiles of 128×128 for 132 SMs: split 8 ways. Layers
    with enough output tiles are never split.
    """
    tiles = triton.cdiv(m, _SPLIT_TILE) * triton.cdiv(cout, _SPLIT_TILE)
    if 2 * tiles > n_sm:
        return 1
    return max(1, min(_SPLIT_MAX, n_sm // tiles, k_iters // _SPLIT_MIN_ITERS))


def _split_k(p: _Conv, device: torch.device) -> int:
    """Split-K factor of a GEMM-path call (1 under the interpreter: no SMs to fill)."""
    target = launch_target(device)
    if target is None:
        return 1
    if p.C1 <= _FLAT_K_MAX_CHANNELS:
        k_iters = triton.cdiv(p.KH * p.KW * p.C1, 64)
    else:
        k_iters = p.KH * p.KW * triton.cdiv(p.C1, 64)
    k_iters += p.KH * p.KW * triton.cdiv(p.C2, 64)
    return _split_k_for(p.N * p.Ho * p.Wo, p.Cout, k_iters, target.sm_count)


def _span(t: torch.Tensor) -> int:
    """Largest element offset from t.data_ptr() any index of t reaches."""
    return sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, ...] = 0,
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
    gate: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Fused conv2d: ``act(conv(cat(x, up(x2)))·scale + shift (+ residual))`` → [N, Cout, Ho, Wo].

    x: [N, C1, H, W]; weight: [Cout, C1 + C2, KH, KW] (depthwise, groups == C1 == Cout:
    [C, 1, KH, KW]); scale/shift: [Cout] or None (1 / 0); residual: [N, Cout, Ho, Wo],
    added before the activation, or after it with ``residual_after_act``; x2:
    [N, C2, H2, W2], resized to H×W (``x2_resize`` "none" / "nearest" / "bilinear",
    ATen semantics; ``x2_scales`` = the (scale_h, scale_w) ATen's upsample op got,
    i.e. the graph's scale_factor, or None for size-based) and concatenated after x
    (before it with ``x2_first``). ``padding``: an int, (h, w), or (top, bottom, left,
    right) for asymmetric zero padding. All tensors may have any strides; the fast path is
    channels_last x/x2 and a :func:`pack_conv_weight` weight. The result goes to
    ``out`` (any strided view, e.g. a channel slice of a channels_last buffer) or to a
    new channels_last tensor of ``out_dtype`` (default x.dtype). ``out`` must not
    overlap the inputs. ``gate`` ([N, C1] or [N, C1, 1, 1], groups 1, no x2): the
    conv reads ``x · gate`` (one scale per image and input channel; squeeze-excitation),
    rounded to x's dtype as it is read; the product is never written. ``stats`` (a
    :func:`stats_buffer` of the output's shape): the kernel also writes each output
    channel's per-tile mean and M2 into it, for GroupNorm and squeeze-excitation.
    """
    device = check_device(x, weight, scale, shift, residual, x2, out, gate, stats)
    p = _check(
        x, weight, scale, shift, stride, padding, dilation, groups, act, residual,
        x2, x2_resize, x2_align_corners, x2_scales, x2_first, out, out_dtype,
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
    # Absent optional tensors: any valid pointer; the constexpr flags keep it unread.
    scale_t = scale if scale is not None else out
    shift_t = shift if shift is not None else out
    res_t = residual if residual is not None else out
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    res_mode = 0 if residual is None else (2 if residual_after_act else 1)
    s_scale = scale.stride(0) if scale is not None else 0
    s_shift = shift.stride(0) if shift is not None else 0
    (sh, sw), (ph, pw), (dh, dw) = p.stride, p.padding, p.dilation

    gate_t, sg = out, (0, 0)
    if gate is not None:
        gate_t = _check_gate(gate, p, x, x2)
        sg = (gate_t.stride(0), gate_t.stride(1))
    if stats is not None:
        check_stats(stats, p.N, p.Ho * p.Wo, p.Cout)
        idx64 = idx64 or stats.numel() > _INT32_MAX
    stats_t = stats if stats is not None else out
    # with statistics, tiles cover one image each: N·⌈Ho·Wo / rows⌉ pixel tiles
    pixel_tiles = (
        (lambda rows: p.N * triton.cdiv(p.Ho * p.Wo, rows))
        if stats is not None
        else (lambda rows: triton.cdiv(M, rows))
    )
    if p.depthwise:

        def dw_grid(meta):
            return (pixel_tiles(meta["BLOCK_P"]) * triton.cdiv(p.Cout, meta["BLOCK_C"]),)

        _dw_conv2d_kernel[dw_grid](
            x, weight, scale_t, shift_t, res_t, out, stats_t,
            p.N, p.C1, p.H, p.W, p.KH, p.KW, p.Ho, p.Wo,
            sh, sw, ph, pw, dh, dw,
            *x.stride(),
            weight.stride(0), weight.stride(2), weight.stride(3),
            s_scale, s_shift,
            *res_strides,
            *out.stride(),
            float(act_param),
            HAS_SCALE=scale is not None,
            HAS_SHIFT=shift is not None,
            RES_MODE=res_mode,
            ACT=act_code(act),
            IDX64=idx64,
            STATS=stats is not None,
        )  # fmt: skip
        return out

    resize = _RESIZE_CODES[x2_resize] if x2 is not None else 0
    step_h, step_w = _resample_steps(
        (p.H2, p.W2), (p.H, p.W), x2_resize, x2_align_corners, x2_scales, device.type == "cpu"
    )
    x2_t = x2 if x2 is not None else x
    wc_x, wc_x2 = (p.C2, 0) if x2_first else (0, p.C1)
    split = _split_k(p, device) if stats is None else 1
    ws = torch.empty((split, M, p.Cout), dtype=torch.float32, device=device) if split > 1 else out

    def grid(meta):
        return (pixel_tiles(meta["BLOCK_M"]) * triton.cdiv(p.Cout, meta["BLOCK_N"]) * split,)

    _conv2d_kernel[grid](
        x, x2_t, weight, scale_t, shift_t, res_t, out, ws, gate_t, stats_t,
        p.N, p.C1, p.C2, p.H, p.W, p.H2, p.W2, p.Cout, p.KH, p.KW, p.Ho, p.Wo,
        sh, sw, ph, pw, dh, dw,
        step_h, step_w,
        wc_x, wc_x2,
        *x.stride(),
        *x2_t.stride(),
        *weight.stride(),
        s_scale, s_shift,
        *res_strides,
        *out.stride(),
        *sg,
        float(act_param),
        HAS_X2=x2 is not None,
        RESIZE=resize,
        ALIGN_CORNERS=bool(x2_align_corners),
        FLAT_K=p.C1 <= _FLAT_K_MAX_CHANNELS,
        HAS_GATE=gate is not None,
        HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None,
        RES_MODE=res_mode,
        ACT=act_code(act),
        IDX64=idx64,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        SPLIT_K=split,
        STATS=stats is not None,
    )  # fmt: skip
    if split > 1:
        blk = _SPLIT_EPILOGUE_BLOCK
        _splitk_epilogue_kernel[(triton.cdiv(M, blk) * triton.cdiv(p.Cout, blk),)](
            ws, scale_t, shift_t, res_t, out,
            p.N, p.Cout, p.Ho, p.Wo,
            s_scale, s_shift,
            *res_strides,
            *out.stride(),
            float(act_param),
            HAS_SCALE=scale is not None,
            HAS_SHIFT=shift is not None,
            RES_MODE=res_mode,
            ACT=act_code(act),
            IDX64=idx64,
            SPLIT_K=split,
            BLOCK_M=blk,
            BLOCK_N=blk,
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------- reference


def _resize_reference(
    x2: torch.Tensor,
    size: tuple[int, int],
    mode: str,
    align_corners: bool,
    scales: tuple[float, float] | None,
) -> torch.Tensor:
    """x2 resized to ``size`` exactly as ATen's upsample ops do (scales passed through)."""
    if mode == "none":
        return x2
    sh, sw = scales if scales is not None else (None, None)
    if mode == "nearest":
        return torch.ops.aten.upsample_nearest2d.default(x2, list(size), sh, sw)
    return torch.ops.aten.upsample_bilinear2d.default(x2, list(size), align_corners, sh, sw)


def _reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    *,
    compute_dtype: torch.dtype,
    stride: int | tuple[int, int],
    padding: int | tuple[int, ...],
    dilation: int | tuple[int, int],
    groups: int,
    act: str,
    act_param: float,
    residual: torch.Tensor | None,
    residual_after_act: bool,
    x2: torch.Tensor | None,
    x2_resize: str,
    x2_align_corners: bool,
    x2_scales: tuple[float, float] | None,
    x2_first: bool,
    out: torch.Tensor | None,
    out_dtype: torch.dtype | None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """The composite PyTorch computation with every step in ``compute_dtype``.

    fp32 is the reference (``conv2d_reference``); the tests also run it in fp16/bf16
    to measure PyTorch's own error in that precision.
    """
    p = _check(
        x, weight, scale, shift, stride, padding, dilation, groups, act, residual,
        x2, x2_resize, x2_align_corners, x2_scales, x2_first, out, out_dtype,
    )  # fmt: skip
    inp = x.to(compute_dtype)
    if gate is not None:
        g = _check_gate(gate, p, x, x2)
        inp = inp * g.to(compute_dtype)[:, :, None, None]
    if x2 is not None:
        up = _resize_reference(
            x2.to(compute_dtype), (p.H, p.W), x2_resize, x2_align_corners, x2_scales
        )
        inp = torch.cat([up, inp] if x2_first else [inp, up], dim=1)
    if p.pad_end != p.padding:  # asymmetric: pad explicitly, as "same" padding does
        (top, left), (bottom, right) = p.padding, p.pad_end
        inp = F.pad(inp, (left, right, top, bottom))
        y = F.conv2d(inp, weight.to(compute_dtype), None, p.stride, 0, p.dilation, groups)
    else:
        y = F.conv2d(inp, weight.to(compute_dtype), None, p.stride, p.padding, p.dilation, groups)
    if scale is not None:
        y = y * scale.to(compute_dtype)[None, :, None, None]
    if shift is not None:
        y = y + shift.to(compute_dtype)[None, :, None, None]
    res = residual.to(compute_dtype) if residual is not None else None
    if res is not None and not residual_after_act:
        y = y + res
    y = apply_activation_reference(y, act, act_param)
    if res is not None and residual_after_act:
        y = y + res
    y = y.to(p.out_dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y.contiguous(memory_format=torch.channels_last)


def conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, ...] = 0,
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
    gate: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Plain PyTorch :func:`conv2d`: ATen upsample + ``torch.cat`` + ``F.conv2d`` + epilogue
    (``x · gate`` first when gated).

    Computed in fp32 whatever the input dtype, cast to the output dtype at the end;
    any device.
    """
    return _reference(
        x, weight, scale, shift,
        compute_dtype=torch.float32,
        stride=stride, padding=padding, dilation=dilation, groups=groups,
        act=act, act_param=act_param,
        residual=residual, residual_after_act=residual_after_act,
        x2=x2, x2_resize=x2_resize, x2_align_corners=x2_align_corners,
        x2_scales=x2_scales, x2_first=x2_first,
        out=out, out_dtype=out_dtype, gate=gate,
    )  # fmt: skip
