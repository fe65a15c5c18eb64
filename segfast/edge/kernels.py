"""The csrc/ CUDA kernels from Python without torch: argument records, NVRTC compilation,
module loading and launches with cuda-python (``cuda.bindings``).

Each kernel takes one struct by value (``sf_preprocess_args`` / ``sf_overlay_args`` in
csrc/segfast_edge.cuh). :data:`PREPROCESS_ARGS` and :data:`OVERLAY_ARGS` are the same
layouts as numpy structured dtypes; :func:`preprocess_args` / :func:`overlay_args` fill
them from shapes, strides and addresses. Tests check the layouts against the C structs
(host build) and against NVRTC's PTX parameter sizes, and run the kernels' per-pixel code
on the CPU with records built by these functions.

Kernels come from NVRTC (:func:`compile_sources`: the shipped .cu files, compiled at load
time for the GPU's architecture — the default) or from nvcc-built cubins
(``make -C csrc`` → ``csrc/build/sm_XY/*.cubin``, :func:`load_cubins`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from segfast.edge import reference as ref
from segfast.errors import BackendUnavailable, InputError

SOURCES = ("preprocess.cu", "overlay.cu")
HEADER = "segfast_edge.cuh"
# --fmad=false: see csrc/segfast_edge.cuh (explicit fmas only, like the host build).
NVRTC_OPTIONS = ("--std=c++17", "--fmad=false")
BLOCK = 256  # threads per block; pure gather/stream kernels, occupancy is what matters
MAX_BLOCKS = 65535 * 32  # grid-stride loops cover the rest

PREPROCESS_ARGS = np.dtype(
    [
        ("src", "u8"),
        ("uv", "u8"),
        ("out", "u8"),
        ("s_n", "i8"),
        ("s_y", "i8"),
        ("s_x", "i8"),
        ("s_c", "i8"),
        ("uv_n", "i8"),
        ("uv_y", "i8"),
        ("o_n", "i8"),
        ("o_c", "i8"),
        ("o_y", "i8"),
        ("o_x", "i8"),
        ("N", "i4"),
        ("H", "i4"),
        ("W", "i4"),
        ("C", "i4"),
        ("h", "i4"),
        ("w", "i4"),
        ("c_first", "i4"),
        ("c_step", "i4"),
        ("align_corners", "i4"),
        ("resize", "i4"),
        ("ratio_h", "f4"),
        ("ratio_w", "f4"),
        ("a", "f4", (3,)),
        ("b", "f4", (3,)),
        ("yuv", "i4", (6,)),
    ],
    align=True,
)

OVERLAY_ARGS = np.dtype(
    [
        ("src", "u8"),
        ("uv", "u8"),
        ("mask", "u8"),
        ("palette", "u8"),
        ("out", "u8"),
        ("s_n", "i8"),
        ("s_y", "i8"),
        ("s_x", "i8"),
        ("s_c", "i8"),
        ("uv_n", "i8"),
        ("uv_y", "i8"),
        ("m_n", "i8"),
        ("m_y", "i8"),
        ("m_x", "i8"),
        ("p_k", "i8"),
        ("p_c", "i8"),
        ("o_n", "i8"),
        ("o_y", "i8"),
        ("o_x", "i8"),
        ("o_c", "i8"),
        ("N", "i4"),
        ("H", "i4"),
        ("W", "i4"),
        ("C", "i4"),
        ("mh", "i4"),
        ("mw", "i4"),
        ("mscale_h", "f4"),
        ("mscale_w", "f4"),
        ("K", "i4"),
        ("alpha", "i4"),
        ("skip", "i4"),
        ("has_skip", "i4"),
        ("yuv", "i4", (6,)),
    ],
    align=True,
)

# kernel name per (source kind, output dtype / mask dtype)
PREPROCESS_KERNELS = {
    ("hwc", "float32"): "sf_preprocess_hwc_f32",
    ("hwc", "float16"): "sf_preprocess_hwc_f16",
    ("nv12", "float32"): "sf_preprocess_nv12_f32",
    ("nv12", "float16"): "sf_preprocess_nv12_f16",
}
OVERLAY_KERNELS = {
    ("hwc", "uint8"): "sf_overlay_hwc_u8",
    ("hwc", "int32"): "sf_overlay_hwc_i32",
    ("hwc", "int64"): "sf_overlay_hwc_i64",
    ("nv12", "uint8"): "sf_overlay_nv12_u8",
    ("nv12", "int32"): "sf_overlay_nv12_i32",
    ("nv12", "int64"): "sf_overlay_nv12_i64",
}
KERNEL_SOURCE = {name: "preprocess.cu" for name in PREPROCESS_KERNELS.values()} | {
    name: "overlay.cu" for name in OVERLAY_KERNELS.values()
}
KERNEL_ARGS = {name: PREPROCESS_ARGS for name in PREPROCESS_KERNELS.values()} | {
    name: OVERLAY_ARGS for name in OVERLAY_KERNELS.values()
}


def source_dir() -> Path:
    """The directory holding the shipped csrc/ sources (package ``segfast.edge.csrc``)."""
    try:
        root = resources.files("segfast.edge.csrc")
    except ModuleNotFoundError:
        raise BackendUnavailable(
            "segfast.edge.csrc (the CUDA sources shipped with segfast) is missing from this "
            "installation; reinstall segfast, or pass kernels='<a csrc/ directory>'"
        ) from None
    path = Path(str(root))
    missing = [f for f in (*SOURCES, HEADER) if not (path / f).is_file()]
    if missing:
        raise BackendUnavailable(f"{path}: the shipped CUDA sources lack {missing}")
    return path


# ---------------------------------------------------------------------------------------
# Argument records
# ---------------------------------------------------------------------------------------


def preprocess_args(
    *,
    src: int,
    src_strides: Sequence[int],
    shape: Sequence[int],
    out: int,
    out_strides: Sequence[int],
    size: Sequence[int],
    mean: Sequence[float] = ref.IMAGENET_MEAN,
    std: Sequence[float] = ref.IMAGENET_STD,
    input_order: str = "bgr",
    align_corners: bool = False,
    nv12: tuple[int, int, int] | None = None,
    matrix: str = "bt601",
    color_range: str = "limited",
) -> np.ndarray:
    """One ``sf_preprocess_args`` record (0-d structured array).

    src: address of the frames (HWC) or the NV12 Y plane; src_strides: (n, y, x, c) in
    bytes (NV12: (n, y, 1, 0) of the Y plane); shape: (N, H, W, C) of the frames (NV12:
    C = 3); out: address of the [N, C, h, w] output with element strides out_strides;
    size: (h, w); nv12: (uv address, uv n stride, uv row pitch) for NV12 input.
    """
    N, H, W, C = (int(s) for s in shape)
    h, w = (int(s) for s in size)
    if min(N, H, W, h, w) < 1:
        raise InputError(f"empty frames or output: frames {list(shape)}, size {list(size)}")
    a, b = ref.normalisation(mean, std)
    if len(a) != C:
        raise InputError(f"{C}-channel frames need {C}-element mean/std, got {len(a)}")
    if input_order not in ("bgr", "rgb"):
        raise ValueError(f"input_order must be 'bgr' or 'rgb', got {input_order!r}")
    rec = np.zeros((), dtype=PREPROCESS_ARGS)
    rec["src"], rec["out"] = src, out
    rec["s_n"], rec["s_y"], rec["s_x"], rec["s_c"] = (int(s) for s in src_strides)
    rec["o_n"], rec["o_c"], rec["o_y"], rec["o_x"] = (int(s) for s in out_strides)
    rec["N"], rec["H"], rec["W"], rec["C"], rec["h"], rec["w"] = N, H, W, C, h, w
    bgr = C == 3 and input_order == "bgr"
    rec["c_first"], rec["c_step"] = (C - 1, -1) if bgr else (0, 1)
    rec["align_corners"] = int(bool(align_corners))
    rec["resize"] = int((h, w) != (H, W))
    rec["ratio_h"] = ref.bilinear_scale(H, h, align_corners)
    rec["ratio_w"] = ref.bilinear_scale(W, w, align_corners)
    rec["a"] = list(a) + [0.0] * (3 - C)
    rec["b"] = list(b) + [0.0] * (3 - C)
    if nv12 is not None:
        if C != 3:
            raise InputError(f"NV12 frames decode to 3 channels, got C = {C}")
        rec["uv"], rec["uv_n"], rec["uv_y"] = (int(v) for v in nv12)
        rec["yuv"] = ref.yuv_coefficients(matrix, color_range)
    return rec


def overlay_args(
    *,
    src: int,
    src_strides: Sequence[int],
    shape: Sequence[int],
    mask: int,
    mask_strides: Sequence[int],
    mask_size: Sequence[int],
    palette: int,
    palette_strides: Sequence[int],
    num_colours: int,
    out: int,
    out_strides: Sequence[int],
    alpha: float = 0.5,
    skip_class: int | None = 0,
    nv12: tuple[int, int, int] | None = None,
    matrix: str = "bt601",
    color_range: str = "limited",
) -> np.ndarray:
    """One ``sf_overlay_args`` record (0-d structured array).

    src/src_strides/shape: the frames as for :func:`preprocess_args`; mask: address of
    [N, mh, mw] class ids with element strides mask_strides, mask_size = (mh, mw)
    (resampled to H×W with ATen's nearest indices when it differs); palette: [K, C]
    uint8 with byte strides palette_strides, K = num_colours; out:
    [N, H, W, C] uint8 with byte strides out_strides (NV12: BGR, C = 3).
    """
    N, H, W, C = (int(s) for s in shape)
    mh, mw = (int(s) for s in mask_size)
    if min(N, H, W, C, mh, mw) < 1:
        raise InputError(f"empty frames or mask: frames {list(shape)}, mask {list(mask_size)}")
    if num_colours < 1:
        raise InputError(f"the palette needs at least one colour, got {num_colours}")
    rec = np.zeros((), dtype=OVERLAY_ARGS)
    rec["src"], rec["mask"], rec["palette"], rec["out"] = src, mask, palette, out
    rec["s_n"], rec["s_y"], rec["s_x"], rec["s_c"] = (int(s) for s in src_strides)
    rec["m_n"], rec["m_y"], rec["m_x"] = (int(s) for s in mask_strides)
    rec["p_k"], rec["p_c"] = (int(s) for s in palette_strides)
    rec["o_n"], rec["o_y"], rec["o_x"], rec["o_c"] = (int(s) for s in out_strides)
    rec["N"], rec["H"], rec["W"], rec["C"], rec["mh"], rec["mw"] = N, H, W, C, mh, mw
    rec["mscale_h"] = np.float32(mh) / np.float32(H)
    rec["mscale_w"] = np.float32(mw) / np.float32(W)
    rec["K"] = int(num_colours)
    rec["alpha"] = ref.alpha_weight(alpha)
    rec["skip"] = -1 if skip_class is None else int(skip_class)
    rec["has_skip"] = int(skip_class is not None)
    if nv12 is not None:
        if C != 3:
            raise InputError(f"NV12 frames overlay as BGR (C = 3), got C = {C}")
        rec["uv"], rec["uv_n"], rec["uv_y"] = (int(v) for v in nv12)
        rec["yuv"] = ref.yuv_coefficients(matrix, color_range)
    return rec


def grid_size(total: int, block: int = BLOCK) -> int:
    """Blocks for ``total`` threads' worth of work (grid-stride loops past MAX_BLOCKS)."""
    return max(1, min(math.ceil(total / block), MAX_BLOCKS))


# ---------------------------------------------------------------------------------------
# cuda-python: NVRTC and the driver API
# ---------------------------------------------------------------------------------------


def cuda_bindings() -> tuple[Any, Any]:
    """(cuda.bindings.driver, cuda.bindings.nvrtc), or BackendUnavailable saying why."""
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError as exc:
        raise BackendUnavailable(
            f"segfast.edge needs cuda-python ≥ 12.6 (`pip install segfast[edge]`): {exc}"
        ) from None
    return driver, nvrtc


def check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(status, *values)`` result; raise RuntimeError on failure."""
    driver, nvrtc = cuda_bindings()
    status, *values = result if isinstance(result, tuple) else (result,)
    if isinstance(status, nvrtc.nvrtcResult):
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, msg = nvrtc.nvrtcGetErrorString(status)
            raise RuntimeError(f"{what}: NVRTC error {status.name}: {msg.decode()}")
    elif status != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(status)
        raise RuntimeError(f"{what}: CUDA error {name.decode() if name else status}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def compile_source(
    source: str | os.PathLike[str], arch: str, *, include_dir: str | os.PathLike[str] | None = None
) -> tuple[bytes, bytes]:
    """NVRTC-compile one .cu file for ``arch`` ("sm_87", "sm_90", …) → (cubin, ptx).

    Needs libnvrtc (the CUDA toolkit's, or the ``nvidia-cuda-nvrtc`` wheel), not a GPU.
    """
    _, nvrtc = cuda_bindings()
    path = Path(source)
    inc = Path(include_dir) if include_dir is not None else path.parent
    prog = check(
        nvrtc.nvrtcCreateProgram(path.read_bytes(), path.name.encode(), 0, [], []),
        f"NVRTC create {path.name}",
    )
    try:
        opts = [o.encode() for o in (*NVRTC_OPTIONS, f"--gpu-architecture={arch}")]
        opts.append(f"--include-path={inc}".encode())
        (status,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            size = check(nvrtc.nvrtcGetProgramLogSize(prog), "NVRTC log size")
            log = b" " * size
            check(nvrtc.nvrtcGetProgramLog(prog, log), "NVRTC log")
            text = log.rstrip(b" \x00").decode(errors="replace")
            raise RuntimeError(f"NVRTC could not compile {path} for {arch}:\n{text}")
        n = check(nvrtc.nvrtcGetCUBINSize(prog), "NVRTC cubin size")
        cubin = b" " * n
        check(nvrtc.nvrtcGetCUBIN(prog, cubin), "NVRTC cubin")
        n = check(nvrtc.nvrtcGetPTXSize(prog), "NVRTC PTX size")
        ptx = b" " * n
        check(nvrtc.nvrtcGetPTX(prog, ptx), "NVRTC PTX")
    finally:
        check(nvrtc.nvrtcDestroyProgram(prog), "NVRTC destroy")
    return cubin, ptx


def compile_sources(arch: str, directory: str | os.PathLike[str] | None = None) -> dict[str, bytes]:
    """Every shipped .cu compiled by NVRTC for ``arch``: {source file name: cubin}."""
    d = Path(directory) if directory is not None else source_dir()
    return {name: compile_source(d / name, arch)[0] for name in SOURCES}


def load_cubins(directory: str | os.PathLike[str], arch: str) -> dict[str, bytes]:
    """nvcc-built cubins from ``make -C csrc``: ``<directory>/<arch>/<name>.cubin``."""
    d = Path(directory) / arch
    images = {}
    for name in SOURCES:
        f = d / (Path(name).stem + ".cubin")
        if not f.is_file():
            raise BackendUnavailable(
                f"{f} is missing: build it with `make -C csrc ARCHS={arch.removeprefix('sm_')}` "
                "or leave kernels= at its default (NVRTC)"
            )
        images[name] = f.read_bytes()
    return images


def load_images(kernels: str | os.PathLike[str], arch: str) -> dict[str, bytes]:
    """Kernel images for ``arch`` from ``kernels``: "nvrtc" (the shipped sources compiled
    by NVRTC), a directory holding the .cu sources (compiled by NVRTC), or a directory of
    nvcc-built cubins (``make -C csrc`` → ``csrc/build``: ``<dir>/<arch>/*.cubin``)."""
    if str(kernels) == "nvrtc":
        return compile_sources(arch)
    d = Path(kernels)
    if all((d / name).is_file() for name in SOURCES):
        return compile_sources(arch, d)
    if (d / arch).is_dir():
        return load_cubins(d, arch)
    raise BackendUnavailable(
        f"kernels={str(kernels)!r}: neither 'nvrtc', a directory with {list(SOURCES)}, nor a "
        f"cubin directory with {arch}/ (build one with `make -C csrc BUILD={d}`)"
    )


class KernelSet:
    """The edge kernels loaded into the current CUDA context (call within one)."""

    def __init__(self, images: dict[str, bytes]) -> None:
        driver, _ = cuda_bindings()
        self._driver = driver
        self._modules: list[Any] = []
        self._functions: dict[str, Any] = {}
        for source, image in images.items():
            # cuModuleLoadData takes a host pointer to the cubin (copied during the call).
            buf = np.frombuffer(image + b"\0", dtype=np.uint8)
            module = check(driver.cuModuleLoadData(buf.ctypes.data), f"load {source}")
            self._modules.append(module)
            for name, src in KERNEL_SOURCE.items():
                if src == source:
                    self._functions[name] = check(
                        driver.cuModuleGetFunction(module, name.encode()), f"find {name}"
                    )
        missing = sorted(set(KERNEL_SOURCE) - set(self._functions))
        if missing:
            raise RuntimeError(f"kernel images lack {missing}")

    def launch(self, name: str, args: np.ndarray, total: int, stream: Any) -> None:
        """Launch kernel ``name`` with its one struct argument over ``total`` items."""
        if args.dtype != KERNEL_ARGS[name]:
            raise TypeError(f"{name} takes {KERNEL_ARGS[name]}, got {args.dtype}")
        rec = np.ascontiguousarray(args)
        # kernelParams: an array of pointers, one per kernel parameter (here one struct).
        params = np.array([rec.ctypes.data], dtype=np.uint64)
        check(
            self._driver.cuLaunchKernel(
                self._functions[name],
                grid_size(total),
                1,
                1,
                BLOCK,
                1,
                1,
                0,
                stream,
                params.ctypes.data,
                0,
            ),
            f"launch {name}",
        )

    def close(self) -> None:
        for module in self._modules:
            check(self._driver.cuModuleUnload(module), "unload module")
        self._modules.clear()
        self._functions.clear()
