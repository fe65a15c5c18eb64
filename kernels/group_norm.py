"""GroupNorm / InstanceNorm + per-channel affine + activation, written once.

Logical shapes (PyTorch's, any strides)::

    x       [N, C, H, W]
    weight  [C] or None,  bias [C] or None
    out     [N, C, H, W]  channels_last by default, x's dtype

``G`` groups of C/G consecutive channels (InstanceNorm: G = C). Statistics in fp32,
the biased variance PyTorch's GroupNorm uses; ``out = act((x − μ)·rstd·w + b)``.

Three launches, all reading NHWC along contiguous channel runs:

1. ``_channel_stats_kernel`` (grid N·S × ⌈C/BLOCK_C⌉): per channel, over one of S
   contiguous pixel ranges, the mean and the sum of squared deviations of
   x − (the range's first pixel), tile by tile with Chan's parallel update (never
   Σx² − (Σx)²/n, which cancels when the mean is large beside the spread). Bytes: read N·C·H·W; write 2·N·S·C fp32.
2. ``_group_stats_kernel`` (grid N·G): merges the C/G × S partials of a group in a
   fixed order (deterministic) into μ and rstd.
3. ``_apply_kernel`` (grid N·⌈HW/BLOCK_P⌉ × ⌈C/BLOCK_C⌉): normalise, affine,
   activation in registers; one write. Bytes: read N·C·H·W; write N·C·H·W.

PyTorch's GroupNorm followed by an activation reads x twice and writes twice (the
activation is a second pass); this reads twice and writes once. When the conv that
produced x wrote its channel statistics (``conv2d(..., stats=)``, the Triton backend
does so for every conv read by a GroupNorm), ``stats=`` replaces launch 1: x is read
once, by the apply pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    STATS_BLOCK,
    act_code,
    apply_activation_reference,
    check_device,
    check_float_dtype,
    check_stats,
    next_power_of_2,
    pixel_splits,
)
from ._epilogue import activate

_BLOCK_P = 64
_MERGE_BLOCK = 128


@triton.jit
def _channel_stats_kernel(
    x_ptr,  # [N, C, H, W] any strides
    mean_ptr, m2_ptr,  # [N, S, C] fp32
    C, W, HW, per_split,
    sx_n, sx_c, sx_h, sx_w,
    S,  # partials per image: a run-time value, so map sizes share a compile
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # n·S + s
    n = pid // S
    s = pid - n * S
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    p0 = s * per_split
    p1 = tl.minimum(p0 + per_split, HW)
    base = x_ptr + n.to(tl.int64) * sx_n
    c_off = c.to(tl.int64)[None, :] * sx_c
    # statistics of x − shift, shift = the split's first pixel: tile sums of values near
    # the mean, not of the values themselves (64 values of 1000 sum to 64000, whose fp32
    # ulp is 4e-3: the mean would carry it)
    h0 = p0 // W
    shift_off = h0.to(tl.int64) * sx_h + (p0 - h0 * W).to(tl.int64) * sx_w
    shift = tl.load(base + shift_off + c.to(tl.int64) * sx_c, mask=mask_c, other=0.0)
    shift = shift.to(tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    count = 0.0
    for q in range(p0, p1, BLOCK_P):
        pp = q + tl.arange(0, BLOCK_P)
        mask_p = pp < p1
        h = pp // W
        w = pp - h * W
        off = h.to(tl.int64) * sx_h + w.to(tl.int64) * sx_w
        mask = mask_p[:, None] & mask_c[None, :]
        v = tl.load(base + off[:, None] + c_off, mask=mask, other=0.0).to(tl.float32)
        v = tl.where(mask, v - shift[None, :], 0.0)
        nb = tl.minimum(p1 - q, BLOCK_P).to(tl.float32)
        t_mean = tl.sum(v, axis=0) / nb
        d = tl.where(mask, v - t_mean[None, :], 0.0)
        t_m2 = tl.sum(d * d, axis=0)
        total = count + nb
        delta = t_mean - mean
        mean += delta * (nb / total)
        m2 += t_m2 + delta * delta * (count * nb / total)
        count = total
    tl.store(mean_ptr + pid * C + c, shift + mean, mask=mask_c)
    tl.store(m2_ptr + pid * C + c, m2, mask=mask_c)


@triton.jit
def _group_stats_kernel(
    mean_ptr, m2_ptr,  # [N, S, C] fp32 partials
    mu_ptr, rstd_ptr,  # [N, G] fp32
    C, G, CG, HW, per_split, eps,
    S,  # partials per image: a run-time value, so map sizes share a compile
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # n·G + g
    n = pid // G
    g = pid - n * G
    items = CG * S  # (channel of the group, split) pairs, channel-major
    mean = 0.0
    m2 = 0.0
    count = 0.0
    for i0 in range(0, items, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        ok = i < items
        cg = i // S
        s = i - cg * S
        idx = (n * S + s) * C + g * CG + cg
        pm = tl.load(mean_ptr + idx, mask=ok, other=0.0)
        pq = tl.load(m2_ptr + idx, mask=ok, other=0.0)
        cnt = tl.where(ok, tl.maximum(tl.minimum(HW - s * per_split, per_split), 0), 0)
        cnt = cnt.to(tl.float32)
        b_count = tl.sum(cnt, axis=0)
        # the block's mean relative to its first entry (values near the mean again)
        ref = tl.sum(tl.where(i == i0, pm, 0.0), axis=0)
        b_mean = ref + tl.sum(cnt * (pm - ref), axis=0) / b_count
        dm = tl.where(cnt > 0, pm - b_mean, 0.0)
        b_m2 = tl.sum(tl.where(cnt > 0, pq, 0.0) + cnt * dm * dm, axis=0)
        total = count + b_count
        delta = b_mean - mean
        mean += delta * (b_count / total)
        m2 += b_m2 + delta * delta * (count * b_count / total)
        count = total
    var = m2 / count
    tl.store(mu_ptr + pid, mean)
    tl.store(rstd_ptr + pid, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _apply_kernel(
    x_ptr, w_ptr, b_ptr, mu_ptr, rstd_ptr, out_ptr,
    C, G, CG, W, HW, act_param,
    sx_n, sx_c, sx_h, sx_w,
    so_n, so_c, so_h, so_w,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    tiles_p = tl.cdiv(HW, BLOCK_P)
    pid = tl.program_id(0)
    n = pid // tiles_p
    pp = (pid - n * tiles_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = pp < HW
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    gi = n * G + c // CG
    mu = tl.load(mu_ptr + gi, mask=mask_c, other=0.0)
    rs = tl.load(rstd_ptr + gi, mask=mask_c, other=0.0)
    # (x − μ)·(rstd·w) + b: never x·a − μ·a, which cancels when |μ| ≫ the spread
    a = rs
    if HAS_W:
        a = rs * tl.load(w_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_B:
        b += tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    h = pp // W
    w = pp - h * W
    n64 = n.to(tl.int64)
    h64 = h.to(tl.int64)
    w64 = w.to(tl.int64)
    c64 = c.to(tl.int64)
    mask = mask_p[:, None] & mask_c[None, :]
    x_off = n64 * sx_n + (h64 * sx_h + w64 * sx_w)[:, None] + c64[None, :] * sx_c
    v = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    y = activate((v - mu[None, :]) * a[None, :] + b[None, :], ACT, act_param)
    o_off = n64 * so_n + (h64 * so_h + w64 * so_w)[:, None] + c64[None, :] * so_c
    tl.store(out_ptr + o_off, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    act: str,
) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got {list(x.shape)}")
    check_float_dtype("x", x)
    n, c, h, w = x.shape
    if min(n, c, h, w) < 1:
        raise ValueError(f"x must have no empty dims, got {list(x.shape)}")
    if not isinstance(groups, int) or groups < 1 or c % groups:
        raise ValueError(f"groups must divide the {c} channels, got {groups!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.shape[0] != c):
            raise ValueError(f"{name} must be [{c}], got {list(t.shape)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    act_code(act)


def group_norm(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    act: str = "none",
    act_param: float = 0.0,
    *,
    stats: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(group_norm(x, groups, weight, bias, eps))`` → channels_last (or ``out``).

    ``stats``: x's per-tile channel statistics as the conv that wrote x produced them
    (``segfast.kernels.conv2d.conv2d(..., stats=)``); then x is not read for them."""
    _check(x, groups, weight, bias, eps, act)
    device = check_device(x, weight, bias, out, stats)
    n, c, hgt, wid = x.shape
    hw = hgt * wid
    if out is None:
        out = torch.empty_like(x, memory_format=torch.channels_last)
    elif tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype:
        raise ValueError(
            f"out must be {list(x.shape)} {x.dtype}, got {list(out.shape)} {out.dtype}"
        )
    block_c = min(64, next_power_of_2(c))
    c_blocks = triton.cdiv(c, block_c)
    if stats is not None:
        check_stats(stats, n, hw, c)
        mean, m2 = stats[0], stats[1]
        splits, per_split = stats.shape[2], STATS_BLOCK
    else:
        splits = pixel_splits(n, c_blocks, hw, _BLOCK_P, device)
        per_split = triton.cdiv(hw, splits)
        mean = torch.empty((n, splits, c), dtype=torch.float32, device=device)
        m2 = torch.empty_like(mean)
        _channel_stats_kernel[(n * splits, c_blocks)](
            x, mean, m2, c, wid, hw, per_split, *x.stride(),
            S=splits, BLOCK_P=_BLOCK_P, BLOCK_C=block_c, num_warps=4,
        )  # fmt: skip
    mu = torch.empty((n, groups), dtype=torch.float32, device=device)
    rstd = torch.empty_like(mu)
    _group_stats_kernel[(n * groups,)](
        mean, m2, mu, rstd, c, groups, c // groups, hw, per_split, float(eps),
        S=splits, BLOCK=_MERGE_BLOCK, num_warps=4,
    )  # fmt: skip
    _apply_kernel[(n * triton.cdiv(hw, _BLOCK_P), c_blocks)](
        x, weight if weight is not None else mu, bias if bias is not None else mu, mu, rstd, out,
        c, groups, c // groups, wid, hw, float(act_param), *x.stride(), *out.stride(),
        HAS_W=weight is not None, HAS_B=bias is not None, ACT=act_code(act),
        BLOCK_P=_BLOCK_P, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return out


def group_norm_reference(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    act: str = "none",
    act_param: float = 0.0,
) -> torch.Tensor:
    """``F.group_norm`` then the activation, in float64, cast back to x's dtype.

    float64: PyTorch's fp32 GroupNorm on the CPU takes the variance as E[x²] − E[x]²,
    which loses ~1e-3 absolute at a mean of 100 and a spread of 3; the kernel's
    two-level Chan update stays within ~1e-5 there.
    """
    _check(x, groups, weight, bias, eps, act)
    y = torch.nn.functional.group_norm(
        x.double(),
        groups,
        None if weight is None else weight.double(),
        None if bias is None else bias.double(),
        eps,
    )
    y = apply_activation_reference(y, act, act_param)
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last)
