"""segfast's CPU kernels against what the ``torch`` backend would run without
them (oneDNN with prepacked weights, PyTorch's resize), on the layers of the
CPU comparison (U-Net base 32 at 256², DeepLab v3+ MobileNetV2 at 512²).

    pytest benchmarks/bench_cpu_kernels.py --benchmark-only
    pytest benchmarks/bench_cpu_kernels.py --benchmark-only -k winograd

Each case records ms (median), GFLOP/s or GB/s and the CPU name in extra_info.
Compare ``segfast`` and ``onednn`` rows of the same case within one run: a
shared machine's speed drifts between runs. Needs the kernels
(``segfast info`` says whether they load here).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from segfast.backends.cpu import narrow, native
from segfast.backends.cpu.depthwise import NativeDepthwiseConv2d
from segfast.backends.cpu.onednn import PackedConv2d
from segfast.backends.cpu.resize import NativeResize
from segfast.backends.cpu.resize_dw import ResizeDepthwiseConv2d
from segfast.backends.cpu.winograd import WinogradConv2d
from segfast.bench.runner import _cpu_name

LIB = native.load()
pytestmark = pytest.mark.skipif(LIB is None, reason=f"CPU kernels: {native.status()[1]}")


def _nhwc(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).contiguous(memory_format=torch.channels_last)


def _packed(w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor, pad: int, dil: int = 1,
            groups: int = 1, act: str = "relu") -> PackedConv2d:  # fmt: skip
    return PackedConv2d(w, b, [1, 1], [pad, pad], [dil, dil], groups, act, 0.0, False, "none",
                        False, None, None, False, input_size=tuple(x.shape))  # fmt: skip


def _measure(benchmark: Any, fn: Callable[[], object], *, flops: int = 0, nbytes: int = 0) -> None:
    with torch.inference_mode():
        for _ in range(3):
            fn()
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    ms = 1e3 * sorted(times)[len(times) // 2]
    info: dict[str, Any] = {"device": _cpu_name(), "threads": torch.get_num_threads(), "ms": ms}
    if flops:
        info["gflop_per_s"] = flops / ms / 1e6
    if nbytes:
        info["gb_per_s"] = nbytes / ms / 1e6
    benchmark.extra_info.update(info)
    benchmark.pedantic(fn, rounds=10, warmup_rounds=2)


# (C_in, C_out, H) of U-Net base 32's 3×3 layers that take Winograd
WINOGRAD = {"128c-64": (128, 128, 64), "256c-32": (256, 256, 32), "512-256c-32": (512, 256, 32)}


@pytest.mark.parametrize("impl", ["segfast", "onednn"])
@pytest.mark.parametrize("case", list(WINOGRAD))
def test_winograd(benchmark, case, impl):
    c, k, h = WINOGRAD[case]
    x, w, b = _nhwc(1, c, h, h), torch.randn(k, c, 3, 3) / (9 * c) ** 0.5, torch.randn(k)
    conv = WinogradConv2d(LIB, w, b, (1, 1), "relu", 0.0, False) if impl == "segfast" else (
        _packed(w, b, x, 1))  # fmt: skip
    _measure(benchmark, lambda: conv(x), flops=2 * h * h * c * k * 9)  # direct-conv FLOPs


@pytest.mark.parametrize("impl", ["segfast", "onednn"])
@pytest.mark.parametrize("rate", [12, 18])
def test_atrous_depthwise(benchmark, rate, impl):
    """DeepLab v3+'s ASPP: 1280 channels at 32×32. Bytes: read + write the map."""
    x, w = _nhwc(1, 1280, 32, 32), torch.randn(1280, 1, 3, 3)
    if impl == "segfast":
        conv = NativeDepthwiseConv2d(LIB, w, None, [1, 1], [rate] * 2, [rate] * 2, "none", 0.0,
                                     False)  # fmt: skip
    else:
        conv = _packed(w, None, x, rate, rate, 1280, "none")
    _measure(benchmark, lambda: conv(x), nbytes=2 * x.numel() * 4)


# (C, H, kernel, stride, rate) of MobileNetV3 / EfficientNet / DeepLab v3+ depthwise layers
DEPTHWISE8 = {
    "960c-32-k5": (960, 32, 5, 1, 1),  # MobileNetV3-Large's last stage (LR-ASPP at 512²)
    "672c-32-k5": (672, 32, 5, 1, 1),
    "1152c-8-k5": (1152, 8, 5, 1, 1),  # EfficientNet-B0's last stage at 256²
    "576c-16-k3": (576, 16, 3, 1, 1),
    "1280c-32-r6": (1280, 32, 3, 1, 6),  # DeepLab v3+'s ASPP at 512²
    "1280c-32-r12": (1280, 32, 3, 1, 12),
    "72c-128-k3": (72, 128, 3, 1, 1),  # oneDNN's case (the plan keeps it there)
    "64c-256-k3s2": (64, 256, 3, 2, 1),  # oneDNN's case
}


@pytest.mark.parametrize("impl", ["segfast8", "onednn"])
@pytest.mark.parametrize("case", list(DEPTHWISE8))
def test_depthwise8(benchmark, case, impl):
    """sf_dwconv8 (8-lane, row-tiled: the depthwise kernel for CPUs without AVX-512)
    against oneDNN (zero-padded first where the padding is above its inline limit, as
    the plan does). Bytes: read the input + write the output once."""
    c, h, k, s, rate = DEPTHWISE8[case]
    x, w, b = _nhwc(1, c, h, h), torch.randn(c, 1, k, k), torch.randn(c)
    pad = rate * (k - 1) // 2
    if impl == "segfast8":
        conv = NativeDepthwiseConv2d(LIB, w, b, [s, s], [pad] * 2, [rate] * 2, "hardswish", 0.0,
                                     False, vec8=True)  # fmt: skip
    else:
        conv = PackedConv2d(w, b, [s, s], [pad] * 2, [rate] * 2, c, "hardswish", 0.0, False,
                            "none", False, None, None, False, input_size=tuple(x.shape))  # fmt: skip
    ho = (h + 2 * pad - rate * (k - 1) - 1) // s + 1
    _measure(benchmark, lambda: conv(x), nbytes=(x.numel() + c * ho * ho) * 4)


# (C_in, C_out, kernel, H) of few-class heads (smp's 3×3 head on 16 channels, 1×1 heads)
FEW = {"16-1-k3-256": (16, 1, 3, 256), "16-3-k3-256": (16, 3, 3, 256),
       "32-1-k3-512": (32, 1, 3, 512), "32-1-k1-256": (32, 1, 1, 256)}  # fmt: skip


@pytest.mark.parametrize("impl", ["segfast", "onednn"])
@pytest.mark.parametrize("case", list(FEW))
def test_few_output_conv(benchmark, case, impl):
    """sf_conv_few (vectors over input channels, a horizontal sum per 8 outputs) against
    oneDNN, which computes a whole vector of output channels however few there are."""
    c, k, ks, h = FEW[case]
    x, w, b = _nhwc(1, c, h, h), torch.randn(k, c, ks, ks), torch.randn(k)
    if impl == "segfast":
        conv = narrow.FewOutputConv2d(LIB, w, b, [ks // 2] * 2, "none", 0.0)
    else:
        conv = _packed(w, b, x, ks // 2, act="none")
    _measure(benchmark, lambda: conv(x), flops=2 * h * h * c * k * ks * ks)


@pytest.mark.parametrize("impl", ["segfast", "torch"])
def test_upsample_depthwise(benchmark, impl):
    """DeepLab v3+'s decoder: 256 channels 32² → 128², then a 3×3 depthwise conv."""
    a, w = _nhwc(1, 256, 32, 32), torch.randn(256, 1, 3, 3)
    fused = ResizeDepthwiseConv2d(LIB, w, None, [1, 1], [1, 1], [1, 1], "none", 0.0, False,
                                  (None, None))  # fmt: skip
    dw = _packed(w, None, _nhwc(1, 256, 128, 128), 1, 1, 256, "none")

    def run() -> torch.Tensor:
        if impl == "segfast":
            return fused(a, (128, 128))
        return dw(F.interpolate(a, size=(128, 128), mode="bilinear"))

    _measure(benchmark, run, nbytes=(a.numel() + 256 * 128 * 128) * 4)


@pytest.mark.parametrize("impl", ["segfast", "torch"])
@pytest.mark.parametrize("out", ["logits", "mask"])
def test_logits_resize(benchmark, out, impl):
    """21-class logits 128² → 512² (DeepLab v3+ at 512²), NCHW logits or an argmax mask."""
    x = _nhwc(1, 21, 128, 128)
    rz = NativeResize(LIB, False, (None, None))

    def run() -> torch.Tensor:
        if impl == "segfast":
            return (
                rz.logits(x, (512, 512)) if out == "logits" else rz.argmax(x, (512, 512), "uint8")
            )
        y = F.interpolate(x, size=(512, 512), mode="bilinear")
        return y if out == "logits" else y.argmax(1).to(torch.uint8)

    written = 21 * 512 * 512 * 4 if out == "logits" else 512 * 512
    _measure(benchmark, run, nbytes=x.numel() * 4 + written)


# (C_in, expansion, C_out, H, stride) of DeepLab v3+ MobileNetV2's blocks at 512²
# (and the first at 1024×2048, where each unfused expanded tensor is a fresh 100 MB+)
INVRES = {
    "b2-16-96-24-256s2": (16, 6, 24, 256, 256, 2),
    "b3-24-144-24-128": (24, 6, 24, 128, 128, 1),
    "b5-32-192-32-64": (32, 6, 32, 64, 64, 1),
    "b2-at-1024x2048": (16, 6, 24, 512, 1024, 2),
}


@pytest.mark.parametrize("impl", ["segfast", "onednn"])
@pytest.mark.parametrize("case", list(INVRES))
def test_inverted_residual(benchmark, case, impl):
    """expand 1×1 + relu6 → depthwise 3×3 + relu6 → project 1×1 (+ residual at stride 1):
    one sf_invres call against three prepacked oneDNN convolutions."""
    from segfast.backends.cpu.invres import NativeInvertedResidual, conv_spec

    c_in, t, c_out, h, w, s = INVRES[case]
    ce = c_in * t
    x = _nhwc(1, c_in, h, w)
    e = conv_spec(torch.randn(ce, c_in, 1, 1) / c_in**0.5, torch.randn(ce), [1, 1], [0, 0],
                  [1, 1], 1, "relu6", 0.0)  # fmt: skip
    d = conv_spec(torch.randn(ce, 1, 3, 3) / 3, torch.randn(ce), [s, s], [1, 1], [1, 1], ce,
                  "relu6", 0.0)  # fmt: skip
    p = conv_spec(torch.randn(c_out, ce, 1, 1) / ce**0.5, torch.randn(c_out), [1, 1], [0, 0],
                  [1, 1], 1, "none", 0.0)  # fmt: skip
    ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
    r = _nhwc(1, c_out, ho, wo) if s == 1 and c_in == c_out else None
    flops = 2 * (h * w * c_in * ce + ho * wo * ce * 9 + ho * wo * ce * c_out)
    if impl == "segfast":
        block = NativeInvertedResidual(LIB, e, d, p, False)
        _measure(benchmark, lambda: block(x, r), flops=flops)
        return

    def packed(c: Any, size: tuple[int, ...]) -> PackedConv2d:
        return PackedConv2d(c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups, c.act,
                            0.0, False, "none", False, None, None, False, input_size=size)  # fmt: skip

    pe, pd = packed(e, (1, c_in, h, w)), packed(d, (1, ce, h, w))
    pp = packed(p, (1, ce, ho, wo))
    _measure(benchmark, lambda: pp(pd(pe(x)), r), flops=flops)


@pytest.mark.parametrize("impl", ["segfast", "onednn"])
@pytest.mark.parametrize("classes", [19, 21])
def test_class_head(benchmark, classes, impl):
    """DeepLab v3+'s head: 3×3, 256 → 19 (Cityscapes) or 21 (VOC) classes at 128×128
    (oneDNN computes 32 output channels; the kernel 24). FLOPs: the real layer's."""
    from segfast.backends.cpu.narrow import NarrowConv2d

    x = _nhwc(1, 256, 128, 128)
    w, b = torch.randn(classes, 256, 3, 3) / 48, torch.randn(classes)
    if impl == "segfast":
        conv = NarrowConv2d(LIB, w, b, [1, 1], [1, 1], "none", 0.0)
        _measure(benchmark, lambda: conv(x), flops=2 * 128 * 128 * 256 * 9 * classes)
        return
    packed = _packed(w, b, x, 1, act="none")
    _measure(benchmark, lambda: packed(x), flops=2 * 128 * 128 * 256 * 9 * classes)


# (C_up, C_skip, C_out, source H) of smp U-Net decoder convs: a ×2 nearest upsample
# [joined with a skip] → 3×3 (EfficientNet-B0 encoder at 256²; resnet34's at 512²)
SUBPIXEL = {"64+32-32-64": (64, 32, 32, 64), "32-16-128": (32, 0, 16, 128),
            "64+64-32-128": (64, 64, 32, 128), "128-64-64": (128, 0, 128, 64)}  # fmt: skip


@pytest.mark.parametrize("impl", ["segfast", "onednn", "winograd"])
@pytest.mark.parametrize("case", list(SUBPIXEL))
def test_nearest_upsample_conv(benchmark, case, impl):
    """The conv of a ×2 nearest upsample at the source resolution (four 2×2 phase convs
    on oneDNN + sf_subpixel2) against the upsampled conv on oneDNN (the two-source
    form: the skip joined, the upsample on the fly) and on Winograd. FLOPs: the
    upsampled conv's."""
    from segfast.backends.cpu.subpixel import NearestUpConv3x3

    cu, cs, k, h = SUBPIXEL[case]
    low, w, b = (
        _nhwc(1, cu, h, h),
        torch.randn(k, cu + cs, 3, 3) / (9 * (cu + cs)) ** 0.5,
        torch.randn(k),
    )
    skip = _nhwc(1, cs, 2 * h, 2 * h) if cs else None
    full = (1, cu + cs, 2 * h, 2 * h)
    mode, scales = ("nearest", 2.0) if cs else ("none", None)
    if impl == "segfast":
        conv = NearestUpConv3x3(LIB, w, b, "relu", 0.0, cu, True, "nearest", (2.0, 2.0),
                                up_size=tuple(low.shape), skip_size=None if skip is None else tuple(skip.shape))  # fmt: skip
        fn = lambda: conv(skip, None, low)  # noqa: E731
    else:
        if impl == "onednn":
            conv = PackedConv2d(w, b, [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, False, mode, False,
                                scales, scales, True, input_size=full,
                                x2_channels=cu if cs else None)  # fmt: skip
        else:
            conv = WinogradConv2d(LIB, w, b, (1, 1), "relu", 0.0, False, mode, False, scales,
                                  scales, True)  # fmt: skip
        if cs:
            fn = lambda: conv(skip, None, low)  # noqa: E731
        else:
            fn = lambda: conv(F.interpolate(low, scale_factor=2.0, mode="nearest"))  # noqa: E731
    _measure(benchmark, fn, flops=2 * 4 * h * h * (cu + cs) * k * 9)
