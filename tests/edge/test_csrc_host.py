"""csrc/'s kernel code on the CPU: the per-pixel functions every CUDA thread runs
(csrc/segfast_edge.cuh), built for the host with g++ and driven by the same argument
records the edge runtime launches the kernels with (segfast.edge.kernels), against the
numpy references — bit for bit.

What this does not cover: the thread → pixel mapping of the __global__ wrappers (a
grid-stride loop, checked to compile in test_csrc_build.py) and running on a GPU.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from segfast.edge import kernels as K
from segfast.edge import reference as R

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
HARNESS = Path(__file__).with_name("csrc_host.cpp")


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) to build the host harness")
    out = tmp_path_factory.mktemp("csrc_host") / "csrc_host.so"
    # -ffp-contract=off: no implicit fmas, like nvcc/NVRTC with --fmad=false.
    cmd = [cxx, "-O2", "-std=c++17", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror"]
    cmd += ["-shared", "-fPIC", f"-I{CSRC}", str(HARNESS), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(out))


def _elem_strides(a: np.ndarray) -> list[int]:
    return [s // a.itemsize for s in a.strides]


def _run_preprocess(lib, rec, nv12, f16):
    r = np.ascontiguousarray(rec)
    lib.sf_host_preprocess(ctypes.c_void_p(r.ctypes.data), int(nv12), int(f16))


def test_struct_layouts_match(lib):
    assert lib.sf_host_sizeof_preprocess_args() == K.PREPROCESS_ARGS.itemsize
    assert lib.sf_host_sizeof_overlay_args() == K.OVERLAY_ARGS.itemsize


def test_half_conversion_matches_numpy(lib):
    rng = np.random.default_rng(0)
    special = np.array(
        [0.0, -0.0, 1.0, -2.5, 65504.0, 65519.99, 65520.0, 1e6, -1e6, np.inf, -np.inf,
         6.1035156e-05, 6.0e-05, 5.96e-08, 2.98e-08, 2.9802322e-08, 2.9802326e-08, 1e-30,
         1e-45, 0.000244140625, 1.0009765625, 1.00048828125, 1.00146484375],
        dtype=np.float32,
    )  # fmt: skip
    x = np.concatenate(
        [
            special,
            rng.standard_normal(20000).astype(np.float32) * 10.0 ** rng.integers(-9, 6, 20000),
        ]
    ).astype(np.float32)
    out = np.empty(x.shape, dtype=np.uint16)
    lib.sf_host_float_to_half(
        ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_longlong(x.size)
    )
    with np.errstate(over="ignore"):  # ±1e6 → ±inf is the point
        want = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(out, want)
    nan = np.array([np.nan], dtype=np.float32)
    lib.sf_host_float_to_half(ctypes.c_void_p(nan.ctypes.data), ctypes.c_void_p(out.ctypes.data), 1)
    assert np.isnan(out[:1].view(np.float16)[0])


CASES = [  # (N, H, W, size, align_corners)
    (2, 37, 53, (32, 48), False),
    (1, 37, 53, (50, 70), False),
    (1, 9, 7, None, False),
    (1, 37, 53, (5, 3), False),
    (2, 7, 5, (13, 11), True),
    (1, 31, 17, (31, 40), False),  # height kept, width resized
]


@pytest.mark.parametrize(("N", "H", "W", "size", "align"), CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("input_order", ["bgr", "rgb"])
def test_preprocess_hwc_matches_reference(lib, N, H, W, size, align, dtype, input_order):
    rng = np.random.default_rng(1)
    # a crop of a wider 4-channel frame: strided, not contiguous
    big = rng.integers(0, 256, (N, H + 3, W + 5, 4), dtype=np.uint8)
    frames = big[:, 1 : 1 + H, 2 : 2 + W, :3]
    h, w = size or (H, W)
    out = np.full((N, 3, h, w), np.nan, dtype=dtype)
    rec = K.preprocess_args(
        src=frames.ctypes.data,
        src_strides=frames.strides,
        shape=frames.shape,
        out=out.ctypes.data,
        out_strides=_elem_strides(out),
        size=(h, w),
        input_order=input_order,
        align_corners=align,
    )
    _run_preprocess(lib, rec, nv12=False, f16=dtype == np.float16)
    want = R.preprocess(frames, size, input_order=input_order, dtype=dtype, align_corners=align)
    np.testing.assert_array_equal(out, want)


def test_preprocess_grayscale_and_nhwc_output(lib):
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (1, 13, 19, 1), dtype=np.uint8)
    out = np.full((1, 6, 9, 1), np.nan, dtype=np.float32).transpose(0, 3, 1, 2)  # NHWC memory
    rec = K.preprocess_args(
        src=gray.ctypes.data,
        src_strides=gray.strides,
        shape=gray.shape,
        out=out.ctypes.data,
        out_strides=_elem_strides(out),
        size=(6, 9),
        mean=(0.5,),
        std=(0.25,),
    )
    _run_preprocess(lib, rec, nv12=False, f16=False)
    want = R.preprocess(gray, (6, 9), mean=(0.5,), std=(0.25,), dtype=np.float32)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize(
    ("H", "W", "size"),
    [(24, 32, (16, 20)), (23, 31, (16, 20)), (7, 9, None), (5, 3, (8, 8))],
    ids=str,
)
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("key", [("bt601", "limited"), ("bt709", "full")], ids=str)
def test_preprocess_nv12_matches_reference(lib, H, W, size, dtype, key):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 256, (H, W), dtype=np.uint8)
    # UV rows with a pitch wider than the pairs (as decoders align rows)
    ch, cw = (H + 1) // 2, (W + 1) // 2
    uv_rows = rng.integers(0, 256, (ch, cw * 2 + 6), dtype=np.uint8)
    uv = uv_rows[:, : cw * 2].reshape(ch, cw, 2)
    h, w = size or (H, W)
    out = np.full((1, 3, h, w), np.nan, dtype=dtype)
    rec = K.preprocess_args(
        src=y.ctypes.data,
        src_strides=(y.nbytes, y.strides[0], 1, 0),
        shape=(1, H, W, 3),
        nv12=(uv_rows.ctypes.data, uv_rows.nbytes, uv_rows.strides[0]),
        matrix=key[0],
        color_range=key[1],
        out=out.ctypes.data,
        out_strides=_elem_strides(out),
        size=(h, w),
    )
    _run_preprocess(lib, rec, nv12=True, f16=dtype == np.float16)
    want = R.preprocess_nv12(y, uv, size, dtype=dtype, matrix=key[0], color_range=key[1])
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("mask_dtype", [np.uint8, np.int32, np.int64])
@pytest.mark.parametrize(
    ("mask_hw", "frame_hw"),
    [((11, 17), (11, 17)), ((5, 7), (23, 31)), ((8, 8), (16, 16)), ((9, 9), (5, 7))],
    ids=str,
)
@pytest.mark.parametrize(("alpha", "skip"), [(0.5, 0), (0.37, None), (1.0, 2)])
def test_overlay_hwc_matches_reference(lib, mask_dtype, mask_hw, frame_hw, alpha, skip):
    rng = np.random.default_rng(4)
    N = 2
    frames = rng.integers(0, 256, (N, *frame_hw, 3), dtype=np.uint8)
    # ids beyond the palette (clamped) and negative ones (signed masks)
    lo = -2 if mask_dtype != np.uint8 else 0
    mask = rng.integers(lo, 9, (N, *mask_hw)).astype(mask_dtype)
    palette = R.default_palette(7)
    out = np.zeros_like(frames)
    rec = K.overlay_args(
        src=frames.ctypes.data,
        src_strides=frames.strides,
        shape=frames.shape,
        mask=mask.ctypes.data,
        mask_strides=_elem_strides(mask),
        mask_size=mask_hw,
        palette=palette.ctypes.data,
        palette_strides=palette.strides,
        num_colours=palette.shape[0],
        out=out.ctypes.data,
        out_strides=out.strides,
        alpha=alpha,
        skip_class=skip,
    )
    r = np.ascontiguousarray(rec)
    lib.sf_host_overlay(ctypes.c_void_p(r.ctypes.data), 0, np.dtype(mask_dtype).itemsize)
    np.testing.assert_array_equal(
        out, R.overlay(frames, mask, palette, alpha=alpha, skip_class=skip)
    )


@pytest.mark.parametrize(("H", "W"), [(24, 32), (23, 31)])
def test_overlay_nv12_matches_reference(lib, H, W):
    rng = np.random.default_rng(5)
    y = rng.integers(0, 256, (H, W), dtype=np.uint8)
    uv = rng.integers(0, 256, ((H + 1) // 2, (W + 1) // 2, 2), dtype=np.uint8)
    mask = rng.integers(0, 5, (1, 12, 16)).astype(np.uint8)
    palette = R.default_palette(5)
    out = np.zeros((1, H, W, 3), dtype=np.uint8)
    rec = K.overlay_args(
        src=y.ctypes.data,
        src_strides=(y.nbytes, y.strides[0], 1, 0),
        shape=(1, H, W, 3),
        nv12=(uv.ctypes.data, uv.nbytes, uv.strides[0]),
        matrix="bt709",
        mask=mask.ctypes.data,
        mask_strides=_elem_strides(mask),
        mask_size=(12, 16),
        palette=palette.ctypes.data,
        palette_strides=palette.strides,
        num_colours=5,
        out=out.ctypes.data,
        out_strides=out.strides,
    )
    r = np.ascontiguousarray(rec)
    lib.sf_host_overlay(ctypes.c_void_p(r.ctypes.data), 1, 1)
    np.testing.assert_array_equal(out[0], R.overlay_nv12(y, uv, mask, palette, matrix="bt709"))
