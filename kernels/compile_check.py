"""Ahead-of-time compile check of every launched Triton kernel, for the GPUs segfast targets.

No GPU is needed. Each case below calls a real launcher (``conv2d``, ``seg_head``, ...) on
``meta`` tensors inside :func:`segfast.kernels._common.meta_launches`, with Triton's launch
intercepted (``Autotuner.run`` for the autotuned kernels, ``JITFunction.run`` for the
split-K epilogue). What is captured is exactly what a real call on that GPU hands Triton:
the arguments, the constexprs the launcher derives (activation, residual mode, flat-K,
split-K, IDX64, resize modes, output dtypes...) and the configs that survive the
launcher's ``early_config_prune`` for that shape and target. Each (kernel, config) is then
specialised the way the JIT specialises a launch (``create_function_from_signature`` +
``JITFunction._pack_args``) and compiled with ``triton.compile`` for the target. Verdicts
come from ptxas' own ``-v`` report and the compiled metadata:

- compile error: any exception from the front end, the MLIR/LLVM passes or ptxas;
- spill: ptxas reports spill stores or loads (a spilling config is slow, and a noisy
  autotuning race may still pick it);
- shared-memory overflow: ``metadata.shared`` above the target's per-block maximum (the
  check behind Triton's ``OutOfResources`` at launch: the config is skipped, after
  having been compiled in front of the first frame).

Targets: ``sm_90`` (H100/H200: 227 KB of shared memory per block, 132 SMs) and ``sm_87``
(Jetson AGX Orin: 163 KB per block, 16 SMs).

Configs: ``all`` compiles every config a launcher can hand the autotuner, for every case,
dtype and target (the full sweep, ``benchmarks/compile_targets.py``); ``representative``
the hungriest config of each launch, every kernel in every dtype on every target and
every code path at least in fp16 on sm_90; ``kernels`` (CI,
``tests/kernels/test_compile_targets.py``) the hungriest config of every kernel in every
dtype on every target, every case still driven through its launcher (see :func:`plan`).

Run ``python -m segfast.kernels.compile_check --help``. The process must not run Triton's
interpreter (``TRITON_INTERPRET`` unset): under it the kernels are interpreted functions
with the interpreter's single config, which is nothing a GPU compiles.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import (
    conv2d,
    conv_transpose2d,
    group_norm,
    head,
    overlay,
    pool,
    preprocess,
    qconv2d,
    resize,
    squeeze_excite,
)
from ._common import STATS_BLOCK, GpuTarget, interpreting, meta_launches

# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """A GPU the kernels are compiled for, with what the occupancy estimate needs."""

    name: str
    arch: int  # Triton's GPUTarget arch: 90, 87
    gpu: GpuTarget  # what the launchers see (capability, SMs, per-block shared maximum)
    shared_per_sm: int  # bytes
    max_warps_per_sm: int
    max_blocks_per_sm: int
    registers_per_sm: int = 65536


TARGETS: dict[str, Target] = {
    # H100 / H200 (CUDA occupancy tables, compute capability 9.0)
    "sm_90": Target("sm_90", 90, GpuTarget((9, 0), 132, 232448), 233472, 64, 32),
    # Jetson AGX Orin (8.7): 16 SMs, 164 KB of shared memory per SM, 48 warps per SM
    "sm_87": Target("sm_87", 87, GpuTarget((8, 7), 16, 166912), 167936, 48, 16),
}
MAX_REGISTERS = 255  # per thread, every target
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "u8": torch.uint8,
}
FLOAT_DTYPES = ("fp32", "fp16", "bf16")

# --------------------------------------------------------------------------- cases


def _t(*shape: int, dtype: torch.dtype, nhwc: bool = True) -> torch.Tensor:
    """A meta tensor: [N, C, H, W] channels_last (the fast path) unless ``nhwc`` is False."""
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if nhwc and t.dim() == 4 else t


def _stats(n: int, hw: int, c: int) -> torch.Tensor:
    """A meta channel-statistics buffer (``conv2d(..., stats=)``)."""
    return torch.empty((2, n, -(-hw // STATS_BLOCK), c), dtype=torch.float32, device="meta")


def _conv(dt, cin, cout, h, w, k, *, x2=None, bn=True, residual=False, gate=False,
          stats=False, **kw):  # fmt: skip
    x = _t(1, cin, h, w, dtype=dt)
    if gate:
        kw["gate"] = _t(1, cin, 1, 1, dtype=dt)
    c2 = 0 if x2 is None else x2[0]
    wt = conv2d.pack_conv_weight(_t(cout, cin + c2, k, k, dtype=dt, nhwc=False))
    x2t = None if x2 is None else _t(1, *x2, dtype=dt)
    stride = kw.pop("stride", 1)
    pad = kw.pop("padding", k // 2)
    span = kw.get("dilation", 1) * (k - 1) + 1
    ho, wo = ((n + 2 * pad - span) // stride + 1 for n in (h, w))
    res = _t(1, cout, ho, wo, dtype=dt) if residual else None
    sc = _t(cout, dtype=dt) if bn else None
    if stats:
        kw["stats"] = _stats(1, ho * wo, cout)
    conv2d.conv2d(x, wt, sc, sc, stride=stride, padding=pad, x2=x2t, residual=res, **kw)


def _se(dt, c, h, w, hidden, *, two=True, stats=False):
    st = {"stats": _stats(1, h * w, c)} if stats else {}
    squeeze_excite.se_gate(
        _t(1, c, h, w, dtype=dt), _t(hidden, c, 1, 1, dtype=dt), _t(hidden, dtype=dt), "relu",
        0.0, _t(c, hidden, 1, 1, dtype=dt) if two else None, _t(c, dtype=dt) if two else None,
        "hardsigmoid", 0.0, **st,
    )  # fmt: skip


def _gn(dt, c, h, w, groups, act, affine=True, stats=False):
    wt = _t(c, dtype=dt) if affine else None
    st = {"stats": _stats(1, h * w, c)} if stats else {}
    group_norm.group_norm(_t(1, c, h, w, dtype=dt), groups, wt, wt, 1e-5, act, **st)


def _dw(dt, c, h, w, k, *, residual=False, stats=False, **kw):
    d = kw.get("dilation", 1)
    x = _t(1, c, h, w, dtype=dt)
    wt = conv2d.pack_conv_weight(_t(c, 1, k, k, dtype=dt, nhwc=False))
    res = _t(1, c, h, w, dtype=dt) if residual else None
    sc = _t(c, dtype=dt)
    if stats:
        kw["stats"] = _stats(1, h * w, c)
    conv2d.conv2d(x, wt, sc, sc, padding=d * (k // 2), groups=c, residual=res, **kw)


def _qconv(dt, cin, cout, h, w, k, *, x2=None, residual=False, depthwise=False, **kw):
    """An int8 conv: float x quantized on load, int8 weight (packed), fp32 scales."""
    x = _t(1, cin, h, w, dtype=dt)
    c2 = 0 if x2 is None else x2[0]
    wshape = (cin, 1, k, k) if depthwise else (cout, cin + c2, k, k)
    wt = qconv2d.pack_qconv_weight(_t(*wshape, dtype=torch.int8, nhwc=False))
    x2t = None if x2 is None else _t(1, *x2, dtype=dt)
    stride = kw.pop("stride", 1)
    pad = kw.pop("padding", kw.get("dilation", 1) * (k // 2))
    span = kw.get("dilation", 1) * (k - 1) + 1
    ho, wo = ((n + 2 * pad - span) // stride + 1 for n in (h, w))
    res = _t(1, cout, ho, wo, dtype=dt) if residual else None
    ws = _t(cout, dtype=torch.float32)
    qconv2d.qconv2d(
        x, wt, ws, x_scale=0.05, w_scale=ws, stride=stride, padding=pad, x2=x2t,
        residual=res, groups=cin if depthwise else 1, **kw,
    )  # fmt: skip


def _convt(dt, cin, cout, h, w, k, *, stride, padding=0, bn=True, residual=None, **kw):
    x = _t(1, cin, h, w, dtype=dt)
    wt = conv_transpose2d.pack_weight(_t(cin, cout, k, k, dtype=dt, nhwc=False))
    sc = _t(cout, dtype=dt) if bn else None
    res = None if residual is None else _t(1, cout, *residual, dtype=dt)
    conv_transpose2d.conv_transpose2d(
        x, wt, sc, sc, stride=stride, padding=padding, residual=res, **kw
    )


def _head(dt, c, k, h, w, *, weight=True, bias=True, **kw):
    x = _t(1, c, h, w, dtype=dt)
    wt = _t(k, c, dtype=dt) if weight else None
    b = _t(k, dtype=dt) if weight and bias else None
    head.seg_head(x, wt, b, **kw)


def _max_pool(dt, *, nhwc=True, **kw):
    pool.max_pool2d(_t(1, 64, 256, 256, dtype=dt, nhwc=nhwc), **kw)


def _unpool(dt, *, nhwc=True):
    x = _t(1, 64, 128, 128, dtype=dt, nhwc=nhwc)
    pool.max_unpool2d(x, _t(1, 64, 128, 128, dtype=torch.int64, nhwc=nhwc), (256, 256))


def _adaptive(dt, c, h, w, bins, *, nhwc=True):
    pool.adaptive_avg_pool2d(_t(1, c, h, w, dtype=dt, nhwc=nhwc), bins)


def _resize(dt, size, *, nhwc=True, **kw):
    resize.resize(_t(1, 64, 128, 128, dtype=dt, nhwc=nhwc), size, **kw)


def _preprocess(dt, channels, size, **kw):
    frames = _t(1, 1080, 1920, channels, dtype=torch.uint8, nhwc=False)
    if channels == 1:
        kw |= {"mean": (0.5,), "std": (0.25,)}
    preprocess.preprocess(frames, size, dtype=dt, **kw)


def _overlay(dt, mask_dtype, **kw):
    frames = _t(1, 1080, 1920, 3, dtype=dt, nhwc=False)
    mask = _t(1, 1080, 1920, dtype=mask_dtype, nhwc=False)
    overlay.overlay(frames, mask, overlay.default_palette(21).to("meta"), **kw)


@dataclass(frozen=True)
class Case:
    """One representative launcher call: a code path of a kernel module."""

    module: str
    name: str
    call: Callable[[torch.dtype], None]  # the launcher call on meta tensors of that dtype
    dtypes: tuple[str, ...] = FLOAT_DTYPES


F16, I32, I64, U8 = torch.float16, torch.int32, torch.int64, torch.uint8

# Every launcher code path that changes the compiled code, on realistic shapes (large
# enough that the launchers' shape pruning keeps every tile a real network could get).
# Switches that only touch the epilogue share cases: each activation, residual mode and
# output dtype appears at least once per kernel.
CASES: tuple[Case, ...] = (
    # conv2d, implicit GEMM
    Case("conv2d", "3x3-bn-relu", lambda d: _conv(d, 256, 256, 128, 128, 3, act="relu")),
    Case("conv2d", "stem-flatk-s2-silu",
         lambda d: _conv(d, 3, 32, 512, 512, 3, stride=2, act="silu")),
    Case("conv2d", "stem-s2-hardswish",  # MobileNetV3's stem
         lambda d: _conv(d, 3, 16, 512, 512, 3, stride=2, act="hardswish")),
    Case("conv2d", "1x1-se-gated-residual",  # MobileNetV3's project conv after SE
         lambda d: _conv(d, 960, 160, 32, 32, 1, gate=True, residual=True)),
    Case("conv2d", "flatk-gated-hardswish",
         lambda d: _conv(d, 8, 64, 128, 128, 3, gate=True, act="hardswish")),
    Case("squeeze_excite", "se-960-240", lambda d: _se(d, 960, 32, 32, 240)),
    Case("squeeze_excite", "se-one-layer-128", lambda d: _se(d, 960, 32, 32, 128, two=False)),
    Case("squeeze_excite", "se-1152-48-large-map", lambda d: _se(d, 1152, 128, 128, 48)),
    Case("group_norm", "gn32-relu", lambda d: _gn(d, 128, 128, 128, 32, "relu")),
    # channel statistics from the conv epilogue (a GroupNorm or an SE gate reads the output)
    Case("conv2d", "3x3-stats-for-gn", lambda d: _conv(d, 128, 128, 128, 128, 3, stats=True)),
    Case("conv2d", "1x1-stats-narrow", lambda d: _conv(d, 24, 32, 64, 64, 1, stats=True)),
    Case("conv2d", "dw5x5-hardswish-stats-for-se",
         lambda d: _dw(d, 672, 32, 32, 5, act="hardswish", stats=True)),
    Case("group_norm", "gn32-from-conv-stats",
         lambda d: _gn(d, 128, 128, 128, 32, "relu", stats=True)),
    Case("squeeze_excite", "se-from-conv-stats",
         lambda d: _se(d, 672, 32, 32, 168, stats=True)),
    Case("group_norm", "instance-hardswish-plain",
         lambda d: _gn(d, 64, 96, 80, 64, "hardswish", affine=False)),
    Case("conv2d", "1x1-gelu",
         lambda d: _conv(d, 96, 96, 64, 64, 1, act="gelu")),
    Case("conv2d", "1x1-residual-relu6",
         lambda d: _conv(d, 64, 256, 128, 128, 1, residual=True, act="relu6")),
    Case("conv2d", "3x3-residual-after-leaky",
         lambda d: _conv(d, 128, 128, 64, 64, 3, residual=True, residual_after_act=True,
                         act="leaky_relu")),
    Case("conv2d", "concat-sigmoid",
         lambda d: _conv(d, 128, 128, 128, 128, 3, x2=(128, 128, 128), bn=False, act="sigmoid")),
    Case("conv2d", "concat-nearest-first-tanh",
         lambda d: _conv(d, 64, 64, 128, 128, 3, x2=(128, 64, 64), x2_resize="nearest",
                         x2_first=True, act="tanh")),
    Case("conv2d", "concat-bilinear-relu",
         lambda d: _conv(d, 128, 128, 128, 128, 3, x2=(256, 64, 64), x2_resize="bilinear",
                         act="relu")),
    Case("conv2d", "concat-bilinear-align-out-fp32",
         lambda d: _conv(d, 256, 256, 128, 128, 1, x2=(256, 32, 32), x2_resize="bilinear",
                         x2_align_corners=True, out_dtype=torch.float32)),
    # DeepLab ASPP at output stride 16 of a 256² crop: too few tiles, split-K + epilogue
    Case("conv2d", "split-k-aspp-relu",
         lambda d: _conv(d, 2048, 256, 16, 16, 3, dilation=6, padding=6, act="relu")),
    # an 8192² activation: offsets beyond int32 (IDX64)
    Case("conv2d", "idx64", lambda d: _conv(d, 64, 64, 8192, 8192, 3, bn=False)),
    # conv2d, depthwise
    Case("conv2d", "dw3x3-bn-relu6", lambda d: _dw(d, 144, 128, 128, 3, act="relu6")),
    Case("conv2d", "dw5x5-residual-after-silu",
         lambda d: _dw(d, 256, 64, 64, 5, residual=True, residual_after_act=True, act="silu")),
    Case("conv2d", "dw3x3-atrous-idx64", lambda d: _dw(d, 64, 8192, 8192, 3, dilation=2)),
    # qconv2d: int8 implicit GEMM (float x quantized on load) and depthwise
    Case("qconv2d", "q3x3-relu", lambda d: _qconv(d, 256, 256, 128, 128, 3, act="relu")),
    Case("qconv2d", "q-stem-flatk-s2-silu",
         lambda d: _qconv(d, 3, 32, 512, 512, 3, stride=2, act="silu")),
    Case("qconv2d", "q1x1-residual-relu6",
         lambda d: _qconv(d, 64, 256, 128, 128, 1, residual=True, act="relu6")),
    Case("qconv2d", "q3x3-residual-after-leaky-int8-out",
         lambda d: _qconv(d, 128, 128, 64, 64, 3, residual=True, residual_after_act=True,
                          act="leaky_relu", out_scale=0.1)),
    Case("qconv2d", "q-concat-nearest-first-tanh",
         lambda d: _qconv(d, 64, 64, 128, 128, 3, x2=(128, 64, 64), x2_resize="nearest",
                          x2_first=True, act="tanh")),
    Case("qconv2d", "q-concat-bilinear-relu",
         lambda d: _qconv(d, 128, 128, 128, 128, 3, x2=(256, 64, 64), x2_resize="bilinear",
                          act="relu")),
    Case("qconv2d", "q-concat-bilinear-align-out-fp32",
         lambda d: _qconv(d, 256, 256, 128, 128, 1, x2=(256, 32, 32), x2_resize="bilinear",
                          x2_align_corners=True, out_dtype=torch.float32)),
    Case("qconv2d", "q-aspp-dilated-sigmoid",
         lambda d: _qconv(d, 2048, 256, 16, 16, 3, dilation=6, act="sigmoid")),
    Case("qconv2d", "q-idx64", lambda d: _qconv(d, 64, 64, 8192, 8192, 3)),
    Case("qconv2d", "qdw3x3-relu6",
         lambda d: _qconv(d, 144, 144, 128, 128, 3, depthwise=True, act="relu6")),
    Case("qconv2d", "qdw5x5-residual-after-silu-int8-out",
         lambda d: _qconv(d, 256, 256, 64, 64, 5, depthwise=True, residual=True,
                          residual_after_act=True, act="silu", out_scale=0.1)),
    Case("qconv2d", "qdw3x3-atrous-idx64",
         lambda d: _qconv(d, 64, 64, 8192, 8192, 3, depthwise=True, dilation=2)),
    # conv_transpose2d
    Case("conv_transpose2d", "2x2s2-bn-relu",
         lambda d: _convt(d, 512, 256, 32, 32, 2, stride=2, act="relu")),
    Case("conv_transpose2d", "4x4s2p1-bn-relu",
         lambda d: _convt(d, 512, 256, 8, 8, 4, stride=2, padding=1, act="relu")),
    Case("conv_transpose2d", "4x4s2p1-rgb-tanh",
         lambda d: _convt(d, 64, 3, 32, 32, 4, stride=2, padding=1, bn=False, act="tanh")),
    Case("conv_transpose2d", "3x3s2d2-residual-after-leaky-out-fp32",
         lambda d: _convt(d, 128, 128, 32, 32, 3, stride=2, padding=2, dilation=2,
                          output_padding=1, residual=(64, 64), residual_after_act=True,
                          act="leaky_relu", out_dtype=torch.float32)),
    Case("conv_transpose2d", "3x3-residual-silu",
         lambda d: _convt(d, 64, 64, 64, 64, 3, stride=1, padding=1, residual=(64, 64),
                          act="silu")),
    # head: 1×1 conv at full resolution (one launch)
    Case("head", "conv-argmax-u8", lambda d: _head(d, 256, 21, 128, 128)),
    Case("head", "conv-argmax-150-i64",
         lambda d: _head(d, 512, 150, 128, 128, bias=False, mask_dtype=I64)),
    Case("head", "conv-softmax", lambda d: _head(d, 256, 21, 128, 128, mode="softmax")),
    Case("head", "conv-softmax-150-fp16",
         lambda d: _head(d, 256, 150, 128, 128, mode="softmax", out_dtype=F16)),
    Case("head", "conv-sigmoid", lambda d: _head(d, 64, 1, 256, 256, mode="sigmoid")),
    Case("head", "conv-threshold-i32",
         lambda d: _head(d, 64, 2, 256, 256, mode="threshold", mask_dtype=I32)),
    Case("head", "conv-logits", lambda d: _head(d, 256, 19, 128, 128, mode="logits")),
    # head: 1×1 conv to low-resolution logits, then the bilinear gather
    Case("head", "up-argmax-u8", lambda d: _head(d, 256, 19, 64, 128, out_size=(512, 1024))),
    Case("head", "up-argmax-150-i32",
         lambda d: _head(d, 512, 150, 64, 64, out_size=(512, 512), mask_dtype=I32)),
    Case("head", "up-softmax-align",
         lambda d: _head(d, 256, 21, 64, 64, out_size=(512, 512), align_corners=True,
                         mode="softmax")),
    Case("head", "up-softmax-150",
         lambda d: _head(d, 256, 150, 64, 64, out_size=(512, 512), mode="softmax")),
    Case("head", "up-threshold-i64",
         lambda d: _head(d, 64, 1, 64, 64, out_size=(256, 256), mode="threshold",
                         mask_dtype=I64)),
    Case("head", "up-sigmoid-fp16",
         lambda d: _head(d, 64, 3, 64, 64, out_size=(256, 256), mode="sigmoid", out_dtype=F16)),
    # head: no weight — the gather reads the logits in their own dtype
    Case("head", "gather-argmax",
         lambda d: _head(d, 21, 21, 128, 128, weight=False, out_size=(512, 512))),
    Case("head", "gather-identity-softmax",
         lambda d: _head(d, 21, 21, 512, 512, weight=False, mode="softmax")),
    Case("head", "gather-logits",
         lambda d: _head(d, 19, 19, 128, 128, weight=False, out_size=(512, 512), mode="logits")),
    # pool
    Case("pool", "max2x2", lambda d: _max_pool(d, kernel_size=2)),
    Case("pool", "max3x3s2p1-indices",
         lambda d: _max_pool(d, kernel_size=3, stride=2, padding=1, return_indices=True)),
    Case("pool", "max2x2-nchw-indices",
         lambda d: _max_pool(d, kernel_size=2, nhwc=False, return_indices=True)),
    Case("pool", "unpool", _unpool),
    Case("pool", "unpool-nchw", lambda d: _unpool(d, nhwc=False)),
    Case("pool", "adaptive-6x6", lambda d: _adaptive(d, 2048, 64, 64, 6)),
    Case("pool", "global", lambda d: _adaptive(d, 2048, 32, 32, 1)),
    Case("pool", "adaptive-3x3-nchw", lambda d: _adaptive(d, 512, 60, 60, 3, nhwc=False)),
    # resize
    Case("resize", "bilinear-x2", lambda d: _resize(d, (256, 256))),
    Case("resize", "bilinear-align-nchw",
         lambda d: _resize(d, (256, 256), nhwc=False, align_corners=True)),
    Case("resize", "nearest", lambda d: _resize(d, (256, 256), mode="nearest")),
    # + residual (the Triton backend's add(resize(x), r)): one more int64 offset a lane
    Case("resize", "bilinear-x2-residual",
         lambda d: _resize(d, (256, 256), residual=_t(1, 64, 256, 256, dtype=d))),
    Case("resize", "bilinear-align-nchw-residual",
         lambda d: _resize(d, (256, 256), nhwc=False, align_corners=True,
                           residual=_t(1, 64, 256, 256, dtype=d, nhwc=False))),
    Case("resize", "nearest-residual",
         lambda d: _resize(d, (256, 256), mode="nearest", residual=_t(1, 64, 256, 256, dtype=d))),
    Case("resize", "nearest-exact-out-fp32",
         lambda d: _resize(d, (200, 300), mode="nearest-exact", out_dtype=torch.float32)),
    # preprocess: the dtype is the output's
    Case("preprocess", "bgr-resize", lambda d: _preprocess(d, 3, (512, 512))),
    Case("preprocess", "rgb-nhwc", lambda d: _preprocess(d, 3, None, input_order="rgb",
                                                         layout="nhwc")),
    Case("preprocess", "gray-resize-align",
         lambda d: _preprocess(d, 1, (512, 512), align_corners=True)),
    # overlay: uint8 frames; the mask dtype is part of the case
    Case("overlay", "mask-u8", lambda d: _overlay(d, U8), ("u8",)),
    Case("overlay", "mask-i32-in-place", lambda d: _overlay(d, I32), ("u8",)),
    Case("overlay", "mask-i64-no-skip", lambda d: _overlay(d, I64, skip_class=None), ("u8",)),
)  # fmt: skip

KERNEL_MODULES = (conv2d, qconv2d, conv_transpose2d, head, pool, resize, preprocess, overlay,
                  squeeze_excite, group_norm)  # fmt: skip
# Kernels launched without an autotuner (registered by hand; the autotuned ones are found).
DIRECT_KERNELS = {
    "conv2d._splitk_epilogue_kernel": conv2d._splitk_epilogue_kernel,
    "squeeze_excite._pool_partial_kernel": squeeze_excite._pool_partial_kernel,
    "squeeze_excite._se_fc_kernel": squeeze_excite._se_fc_kernel,
    "group_norm._channel_stats_kernel": group_norm._channel_stats_kernel,
    "group_norm._group_stats_kernel": group_norm._group_stats_kernel,
    "group_norm._apply_kernel": group_norm._apply_kernel,
}


def launched_kernels() -> dict[int, str]:
    """id() of every kernel object a launcher calls → ``module.attribute`` name.

    Every ``triton.autotune`` object in the kernel modules, plus :data:`DIRECT_KERNELS`.
    A launch of anything else fails the capture (a new kernel must be registered).
    """
    from triton.runtime.autotuner import Autotuner

    names = {id(obj): name for name, obj in DIRECT_KERNELS.items()}
    for m in KERNEL_MODULES:
        for attr, obj in vars(m).items():
            if isinstance(obj, Autotuner):
                names[id(obj)] = f"{m.__name__.rsplit('.', 1)[-1]}.{attr}"
    return names


# --------------------------------------------------------------------------- capture


@dataclass
class Launch:
    """One kernel launch as the launcher made it, and the configs it could run with."""

    kernel: str
    fn: Any  # the JITFunction
    args: tuple
    kwargs: dict[str, Any]  # constexprs (and launch options) the launcher passed
    configs: list[Any]  # triton.Config after early pruning; [None]: a plain launch


_LAUNCH_ONLY = ("grid", "warmup")


@contextlib.contextmanager
def _intercepted(launches: list[Launch]) -> Iterator[None]:
    """Record launches instead of running them (Autotuner.run, JITFunction.run)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    names = launched_kernels()

    def name_of(obj: object) -> str:
        name = names.get(id(obj))
        if name is None:
            raise RuntimeError(
                f"a launcher launched {obj!r}, which compile_check does not know: register it "
                f"in DIRECT_KERNELS (or wrap it in triton.autotune in a kernel module)"
            )
        return name

    def autotuned(self, *args, **kwargs):
        jit = self.fn
        while not isinstance(jit, JITFunction):
            jit = jit.fn
        configs = list(self.configs)
        if len(configs) > 1:  # as Autotuner.run: a single config is never pruned
            self.nargs = dict(zip(self.arg_names, args, strict=False))
            try:
                configs = self.prune_configs(kwargs)
            finally:
                self.nargs = None
        kw = {k: v for k, v in kwargs.items() if k not in _LAUNCH_ONLY}
        launches.append(Launch(name_of(self), jit, args, kw, configs))

    def direct(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(name_of(self), self, args, dict(kwargs), [None]))

    saved = Autotuner.run, JITFunction.run
    Autotuner.run, JITFunction.run = autotuned, direct
    try:
        yield
    finally:
        Autotuner.run, JITFunction.run = saved


def capture(case: Case, dtype: str, target: Target) -> list[Launch]:
    """The launches ``case`` makes on ``target`` with ``dtype`` tensors."""
    launches: list[Launch] = []
    with _intercepted(launches), meta_launches(target.gpu):
        case.call(DTYPES[dtype])
    return launches


# --------------------------------------------------------------------------- configs


def config_label(config: Any, kwargs: dict[str, Any]) -> str:
    """``M128 N128 K64 w4 s3``: block sizes without ``BLOCK_``, warps, stages."""
    if config is None:
        blocks = {k: v for k, v in kwargs.items() if k.startswith("BLOCK_") or k == "TILE"}
        warps, stages = kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)
    else:
        blocks, warps, stages = config.kwargs, config.num_warps, config.num_stages
    parts = [f"{k.removeprefix('BLOCK_')}{v}" for k, v in blocks.items()]
    return " ".join([*parts, f"w{warps}", f"s{stages}"])


def hungriest(configs: Sequence[Any]) -> Any:
    """The config with the most tile elements per thread (the product of its block sizes
    over its warps: the register pressure), most stages first among equals (the shared
    memory): the first to spill or overflow. ``None`` (a plain launch) stays ``None``."""
    if any(c is None for c in configs):  # (not `== [None]`: Config.__eq__ rejects None)
        return None

    def score(c: Any) -> tuple[float, int]:
        n = 1
        for v in c.kwargs.values():
            n *= v
        return n / c.num_warps, c.num_stages

    return max(configs, key=score)


def _ci_pairs(case: Case) -> set[tuple[str, str]]:
    """The (dtype, target) pair ``representative`` compiles every code path in: the
    tensor-core path on Hopper. (Every kernel also runs in every dtype on every target —
    the first case to launch it there; the fp32 FMA path of every case on sm_87 was a
    second pair until the suite's time had to shrink: 231 → 169 compiles. CI's
    ``kernels`` set has since left these code paths out too: 176 → 104 compiles.
    ``benchmarks/compile_targets.py`` compiles every config of every case on both.)"""
    return {(case.dtypes[min(1, len(case.dtypes) - 1)], "sm_90")}


# --------------------------------------------------------------------------- compile


@dataclass
class Job:
    """One row of the table: a (kernel, case, config, target, dtype) combination."""

    kernel: str
    case: str
    config: str
    target: str
    dtype: str
    key: str = ""  # identical compiles (same specialisation) share a key
    warps: int = 0
    stages: int = 0


@dataclass
class Result(Job):
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    occupancy: float | None = None  # estimated resident warps / the SM's maximum
    seconds: float = 0.0
    error: str | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class _Compile:
    """What ``triton.compile`` needs, prepared in the parent process."""

    fn: Any
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    arch: int


def _specialise(launch: Launch, config: Any, target: Target) -> _Compile:
    """Bind and specialise the launch's arguments the way ``JITFunction.run`` does."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    if not hasattr(fn, "_pack_args"):
        raise RuntimeError("this Triton has no JITFunction._pack_args (checked: 3.6, 3.9)")
    backend = make_backend(GPUTarget("cuda", target.arch, 32))
    kwargs = dict(launch.kwargs)
    if config is not None:
        kwargs |= config.all_kwargs()
    # JITFunction.run's own additions (3.9 adds fpsan_homomorphic_casts to 3.6's two)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, options
    )
    return _Compile(fn, signature, constexprs, attrs, dict(options.__dict__), target.arch)


def _compile_key(c: _Compile) -> str:
    from triton.compiler import ASTSource

    src = ASTSource(c.fn, c.signature, c.constexprs, c.attrs)
    return f"{src.hash()}-{sorted(c.options.items())}-{c.arch}"


_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _occupancy(target: Target, registers: int, shared: int, warps: int) -> float:
    """Resident warps per SM / the SM's maximum: registers (allocated per warp in units of
    256), shared memory (+1 KB reserved per block) and the block and warp limits."""
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = target.registers_per_sm // max(regs_per_warp * warps, 1)
    by_shared = target.shared_per_sm // (shared + 1024)
    by_warps = target.max_warps_per_sm // warps
    blocks = min(by_regs, by_shared, by_warps, target.max_blocks_per_sm)
    return blocks * warps / target.max_warps_per_sm


def _run_compile(c: _Compile) -> dict[str, Any]:
    """Compile once; registers and spills from ptxas' -v log, shared from the metadata."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's report
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                ASTSource(c.fn, c.signature, c.constexprs, c.attrs),
                target=GPUTarget("cuda", c.arch, 32),
                options=c.options,
            )
    except Exception as e:  # any stage: report it as this combination's error
        first = str(e).strip().splitlines()
        return {
            "error": f"{type(e).__name__}: {first[0] if first else ''}"[:300],
            "seconds": time.perf_counter() - start,
        }
    text = log.getvalue()
    spill = _PTXAS_SPILL.search(text)
    regs = _PTXAS_REGS.search(text)
    if spill is None or regs is None:
        return {"error": f"no ptxas -v report in the compile log: {text[:200]!r}"}
    return {
        "registers": int(regs.group(1)),
        "spill_stores": int(spill.group(1)),
        "spill_loads": int(spill.group(2)),
        "shared": int(kernel.metadata.shared),
        "seconds": time.perf_counter() - start,
    }


def _judge(r: Result, target: Target) -> None:
    if r.error is not None:
        r.problems.append("compile error")
        return
    if r.spill_stores or r.spill_loads:
        r.problems.append("spill")
    if r.registers > MAX_REGISTERS:
        r.problems.append("registers")
    if r.shared > target.gpu.max_shared:
        r.problems.append("shared memory")
    r.occupancy = _occupancy(target, r.registers, r.shared, r.warps)


# --------------------------------------------------------------------------- plan and run


@dataclass
class Plan:
    jobs: list[Job]
    compiles: dict[str, _Compile]  # key → what to compile
    errors: list[Result]  # combinations that failed before compiling (capture, binding)


CONFIG_SETS = ("all", "representative", "kernels")


def plan(
    *,
    configs: str = "all",
    targets: Sequence[str] = tuple(TARGETS),
    kernels: Sequence[str] = (),
    dtypes: Sequence[str] = (),
    cases: Sequence[str] = (),
) -> Plan:
    """Capture every selected case and list the combinations to compile.

    ``configs="all"``: every config each launch can hand the autotuner, for every case,
    dtype and target. ``"representative"``: the hungriest config of each launch
    (:func:`hungriest`), each case in the (dtype, target) pair of :func:`_ci_pairs`
    and in every other pair where it is the first to launch a kernel — so every kernel
    runs in every dtype on every target, and every code path at least once (176
    compiles, ~3.5 CPU-min). ``"kernels"`` (CI): only the first case to launch each
    kernel in each (dtype, target) pair, at the hungriest config (104 compiles); every
    case is still captured — its launcher driven on meta tensors, so a code path that
    no longer launches is an error — but the other code paths are not compiled.
    ``kernels``/``cases``: substrings of the kernel (``conv2d._conv2d_kernel``) or case
    name; ``dtypes``: fp32 / fp16 / bf16 / u8; empty means all.
    """
    if interpreting():
        raise RuntimeError(
            "the compile check needs real JIT functions and the GPU autotune spaces: "
            "run it without TRITON_INTERPRET"
        )
    if configs not in CONFIG_SETS:
        raise ValueError(f"configs must be one of {', '.join(CONFIG_SETS)}, got {configs!r}")
    every = configs == "all"
    code_paths = configs == "representative"
    seen: set[tuple[str, str, str]] = set()  # (kernel, dtype, target) compiled so far
    jobs: list[Job] = []
    compiles: dict[str, _Compile] = {}
    errors: list[Result] = []
    for case in CASES:
        if cases and not any(s in case.name for s in cases):
            continue
        for tname in targets:
            target = TARGETS[tname]
            for dtype in case.dtypes:
                if dtypes and dtype not in dtypes:
                    continue
                try:
                    launches = capture(case, dtype, target)
                except Exception as e:
                    errors.append(
                        Result(case.module, case.name, "-", tname, dtype, error=f"capture: {e}")
                    )
                    continue
                for launch in launches:
                    if kernels and not any(s in launch.kernel for s in kernels):
                        continue
                    triple = (launch.kernel, dtype, tname)
                    if (
                        not every
                        and triple in seen
                        and not (code_paths and (dtype, tname) in _ci_pairs(case))
                    ):
                        continue
                    seen.add(triple)
                    picked = launch.configs if every else [hungriest(launch.configs)]
                    for config in picked:
                        label = config_label(config, launch.kwargs)
                        job = Job(launch.kernel, case.name, label, tname, dtype)
                        try:
                            c = _specialise(launch, config, target)
                        except Exception as e:
                            errors.append(Result(**asdict(job), error=f"specialise: {e}"))
                            continue
                        job.key = _compile_key(c)
                        job.warps, job.stages = c.options["num_warps"], c.options["num_stages"]
                        compiles.setdefault(job.key, c)
                        jobs.append(job)
    return Plan(jobs, compiles, errors)


_WORKER_COMPILES: dict[str, _Compile] = {}


def _init_worker(compiles: dict[str, _Compile]) -> None:
    _WORKER_COMPILES.update(compiles)


def _compile_by_key(key: str) -> tuple[str, dict[str, Any]]:
    return key, _run_compile(_WORKER_COMPILES[key])


def execute(
    p: Plan, jobs: int = 1, progress: Callable[[int, int], None] | None = None
) -> list[Result]:
    """Compile every distinct specialisation of ``p`` (in ``jobs`` processes) and judge
    every combination. Triton's cache goes to a fresh directory, removed afterwards: a
    result cached by an earlier run never stands in for a compile."""
    cache = tempfile.mkdtemp(prefix="segfast-compile-check-")
    saved = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = cache
    out: dict[str, dict[str, Any]] = {}
    # slowest first (the GEMM kernels) so the processes finish together
    order = sorted(p.compiles, key=lambda k: -len(p.compiles[k].fn.src))
    try:
        if jobs <= 1:
            _init_worker(p.compiles)
            for i, key in enumerate(order):
                out[key] = _compile_by_key(key)[1]
                if progress:
                    progress(i + 1, len(order))
        else:
            # fork: the workers inherit the prepared compiles (JIT functions don't pickle)
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(jobs, ctx, _init_worker, (p.compiles,)) as pool:
                for i, (key, res) in enumerate(pool.map(_compile_by_key, order)):
                    out[key] = res
                    if progress:
                        progress(i + 1, len(order))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if saved is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved
    results = list(p.errors)
    for r in results:
        r.problems.append("compile error")
    for job in p.jobs:
        r = Result(**asdict(job), **out[job.key])
        _judge(r, TARGETS[job.target])
        results.append(r)
    return results


# --------------------------------------------------------------------------- report


def summary(results: Sequence[Result]) -> str:
    """``N combinations: E compile errors, S spills, O shared-memory overflows (sm_90, sm_87)``"""
    count = {k: sum(k in r.problems for r in results) for k in ("compile error", "spill")}
    over = sum("shared memory" in r.problems for r in results)
    targets = ", ".join(t for t in TARGETS if any(r.target == t for r in results))
    regs = sum("registers" in r.problems for r in results)
    extra = f", {regs} over {MAX_REGISTERS} registers" if regs else ""
    return (
        f"{len(results)} combinations: {count['compile error']} compile errors, "
        f"{count['spill']} spills, {over} shared-memory overflows{extra} ({targets})"
    )


def table(results: Sequence[Result], only_problems: bool = False) -> str:
    head = ("kernel", "case", "config", "target", "dtype", "regs", "spill B", "shared B",
            "warps", "occ.", "problem")  # fmt: skip
    rows = [head]
    for r in results:
        if only_problems and not r.problems:
            continue
        spill = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        rows.append((
            r.kernel, r.case, r.config, r.target, r.dtype,
            "-" if r.registers is None else str(r.registers), spill,
            "-" if r.shared is None else str(r.shared), str(r.warps or "-"),
            "-" if r.occupancy is None else f"{r.occupancy:.0%}",
            ", ".join(r.problems) + (f": {r.error}" if r.error else ""),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    )


def main(argv: Sequence[str] | None = None, default_configs: str = "all") -> int:
    """Command line: plan, compile, print the table and the summary; 1 if any problem."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", choices=CONFIG_SETS, default=default_configs)
    ap.add_argument("--target", action="append", choices=tuple(TARGETS), default=[])
    ap.add_argument("--kernel", action="append", default=[], help="substring of the kernel name")
    ap.add_argument("--dtype", action="append", choices=tuple(DTYPES), default=[])
    ap.add_argument("--case", action="append", default=[], help="substring of the case name")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--problems-only", action="store_true", help="table rows with problems only")
    ap.add_argument("--json", help="also write every result to this file")
    a = ap.parse_args(argv)
    start = time.perf_counter()
    p = plan(
        configs=a.configs,
        targets=a.target or tuple(TARGETS),
        kernels=a.kernel,
        dtypes=a.dtype,
        cases=a.case,
    )
    print(
        f"{len(p.jobs)} combinations, {len(p.compiles)} distinct compiles, {a.jobs} processes",
        file=sys.stderr,
    )

    def progress(done: int, total: int) -> None:
        if done % 25 == 0 or done == total:
            print(
                f"  compiled {done}/{total}  {time.perf_counter() - start:.0f} s", file=sys.stderr
            )

    results = execute(p, a.jobs, progress)
    results.sort(key=lambda r: (r.kernel, r.case, r.target, r.dtype, r.config))
    print(table(results, a.problems_only))
    print(summary(results))
    print(f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return int(any(r.problems for r in results))


if __name__ == "__main__":
    sys.exit(main())
