"""segfast/edge/reference.py (numpy) against segfast.kernels' PyTorch references, on the CPU.

The numpy references are what the csrc/ kernels implement (tests/edge/test_csrc_host.py
holds the kernels' code to them); here they are held to the torch pre/post-processing
that the rest of segfast uses, on the same inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segfast.edge import reference as R
from segfast.kernels.overlay import default_palette, overlay_reference
from segfast.kernels.preprocess import preprocess_reference

# Both compute in fp32 with the same source indices; the normalisation is folded into one
# fma here and written (x/255 − m)/s there: a few fp32 ulps of values |v| ≤ 2.7.
FP32_ATOL = 2e-6
GRAY = {"mean": (0.5,), "std": (0.25,)}


def _assert_fp16_close(a: np.ndarray, b: np.ndarray) -> None:
    """fp16 roundings of two fp32 values FP32_ATOL apart: within one fp16 ulp (or within
    FP32_ATOL near zero, where fp16's spacing is finer than the fp32 difference)."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    ulp = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(np.float16)).astype(np.float32)
    bad = np.abs(a32 - b32) > np.maximum(ulp, FP32_ATOL)
    assert not bad.any(), f"{bad.sum()} fp16 values differ by more than one ulp"


def _torch_pre(frames, size, dtype, **kw):
    return preprocess_reference(
        torch.from_numpy(np.ascontiguousarray(frames)), size, dtype=dtype, **kw
    ).numpy()


@pytest.mark.parametrize("size", [None, (32, 48), (50, 70), (5, 3), (37, 1)], ids=str)
@pytest.mark.parametrize("input_order", ["bgr", "rgb"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_preprocess_matches_torch(size, input_order, align_corners):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 37, 53, 3), dtype=np.uint8)
    kw = {"input_order": input_order, "align_corners": align_corners}
    want = _torch_pre(frames, size, torch.float32, **kw)
    got = R.preprocess(frames, size, dtype=np.float32, **kw)
    assert got.shape == want.shape
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=FP32_ATOL)
    want16 = _torch_pre(frames, size, torch.float16, **kw)
    got16 = R.preprocess(frames, size, **kw)  # fp16 is the default
    assert got16.dtype == np.float16
    _assert_fp16_close(got16, want16)


def test_preprocess_odd_strided_and_grayscale():
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (1, 40, 70, 4), dtype=np.uint8)
    crop = big[:, 3:34, 5:66, :3]  # 31×61, non-contiguous, a fourth channel skipped
    np.testing.assert_allclose(
        R.preprocess(crop, (17, 29), dtype=np.float32),
        _torch_pre(crop, (17, 29), torch.float32),
        rtol=0,
        atol=FP32_ATOL,
    )
    gray = rng.integers(0, 256, (9, 13), dtype=np.uint8)
    got = R.preprocess(gray, (5, 20), dtype=np.float32, **GRAY)
    assert got.shape == (1, 1, 5, 20)
    np.testing.assert_allclose(
        got, _torch_pre(gray, (5, 20), torch.float32, **GRAY), rtol=0, atol=FP32_ATOL
    )


def test_preprocess_rejects_bad_input():
    f = np.zeros((4, 4, 3), dtype=np.uint8)
    with pytest.raises(TypeError, match="uint8"):
        R.preprocess(f.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        R.preprocess(np.zeros((4, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="input_order"):
        R.preprocess(f, input_order="yuv")
    with pytest.raises(ValueError, match="non-zero"):
        R.preprocess(f, std=(1.0, 0.0, 1.0))
    with pytest.raises(TypeError, match="float32 or float16"):
        R.preprocess(f, dtype=np.float64)


def test_index_helpers_match_aten():
    # Nearest: ATen's upsample_nearest2d picks the same rows for up- and downscales.
    for in_size, out_size in [(7, 13), (13, 7), (5, 10), (10, 5), (9, 9), (1, 4), (31, 1)]:
        src = torch.arange(in_size, dtype=torch.float32).view(1, 1, in_size, 1)
        want = F.interpolate(src, size=(out_size, 1), mode="nearest").view(-1).long().numpy()
        np.testing.assert_array_equal(R.nearest_index(out_size, in_size), want)
    # Bilinear: an impulse per source row recovers ATen's (i0, i1, λ) weights.
    for in_size, out_size, align in [(7, 13, False), (13, 7, False), (7, 13, True), (5, 1, True)]:
        eye = torch.eye(in_size).view(1, in_size, in_size, 1)  # channel c = impulse at c
        w = F.interpolate(eye, size=(out_size, 1), mode="bilinear", align_corners=align)
        w = w.view(in_size, out_size).T.numpy()  # [out, in] weights
        i0, i1, lam = R.source_index(
            out_size, in_size, R.bilinear_scale(in_size, out_size, align), align
        )
        mine = np.zeros_like(w)
        np.add.at(mine, (np.arange(out_size), i0), 1 - lam)
        np.add.at(mine, (np.arange(out_size), i1), lam)
        np.testing.assert_allclose(mine, w, atol=1e-6)


@pytest.mark.parametrize("mask_dtype", [np.uint8, np.int32, np.int64])
@pytest.mark.parametrize("skip_class", [0, None, 3])
@pytest.mark.parametrize("alpha", [0.0, 0.37, 0.5, 1.0])
def test_overlay_matches_torch(mask_dtype, skip_class, alpha):
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (2, 11, 17, 3), dtype=np.uint8)
    mask = rng.integers(0, 7, (2, 11, 17)).astype(mask_dtype)
    palette = default_palette(7, "bgr").numpy()
    want = overlay_reference(
        torch.from_numpy(frames),
        torch.from_numpy(mask),
        torch.from_numpy(palette),
        alpha=alpha,
        skip_class=skip_class,
    ).numpy()
    got = R.overlay(frames, mask, palette, alpha=alpha, skip_class=skip_class)
    np.testing.assert_array_equal(got, want)
    # single frame, four channels
    pal4 = rng.integers(0, 256, (7, 4), dtype=np.uint8)
    f4 = rng.integers(0, 256, (11, 17, 4), dtype=np.uint8)
    want4 = overlay_reference(
        torch.from_numpy(f4),
        torch.from_numpy(mask[0]),
        torch.from_numpy(pal4),
        alpha=alpha,
        skip_class=skip_class,
    ).numpy()
    np.testing.assert_array_equal(
        R.overlay(f4, mask[0], pal4, alpha=alpha, skip_class=skip_class), want4
    )


def test_overlay_clamps_out_of_range_ids_like_the_kernel():
    frames = np.full((3, 4, 3), 100, dtype=np.uint8)
    mask = np.array([[-5, 0, 1, 9]] * 3, dtype=np.int32)
    palette = np.array([[0, 0, 0], [200, 200, 200]], dtype=np.uint8)
    want = overlay_reference(
        torch.from_numpy(frames),
        torch.from_numpy(mask),
        torch.from_numpy(palette),
        skip_class=None,
    ).numpy()
    np.testing.assert_array_equal(R.overlay(frames, mask, palette, skip_class=None), want)


@pytest.mark.parametrize(
    ("mask_hw", "frame_hw"), [((5, 7), (11, 17)), ((6, 8), (12, 16)), ((9, 9), (7, 5))]
)
def test_overlay_resizes_mask_like_interpolate_nearest(mask_hw, frame_hw):
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (*frame_hw, 3), dtype=np.uint8)
    mask = rng.integers(0, 21, mask_hw).astype(np.uint8)
    palette = default_palette(21, "bgr").numpy()
    up = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=frame_hw, mode="nearest")
    want = overlay_reference(
        torch.from_numpy(frames), up[0, 0].to(torch.uint8), torch.from_numpy(palette)
    ).numpy()
    np.testing.assert_array_equal(R.overlay(frames, mask, palette), want)


def test_default_palette_matches_kernels():
    for order in ("rgb", "bgr"):
        np.testing.assert_array_equal(
            R.default_palette(40, order), default_palette(40, order).numpy()
        )


# ---- NV12 ------------------------------------------------------------------------------


def _nv12(rng, H, W):
    y = rng.integers(0, 256, (H, W), dtype=np.uint8)
    uv = rng.integers(0, 256, ((H + 1) // 2, (W + 1) // 2, 2), dtype=np.uint8)
    return y, uv


@pytest.mark.parametrize("key", sorted(R.YUV_COEFFICIENTS))
def test_nv12_integer_decoding_follows_the_matrix(key):
    """The fixed-point coefficients reproduce the real-valued matrix to ±1 grey level."""
    matrix, color_range = key
    rng = np.random.default_rng(4)
    y, uv = _nv12(rng, 16, 16)
    got = R.nv12_to_rgb(y, uv, matrix=matrix, color_range=color_range).astype(np.float64)
    y_off, cy, crv, cgu, cgv, cbu = R.YUV_MATRICES[key]
    Y = y.astype(np.float64)
    U = np.repeat(np.repeat(uv[..., 0], 2, 0), 2, 1).astype(np.float64) - 128
    V = np.repeat(np.repeat(uv[..., 1], 2, 0), 2, 1).astype(np.float64) - 128
    c = cy * (Y - y_off)
    want = np.stack([c + crv * V, c - cgu * U - cgv * V, c + cbu * U], axis=-1)
    assert np.abs(got - np.clip(np.round(want), 0, 255)).max() <= 1
    for k, real in zip(R.YUV_COEFFICIENTS[key][1:], R.YUV_MATRICES[key][1:], strict=True):
        assert abs(k - 256 * real) <= 0.5 + 1e-9  # each integer is round(256·c)


@pytest.mark.parametrize("key", sorted(R.YUV_COEFFICIENTS))
def test_nv12_decoding_agrees_with_ffmpeg(key):
    """FFmpeg's swscale (via PyAV) decodes flat-chroma NV12 within 3 grey levels of ours
    (swscale filters chroma and rounds its own fixed point, hence flat chroma and ±3)."""
    av = pytest.importorskip("av", reason="PyAV (segfast[video]) compares with FFmpeg")
    matrix, color_range = key
    rng = np.random.default_rng(5)
    for _ in range(5):
        y = rng.integers(0, 256, (16, 32), dtype=np.uint8)
        uv = np.broadcast_to(rng.integers(0, 256, (1, 1, 2), dtype=np.uint8), (8, 16, 2))
        frame = av.VideoFrame.from_ndarray(np.concatenate([y, uv.reshape(8, 32)]), format="nv12")
        want = frame.reformat(
            format="bgr24",
            src_colorspace="ITU709" if matrix == "bt709" else "ITU601",
            src_color_range="JPEG" if color_range == "full" else "MPEG",
        ).to_ndarray()
        got = R.nv12_to_bgr(y, uv, matrix=matrix, color_range=color_range)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 3


@pytest.mark.parametrize(("H", "W"), [(8, 12), (7, 9), (1, 1), (5, 2)])
def test_nv12_odd_sizes_take_chroma_of_pair(H, W):
    """Pixel (y, x) decodes with chroma pair (y // 2, x // 2), odd edges included."""
    rng = np.random.default_rng(6)
    y, uv = _nv12(rng, H, W)
    got = R.nv12_to_rgb(y, uv)
    coeffs = R.yuv_coefficients()
    for yy in range(H):
        for xx in range(W):
            u, v = (int(t) for t in uv[yy // 2, xx // 2])
            c = coeffs[1] * (int(y[yy, xx]) - coeffs[0])
            r = (c + coeffs[2] * (v - 128) + 128) >> 8
            g = (c - coeffs[3] * (u - 128) - coeffs[4] * (v - 128) + 128) >> 8
            b = (c + coeffs[5] * (u - 128) + 128) >> 8
            assert tuple(got[yy, xx]) == tuple(min(max(t, 0), 255) for t in (r, g, b))


def test_nv12_preprocess_and_overlay_are_decode_then_bgr():
    """The NV12 paths equal segfast.kernels' torch references applied to the decoded frame."""
    rng = np.random.default_rng(7)
    y, uv = _nv12(rng, 23, 31)
    bgr = R.nv12_to_bgr(y, uv, matrix="bt709")
    want = _torch_pre(bgr[None], (16, 20), torch.float32, input_order="bgr")
    got = R.preprocess_nv12(y, uv, (16, 20), dtype=np.float32, matrix="bt709")
    np.testing.assert_allclose(got, want, rtol=0, atol=FP32_ATOL)
    mask = rng.integers(0, 5, (23, 31)).astype(np.uint8)
    palette = default_palette(5, "bgr")
    want_o = overlay_reference(torch.from_numpy(bgr), torch.from_numpy(mask), palette).numpy()
    np.testing.assert_array_equal(
        R.overlay_nv12(y, uv, mask, palette.numpy(), matrix="bt709"), want_o
    )


def test_nv12_layout_checks():
    packed = np.zeros((12, 8), dtype=np.uint8)  # 8×8 frame: 8 rows of Y, 4 of UV
    y, uv = R.nv12_planes(packed, 8, 8)
    assert y.shape == (8, 8)
    assert uv.shape == (4, 4, 2)
    with pytest.raises(ValueError, match="odd"):
        R.nv12_planes(np.zeros((12, 7), dtype=np.uint8), 8, 7)
    with pytest.raises(ValueError, match="UV plane"):
        R.check_nv12(np.zeros((7, 9), np.uint8), np.zeros((3, 5, 2), np.uint8))
    with pytest.raises(ValueError, match="matrix"):
        R.yuv_coefficients("bt2020")
