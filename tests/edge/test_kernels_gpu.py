"""The csrc/ kernels on a GPU, launched the way EdgeEngine launches them (cuda-python,
NVRTC-compiled, one struct argument), against the numpy references — bit for bit.
Needs a CUDA GPU and cuda-python; no TensorRT, no torch on the device path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segfast.edge import kernels as K
from segfast.edge import reference as R

pytestmark = pytest.mark.gpu
CSRC = Path(__file__).resolve().parents[2] / "csrc"


@pytest.fixture(scope="module")
def gpu():
    pytest.importorskip("cuda.bindings", reason="cuda-python (segfast[edge]) not installed")
    driver, _ = K.cuda_bindings()
    K.check(driver.cuInit(0), "cuInit")
    dev = K.check(driver.cuDeviceGet(0), "device")
    attr = driver.CUdevice_attribute
    major = K.check(
        driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cc"
    )
    minor = K.check(
        driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cc"
    )
    ctx = K.check(driver.cuDevicePrimaryCtxRetain(dev), "context")
    K.check(driver.cuCtxSetCurrent(ctx), "context")
    stream = K.check(driver.cuStreamCreate(0), "stream")
    kernels = K.KernelSet(K.compile_sources(f"sm_{major}{minor}", CSRC))
    allocations = []

    class Gpu:
        def put(self, a: np.ndarray) -> int:
            a = np.ascontiguousarray(a)
            ptr = K.check(driver.cuMemAlloc(max(a.nbytes, 1)), "alloc")
            allocations.append(ptr)
            K.check(driver.cuMemcpyHtoD(ptr, a.ctypes.data, a.nbytes), "H2D")
            return int(ptr)

        def get(self, ptr: int, like: np.ndarray) -> np.ndarray:
            out = np.empty_like(like)
            K.check(driver.cuStreamSynchronize(stream), "sync")
            K.check(driver.cuMemcpyDtoH(out.ctypes.data, ptr, out.nbytes), "D2H")
            return out

        def launch(self, name, rec, total):
            kernels.launch(name, rec, total, stream)

    yield Gpu()
    for ptr in allocations:
        driver.cuMemFree(ptr)
    kernels.close()
    driver.cuStreamDestroy(stream)
    driver.cuDevicePrimaryCtxRelease(dev)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize(
    ("H", "W", "size"), [(37, 53, (32, 48)), (1080, 1920, (512, 512)), (23, 31, None)], ids=str
)
def test_preprocess_hwc_on_gpu(gpu, dtype, H, W, size):
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (1, H, W, 3), dtype=np.uint8)
    h, w = size or (H, W)
    like = np.empty((1, 3, h, w), dtype=dtype)
    out = gpu.put(np.full_like(like, np.nan))
    rec = K.preprocess_args(
        src=gpu.put(frame),
        src_strides=frame.strides,
        shape=frame.shape,
        out=out,
        out_strides=[s // like.itemsize for s in like.strides],
        size=(h, w),
    )
    gpu.launch(K.PREPROCESS_KERNELS[("hwc", np.dtype(dtype).name)], rec, h * w)
    np.testing.assert_array_equal(gpu.get(out, like), R.preprocess(frame, size, dtype=dtype))


def test_preprocess_nv12_on_gpu(gpu):
    rng = np.random.default_rng(1)
    H, W = 23, 31
    y = rng.integers(0, 256, (H, W), dtype=np.uint8)
    uv = rng.integers(0, 256, ((H + 1) // 2, (W + 1) // 2, 2), dtype=np.uint8)
    like = np.empty((1, 3, 16, 20), dtype=np.float16)
    out = gpu.put(np.zeros_like(like))
    rec = K.preprocess_args(
        src=gpu.put(y),
        src_strides=(y.nbytes, W, 1, 0),
        shape=(1, H, W, 3),
        nv12=(gpu.put(uv), uv.nbytes, uv.strides[0]),
        out=out,
        out_strides=[s // 2 for s in like.strides],
        size=(16, 20),
    )
    gpu.launch(K.PREPROCESS_KERNELS[("nv12", "float16")], rec, 16 * 20)
    np.testing.assert_array_equal(gpu.get(out, like), R.preprocess_nv12(y, uv, (16, 20)))


@pytest.mark.parametrize("mask_dtype", [np.uint8, np.int32, np.int64])
def test_overlay_on_gpu(gpu, mask_dtype):
    rng = np.random.default_rng(2)
    frame = rng.integers(0, 256, (1, 45, 61, 3), dtype=np.uint8)
    mask = rng.integers(0, 9, (1, 16, 20)).astype(mask_dtype)
    palette = R.default_palette(7)
    out = gpu.put(np.zeros_like(frame))
    rec = K.overlay_args(
        src=gpu.put(frame),
        src_strides=frame.strides,
        shape=frame.shape,
        mask=gpu.put(mask),
        mask_strides=[s // mask.itemsize for s in mask.strides],
        mask_size=(16, 20),
        palette=gpu.put(palette),
        palette_strides=palette.strides,
        num_colours=7,
        out=out,
        out_strides=frame.strides,
        alpha=0.37,
    )
    gpu.launch(K.OVERLAY_KERNELS[("hwc", np.dtype(mask_dtype).name)], rec, 45 * 61)
    want = R.overlay(frame, mask, palette, alpha=0.37)
    np.testing.assert_array_equal(gpu.get(out, frame), want)
