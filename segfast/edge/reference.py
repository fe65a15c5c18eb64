"""numpy references of the edge runtime's CUDA kernels (csrc/), torch-free.

Each function states the semantics its kernel implements; tests check them against
``segfast.kernels.preprocess.preprocess_reference`` / ``segfast.kernels.overlay.overlay_reference``
(PyTorch) on the same inputs, and against the kernels' own per-pixel C++ (csrc/segfast_edge.cuh
built for the host) on the CPU.

    preprocess      uint8 [N, H, W, C] / [H, W, C] frames (BGR, RGB; or grayscale)
                    → [N, C, h, w] float32 / float16, RGB order: bilinear resize (ATen's
                    upsample_bilinear2d, fp32 source indices), then (v/255 − mean)/std
                    folded into one multiply-add, v·(1/(255·std)) + (−mean/std).
    nv12_to_bgr     NV12 (Y [H, W] + interleaved UV [⌈H/2⌉, ⌈W/2⌉, 2]) → uint8 [H, W, 3] BGR,
                    integer BT.601 / BT.709, limited or full range (YUV_COEFFICIENTS).
    preprocess_nv12 ≡ preprocess(nv12_to_bgr(y, uv), input_order="bgr"): the kernel decodes
                    each bilinear neighbour to RGB bytes, then blends exactly as for BGR.
    overlay         uint8 frames + class mask + palette → (1 − α)·frame + α·palette[mask],
                    segfast.kernels.overlay's fixed-point rounding bit for bit; a mask
                    smaller than the frame is upscaled with ATen's nearest indices.
    overlay_nv12    ≡ overlay(nv12_to_bgr(y, uv), ...), BGR out.

Odd sizes in NV12: the chroma plane has ⌈H/2⌉ rows of ⌈W/2⌉ (U, V) pairs (FFmpeg's and
NVDEC's layout); pixel (y, x) takes the pair (y // 2, x // 2), so an odd last row or column
shares the chroma sample of the row/column before it. No chroma interpolation: decoders'
bgr24 output differs (by a few grey levels at colour edges) where they filter chroma.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ALPHA_ONE = 65536  # fixed-point 1.0 of the overlay blend weight

# (y_offset, cy, crv, cgu, cgv, cbu) in 1/256: the usual fixed-point YUV → RGB matrices,
#   R = (cy·(Y − y_off) + crv·(V − 128) + 128) >> 8
#   G = (cy·(Y − y_off) − cgu·(U − 128) − cgv·(V − 128) + 128) >> 8
#   B = (cy·(Y − y_off) + cbu·(U − 128) + 128) >> 8, each clamped to [0, 255].
# Each coefficient is round(256·c) of the matrix's real coefficient c: BT.601 limited
# (1.164383, 1.596027, 0.391762, 0.812968, 2.017232), BT.709 limited (1.164383, 1.792741,
# 0.213249, 0.532909, 2.112402), and full range (Y not rescaled; 1.402, 0.344136,
# 0.714136, 1.772 / 1.5748, 0.187324, 0.468124, 1.8556).
YUV_COEFFICIENTS: dict[tuple[str, str], tuple[int, int, int, int, int, int]] = {
    ("bt601", "limited"): (16, 298, 409, 100, 208, 516),
    ("bt709", "limited"): (16, 298, 459, 55, 136, 541),
    ("bt601", "full"): (0, 256, 359, 88, 183, 454),
    ("bt709", "full"): (0, 256, 403, 48, 120, 475),
}
# The real-valued matrices the integers approximate (tests hold the integers to them).
YUV_MATRICES: dict[tuple[str, str], tuple[float, float, float, float, float, float]] = {
    ("bt601", "limited"): (16.0, 255 / 219, 1.596027, 0.391762, 0.812968, 2.017232),
    ("bt709", "limited"): (16.0, 255 / 219, 1.792741, 0.213249, 0.532909, 2.112402),
    ("bt601", "full"): (0.0, 1.0, 1.402, 0.344136, 0.714136, 1.772),
    ("bt709", "full"): (0.0, 1.0, 1.5748, 0.187324, 0.468124, 1.8556),
}
OUT_DTYPES = (np.float32, np.float16)


def yuv_coefficients(matrix: str = "bt601", color_range: str = "limited") -> tuple[int, ...]:
    """The kernels' integer NV12 decoding coefficients for ``matrix`` / ``color_range``."""
    try:
        return YUV_COEFFICIENTS[(matrix, color_range)]
    except KeyError:
        raise ValueError(
            f"matrix/color_range must be one of {sorted(YUV_COEFFICIENTS)}, "
            f"got ({matrix!r}, {color_range!r})"
        ) from None


def bilinear_scale(in_size: int, out_size: int, align_corners: bool) -> float:
    """ATen's fp32 source-per-destination ratio (= segfast.kernels.head.bilinear_scale
    without a scale factor): 1 for an unchanged size, (in−1)/(out−1) with align_corners,
    else in/out."""
    if in_size == out_size:
        r = 1.0
    elif align_corners:
        r = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    else:
        r = in_size / out_size
    return float(np.float32(r))


def _fma32(a: np.ndarray | float, b: np.ndarray | float, c: np.ndarray | float) -> np.ndarray:
    """fp32 fma(a, b, c): the exact fp32 product a·b is exact in fp64, so only the sum is
    rounded twice (to fp64, then fp32) — equal to a true fma except at rare ties."""
    a64 = np.asarray(a, dtype=np.float32).astype(np.float64)
    b64 = np.asarray(b, dtype=np.float32).astype(np.float64)
    c64 = np.asarray(c, dtype=np.float32).astype(np.float64)
    return (a64 * b64 + c64).astype(np.float32)


def source_index(
    out_size: int, in_size: int, ratio: float, align_corners: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear source indices (i0, i1 int64; λ float32) for outputs 0 … out_size−1.

    fp32 like ATen: src = ratio·d (align_corners) or max(fma(ratio, d + ½, −½), 0);
    i0 = min(⌊src⌋, in−1), i1 = i0 + 1 clamped, λ = clamp(src − i0, 0, 1).
    """
    d = np.arange(out_size, dtype=np.float32)
    r = np.float32(ratio)
    if align_corners:
        src = (r * d).astype(np.float32)
    else:
        src = np.maximum(_fma32(r, d + np.float32(0.5), np.float32(-0.5)), np.float32(0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    lam = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, lam


def nearest_index(out_size: int, in_size: int) -> np.ndarray:
    """ATen's upsample_nearest2d source indices: min(⌊d·scale⌋, in−1), scale = in/out in fp32
    (identity when the sizes match)."""
    if in_size == out_size:
        return np.arange(out_size, dtype=np.int64)
    scale = np.float32(in_size) / np.float32(out_size)
    s = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(s, in_size - 1)


def normalisation(
    mean: Sequence[float], std: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (a, b) with value = v·a + b: a = 1/(255·std), b = −mean/std, as fp32
    values (what the kernels receive; segfast.kernels.preprocess computes the same)."""
    if len(mean) != len(std) or len(mean) not in (1, 3):
        raise ValueError(
            f"mean and std must both have 3 (colour) or 1 (grayscale) elements, "
            f"got {len(mean)} and {len(std)}"
        )
    if any(float(s) == 0 for s in std):
        raise ValueError(f"std must be non-zero, got {tuple(std)}")
    a = tuple(float(np.float32(1.0 / (255.0 * float(s)))) for s in std)
    b = tuple(float(np.float32(-float(m) / float(s))) for m, s in zip(mean, std, strict=True))
    return a, b


def _frames4(frames: np.ndarray, channels: int) -> np.ndarray:
    """frames as a [N, H, W, C] uint8 view (C = 3 colour, 1 grayscale)."""
    f = np.asarray(frames)
    if f.dtype != np.uint8:
        raise TypeError(f"frames must be uint8, got {f.dtype}")
    shape = f.shape
    if channels == 3:
        if f.ndim == 3:
            f = f[None]
        if f.ndim != 4 or f.shape[3] != 3:
            raise ValueError(f"colour frames must be [N, H, W, 3] or [H, W, 3] uint8, got {shape}")
    else:
        if f.ndim == 2:
            f = f[None]
        if f.ndim == 3:
            f = f[..., None]
        if f.ndim != 4 or f.shape[3] != 1:
            raise ValueError(
                f"grayscale frames must be [N, H, W], [N, H, W, 1] or [H, W] uint8, got {shape}"
            )
    return f


def _check_size(size: Sequence[int] | None, H: int, W: int) -> tuple[int, int]:
    if size is None:
        return H, W
    if len(size) != 2 or min(int(s) for s in size) < 1:
        raise ValueError(f"size must be (h, w) with h, w ≥ 1, got {size}")
    return int(size[0]), int(size[1])


def _resize_normalise(
    x: np.ndarray,
    size: tuple[int, int],
    a: Sequence[float],
    b: Sequence[float],
    dtype: type,
    align_corners: bool,
) -> np.ndarray:
    """[N, H, W, C] values (float32-exact integers) → [N, C, h, w] ``dtype``."""
    if np.dtype(dtype) not in [np.dtype(d) for d in OUT_DTYPES]:
        raise TypeError(f"dtype must be float32 or float16, got {np.dtype(dtype)}")
    _, H, W, C = x.shape
    h, w = size
    x = x.astype(np.float32)
    if (h, w) != (H, W):
        iy0, iy1, ly = source_index(h, H, bilinear_scale(H, h, align_corners), align_corners)
        ix0, ix1, lx = source_index(w, W, bilinear_scale(W, w, align_corners), align_corners)
        h1, h0 = ly[:, None, None], (np.float32(1) - ly)[:, None, None]  # [h, 1, 1]
        w1, w0 = lx[None, :, None], (np.float32(1) - lx)[None, :, None]  # [1, w, 1]
        rows0, rows1 = x[:, iy0], x[:, iy1]  # [N, h, W, C]
        x00, x01 = rows0[:, :, ix0], rows0[:, :, ix1]  # [N, h, w, C]
        x10, x11 = rows1[:, :, ix0], rows1[:, :, ix1]
        t0 = _fma32(w0, x00, (w1 * x01).astype(np.float32))
        t1 = _fma32(w0, x10, (w1 * x11).astype(np.float32))
        x = _fma32(h0, t0, (h1 * t1).astype(np.float32))
    av = np.asarray(a[:C], dtype=np.float32)
    bv = np.asarray(b[:C], dtype=np.float32)
    v = _fma32(x, av, bv)  # [N, h, w, C]
    return np.ascontiguousarray(v.transpose(0, 3, 1, 2)).astype(dtype)


def preprocess(
    frames: np.ndarray,
    size: Sequence[int] | None = None,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    input_order: str = "bgr",
    dtype: type = np.float16,
    align_corners: bool = False,
) -> np.ndarray:
    """uint8 HWC frames → [N, C, h, w] ``dtype`` network input, RGB order (the semantics of
    csrc/preprocess.cu's ``sf_preprocess_hwc_*`` and segfast.kernels.preprocess).

    frames: [N, H, W, 3] / [H, W, 3] in ``input_order`` ("bgr" or "rgb"); with 1-element
    ``mean``/``std``, grayscale [N, H, W] / [N, H, W, 1] / [H, W]. ``size`` = (h, w)
    (None: keep H, W). ``mean``/``std`` in [0, 1] units, RGB order.
    """
    if input_order not in ("bgr", "rgb"):
        raise ValueError(f"input_order must be 'bgr' or 'rgb', got {input_order!r}")
    a, b = normalisation(mean, std)
    f = _frames4(frames, len(mean))
    if f.shape[3] == 3 and input_order == "bgr":
        f = f[..., ::-1]
    return _resize_normalise(
        f, _check_size(size, f.shape[1], f.shape[2]), a, b, dtype, align_corners
    )


def nv12_planes(frame: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a packed NV12 buffer (as decoders and OpenCV give it: [H + ⌈H/2⌉, W] uint8 for
    even W, i.e. the Y plane then the UV plane with the same row pitch) into (Y [H, W],
    UV [⌈H/2⌉, ⌈W/2⌉, 2]) views. Odd widths need a row pitch above W: pass the planes."""
    f = np.asarray(frame)
    ch = (height + 1) // 2
    if f.dtype != np.uint8 or f.ndim != 2 or f.shape != (height + ch, width):
        raise ValueError(
            f"a packed NV12 frame of {height}×{width} must be uint8 [{height + ch}, {width}], "
            f"got {f.dtype} {f.shape}"
        )
    if width % 2:
        raise ValueError(
            f"a packed NV12 buffer of width {width} (odd) cannot hold the ⌈W/2⌉ chroma "
            "pairs per row; pass the Y and UV planes separately"
        )
    return f[:height], f[height:].reshape(ch, width // 2, 2)


def check_nv12(y: np.ndarray, uv: np.ndarray) -> tuple[int, int]:
    """(H, W) of an NV12 frame given as planes; raises on any mismatch."""
    y = np.asarray(y)
    uv = np.asarray(uv)
    if y.dtype != np.uint8 or uv.dtype != np.uint8:
        raise TypeError(f"NV12 planes must be uint8, got Y {y.dtype}, UV {uv.dtype}")
    if y.ndim != 2:
        raise ValueError(f"the NV12 Y plane must be [H, W], got {y.shape}")
    H, W = y.shape
    want = ((H + 1) // 2, (W + 1) // 2, 2)
    if uv.shape != want:
        raise ValueError(
            f"the NV12 UV plane of a {H}×{W} frame must be [⌈H/2⌉, ⌈W/2⌉, 2] = {list(want)}, "
            f"got {uv.shape}"
        )
    return H, W


def nv12_to_rgb(
    y: np.ndarray, uv: np.ndarray, *, matrix: str = "bt601", color_range: str = "limited"
) -> np.ndarray:
    """NV12 planes → uint8 [H, W, 3] RGB with the kernels' integer decoding."""
    H, W = check_nv12(y, uv)
    y_off, cy, crv, cgu, cgv, cbu = yuv_coefficients(matrix, color_range)
    Y = np.asarray(y, dtype=np.int32)
    chroma = np.asarray(uv, dtype=np.int32)
    ys, xs = np.arange(H) // 2, np.arange(W) // 2
    U = chroma[ys][:, xs, 0]  # [H, W]: pair (y // 2, x // 2)
    V = chroma[ys][:, xs, 1]
    c, d, e = cy * (Y - y_off), U - 128, V - 128
    r = (c + crv * e + 128) >> 8  # numpy's >> on int32 is an arithmetic (floor) shift
    g = (c - cgu * d - cgv * e + 128) >> 8
    b = (c + cbu * d + 128) >> 8
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def nv12_to_bgr(
    y: np.ndarray, uv: np.ndarray, *, matrix: str = "bt601", color_range: str = "limited"
) -> np.ndarray:
    """NV12 planes → uint8 [H, W, 3] BGR (see :func:`nv12_to_rgb`)."""
    return np.ascontiguousarray(
        nv12_to_rgb(y, uv, matrix=matrix, color_range=color_range)[..., ::-1]
    )


def preprocess_nv12(
    y: np.ndarray,
    uv: np.ndarray,
    size: Sequence[int] | None = None,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: type = np.float16,
    align_corners: bool = False,
    matrix: str = "bt601",
    color_range: str = "limited",
) -> np.ndarray:
    """NV12 → [1, 3, h, w] network input: exactly ``preprocess(nv12_to_bgr(y, uv), size,
    input_order="bgr", ...)`` (csrc/preprocess.cu's ``sf_preprocess_nv12_*``)."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"NV12 input is colour: mean/std need 3 elements, got {mean}, {std}")
    bgr = nv12_to_bgr(y, uv, matrix=matrix, color_range=color_range)
    return preprocess(
        bgr,
        size,
        mean=mean,
        std=std,
        input_order="bgr",
        dtype=dtype,
        align_corners=align_corners,
    )


def alpha_weight(alpha: float) -> int:
    """alpha in [0, 1] as the blend's fixed-point weight, round(alpha·65536) (Python's
    round, as segfast.kernels.overlay.alpha_weight)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return round(alpha * ALPHA_ONE)


def check_palette(palette: np.ndarray, channels: int) -> np.ndarray:
    p = np.asarray(palette)
    if p.dtype != np.uint8 or p.ndim != 2 or p.shape[1] != channels or p.shape[0] < 1:
        raise ValueError(
            f"palette must be uint8 [K, {channels}] (K ≥ 1, the frames' channels), "
            f"got {p.dtype} {p.shape}"
        )
    return p


MASK_DTYPES = (np.uint8, np.int32, np.int64)


def check_mask(mask: np.ndarray) -> np.ndarray:
    """mask as [N, mh, mw] (a [mh, mw] mask gets N = 1) of uint8 / int32 / int64."""
    m = np.asarray(mask)
    if m.dtype not in [np.dtype(d) for d in MASK_DTYPES]:
        raise TypeError(f"mask must be uint8, int32 or int64, got {m.dtype}")
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"mask must be [N, h, w] or [h, w], got {m.shape}")
    return m


def _blend(
    frames: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float, skip: int | None
) -> np.ndarray:
    """frames [N, H, W, C] uint8, mask [N, mh, mw] → blended [N, H, W, C] uint8."""
    N, H, W, C = frames.shape
    if mask.shape[0] != N:
        raise ValueError(f"mask batch {mask.shape[0]} != frames batch {N}")
    pal = check_palette(palette, C)
    a = alpha_weight(alpha)
    ids = mask[:, nearest_index(H, mask.shape[1])][:, :, nearest_index(W, mask.shape[2])]
    ids = ids.astype(np.int64)  # [N, H, W]
    col = pal.astype(np.int64)[np.clip(ids, 0, pal.shape[0] - 1)]  # [N, H, W, C]
    f = frames.astype(np.int64)
    v = (f * (ALPHA_ONE - a) + col * a + ALPHA_ONE // 2) >> 16
    if skip is not None:
        v = np.where((ids == skip)[..., None], f, v)
    return v.astype(np.uint8)


def overlay(
    frames: np.ndarray,
    mask: np.ndarray,
    palette: np.ndarray,
    *,
    alpha: float = 0.5,
    skip_class: int | None = 0,
) -> np.ndarray:
    """Blend ``palette[mask]`` onto ``frames`` (csrc/overlay.cu's ``sf_overlay_hwc_*``).

    frames: uint8 [N, H, W, C] / [H, W, C]; mask: uint8/int32/int64 [N, mh, mw] / [mh, mw]
    class ids at any resolution — upscaled to H×W with ATen's nearest indices (identity
    when equal); palette: uint8 [K, C] in the frames' channel order. Ids are clamped to
    [0, K−1]; pixels of ``skip_class`` (None: none) keep the frame. Integer blend:
    ((65536 − a)·frame + a·colour + 32768) >> 16 with a = round(alpha·65536).
    """
    f = np.asarray(frames)
    if f.dtype != np.uint8 or f.ndim not in (3, 4):
        raise ValueError(f"frames must be uint8 [N, H, W, C] or [H, W, C], got {f.dtype} {f.shape}")
    batched = f.ndim == 4
    out = _blend(f if batched else f[None], check_mask(mask), palette, alpha, skip_class)
    return out if batched else out[0]


def overlay_nv12(
    y: np.ndarray,
    uv: np.ndarray,
    mask: np.ndarray,
    palette: np.ndarray,
    *,
    alpha: float = 0.5,
    skip_class: int | None = 0,
    matrix: str = "bt601",
    color_range: str = "limited",
) -> np.ndarray:
    """NV12 frame + mask → uint8 [H, W, 3] BGR: ``overlay(nv12_to_bgr(y, uv), ...)``
    (csrc/overlay.cu's ``sf_overlay_nv12_*``); the palette is in BGR order."""
    bgr = nv12_to_bgr(y, uv, matrix=matrix, color_range=color_range)
    return overlay(bgr, mask, palette, alpha=alpha, skip_class=skip_class)


def default_palette(k: int, order: str = "bgr") -> np.ndarray:
    """PASCAL VOC's colour map as uint8 [k, 3] (= segfast.kernels.overlay.default_palette):
    bit 3j + c of class i sets bit 7 − j of channel c (R, G, B). ``order`` "bgr" (default
    here: the edge runtime blends onto BGR frames) or "rgb"."""
    if order not in ("rgb", "bgr"):
        raise ValueError(f"order must be 'rgb' or 'bgr', got {order!r}")
    if not 1 <= k <= 1 << 24:
        raise ValueError(f"k must be in [1, 2**24], got {k}")
    i = np.arange(k, dtype=np.int64)
    rgb = np.zeros((k, 3), dtype=np.int64)
    for j in range(8):
        for c in range(3):
            rgb[:, c] |= ((i >> (3 * j + c)) & 1) << (7 - j)
    rgb = rgb.astype(np.uint8)
    return np.ascontiguousarray(rgb[:, ::-1]) if order == "bgr" else rgb
