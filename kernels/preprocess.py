"""Fused preprocessing: uint8 HWC frames → normalised network input, one kernel.

    frames  uint8 [N, H, W, C] or [H, W, C] (C = 3: BGR or RGB as decoders give them),
            grayscale uint8 [N, H, W], [N, H, W, 1] or [H, W] (C = 1); any strides
    result  [N, C, h, w] float32 / float16 / bfloat16, RGB channel order, contiguous NCHW
            (layout="nchw") or channels_last (layout="nhwc")

    value[n, c, y, x] = (bilinear(frames[..., c'] as fp32)[y, x] / 255 − mean[c]) / std[c]

where c' is c, or 2 − c for BGR input. The resize is ATen's ``upsample_bilinear2d`` (no
antialias; fp32 source indices, shared with ``kernels/head.py``) of the raw 0–255 values;
the normalisation is folded into one multiply-add, value = v·(1/(255·std)) + (−mean/std):
linear, so it equals normalise-then-resize up to fp32 rounding.

One program handles BLOCK_P output pixels, all channels. Bytes: read up to 4·C bytes per
output pixel (the 4 bilinear neighbours; each frame byte is read once per output pixel that
needs it, mostly from cache), write N·C·h·w output elements. E.g. a 1080p BGR frame →
512×512 fp16: 6.2 MB frame (≤ 3.1 MB of it touched), 1.5 MB out; the PyTorch chain
(permute, float, /255, interpolate, sub, div, cast) makes ~6 passes over fp32 copies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import autotune_configs, check_device
from .head import _blend, _source_index, bilinear_scale

LAYOUTS = ("nchw", "nhwc")
INPUT_ORDERS = ("bgr", "rgb")
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _preprocess_kernel(
    src, s_n, s_y, s_x,               # frames [N, H, W, C] uint8
    c_first, c_step,                  # output channel c reads frames[..., c_first + c·c_step]
    a0, a1, a2, b0, b1, b2,           # value = v·a_c + b_c per output channel c
    out, o_n, o_c, o_y, o_x,          # [N, C, h, w]
    H, W, h, w, total,                # total = N·h·w output pixels
    ratio_h, ratio_w,
    C: tl.constexpr, RESIZE: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    # Output pixels flattened (n, y, x), x fastest: NCHW stores coalesce per channel.
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < total
    ox = p % w
    t = p // w
    oy = t % h
    n = t // h
    nb = n * s_n
    if RESIZE:
        iy0, iy1, ly = _source_index(oy, H, ratio_h, ALIGN)
        ix0, ix1, lx = _source_index(ox, W, ratio_w, ALIGN)
        off00 = nb + iy0 * s_y + ix0 * s_x
        off01 = nb + iy0 * s_y + ix1 * s_x
        off10 = nb + iy1 * s_y + ix0 * s_x
        off11 = nb + iy1 * s_y + ix1 * s_x
        h1 = ly
        h0 = 1.0 - ly
        w1 = lx
        w0 = 1.0 - lx
    else:
        off00 = nb + oy * s_y + ox * s_x
    o_pix = n * o_n + oy * o_y + ox * o_x
    for c in tl.static_range(C):
        cs = c_first + c * c_step  # frames' channel for output channel c
        v = tl.load(src + off00 + cs, mask=pmask, other=0).to(tl.float32)
        if RESIZE:
            v01 = tl.load(src + off01 + cs, mask=pmask, other=0).to(tl.float32)
            v10 = tl.load(src + off10 + cs, mask=pmask, other=0).to(tl.float32)
            v11 = tl.load(src + off11 + cs, mask=pmask, other=0).to(tl.float32)
            v = _blend(v, v01, v10, v11, h0, h1, w0, w1)
        a = tl.where(c == 0, a0, tl.where(c == 1, a1, a2))
        b = tl.where(c == 0, b0, tl.where(c == 1, b1, b2))
        v = v * a + b
        tl.store(out + o_pix + c * o_c, v.to(out.dtype.element_ty), mask=pmask)


# A pure gather/scatter kernel: no loop to pipeline (num_stages=(1,)); the pixel tile only
# trades occupancy against per-program overhead. Interpreter: large tiles, few programs.
_preprocess = triton.autotune(
    configs=autotune_configs(
        [{"BLOCK_P": bp} for bp in (128, 256, 512, 1024)],
        num_stages=(1,),
        interpreter_config={"BLOCK_P": 1024},
    ),
    key=["H", "W", "h", "w", "total", "C", "RESIZE"],
)(_preprocess_kernel)


class _Plan:
    """Validated arguments shared by ``preprocess`` and ``preprocess_reference``."""

    def __init__(self, frames, size, mean, std, input_order, layout, dtype, align_corners, out):
        if frames.dtype != torch.uint8:
            raise TypeError(f"frames must be uint8, got {frames.dtype}")
        if len(mean) != len(std) or len(mean) not in (1, 3):
            raise ValueError(
                f"mean and std must both have 3 (colour) or 1 (grayscale) elements, "
                f"got {len(mean)} and {len(std)}"
            )
        if any(s == 0 for s in std):
            raise ValueError(f"std must be non-zero, got {tuple(std)}")
        C = len(mean)
        shape = tuple(frames.shape)
        if C == 3:
            if frames.dim() == 3:
                frames = frames[None]
            if frames.dim() != 4 or frames.shape[3] != 3:
                raise ValueError(
                    f"colour frames must be [N, H, W, 3] or [H, W, 3] uint8, got {shape}"
                )
        else:
            if frames.dim() == 2:
                frames = frames[None]
            if frames.dim() == 3:
                frames = frames[..., None]
            if frames.dim() != 4 or frames.shape[3] != 1:
                raise ValueError(
                    f"grayscale frames (1-element mean/std) must be [N, H, W], [N, H, W, 1] "
                    f"or [H, W] uint8, got {shape}"
                )
        if input_order not in INPUT_ORDERS:
            raise ValueError(f"input_order must be one of {INPUT_ORDERS}, got {input_order!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if dtype not in _OUT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.frames = frames  # [N, H, W, C] view
        self.N, self.H, self.W, self.C = (int(s) for s in frames.shape)
        if size is None:
            self.h, self.w = self.H, self.W
        else:
            if len(size) != 2 or min(int(s) for s in size) < 1:
                raise ValueError(f"size must be (h, w) with h, w ≥ 1, got {size}")
            self.h, self.w = int(size[0]), int(size[1])
        self.align_corners = bool(align_corners)
        self.resize = (self.h, self.w) != (self.H, self.W)
        self.ratio_h = bilinear_scale(self.H, self.h, self.align_corners, None)
        self.ratio_w = bilinear_scale(self.W, self.w, self.align_corners, None)
        self.bgr = C == 3 and input_order == "bgr"
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        self.layout, self.dtype = layout, dtype
        self.out_shape = (self.N, C, self.h, self.w)
        if out is not None:
            if tuple(out.shape) != self.out_shape:
                raise ValueError(f"out must be {list(self.out_shape)}, got {tuple(out.shape)}")
            if out.dtype != dtype:
                raise TypeError(f"out must have dtype {dtype}, got {out.dtype}")

    def allocate(self, device: torch.device) -> torch.Tensor:
        fmt = torch.contiguous_format if self.layout == "nchw" else torch.channels_last
        return torch.empty(self.out_shape, dtype=self.dtype, device=device, memory_format=fmt)


def preprocess(
    frames: torch.Tensor,
    size: tuple[int, int] | None = None,
    *,
    mean: tuple[float, ...] = (0.485, 0.456, 0.406),
    std: tuple[float, ...] = (0.229, 0.224, 0.225),
    input_order: str = "bgr",
    layout: str = "nchw",
    dtype: torch.dtype = torch.float32,
    align_corners: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 HWC frames → [N, C, h, w] network input: bilinear resize, /255, normalise.

    frames: uint8 [N, H, W, 3] / [H, W, 3] in ``input_order`` ("bgr" as OpenCV and PyAV's
    bgr24 give them, or "rgb"), any strides; with 1-element ``mean``/``std``, grayscale
    [N, H, W] / [N, H, W, 1] / [H, W]. A single frame gives N = 1. ``size`` = (h, w) of the
    output (None: keep H, W); ``mean``/``std`` in [0, 1] units, RGB order. The output is
    always RGB, ``dtype``, contiguous NCHW (layout "nchw") or channels_last ("nhwc");
    ``out`` may be any strided [N, C, h, w] tensor of ``dtype`` (its strides win).
    """
    plan = _Plan(frames, size, mean, std, input_order, layout, dtype, align_corners, out)
    device = check_device(frames, out)
    if out is None:
        out = plan.allocate(device)
    total = plan.N * plan.h * plan.w
    if total == 0:
        return out
    f, C = plan.frames, plan.C
    # v·(1/(255·std)) + (−mean/std), passed as fp32 scalars (no host→device copy, so the
    # launch can be captured in a CUDA graph); grayscale uses channel 0 only.
    a = [1.0 / (255.0 * s) for s in plan.std] * 3
    b = [-m / s for m, s in zip(plan.mean, plan.std, strict=True)] * 3
    _preprocess[lambda meta: (triton.cdiv(total, meta["BLOCK_P"]),)](
        f, f.stride(0), f.stride(1), f.stride(2),
        # BGR → RGB: start at the last channel and step backwards
        (C - 1) * f.stride(3) if plan.bgr else 0, -f.stride(3) if plan.bgr else f.stride(3),
        a[0], a[1], a[2], b[0], b[1], b[2],
        out, out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        plan.H, plan.W, plan.h, plan.w, total,
        plan.ratio_h, plan.ratio_w,
        C=C, RESIZE=plan.resize, ALIGN=plan.align_corners,
    )  # fmt: skip
    return out


def preprocess_reference(
    frames: torch.Tensor,
    size: tuple[int, int] | None = None,
    *,
    mean: tuple[float, ...] = (0.485, 0.456, 0.406),
    std: tuple[float, ...] = (0.229, 0.224, 0.225),
    input_order: str = "bgr",
    layout: str = "nchw",
    dtype: torch.dtype = torch.float32,
    align_corners: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch ``preprocess``: permute, float, /255, aten.upsample_bilinear2d,
    normalise, reorder channels to RGB, cast, layout."""
    plan = _Plan(frames, size, mean, std, input_order, layout, dtype, align_corners, out)
    x = plan.frames.permute(0, 3, 1, 2).float() / 255.0  # [N, C, H, W]
    if size is not None:
        x = torch.ops.aten.upsample_bilinear2d.default(
            x, [plan.h, plan.w], plan.align_corners, None, None
        )  # [N, C, h, w]
    if plan.bgr:
        x = x.flip(1)
    m = torch.tensor(plan.mean, dtype=torch.float32, device=x.device)[:, None, None]
    s = torch.tensor(plan.std, dtype=torch.float32, device=x.device)[:, None, None]
    x = ((x - m) / s).to(dtype)
    fmt = torch.contiguous_format if layout == "nchw" else torch.channels_last
    x = x.contiguous(memory_format=fmt)
    if out is not None:
        return out.copy_(x)
    return x
