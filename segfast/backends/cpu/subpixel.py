"""A 3×3 convolution of a ×2 nearest upsample, computed at the source resolution.

U-Net decoders (segmentation_models_pytorch's, with any encoder) upsample ×2 with
``nearest`` and convolve 3×3 — the upsampled map joined with a skip connection, or
alone in the last block. After a ×2 nearest upsample, output row ``2i+a`` of a 3×3
conv (stride 1, padding 1) reads only two source rows: ``{i-1, i}`` for ``a = 0``
(kernel row 0, then rows 1+2 summed) and ``{i, i+1}`` for ``a = 1`` (rows 0+1, then
row 2); columns alike. So the four output phases ``(a, b)`` are four 2×2 convs of the
*source*: 16 multiply-adds per source pixel and channel pair instead of the 36 the
upsampled conv does — 2.25× fewer. oneDNN runs them as one 2×2 conv with ``4·K``
outputs and padding 1 (phase ``(a, b)``'s output at ``(i, j)`` is that conv's at
``(i+a, j+b)``); the skip source's share is an ordinary 3×3 conv at full resolution;
``sf_subpixel2`` interleaves the phases into the output, adding that share, the bias
and the activation in the same pass. The upsampled tensor is never written.

Exact up to fp32 summation order (two kernel taps are summed in the weight). In
bf16 (an engine built with ``precision="bf16"``) the phase weights are summed in
float64 and rounded once to bf16, oneDNN's convs write bf16, and ``sf_subpixel2`` sums
the phase, the skip's share and the bias in fp32 and rounds once more — two bf16
roundings where the upsampled conv has one. Reference: the conv of the upsampled,
joined input (:func:`segfast.compiler.ops.conv2d_impl`); every call it cannot take
(another dtype, sizes that are not exactly ×2, a residual, empty maps) runs that
oneDNN conv.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from segfast.backends.cpu.depthwise import ACT_CODES, nhwc_strides
from segfast.backends.cpu.native import Native
from segfast.backends.cpu.onednn import DTYPES, PackedConv2d
from segfast.compiler import ops

MODES = ("nearest", "nearest-exact")  # identical at exactly ×2: source row ⌊o/2⌋

# Source rows each phase's 2×2 kernel row reads, as sums of 3×3 kernel rows.
_PHASE_ROWS = (
    torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64),  # a = 0
    torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64),  # a = 1
)


def phase_weights(weight: Tensor) -> Tensor:
    """[K, C, 3, 3] → [4K, C, 2, 2]: phase ``p = 2a + b``'s 2×2 kernel in rows
    ``p·K … p·K + K - 1`` (summed in float64, rounded once to the weight's dtype)."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"need a 3×3 weight [K, C, 3, 3], got {tuple(weight.shape)}")
    w = weight.detach().double()
    phases = [
        torch.einsum("rh,kchw,sw->kcrs", ra, w, rb) for ra in _PHASE_ROWS for rb in _PHASE_ROWS
    ]
    return torch.cat(phases).to(weight.dtype).contiguous()


def applies(
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    mode: str,
    scales: tuple[Any, Any],
    act: str,
) -> bool:
    """Whether a conv of a ×2 nearest upsample can be computed at the source."""
    return (
        weight.dtype in DTYPES
        and tuple(weight.shape[2:]) == (3, 3)
        and [int(s) for s in stride] == [1, 1]
        and [int(p) for p in padding] == [1, 1]
        and [int(d) for d in dilation] == [1, 1]
        and int(groups) == 1
        and mode in MODES
        and all(s is None or float(s) == 2.0 for s in scales)
        and act in ACT_CODES
    )


def preferred(
    up_channels: int,
    skip_channels: int,
    out_channels: int,
    winograd: bool,
    source_pixels: int | None = None,
) -> bool:
    """Whether this beats the conv the plan would run otherwise: oneDNN's direct conv
    from 4 upsampled channels (measured 1.3–2.7× on an AVX2 EPYC, 2 cores: 32→16 at
    256² 4.5 → 2.4 ms, 64+32→32 at 128² 7.0 → 4.6; 8→16 1.26×, 4→16 1.13×, 3→16
    0.91×); Winograd F(4×4, 3×3) — which saves 4× the
    multiply-adds on every channel, against 2.25× on the upsampled ones here — only
    where the skip source is a small share and the layer is narrow (Winograd's
    transforms weigh most): C·K/(C+K) ≤ 64 with at most a ninth of the input channels
    from the skip. Measured there against Winograd: 64→64 at 128² 1.55×, 128→128 at
    64² 1.48×, 96→96 at 64² 1.39×; par or slower with a larger skip share (128+64→64
    at 64²: 0.99–1.01×, 96+96→96: 0.87×) or wider layers (256→256 at 32²: 0.97×,
    256+40→128 at 32²: 0.81×), and on small maps, where Winograd's work stays in cache:
    from a source of at least 32×32 pixels (``source_pixels``; None: dynamic, taken as
    large) — 128→128 from 16² 0.90×, from 8² 0.96×, 64→64 from 16² 0.98×."""
    if up_channels < 4:  # 3→16 at 128²: 0.91× (oneDNN's 2×2 conv of 3 channels); 4→16 1.13×
        return False
    if not winograd:
        return True
    c = up_channels + skip_channels
    return (
        9 * skip_channels <= up_channels
        and c * out_channels <= 64 * (c + out_channels)
        and (source_pixels is None or source_pixels >= 32 * 32)
    )


class NearestUpConv3x3:
    """``act(conv3×3(cat(up2(x2), x)) + bias)`` (or ``x`` first, or no ``x``) with the
    upsampled channels convolved at ``x2``'s resolution. Called as
    ``conv(x, residual, x2)`` like :class:`~.onednn.PackedConv2d`'s two-source form;
    ``x`` is None where the conv reads the upsample alone.

    ``up_channels``: how many of the weight's input channels are the upsampled
    source, ``up_first``: whether they come first. ``mode``/``scales``: the upsample
    (checked by :func:`applies`). ``up_size``/``skip_size``: the example's sizes (for
    oneDNN's packing; None where symbolic).
    """

    def __init__(
        self,
        native: Native,
        weight: Tensor,
        bias: Tensor | None,
        act: str,
        act_param: float,
        up_channels: int,
        up_first: bool,
        mode: str,
        scales: tuple[Any, Any],
        up_size: Sequence[Any] | None = None,
        skip_size: Sequence[Any] | None = None,
    ) -> None:
        if not applies(weight, [1, 1], [1, 1], [1, 1], 1, mode, scales, act):
            raise ValueError(
                "NearestUpConv3x3 takes fp32 or bf16 3×3 convs of a ×2 nearest upsample"
            )
        k, c = int(weight.shape[0]), int(weight.shape[1])
        if not 0 < up_channels <= c:
            raise ValueError(f"up_channels must be in 1..{c}, got {up_channels}")
        self.native = native
        self.dtype = weight.dtype
        self.k, self.cu, self.cs = k, int(up_channels), c - int(up_channels)
        self.act, self.act_param = act, float(act_param)
        self.mode, self.scales, self.up_first = mode, scales, bool(up_first)
        up = slice(0, self.cu) if up_first else slice(self.cs, c)
        skip = slice(self.cu, c) if up_first else slice(0, self.cs)
        self.zconv = PackedConv2d(
            phase_weights(weight[:, up]), None, [1, 1], [1, 1], [1, 1], 1, "none", 0.0, False,
            "none", False, None, None, False, input_size=up_size,
        )  # fmt: skip
        self.skip = None
        if self.cs:
            self.skip = PackedConv2d(
                weight[:, skip].contiguous(), None, [1, 1], [1, 1], [1, 1], 1, "none", 0.0,
                False, "none", False, None, None, False, input_size=skip_size,
            )  # fmt: skip
        self.bias = torch.zeros(k) if bias is None else bias.detach().float().contiguous()
        # what a call it cannot take runs — the conv of the joined, upsampled input —
        # packed on first use (a static engine never needs it)
        self._weight, self._bias, self._skip_size = weight, bias, skip_size
        self._fallback_conv: PackedConv2d | None = None

    @property
    def fallback(self) -> PackedConv2d:
        if self._fallback_conv is None:
            sh, sw = self.scales
            c = self.cu + self.cs
            size = self._skip_size
            full = None if size is None else [size[0], c, *size[2:]]
            self._fallback_conv = PackedConv2d(
                self._weight, self._bias, [1, 1], [1, 1], [1, 1], 1, self.act, self.act_param,
                False, self.mode if self.cs else "none", False, sh, sw, self.up_first,
                input_size=full, x2_channels=self.cu if self.cs else None,
            )  # fmt: skip
        return self._fallback_conv

    def _fallback(self, x: Tensor | None, residual: Tensor | None, x2: Tensor) -> Tensor:
        if self.cs:
            return self.fallback(x, residual, x2)
        sh, sw = self.scales
        h, w = (int(d) for d in x2.shape[2:])
        up = ops.resize_like_aten(x2, (2 * h, 2 * w), self.mode, False, sh, sw)
        return self.fallback(up, residual)

    def __call__(
        self, x: Tensor | None, residual: Tensor | None = None, x2: Tensor | None = None
    ) -> Tensor:
        if x2 is None or (x is None) != (self.cs == 0):
            raise ValueError("NearestUpConv3x3 got sources it was not built for")
        n, c, h, w = x2.shape
        if (
            residual is not None
            or x2.dtype != self.dtype
            or c != self.cu
            or n * h * w == 0
            or (x is not None and (x.dtype != self.dtype
                                   or tuple(x.shape) != (n, self.cs, 2 * h, 2 * w)))
        ):  # fmt: skip
            return self._fallback(x, residual, x2)
        z = ops.to_nhwc(self.zconv(x2))  # [n, 4K, h+1, w+1]
        if self.skip is not None:
            y = ops.to_nhwc(self.skip(x))  # the skip's share; the result goes here too
            s: tuple[Any, ...] = (y.data_ptr(), *nhwc_strides(y))
        else:
            y = torch.empty(
                (n, self.k, 2 * h, 2 * w), dtype=self.dtype, memory_format=torch.channels_last
            )
            s = (None, 0, 0, 0)
        self.native.subpixel2(
            z.data_ptr(), n, h, w, *nhwc_strides(z), self.k, *s, self.bias.data_ptr(),
            ACT_CODES[self.act], self.act_param, y.data_ptr(), *nhwc_strides(y),
            int(self.dtype == torch.bfloat16),
        )  # fmt: skip
        return y
