"""Squeeze-excitation gate: mean over H×W → 1×1 conv → act → [1×1 conv → act], as
one reduction pass and one small kernel.

Logical shapes (PyTorch's, any strides)::

    p    [N, C, H, W]        the pooled feature map
    w1   [R, C] or [R, C, 1, 1],  b1 [R]
    w2   [C2, R] or [C2, R, 1, 1], b2 [C2]     (optional: one layer when absent)
    gate [N, C2, 1, 1] (or [N, R, 1, 1]) in p's dtype

Launch 1 (``_pool_partial_kernel``, grid N·S × ⌈C/BLOCK_C⌉): each program sums a
contiguous range of pixels for BLOCK_C channels in fp32 and writes one partial sum
row; S splits of the pixel range give a small map enough programs to fill the GPU.
Bytes: read N·C·H·W once; write N·S·C fp32.

Launch 2 (``_se_fc_kernel``, grid N): one program per image adds the S partial sums
in a fixed order (deterministic, no atomics), divides by H·W, computes
h = act1(W1·m + b1) with h held in registers (R ≤ 1024), then
gate = act2(W2·h + b2) block by block, all in fp32, and rounds once to p's dtype.
Bytes: the weights (R·C + C2·R) per image, from L2 after the first image.

When the conv that produced p wrote its channel statistics (``conv2d(..., stats=)``:
per-tile means of 64-pixel tiles), ``stats=`` replaces launch 1 and p is not read at all;
the fc kernel weights each tile's mean by its pixel count.

The gate scales a conv's input channels as the conv reads them
(``segfast.kernels.conv2d.conv2d(..., gate=)``): the gated feature map is never
written.
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

MAX_HIDDEN = 1024  # R: the hidden vector lives in one program's registers
_POOL_BLOCK_P = 64
_FC_TILE = 4096  # elements of a weight tile in _se_fc_kernel (32 per thread at 4 warps)


@triton.jit
def _pool_partial_kernel(
    x_ptr,  # [N, C, H, W] any strides
    part_ptr,  # [N, S, C] fp32
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
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for q in range(p0, p1, BLOCK_P):
        pp = q + tl.arange(0, BLOCK_P)
        mask_p = pp < p1
        h = pp // W
        w = pp - h * W
        off = h.to(tl.int64) * sx_h + w.to(tl.int64) * sx_w
        v = tl.load(base + off[:, None] + c_off, mask=mask_p[:, None] & mask_c[None, :], other=0.0)
        acc += v.to(tl.float32)
    tl.store(part_ptr + pid * C + c, tl.sum(acc, axis=0), mask=mask_c)


@triton.jit
def _se_fc_kernel(
    part_ptr,  # [N, S, C] fp32 partial sums
    w1_ptr, b1_ptr,  # [R, C], [R]
    w2_ptr, b2_ptr,  # [C2, R], [C2]
    out_ptr,  # [N, C_out] (C_out = C2, or R without w2)
    C, R, C2, HW, per_split, inv_hw,
    sw1_o, sw1_i, sw2_o, sw2_i, so_n, so_c,
    p1, p2,
    S,  # partials per image: a run-time value, so map sizes share a compile
    MEANS: tl.constexpr,  # the partials are means of per_split-pixel tiles, not sums
    HAS_B1: tl.constexpr,
    HAS_W2: tl.constexpr,
    HAS_B2: tl.constexpr,
    ACT1: tl.constexpr,
    ACT2: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    r = tl.arange(0, BLOCK_R)
    mask_r = r < R
    h = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask_c = c < C
        m = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for s in range(S):  # a fixed order: the result does not depend on scheduling
            v = tl.load(part_ptr + (n * S + s) * C + c, mask=mask_c, other=0.0)
            if MEANS:
                v = v * tl.minimum(HW - s * per_split, per_split).to(tl.float32)
            m += v
        m = m * inv_hw
        wt = tl.load(
            w1_ptr + r[:, None] * sw1_o + c[None, :] * sw1_i,
            mask=mask_r[:, None] & mask_c[None, :],
            other=0.0,
        )
        h += tl.sum(wt.to(tl.float32) * m[None, :], axis=1)
    if HAS_B1:
        h += tl.load(b1_ptr + r, mask=mask_r, other=0.0).to(tl.float32)
    h = activate(h, ACT1, p1)
    if HAS_W2:
        h = tl.where(mask_r, h, 0.0)
        for c0 in range(0, C2, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            mask_c = c < C2
            wt = tl.load(
                w2_ptr + c[:, None] * sw2_o + r[None, :] * sw2_i,
                mask=mask_c[:, None] & mask_r[None, :],
                other=0.0,
            )
            g = tl.sum(wt.to(tl.float32) * h[None, :], axis=1)
            if HAS_B2:
                g += tl.load(b2_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
            g = activate(g, ACT2, p2)
            tl.store(out_ptr + n * so_n + c * so_c, g.to(out_ptr.dtype.element_ty), mask=mask_c)
    else:
        tl.store(out_ptr + n * so_n + r * so_c, h.to(out_ptr.dtype.element_ty), mask=mask_r)


def _matrix(name: str, w: torch.Tensor, rows: int | None, cols: int) -> torch.Tensor:
    if w.dim() == 4 and tuple(w.shape[2:]) == (1, 1):
        w = w.reshape(w.shape[0], w.shape[1])
    if w.dim() != 2 or w.shape[1] != cols or (rows is not None and w.shape[0] != rows):
        raise ValueError(
            f"{name} must be [{rows if rows is not None else 'R'}, {cols}] (or a 1×1 conv "
            f"weight of that shape), got {list(w.shape)}"
        )
    return w


def _vector(name: str, b: torch.Tensor | None, n: int) -> None:
    if b is not None and (b.dim() != 1 or b.shape[0] != n):
        raise ValueError(f"{name} must be [{n}], got {list(b.shape)}")


def se_gate(
    p: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None = None,
    act1: str = "relu",
    act1_param: float = 0.0,
    w2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    act2: str = "hardsigmoid",
    act2_param: float = 0.0,
    *,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """The squeeze-excitation gate of ``p``: [N, C_out, 1, 1] in ``p``'s dtype.

    ``stats``: p's per-tile channel statistics as the conv that wrote p produced them
    (``segfast.kernels.conv2d.conv2d(..., stats=)``); then p is not read."""
    if p.dim() != 4:
        raise ValueError(f"p must be [N, C, H, W], got {list(p.shape)}")
    check_float_dtype("p", p)
    device = check_device(p, w1, b1, w2, b2, stats)
    n, c, hgt, wid = p.shape
    if hgt * wid == 0 or n == 0:
        raise ValueError(f"p must have pixels and images, got {list(p.shape)}")
    a1, a2 = act_code(act1), act_code(act2)
    w1 = _matrix("w1", w1, None, c)
    r = w1.shape[0]
    if r > MAX_HIDDEN:
        raise ValueError(f"the hidden width ({r}) exceeds {MAX_HIDDEN}")
    _vector("b1", b1, r)
    if w2 is not None:
        w2 = _matrix("w2", w2, None, r)
        _vector("b2", b2, w2.shape[0])
    elif b2 is not None:
        raise ValueError("b2 without w2")
    c_out = w2.shape[0] if w2 is not None else r
    hw = hgt * wid
    block_c = min(64, next_power_of_2(c))
    c_blocks = triton.cdiv(c, block_c)
    if stats is not None:
        check_stats(stats, n, hw, c)
        part, splits, per_split = stats[0], stats.shape[2], STATS_BLOCK
    else:
        splits = pixel_splits(n, c_blocks, hw, _POOL_BLOCK_P, device)
        per_split = triton.cdiv(hw, splits)
        part = torch.empty((n, splits, c), dtype=torch.float32, device=device)
        _pool_partial_kernel[(n * splits, c_blocks)](
            p, part, c, wid, hw, per_split, *p.stride(),
            S=splits, BLOCK_P=_POOL_BLOCK_P, BLOCK_C=block_c, num_warps=4,
        )  # fmt: skip
    out = torch.empty((n, c_out, 1, 1), dtype=p.dtype, device=device)
    block_r = next_power_of_2(r)
    fc_block_c = max(4, min(256, _FC_TILE // block_r))
    w2_ = w2 if w2 is not None else w1
    _se_fc_kernel[(n,)](
        part, w1, b1 if b1 is not None else w1, w2_, b2 if b2 is not None else w1, out,
        c, r, c_out, hw, per_split, 1.0 / hw, w1.stride(0), w1.stride(1), w2_.stride(0), w2_.stride(1),
        out.stride(0), out.stride(1), float(act1_param), float(act2_param),
        S=splits, MEANS=stats is not None, HAS_B1=b1 is not None, HAS_W2=w2 is not None, HAS_B2=b2 is not None,
        ACT1=a1, ACT2=a2, BLOCK_R=block_r, BLOCK_C=fc_block_c, num_warps=4,
    )  # fmt: skip
    return out


def se_gate_reference(
    p: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None = None,
    act1: str = "relu",
    act1_param: float = 0.0,
    w2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    act2: str = "hardsigmoid",
    act2_param: float = 0.0,
) -> torch.Tensor:
    """The gate as PyTorch computes it, in fp32: mean → linear → act → [linear → act]."""
    m = p.float().mean((2, 3))
    h = apply_activation_reference(
        torch.nn.functional.linear(
            m, w1.float().reshape(w1.shape[0], -1), None if b1 is None else b1.float()
        ),
        act1,
        act1_param,
    )
    if w2 is not None:
        h = apply_activation_reference(
            torch.nn.functional.linear(
                h, w2.float().reshape(w2.shape[0], -1), None if b2 is None else b2.float()
            ),
            act2,
            act2_param,
        )
    return h[:, :, None, None]
