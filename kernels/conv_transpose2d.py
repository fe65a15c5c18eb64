"""Transposed 2-D convolution (groups=1) with a fused per-channel epilogue:

    acc[n, co, oh, ow] = Σ_{ci, kh, kw} x[n, ci, ih, iw] · w[ci, co, kh, kw]
                         over oh = ih·s − p + kh·d   (ih in [0, H), iw in [0, W))
    y = act(acc·scale[co] + shift[co] (+ residual))   (+ residual, if after the act)

stored in out's dtype through out's strides. Ho = (H−1)·s − 2p + d·(KH−1) + op + 1.

Sub-pixel (phase) decomposition: output row oh = rh + qh·s (phase rh = oh mod s)
only receives taps kh with (rh + p − kh·d) ≡ 0 (mod s): the taps kh0, kh0 + step,
kh0 + 2·step, … (step = s / gcd(s, d)), reading input row ih = qh + (rh + p − kh·d)/s.
So each of the s_h·s_w phases is a dense implicit GEMM — M = N·⌈Ho/s⌉·⌈Wo/s⌉
output pixels, N = Cout, K = taps_of_phase·Cin — run with ``tl.dot`` and fp32
accumulation (fp32 inputs: ``input_precision="ieee"``, never TF32). The phase is
grid axis 2; no work is spent on the zeros a zero-insertion formulation multiplies.
Output pixels no tap reaches (output_padding, kernel smaller than stride) get the
epilogue of a zero accumulator, as in PyTorch.

Layouts: any strides for every tensor. Fast path: x channels_last (Cin stride 1,
A tiles load contiguous along K) and the weight with Cout stride 1 (B tiles load
contiguous along N) — ``pack_weight`` makes such a view once, at build time; the
PyTorch layout [Cin, Cout, KH, KW] contiguous is correct but strided.

Counts (useful work): FLOPs 2·N·H·W·Cin·Cout·KH·KW; bytes: read N·Cin·H·W
(once per Cout tile), Cin·Cout·KH·KW weights and, with a residual, N·Cout·Ho·Wo;
write N·Cout·Ho·Wo.
"""

from __future__ import annotations

import math
import operator

import torch
import triton
import triton.language as tl

from ._common import (
    GpuTarget,
    act_code,
    apply_activation_reference,
    autotune_configs,
    check_device,
    check_float_dtype,
    dot_loop_shared_bytes,
    launch_target,
    next_power_of_2,
)
from ._epilogue import activate


def _configs():
    # Tensor-core tiles; 128×128 for the big U-Net up-convolutions (K = Cin up to
    # 1024 per tap), 64-wide for small Cout (64) and DCGAN's 4×4 feature maps where
    # M per phase is small. BLOCK_K 32/64: Cin is a multiple of 32 in every real
    # decoder; 64 halves the loop trips when it is large. At most 64 fp32 accumulators
    # per thread: 128×128 on 4 warps (128) spills 4–1600 B in every dtype, the
    # residual and RGB-output cases most (sm_90 and sm_87).
    space = [
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64},
        {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32},
        {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32},
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64},
    ]
    return autotune_configs(
        space,
        interpreter_config={"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32},
        fits=lambda b, warps, stages: b["BLOCK_M"] * b["BLOCK_N"] <= 64 * 32 * warps,
    )


def _fits(config, args: dict, target: GpuTarget) -> bool:
    """Whether a tile compiles for ``target`` without spills or a shared-memory overflow
    (beyond the space's ≤ 64 accumulators per thread).

    Per thread (T = 32·warps threads), measured with ptxas for sm_90 and sm_87, Triton
    3.9 and 3.6 (``python benchmarks/compile_targets.py``):

    - fp32 (``ieee`` dots, no tensor cores) holds the K-slab of both operands:
      BM·BN·BK/T ≤ 2048 and BK ≤ 32 (128×128×64 on 8 warps spills 12–28 B, 128×64×64
      184–260 B on 4 warps, 8 B on 8); and not fewer than 32 accumulators on 8 warps,
      where ptxas trades 4–8 B of spills at 80 registers for occupancy (64×64×64).
    - with the residual added after the activation (its tile live across it), or an
      output whose NHWC rows are not 16-aligned (RGB: Cout = 3; stored element by
      element, a 64-bit address each): ≤ 32 accumulators (128×64 on 4 warps spills
      12–36 B and 600–1900 B).
    - shared memory as ``dot_loop_shared_bytes`` (fp32 128×128×64 at 4 stages: 192 KB,
      over sm_87's 163 KB).
    """
    bm, bn, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    threads = 32 * config.num_warps
    acc = bm * bn // threads
    ieee = args["IEEE"]
    aligned_out = all(args[s] % 16 == 0 for s in ("syn", "syh", "syw")) and args["syc"] == 1
    if ieee and (bm * bn * bk // threads > 2048 or bk > 32):
        return False
    if ieee and threads >= 256 and acc < 32:
        return False
    if (args["RES_AFTER_ACT"] or not aligned_out) and acc > 32:
        return False
    shared = dot_loop_shared_bytes(
        bm, bn, bk, config.num_stages,
        elem_bytes=args["x_ptr"].element_size(),
        wgmma=target.capability[0] >= 9 and not ieee,
    )  # fmt: skip
    return shared <= target.max_shared


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs whose N or K tile is more than twice the channel count (pure
    padding work), keeping the smallest ones if that leaves nothing; then, on a GPU,
    those that would spill or overflow shared memory there (``_fits``)."""
    args = {**named_args, **kwargs}
    cout = next_power_of_2(args["Cout"])
    cin = next_power_of_2(args["Cin"])
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_N"] <= max(2 * cout, 64) and c.kwargs["BLOCK_K"] <= max(2 * cin, 32)
    ]
    if not kept:
        smallest = min(c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] for c in configs)
        kept = [c for c in configs if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] == smallest]
    x = args.get("x_ptr")  # absent when called with shapes alone
    target = None if x is None else launch_target(x.device)
    if target is None:  # the interpreter (one config) or no tensor: nothing to fit
        return kept
    return (
        [c for c in kept if _fits(c, args, target)]
        or [c for c in configs if _fits(c, args, target)]
        or kept
    )


@triton.autotune(
    configs=_configs(),
    key=[
        "N",
        "Cin",
        "H",
        "W",
        "Cout",
        "Ho",
        "Wo",
        "KH",
        "KW",
        "SH",
        "SW",
        "PH",
        "PW",
        "DH",
        "DW",
        # what fits depends on these too (_fits): the residual after the activation and
        # whether the output rows are 16-aligned (a concat slice's strides)
        "RES_AFTER_ACT",
        "syn",
        "syc",
        "syh",
        "syw",
    ],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _conv_transpose2d_kernel(
    x_ptr,  # [N, Cin, H, W], strides sx*
    w_ptr,  # [Cin, Cout, KH, KW], strides sw*
    scale_ptr,  # [Cout] or dummy
    shift_ptr,  # [Cout] or dummy
    res_ptr,  # [N, Cout, Ho, Wo], strides sr*, or dummy
    y_ptr,  # [N, Cout, Ho, Wo], strides sy*
    N,
    Cin,
    H,
    W,
    Cout,
    Ho,
    Wo,
    sxn,
    sxc,
    sxh,
    sxw,
    swi,
    swo,
    swh,
    sww,
    srn,
    src,
    srh,
    srw,
    syn,
    syc,
    syh,
    syw,
    act_param,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    STEP_H: tl.constexpr,  # SH // gcd(SH, DH): kh distance between taps of one phase
    STEP_W: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_RES: tl.constexpr,
    RES_AFTER_ACT: tl.constexpr,  # HAS_RES and the residual goes after the activation
    ACT: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 operands: exact fp32 products, not TF32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    DSTEP_H: tl.constexpr = STEP_H * DH // SH  # input-row distance between those taps
    DSTEP_W: tl.constexpr = STEP_W * DW // SW
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    phase = tl.program_id(2)
    rh = phase // SW
    rw = phase % SW
    HQ = tl.cdiv(Ho, SH)  # output rows per phase (the last may be short by one)
    WQ = tl.cdiv(Wo, SW)

    # First tap of this phase: the one kh in [0, STEP_H) with (rh + PH − kh·DH) ≡ 0
    # (mod SH), if any (KH = none). Then the phase has TH taps kh0 + j·STEP_H < KH.
    kh0 = rh * 0 + KH
    for i in tl.static_range(STEP_H):
        kh0 = tl.where(((rh + PH - i * DH) % SH == 0) & (kh0 == KH), i, kh0)
    kw0 = rw * 0 + KW
    for i in tl.static_range(STEP_W):
        kw0 = tl.where(((rw + PW - i * DW) % SW == 0) & (kw0 == KW), i, kw0)
    TH = (KH - kh0 + STEP_H - 1) // STEP_H
    TW = (KW - kw0 + STEP_W - 1) // STEP_W
    dh0 = (rh + PH - kh0 * DH) // SH  # exact division (when TH > 0)
    dw0 = (rw + PW - kw0 * DW) // SW

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (n, qh, qw) of this phase
    qw = m % WQ
    t = m // WQ
    qh = t % HQ
    n = t // HQ
    oh = rh + qh * SH
    ow = rw + qw * SW
    m_ok = (n < N) & (oh < Ho) & (ow < Wo)
    x_n = x_ptr + n.to(tl.int64) * sxn  # [BLOCK_M] pointers
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < Cout
    kk = tl.arange(0, BLOCK_K)

    KCH = tl.cdiv(Cin, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # K loop over (tap, Cin chunk) of this phase as one loop, so it pipelines
    for it in range(0, TH * TW * KCH):
        kc = it % KCH
        tap = it // KCH
        jw = tap % TW
        jh = tap // TW
        ih = qh + (dh0 - jh * DSTEP_H)
        iw = qw + (dw0 - jw * DSTEP_W)
        a_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        ci = kc * BLOCK_K + kk
        ci_ok = ci < Cin
        a_ptr = (x_n + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None] + (
            ci.to(tl.int64) * sxc
        )[None, :]
        a = tl.load(a_ptr, mask=a_ok[:, None] & ci_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        kh = kh0 + jh * STEP_H
        kw = kw0 + jw * STEP_W
        b_ptr = w_ptr + kh * swh + kw * sww + ci[:, None] * swi + co[None, :] * swo
        b = tl.load(b_ptr, mask=ci_ok[:, None] & co_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(a, b, acc, input_precision="ieee") if IEEE else tl.dot(a, b, acc)

    # epilogue: y = act(acc·scale + shift (+ res)) (+ res)
    y = acc
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + co, mask=co_ok, other=1.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        y = y + tl.load(shift_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & co_ok[None, :]
    n64 = n.to(tl.int64)
    oh64 = oh.to(tl.int64)
    ow64 = ow.to(tl.int64)
    co64 = co.to(tl.int64)[None, :]
    if HAS_RES:
        r_off = (n64 * srn + oh64 * srh + ow64 * srw)[:, None] + co64 * src
        r = tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
        if not RES_AFTER_ACT:
            y = y + r
    y = activate(y, ACT, act_param)
    if RES_AFTER_ACT:  # only set with HAS_RES
        y = y + r
    y_off = (n64 * syn + oh64 * syh + ow64 * syw)[:, None] + co64 * syc
    tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launcher


def _pair(name: str, v: int | tuple[int, int]) -> tuple[int, int]:
    try:
        if isinstance(v, (tuple, list)) and len(v) == 2:
            return operator.index(v[0]), operator.index(v[1])
        if not isinstance(v, (tuple, list)):
            return operator.index(v), operator.index(v)
    except TypeError:
        pass
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


def _check(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    stride,
    padding,
    output_padding,
    dilation,
    act: str,
    residual: torch.Tensor | None,
):
    """Validate the arguments; returns (s, p, op, d, (Ho, Wo))."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, Cin, H, W], got {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [Cin, Cout, KH, KW], got {tuple(weight.shape)}")
    check_float_dtype("x", x)
    check_float_dtype("weight", weight)
    if weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"weight must be [Cin={x.shape[1]}, Cout, KH, KW] (groups=1), got {tuple(weight.shape)}"
        )
    if min(weight.shape) == 0 or min(x.shape[1:]) == 0:
        raise ValueError(
            f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must have non-empty "
            "channel and spatial dimensions"
        )
    cout = weight.shape[1]
    for name, v in (("scale", scale), ("shift", shift)):
        if v is not None:
            if v.dim() != 1 or v.shape[0] != cout:
                raise ValueError(f"{name} must be 1-D [Cout={cout}], got {tuple(v.shape)}")
            check_float_dtype(name, v)
    act_code(act)
    s = _pair("stride", stride)
    p = _pair("padding", padding)
    op = _pair("output_padding", output_padding)
    d = _pair("dilation", dilation)
    if min(s) <= 0 or min(d) <= 0 or min(p) < 0 or min(op) < 0:
        raise ValueError(
            f"stride and dilation must be positive, padding and output_padding non-negative; "
            f"got stride={s}, padding={p}, output_padding={op}, dilation={d}"
        )
    for i in range(2):
        if op[i] >= max(s[i], d[i]):
            raise ValueError(
                f"output_padding must be smaller than stride or dilation, got "
                f"output_padding={op}, stride={s}, dilation={d}"
            )
    kh, kw = weight.shape[2], weight.shape[3]
    H, W = x.shape[2], x.shape[3]
    Ho = (H - 1) * s[0] - 2 * p[0] + d[0] * (kh - 1) + op[0] + 1
    Wo = (W - 1) * s[1] - 2 * p[1] + d[1] * (kw - 1) + op[1] + 1
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"output size {(Ho, Wo)} must be positive (input {(H, W)}, padding {p})")
    if residual is not None:
        want = (x.shape[0], cout, Ho, Wo)
        if tuple(residual.shape) != want:
            raise ValueError(f"residual must have shape {want}, got {tuple(residual.shape)}")
        check_float_dtype("residual", residual)
    return s, p, op, d, (Ho, Wo)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The same logical [Cin, Cout, KH, KW] weight stored as [KH, KW, Cin, Cout]
    (Cout stride 1): the layout ``conv_transpose2d`` loads fastest. Do it once,
    when the engine is built."""
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [Cin, Cout, KH, KW], got {tuple(weight.shape)}")
    return weight.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)


def conv_transpose2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    output_padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    act: str = "none",
    act_param: float = 0.01,
    residual: torch.Tensor | None = None,
    residual_after_act: bool = False,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``F.conv_transpose2d`` (groups=1, no bias: fold it into ``shift``) + epilogue.

    x [N, Cin, H, W], weight [Cin, Cout, KH, KW] (PyTorch's ConvTranspose2d layout,
    any strides; ``pack_weight`` gives the fast one), same dtype -> [N, Cout, Ho, Wo]
    with Ho = (H−1)·s − 2p + d·(KH−1) + output_padding + 1. ``out`` may be any
    strided view (e.g. a channel slice of a concat buffer) that overlaps no input;
    otherwise the output is allocated channels_last in ``out_dtype`` (default x's).
    """
    s, p, _, d, (Ho, Wo) = _check(
        x, weight, scale, shift, stride, padding, output_padding, dilation, act, residual
    )
    device = check_device(x, weight, scale, shift, residual, out)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    N, Cin, H, W = x.shape
    Cout, KH, KW = weight.shape[1], weight.shape[2], weight.shape[3]
    shape = (N, Cout, Ho, Wo)
    if out is None:
        dtype = out_dtype or x.dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {dtype}")
        out = torch.empty(shape, device=device, dtype=dtype, memory_format=torch.channels_last)
    else:
        if tuple(out.shape) != shape:
            raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
        check_float_dtype("out", out)
        if out_dtype is not None and out_dtype != out.dtype:
            raise TypeError(f"out_dtype {out_dtype} disagrees with out.dtype {out.dtype}")
    if N == 0:
        return out
    m_total = N * triton.cdiv(Ho, s[0]) * triton.cdiv(Wo, s[1])
    if m_total >= 2**31:
        raise ValueError(f"N*ceil(Ho/s)*ceil(Wo/s) must be < 2**31, got {m_total}")
    res = residual if residual is not None else out  # dummies are never read
    scale_t = scale if scale is not None else out
    shift_t = shift if shift is not None else out

    def grid(meta):
        return (
            triton.cdiv(m_total, meta["BLOCK_M"]),
            triton.cdiv(Cout, meta["BLOCK_N"]),
            s[0] * s[1],
        )

    _conv_transpose2d_kernel[grid](
        x,
        weight,
        scale_t,
        shift_t,
        res,
        out,
        N,
        Cin,
        H,
        W,
        Cout,
        Ho,
        Wo,
        *x.stride(),
        *weight.stride(),
        *res.stride(),
        *out.stride(),
        float(act_param),
        KH=KH,
        KW=KW,
        SH=s[0],
        SW=s[1],
        PH=p[0],
        PW=p[1],
        DH=d[0],
        DW=d[1],
        STEP_H=s[0] // math.gcd(s[0], d[0]),
        STEP_W=s[1] // math.gcd(s[1], d[1]),
        HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None,
        HAS_RES=residual is not None,
        RES_AFTER_ACT=residual is not None and bool(residual_after_act),
        ACT=act_code(act),
        IEEE=x.dtype == torch.float32,
    )
    return out


def conv_transpose2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    output_padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    act: str = "none",
    act_param: float = 0.01,
    residual: torch.Tensor | None = None,
    residual_after_act: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``F.conv_transpose2d`` + the same epilogue, computed in fp32, cast to
    ``out_dtype`` (default x's)."""
    s, p, op, d, _ = _check(
        x, weight, scale, shift, stride, padding, output_padding, dilation, act, residual
    )
    y = torch.nn.functional.conv_transpose2d(
        x.float(), weight.float(), None, s, p, op, 1, d
    )  # [N, Cout, Ho, Wo]
    if scale is not None:
        y = y * scale.float().view(1, -1, 1, 1)
    if shift is not None:
        y = y + shift.float().view(1, -1, 1, 1)
    if residual is not None and not residual_after_act:
        y = y + residual.float()
    y = apply_activation_reference(y, act, act_param)
    if residual is not None and residual_after_act:
        y = y + residual.float()
    return y.to(out_dtype or x.dtype)
