"""MobileNetV2's inverted residual block as one CPU kernel (``sf_invres``), fp32 NHWC.

``[1×1 expand + act →] depthwise KH×KW + act → 1×1 project [+ act] [+ residual]``:
at high resolution the expanded tensor is 4–6× the block's input (DeepLab v3+
MobileNetV2 at 512²: 96 channels at 256×256, 25 MB) and three oneDNN calls
write it, read it, write the depthwise output and read that again. The kernel
walks each thread's output rows keeping only the expanded rows the depthwise
taps reach (a ring of ``(KH-1)·dilation + 1`` rows, in L2), so memory sees the
block's input and output only. The 1×1 convolutions are register-tiled
GEMMs over one row of pixels (6–12 pixels × 16–64 channels of accumulators).

The same rows without the projection are the front of a squeeze-excitation block
(EfficientNet's MBConv, MobileNetV3's bneck with SE: ``project=None``): the depthwise
output is written once and its channel means summed from the rows on the way, for
the SE gate (``sf_invres_front``).

Worth it where the expanded tensor is large next to the work: see
:func:`worthwhile` (measured on 2 cores of an AMD EPYC Zen 4, torch 2.13).
Reference: :func:`reference` (the three composite convolutions segfast's graph
runs elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from segfast.backends.cpu.depthwise import ACT_CODES, nhwc_strides
from segfast.backends.cpu.native import Native
from segfast.compiler import ops

# The vectors are one register of lanes (16 with AVX-512, 8 on AVX2; internal channel
# widths are padded to whole vectors of the build, ``Native.lanes``). On 2 cores of an
# AVX2 EPYC (torch 2.13) the 8-lane build against the plan's three calls there (MKL
# GEMM / oneDNN 1×1s, oneDNN or sf_dwconv8 depthwise), single blocks: MobileNetV2's
# 16→96→24 s2 at 256² 1.20×, 24→144→24 at 128² 1.19×, 64→384→64 at 32² 1.20×,
# 32→192→32 at 64² 0.99×; MobileNetV3's 16→64→24 s2 at 256² 1.35×, 24→72→24 at 128²
# 1.06×, 5×5 24→72→40 s2 1.03×; whole networks 1.04× (LR-ASPP MobileNetV3-Large, 4
# blocks) and 1.05× (DeepLab v3+ MobileNetV2, 12 blocks) at 512². The same thresholds
# hold there (the blocks below them measured even).
# Measured on 2 cores of an AMD EPYC Zen 4 (torch 2.13): the kernel wins where
# the expanded tensor is large and narrow (MobileNetV2 at 512²: 1.0–1.9× the
# three oneDNN calls per block; at 1024×2048, where each expanded tensor is a
# fresh 100–200 MB allocation for oneDNN, 4–5×); with 576–960 channels on a
# 32×32 map the two are even, and oneDNN's GEMMs take those. The ring of
# expanded rows should stay in the caches (it is ≤ 1.2 MB at 1024×2048).
MIN_EXPANDED_BYTES = 1 << 20
MAX_EXPANDED_CHANNELS = 384
MAX_RING_BYTES = 4 << 20
MAX_KERNEL_ROWS = 64  # MAX_KH in segfast_cpu.c


@dataclass(frozen=True)
class Conv:
    """One convolution of the block, as ``segfast.conv2d`` takes it."""

    weight: Tensor
    bias: Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    act: str
    act_param: float
    # (bottom, right) where they differ from ``padding`` (then top, left): a zero pad the
    # plan folded in (efficientnet-pytorch's "same" padding before strided depthwise
    # convs pads only the bottom and right)
    pad_end: tuple[int, int] | None = None

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        (t, left), (b, r) = self.padding, self.pad_end or self.padding
        kh, kw = (int(k) for k in self.weight.shape[2:])
        return (
            ops._conv_out_size(h + t + b, kh, self.stride[0], 0, self.dilation[0]),
            ops._conv_out_size(w + left + r, kw, self.stride[1], 0, self.dilation[1]),
        )


def _pad(t: Tensor, *size: int) -> Tensor:
    out = torch.zeros(size, dtype=torch.float32)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out.contiguous()


def _round_up(c: int, lanes: int) -> int:
    return (c + lanes - 1) // lanes * lanes


def worthwhile(c_expanded: int, h: int | None, w: int | None, ring_rows: int) -> bool:
    """Whether the fused block beats three oneDNN calls for an expanded tensor
    of ``c_expanded × h × w`` (fp32) and a depthwise conv reaching ``ring_rows``
    rows. ``None``: a dynamic size, taken as large (the kernel's advantage grows
    with the map) with a ring that stays in the caches."""
    cp = _round_up(c_expanded, 16)
    big = 1 << 30
    return (
        c_expanded <= MAX_EXPANDED_CHANNELS
        and c_expanded * (h or big) * (w or big) * 4 >= MIN_EXPANDED_BYTES
        and (w is None or ring_rows * w * cp * 4 <= MAX_RING_BYTES)
    )


class NativeInvertedResidual:
    """``project(depthwise(expand(x))) (+ residual)``; called as ``block(x, residual)``.

    ``project=None``: the front of a squeeze-excitation block (``sf_invres_front``) —
    ``block(x)`` returns ``(d, pooled)``: ``d = depthwise(expand(x))`` and its mean over
    H×W, ``[N, C]`` fp32, summed from the rows as they are computed (for
    :meth:`~.se_gate.NativeSEGate.from_pooled`), so the expanded tensor is never written
    and the gate does not read ``d`` again."""

    def __init__(
        self,
        native: Native,
        expand: Conv | None,
        depthwise: Conv,
        project: Conv | None,
        residual_after_act: bool = False,
    ) -> None:
        for conv in (expand, depthwise, project):
            if conv is None:
                continue
            if conv.weight.dtype != torch.float32 or (
                conv.bias is not None and conv.bias.dtype != torch.float32
            ):
                raise ValueError(
                    f"the inverted residual kernel is fp32 only, got {conv.weight.dtype}"
                )
            if conv.act not in ACT_CODES:
                raise ValueError(f"activation {conv.act!r} is not in the kernel")
        for conv in (expand, project):
            if conv is None:
                continue
            if tuple(conv.weight.shape[2:]) != (1, 1) or conv.groups != 1:
                raise ValueError("expand and project must be 1×1 convolutions with groups=1")
            if (
                conv.stride != (1, 1)
                or conv.padding != (0, 0)
                or conv.pad_end not in (None, (0, 0))
            ):
                raise ValueError("expand and project must have stride 1 and no padding")
        ce, one, kh, kw = depthwise.weight.shape
        if one != 1 or depthwise.groups != ce:
            raise ValueError(f"not a depthwise weight: {tuple(depthwise.weight.shape)}")
        c_in = int(expand.weight.shape[1]) if expand is not None else int(ce)
        if expand is not None and int(expand.weight.shape[0]) != ce:
            raise ValueError("expand's output channels differ from the depthwise conv's")
        if project is not None and int(project.weight.shape[1]) != ce:
            raise ValueError("project's input channels differ from the depthwise conv's")
        if kh > MAX_KERNEL_ROWS:
            raise ValueError(f"depthwise kernel has {kh} rows, the kernel takes {MAX_KERNEL_ROWS}")
        self.native = native
        self.expand, self.depthwise, self.project = expand, depthwise, project
        self.residual_after_act = bool(residual_after_act)
        self.c_in, self.ce, self.kh, self.kw = c_in, int(ce), int(kh), int(kw)
        # internal widths: whole vectors of this build (16 lanes with AVX-512, 8 on AVX2)
        lanes = native.lanes
        self.cp = _round_up(self.ce, lanes)
        self.co = int(project.weight.shape[0]) if project is not None else self.ce
        self.cop = _round_up(self.co, lanes)

        def bias(conv: Conv, n: int, size: int) -> Tensor:
            b = conv.bias if conv.bias is not None else torch.zeros(n)
            return _pad(b.detach().float(), size)

        if expand is not None:
            self.we = _pad(expand.weight.detach().reshape(self.ce, c_in).t(), c_in, self.cp)
            self.be = bias(expand, self.ce, self.cp)
        wd = depthwise.weight.detach().reshape(self.ce, self.kh, self.kw).permute(1, 2, 0)
        self.wd = _pad(wd, self.kh, self.kw, self.cp)
        self.bd = bias(depthwise, self.ce, self.cp)
        if project is not None:
            wp = project.weight.detach().reshape(self.co, self.ce).t()
            self.wp = _pad(wp, self.ce, self.cop)
            self.bp = bias(project, self.co, self.cop)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        return self.depthwise.out_size(h, w)

    def _composite(self, x: Tensor, residual: Tensor | None) -> Any:
        if self.project is None:
            if residual is not None:
                raise ValueError("the front of an SE block takes no residual")
            d = reference_front(x, self.expand, self.depthwise)
            return d, d.float().mean((2, 3))
        return reference(x, self.expand, self.depthwise, self.project, residual,
                         self.residual_after_act)  # fmt: skip

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Any:
        if x.dtype != torch.float32 or x.dim() != 4 or x.shape[1] != self.c_in:
            return self._composite(x, residual)
        n, _, h, w = x.shape
        ho, wo = self.out_size(h, w)
        if ho < 1 or wo < 1 or x.numel() == 0:
            return self._composite(x, residual)
        x = ops.to_nhwc(x)
        if self.project is None:
            if residual is not None:
                return self._composite(x, residual)  # (raises)
            return self._front(x, n, h, w, ho, wo)
        if residual is not None:
            if residual.dtype != x.dtype or tuple(residual.shape) != (n, self.co, ho, wo):
                return self._composite(x, residual)
            residual = ops.to_nhwc(residual)
        y = torch.empty((n, self.co, ho, wo), dtype=x.dtype, memory_format=torch.channels_last)
        p = self.project
        rc = self.native.invres(
            *self._front_args(x, n, h, w),
            self.wp.data_ptr(), self.bp.data_ptr(), self.co, self.cop,
            ACT_CODES[p.act], p.act_param,
            y.data_ptr(), ho, wo, *nhwc_strides(y),
            0 if residual is None else residual.data_ptr(),
            *(nhwc_strides(residual) if residual is not None else (0, 0, 0)),
            int(self.residual_after_act),
        )  # fmt: skip
        _check(rc, "sf_invres")
        return y

    def _front_args(self, x: Tensor, n: int, h: int, w: int) -> tuple:
        """The arguments sf_invres and sf_invres_front share: input, expand, depthwise."""
        e, d = self.expand, self.depthwise
        return (
            x.data_ptr(), n, h, w, self.c_in, *nhwc_strides(x),
            0 if e is None else self.we.data_ptr(), 0 if e is None else self.be.data_ptr(),
            ACT_CODES[e.act] if e is not None else 0, e.act_param if e is not None else 0.0,
            self.ce, self.cp,
            self.wd.data_ptr(), self.bd.data_ptr(), self.kh, self.kw,
            d.stride[0], d.stride[1], d.padding[0], d.padding[1], d.dilation[0], d.dilation[1],
            ACT_CODES[d.act], d.act_param,
        )  # fmt: skip

    def _front(self, x: Tensor, n: int, h: int, w: int, ho: int, wo: int) -> tuple[Tensor, Tensor]:
        y = torch.empty((n, self.ce, ho, wo), dtype=x.dtype, memory_format=torch.channels_last)
        pooled = torch.empty((n, self.ce), dtype=torch.float32)
        rc = self.native.invres_front(
            *self._front_args(x, n, h, w), y.data_ptr(), ho, wo, *nhwc_strides(y),
            pooled.data_ptr(),
        )  # fmt: skip
        _check(rc, "sf_invres_front")
        return y, pooled


def _check(rc: int, name: str) -> None:
    if rc == -1:
        raise MemoryError(f"{name} could not allocate its per-thread rows")
    if rc != 0:
        raise RuntimeError(f"{name} refused the call (code {rc})")


def _conv(x: Tensor, c: Conv, residual: Tensor | None = None, after: bool = False) -> Tensor:
    padding = c.padding
    if c.pad_end is not None and c.pad_end != c.padding:  # the graph's zero pad, then the conv
        (t, left), (b, r) = c.padding, c.pad_end
        x, padding = torch.nn.functional.pad(x, (left, r, t, b)), (0, 0)
    return ops.conv2d_one_source(x, c.weight, c.bias, c.stride, padding, c.dilation, c.groups,
                                 c.act, c.act_param, residual, after)  # fmt: skip


def reference(
    x: Tensor,
    expand: Conv | None,
    depthwise: Conv,
    project: Conv,
    residual: Tensor | None = None,
    residual_after_act: bool = False,
) -> Tensor:
    """What :class:`NativeInvertedResidual` computes, as three composite convolutions."""
    h = reference_front(x, expand, depthwise)
    return _conv(h, project, residual, residual_after_act)


def reference_front(x: Tensor, expand: Conv | None, depthwise: Conv) -> Tensor:
    """The front of an SE block (``project=None``): ``depthwise(expand(x))``."""
    return _conv(x if expand is None else _conv(x, expand), depthwise)


def conv_spec(
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    act: str,
    act_param: float,
    pad_end: Sequence[int] | None = None,
) -> Conv:
    """``pad_end``: (bottom, right) where they differ from ``padding`` (top, left)."""
    end = None if pad_end is None else (int(pad_end[0]), int(pad_end[1]))
    return Conv(weight, bias, (int(stride[0]), int(stride[1])), (int(padding[0]), int(padding[1])),
                (int(dilation[0]), int(dilation[1])), int(groups), str(act), float(act_param),
                end)  # fmt: skip
