"""``EdgeEngine``: a TensorRT plan + its sidecar → frames in, masks and overlays out, with
TensorRT, cuda-python and numpy only (no PyTorch).

    frame (uint8 BGR [H, W, 3] or NV12 planes)
      ─H→D─▶ sf_preprocess_* (csrc/preprocess.cu: resize + normalise → fp16/fp32 NCHW)
      ─────▶ TensorRT (execute_async_v3 on the engine's stream)
      ─────▶ sf_overlay_* (csrc/overlay.cu: mask → nearest upscale → palette → alpha blend)
      ─D→H─▶ mask [h, w] (network resolution) and overlay [H, W, 3] BGR

One CUDA stream orders everything; the host waits once per frame (after the device→host
copies). Device buffers are allocated on first use and grow when a larger frame arrives.

Loading refuses a plan whose sidecar is missing, malformed or does not match the plan,
this TensorRT version or this GPU's compute capability (:mod:`segfast.edge.sidecar`) —
before TensorRT deserialises anything.

Not run on this project's machines (no GPU, no TensorRT): this module's CUDA and TensorRT
calls follow cuda-python's and TensorRT's documented APIs; what is tested here is the
kernels' code (per-pixel functions built for the host, NVRTC and nvcc compiles), the
argument records, the sidecar checks and the numpy references. See README.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segfast.edge import kernels as K
from segfast.edge import reference as ref
from segfast.edge.sidecar import PlanMeta, check_environment, read_plan
from segfast.edge.trt import TrtSession, tensorrt_version
from segfast.errors import InputError

_NP_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "uint8": np.uint8,
    "int8": np.int8,
    "int32": np.int32,
    "int64": np.int64,
    "bool": np.bool_,
}


@dataclass
class EdgeResult:
    """What :meth:`EdgeEngine.run` returns for one frame."""

    output: np.ndarray  # the engine's output for the frame: a [h, w] mask, or [K, h, w]
    overlay: np.ndarray | None  # uint8 [H, W, 3] BGR, when asked for and the output is a mask


class _Buffer:
    """A device allocation that grows on demand (cuMemAlloc / cuMemFree)."""

    def __init__(self, driver: Any) -> None:
        self._driver = driver
        self.ptr: Any = None
        self.nbytes = 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.free()
            self.ptr = K.check(self._driver.cuMemAlloc(max(nbytes, 1)), f"cuMemAlloc {nbytes}")
            self.nbytes = nbytes
        return int(self.ptr)

    @property
    def address(self) -> int:
        if self.ptr is None:
            raise RuntimeError("device buffer used before allocation")
        return int(self.ptr)

    def free(self) -> None:
        if self.ptr is not None:
            K.check(self._driver.cuMemFree(self.ptr), "cuMemFree")
            self.ptr, self.nbytes = None, 0


def _contiguous_strides(shape: Sequence[int], itemsize: int) -> list[int]:
    strides, step = [], itemsize
    for d in reversed(shape):
        strides.append(step)
        step *= int(d)
    return strides[::-1]


class EdgeEngine:
    """Run a segfast TensorRT plan on frames, torch-free.

    Args:
        plan: the ``.plan`` file (from ``segfast build``); sidecar: its ``.plan.json``
            (default: beside it).
        device: CUDA device ordinal.
        kernels: "nvrtc" (compile the shipped csrc/ sources for this GPU at load time), a
            directory of .cu sources (compiled the same way), or a directory of nvcc-built
            cubins (``make -C csrc`` → ``csrc/build/sm_XY/*.cubin``).
        size: network input (h, w) for plans with a dynamic height/width (default: the
            profile's opt shape); static plans use their shape.
        mean / std / input_order: override the sidecar's preprocessing.
        palette: uint8 [K, 3] BGR colours (default: PASCAL VOC's map for the plan's class
            count, or 256 colours); alpha / skip_class: the overlay blend.
        matrix / color_range: how NV12 frames decode ("bt601"/"bt709", "limited"/"full").
    """

    def __init__(
        self,
        plan: str | os.PathLike[str],
        sidecar: str | os.PathLike[str] | None = None,
        *,
        device: int = 0,
        kernels: str | os.PathLike[str] = "nvrtc",
        size: Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        input_order: str | None = None,
        palette: np.ndarray | None = None,
        alpha: float = 0.5,
        skip_class: int | None = 0,
        matrix: str = "bt601",
        color_range: str = "limited",
    ) -> None:
        self._closed = True
        # Files first (no CUDA, no TensorRT): the sidecar exists, parses, matches the plan.
        meta, data = read_plan(plan, sidecar)
        self._check_io(meta)
        ref.yuv_coefficients(matrix, color_range)  # validates
        self.matrix, self.color_range = matrix, color_range
        driver, _ = K.cuda_bindings()
        self._driver = driver
        K.check(driver.cuInit(0), "cuInit")
        self._device = K.check(driver.cuDeviceGet(device), f"cuDeviceGet({device})")
        attr = driver.CUdevice_attribute
        cap = tuple(
            K.check(driver.cuDeviceGetAttribute(a, self._device), "compute capability")
            for a in (
                attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
            )
        )
        # Then this machine: nothing is deserialised or compiled for a plan refused here.
        check_environment(
            meta, tensorrt_version=tensorrt_version(), capability=cap, where=str(plan)
        )
        self.meta: PlanMeta = meta
        # TensorRT works in the device's primary context (the CUDA runtime's); use it too.
        self._ctx = K.check(driver.cuDevicePrimaryCtxRetain(self._device), "retain context")
        K.check(driver.cuCtxSetCurrent(self._ctx), "set context")
        self._closed = False
        self._buffers: dict[str, _Buffer] = {}
        try:
            self._stream = K.check(driver.cuStreamCreate(0), "cuStreamCreate")
            arch = f"sm_{cap[0]}{cap[1]}"
            self._kernels = K.KernelSet(K.load_images(kernels, arch))
            self._session = TrtSession(data, meta)
            self._configure(size, mean, std, input_order, palette, alpha, skip_class)
        except BaseException:
            self.close()
            raise

    # -- setup -------------------------------------------------------------------------

    @staticmethod
    def _check_io(meta: PlanMeta) -> None:
        if len(meta.inputs) != 1 or len(meta.outputs) != 1:
            raise InputError(
                f"EdgeEngine runs single-input, single-output image plans; this one has inputs "
                f"{[t.name for t in meta.inputs]} and outputs {[t.name for t in meta.outputs]}"
            )
        x = meta.inputs[0]
        if len(x.shape) != 4 or x.shape[1] not in (1, 3) or x.dtype not in ("float32", "float16"):
            raise InputError(
                f"EdgeEngine needs a float32/float16 [N, 1 or 3, H, W] image input, the plan's "
                f"is {x.dtype} {list(x.shape)}"
            )

    def _configure(self, size, mean, std, input_order, palette, alpha, skip_class) -> None:
        meta = self.meta
        x = meta.inputs[0]
        assert x.profile is not None
        if x.profile.min[0] > 1:
            raise InputError(
                f"the plan's batch starts at {x.profile.min[0]}; frames come one by one"
            )
        if size is None:
            h, w = x.profile.opt[2], x.profile.opt[3]
        else:
            h, w = (int(s) for s in size)
        self.input_shape = (1, x.shape[1], h, w)
        x.profile.check(x.name, self.input_shape)
        pre = meta.preprocess
        self.mean = tuple(mean if mean is not None else pre.get("mean", ref.IMAGENET_MEAN))
        self.std = tuple(std if std is not None else pre.get("std", ref.IMAGENET_STD))
        self.input_order = input_order or pre.get("input_order", "bgr")
        self.align_corners = bool(pre.get("align_corners", False))
        ref.normalisation(self.mean, self.std)  # validates
        if len(self.mean) != x.shape[1]:
            raise InputError(
                f"the plan takes {x.shape[1]} channels, mean/std have {len(self.mean)} elements"
            )
        self.alpha, self.skip_class = alpha, skip_class
        ref.alpha_weight(alpha)
        if palette is None:
            k = meta.raw.get("head", {}).get("num_classes") or 256
            palette = ref.default_palette(int(k), "bgr")
        self.palette = np.ascontiguousarray(ref.check_palette(palette, 3))
        # Bind the input once: its shape is fixed from here on.
        x_dtype = np.dtype(_NP_DTYPES[x.dtype])
        n_in = int(np.prod(self.input_shape)) * x_dtype.itemsize
        self._in_dtype = x_dtype
        self._session.set_input(x.name, self.input_shape, self._buffer("input").ensure(n_in))
        y = meta.outputs[0]
        self.output_shape = self._session.output_shape(y.name)
        self._out_dtype = np.dtype(_NP_DTYPES[y.dtype])
        n_out = int(np.prod(self.output_shape)) * self._out_dtype.itemsize
        self._session.set_output(y.name, self._buffer("output").ensure(n_out))
        pal = self._buffer("palette").ensure(self.palette.nbytes)
        K.check(
            self._driver.cuMemcpyHtoDAsync(
                pal, self.palette.ctypes.data, self.palette.nbytes, self._stream
            ),
            "copy palette",
        )
        self._sync()

    def _buffer(self, name: str) -> _Buffer:
        if name not in self._buffers:
            self._buffers[name] = _Buffer(self._driver)
        return self._buffers[name]

    def _sync(self) -> None:
        K.check(self._driver.cuStreamSynchronize(self._stream), "cuStreamSynchronize")

    def _upload(self, name: str, array: np.ndarray) -> int:
        ptr = self._buffer(name).ensure(array.nbytes)
        K.check(
            self._driver.cuMemcpyHtoDAsync(ptr, array.ctypes.data, array.nbytes, self._stream),
            f"copy {name} to the device",
        )
        return ptr

    # -- running -----------------------------------------------------------------------

    def _frame(self, frame: Any) -> tuple[dict[str, Any], tuple[int, int]]:
        """Upload a frame; its source fields for the kernels' argument records."""
        if isinstance(frame, tuple):
            if len(frame) != 2:
                raise InputError("an NV12 frame is a (Y plane, UV plane) pair")
            y, uv = (np.ascontiguousarray(p) for p in frame)
            H, W = ref.check_nv12(y, uv)
            yp, uvp = self._upload("frame", y), self._upload("chroma", uv)
            src = {
                "src": yp,
                "src_strides": (y.nbytes, W, 1, 0),
                "shape": (1, H, W, 3),
                "nv12": (uvp, uv.nbytes, uv.strides[0]),
                "matrix": self.matrix,
                "color_range": self.color_range,
            }
            return src, (H, W)
        f = np.asarray(frame)
        channels = self.input_shape[1]
        if f.dtype != np.uint8 or not (
            (f.ndim == 3 and f.shape[2] == channels) or (channels == 1 and f.ndim == 2)
        ):
            raise InputError(
                f"frames must be uint8 [H, W, {channels}]"
                + (" or [H, W]" if channels == 1 else "")
                + f" or an NV12 (Y, UV) pair, got {f.dtype} {list(f.shape)}"
            )
        f = np.ascontiguousarray(f.reshape(f.shape[0], f.shape[1], channels))
        H, W = f.shape[:2]
        ptr = self._upload("frame", f)
        return {
            "src": ptr,
            "src_strides": (f.nbytes, *f.strides),
            "shape": (1, H, W, channels),
        }, (H, W)

    def run(
        self, frame: np.ndarray | tuple[np.ndarray, np.ndarray], *, overlay: bool = True
    ) -> EdgeResult:
        """Segment one frame: uint8 [H, W, 3] in ``input_order`` (BGR by default) or an
        NV12 (Y [H, W], UV [⌈H/2⌉, ⌈W/2⌉, 2]) pair. Returns the engine's output for the frame
        and, for mask plans with ``overlay=True``, the BGR overlay at the frame's size."""
        if self._closed:
            raise RuntimeError("this EdgeEngine is closed")
        if overlay:
            self._check_overlay()
        src, (H, W) = self._frame(frame)
        kind = "nv12" if "nv12" in src else "hwc"
        h, w = self.input_shape[2:]
        pre = K.preprocess_args(
            **src,
            out=self._buffer("input").address,
            out_strides=_contiguous_strides(self.input_shape, 1),
            size=(h, w),
            mean=self.mean,
            std=self.std,
            input_order=self.input_order,
            align_corners=self.align_corners,
        )
        # one stream: preprocess → TensorRT → overlay → copies back; one wait at the end
        self._kernels.launch(
            K.PREPROCESS_KERNELS[(kind, self._in_dtype.name)], pre, h * w, self._stream
        )
        self._session.execute(int(self._stream))
        out_ptr = self._buffer("output").address
        blended = np.empty((H, W, 3), dtype=np.uint8) if overlay else None
        if blended is not None:
            self._launch_overlay(src, kind, blended, out_ptr)
        out = np.empty(self.output_shape, dtype=self._out_dtype)
        K.check(
            self._driver.cuMemcpyDtoHAsync(out.ctypes.data, out_ptr, out.nbytes, self._stream),
            "copy the output to the host",
        )
        if blended is not None:
            K.check(
                self._driver.cuMemcpyDtoHAsync(
                    blended.ctypes.data,
                    self._buffer("overlay").address,
                    blended.nbytes,
                    self._stream,
                ),
                "copy the overlay to the host",
            )
        self._sync()
        return EdgeResult(output=out[0], overlay=blended)

    def _check_overlay(self) -> None:
        if self.meta.output != "mask" or self._out_dtype.name not in ("uint8", "int32", "int64"):
            raise InputError(
                f"overlays need a mask plan; this plan outputs {self.meta.output} "
                f"({self._out_dtype.name}): rebuild it with `segfast build ... --head mask`, "
                "or call run(frame, overlay=False)"
            )
        if len(self.output_shape) != 3:
            raise InputError(f"a mask output is [N, h, w], the plan's is {list(self.output_shape)}")
        if self.input_shape[1] != 3:
            raise InputError("overlays are drawn on colour frames; this plan takes grayscale")

    def _launch_overlay(
        self, src: dict[str, Any], kind: str, result: np.ndarray, mask_ptr: int
    ) -> None:
        H, W = result.shape[:2]
        mh, mw = self.output_shape[1:]
        rec = K.overlay_args(
            src=src["src"],
            src_strides=src["src_strides"],
            shape=src["shape"],
            nv12=src.get("nv12"),
            matrix=self.matrix,
            color_range=self.color_range,
            mask=mask_ptr,
            mask_strides=(mh * mw, mw, 1),
            mask_size=(mh, mw),
            palette=self._buffer("palette").address,
            palette_strides=self.palette.strides,
            num_colours=self.palette.shape[0],
            out=self._buffer("overlay").ensure(result.nbytes),
            out_strides=(result.nbytes, *result.strides),
            alpha=self.alpha,
            skip_class=self.skip_class,
        )
        self._kernels.launch(
            K.OVERLAY_KERNELS[(kind, self._out_dtype.name)], rec, H * W, self._stream
        )

    # -- teardown ----------------------------------------------------------------------

    def close(self) -> None:
        """Free device memory, the stream and the kernels; release the context."""
        if self._closed:
            return
        self._closed = True
        session = getattr(self, "_session", None)
        if session is not None:
            del self._session  # the TensorRT context before the memory it points at
        for buf in self._buffers.values():
            buf.free()
        kernels = getattr(self, "_kernels", None)
        if kernels is not None:
            kernels.close()
        stream = getattr(self, "_stream", None)
        if stream is not None:
            K.check(self._driver.cuStreamDestroy(stream), "cuStreamDestroy")
        K.check(self._driver.cuDevicePrimaryCtxRelease(self._device), "release context")

    def __enter__(self) -> EdgeEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
