"""Winograd F(4×4, 3×3) convolution for the CPU: segfast's transforms
(``sf_wino_in`` / ``sf_wino_out``) around 36 GEMMs in ``torch.bmm``.

A stride-1, dilation-1, 3×3 convolution computes every 4×4 block of outputs
from the 6×6 input tile around it. Winograd's minimal filtering (Lavin & Gray,
"Fast Algorithms for Convolutional Neural Networks", CVPR 2016) does it with 36
multiplies per (tile, input channel, output channel) instead of 144:

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A          per channel pair, summed over C

Over all tiles and channels the elementwise product is 36 independent GEMMs,
``M[ξ] = V[ξ] · U[ξ]`` with ``V[ξ]: [T, C]`` the transformed input tiles and
``U[ξ]: [C, K]`` the transformed weights (computed once, in float64). A layer
then needs 4× fewer multiply-adds than the direct convolution, which pays where
the layer is bound by arithmetic: 64+ channels in and out. The GEMMs run at
~140 GFLOP/s on 2 Zen 4 cores against ~190 for oneDNN's direct convolution, and
the transforms cost about two passes over input and output, so the measured
gain is 1.3–2.2× on 128–512-channel layers and nothing below 64 channels
(:func:`worthwhile`).

Traffic, in elements (T = N·⌈Ho/4⌉·⌈Wo/4⌉ tiles): read N·H·W·C, write then
read 36·T·C (V), write then read 36·T·K (M), write N·Ho·Wo·K. V and M are
2.25× the input and output: the image is processed in bands of tile rows whose
V and M fit in :data:`BAND_BYTES`, so they stay in the last-level cache.

The two-source prologue (``conv(cat([a, up(b)]))``) writes both sources into
one V, each at its channel offset: the concat is never materialised.

Numerics: fp32 throughout; the transforms add rounding at the 1e-6 relative
level per layer (rel-L2 1–2e-6 against float64 on random layers, against
2–7e-7 for oneDNN's direct convolution), far inside segfast's fp32 contract
(rel-L2 ≤ 1e-4 for a whole network) — checked per model by the tests and by
``segfast.check``. Not used for fp16/bf16, and ``options={"winograd": False}``
turns it off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from segfast.backends.cpu.depthwise import ACT_CODES, epilogue, nhwc_strides
from segfast.backends.cpu.native import Native
from segfast.backends.cpu.onednn import PackedConv2d
from segfast.compiler import ops

# Lavin & Gray's F(4×4, 3×3) with interpolation points 0, ±1, ±2, ∞ (the weight
# transform G; Bᵀ and Aᵀ are spelled out in segfast_cpu.c and in reference()).
G = [
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
]
BT = [
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
]
AT = [
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 2, -2, 0],
    [0, 1, 1, 4, 4, 0],
    [0, 1, -1, 8, -8, 1],
]
TILE = 4
# V + M of one band (bytes). 8 MiB kept both in the 32 MiB L3 of the Zen 4 this
# was tuned on; 2 MiB bands cost 10–40 % (more, smaller GEMMs), whole-image
# transforms up to 2× on 128-channel 128×128 layers (DRAM-bound).
BAND_BYTES = 8 << 20
# Fewer 4×4 output tiles than this in one call and the GEMMs are bound by reading the
# transformed weights (see worthwhile)
MIN_TILES = 16


def tile_count(n: int, h: int, w: int) -> int:
    """The 4×4 output tiles of ``n`` maps of ``h × w`` outputs: the GEMMs' row count."""
    return n * -(-h // TILE) * -(-w // TILE)


def transform_weight(weight: Tensor) -> Tensor:
    """``G g Gᵀ`` for every (out, in) channel pair: [K, C, 3, 3] → [36, C, K] fp32,
    computed in float64 and rounded once."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be [K, C, 3, 3], got {tuple(weight.shape)}")
    g = torch.tensor(G, dtype=torch.float64)
    u = torch.einsum("ai,kcij,bj->abck", g, weight.detach().to("cpu", torch.float64), g)
    k, c = weight.shape[:2]
    return u.reshape(36, c, k).to(torch.float32).contiguous()


def applies(weight: Tensor, stride: Sequence[int], dilation: Sequence[int], groups: int) -> bool:
    """A 3×3, stride-1, dilation-1, dense fp32 convolution."""
    return (
        weight.dtype == torch.float32
        and tuple(weight.shape[2:]) == (3, 3)
        and list(stride) == [1, 1]
        and list(dilation) == [1, 1]
        and groups == 1
    )


def worthwhile(
    c_in: int, c_out: int, h: int, w: int, wide_vectors: bool = True, n: int = 1
) -> bool:
    """Whether F(4×4, 3×3) beats oneDNN's direct convolution for this layer (``n``
    images of ``h × w``).

    Each call reads the transformed weights U, 36·C·K floats — 4× the direct conv's —
    and uses each one once per 4×4 tile. With fewer than :data:`MIN_TILES` tiles in
    the call (N·⌈H/4⌉·⌈W/4⌉) the GEMMs wait on U coming from memory, as it does in a
    network, where every layer's weights are evicted by the next frame: measured with
    the caches flushed before each call (AVX2 EPYC, 2 cores), oneDNN ÷ Winograd is
    0.61 (1280→1280 at 8×8: 20.5 vs 12.4 ms), 0.66 (512 at 8×8), 0.80 (256 at 8×8),
    about 1.0 at 12×12 (9 tiles) for 128–1280 channels, 1.07–1.35 at 16×16 and 1.16
    for 4 images of 256 channels at 8×8 (smp's MAnet has three 1280→1280 3×3 convs at
    1/32 scale: 8×8 at a 256² input, 67 of its 114 ms on Winograd).

    Past that, the transforms are bound by memory and grow with H·W·(C + K), the
    saving with H·W·C·K: what decides is C·K/(C + K). Measured on 2 cores with torch
    2.13 against oneDNN with prepacked weights, blocks of calls alternated
    (benchmarks/bench_cpu_kernels.py):

    - AVX-512 (AMD EPYC Zen 4): 1.3–2.2× from 128 channels in and out, break-even at
      64, slower below: both ≥ 96.
    - AVX2 only (AMD EPYC, no AVX-512), where oneDNN's direct kernels are weaker:
      C·K/(C + K) ≥ 27 wins (64→48 at 64²: 1.13–1.25×; 96→48: 1.21–1.35×; 96→64:
      1.30–1.39×; 192→64 at 32²: 2.0×), ≤ 24 breaks even or loses (96→32 at 128²:
      0.92–1.05×; 48→32: 0.85–0.91×; 16→32: 0.47×). Measured again (2026-12-07)
      after the transforms moved to 8-lane vectors there (they had spilled: 2–4×
      faster now): the same line — 64→48 at 64² 1.14×, 64→64 at 32² 1.42×, 96→32
      and 64→32 at 128² 1.00×, 32→32 at 128² 0.78×, 16→16 at 256² 0.54×.
    """
    if tile_count(n, h, w) < MIN_TILES:
        return False
    if wide_vectors:
        return c_in >= 96 and c_out >= 96
    return c_in * c_out >= 27 * (c_in + c_out)


class WinogradConv2d:
    """``segfast.conv2d`` by F(4×4, 3×3); called as ``conv(x, residual, x2)``."""

    def __init__(
        self,
        native: Native,
        weight: Tensor,
        bias: Tensor | None,
        padding: Sequence[int],
        act: str,
        act_param: float,
        residual_after_act: bool,
        x2_resize: str = "none",
        x2_align_corners: bool = False,
        x2_scale_h: float | None = None,
        x2_scale_w: float | None = None,
        x2_first: bool = False,
        min_tiles: int = MIN_TILES,
    ) -> None:
        if weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
            raise ValueError(f"Winograd convolution is fp32 only, got {weight.dtype}")
        self.native = native
        self.weight, self.bias = weight, bias
        self.k, self.c = int(weight.shape[0]), int(weight.shape[1])
        self.u = transform_weight(weight)  # [36, C, K]
        self.b = None if bias is None else bias.detach().contiguous()
        self.padding = [int(padding[0]), int(padding[1])]
        self.act, self.act_param = act, float(act_param)
        self.residual_after_act = bool(residual_after_act)
        self.x2_spec = (x2_resize, x2_align_corners, x2_scale_h, x2_scale_w, x2_first)
        # calls with fewer output tiles run oneDNN's direct conv (_direct); 0: never
        self.min_tiles = int(min_tiles)
        self._direct_convs: dict[int | None, PackedConv2d] = {}

    def _composite(self, x: Tensor, residual: Tensor | None, x2: Tensor | None) -> Tensor:
        resize, align, sh, sw, first = self.x2_spec
        return ops.conv2d_impl(
            x, self.weight, self.bias, [1, 1], self.padding, [1, 1], 1, self.act,
            self.act_param, residual, self.residual_after_act, x2, resize, align, sh, sw, first,
        )  # fmt: skip

    def _direct(self, x: Tensor, residual: Tensor | None, x2: Tensor | None) -> Tensor:
        """oneDNN's direct convolution (weights packed on first use), for a call with
        fewer than ``min_tiles`` output tiles: an engine with dynamic sizes meets maps
        its plan could not see (see :func:`worthwhile`)."""
        key = None if x2 is None else int(x2.shape[1])
        conv = self._direct_convs.get(key)
        if conv is None:
            conv = PackedConv2d(
                self.weight, self.bias, [1, 1], self.padding, [1, 1], 1, self.act,
                self.act_param, self.residual_after_act, *self.x2_spec, x2_channels=key,
            )  # fmt: skip
            self._direct_convs[key] = conv
        return conv(x, residual, x2)

    def __call__(
        self, x: Tensor, residual: Tensor | None = None, x2: Tensor | None = None
    ) -> Tensor:
        if x.dtype != torch.float32 or x.dim() != 4:
            return self._composite(x, residual, x2)
        x = ops.to_nhwc(x)
        n, _, h, w = x.shape
        ph, pw = self.padding
        ho, wo = h + 2 * ph - 2, w + 2 * pw - 2
        if ho >= 1 and wo >= 1 and tile_count(n, ho, wo) < self.min_tiles:
            return self._direct(x, residual, x2)
        sources = [x]
        if x2 is not None:
            resize, align, sh, sw, first = self.x2_spec
            if x2.dtype != torch.float32:
                return self._composite(x, residual, x2)
            if resize != "none":
                x2 = ops.resize_like_aten(x2, x.shape[-2:], resize, align, sh, sw)
            x2 = ops.to_nhwc(x2)
            if x2.shape[0] != x.shape[0] or x2.shape[2:] != x.shape[2:]:
                return self._composite(x, residual, x2)
            sources = [x2, x] if first else [x, x2]
        if sum(int(s.shape[1]) for s in sources) != self.c:
            return self._composite(x, residual, x2)
        if ho < 1 or wo < 1:
            return self._composite(x, residual, x2)
        in_kernel = self.act in ACT_CODES
        if residual is not None:
            if residual.dtype != torch.float32 or tuple(residual.shape) != (n, self.k, ho, wo):
                return self._composite(x, residual, x2)
            residual = ops.to_nhwc(residual)
        y = torch.empty((n, self.k, ho, wo), dtype=torch.float32, memory_format=torch.channels_last)
        res = residual if in_kernel else None
        self._run(sources, n, h, w, ho, wo, y, res, ACT_CODES.get(self.act, 0))
        if in_kernel:
            return y
        return epilogue(y, residual, self.act, self.act_param, self.residual_after_act)

    def _run(self, sources: list[Tensor], n: int, h: int, w: int, ho: int, wo: int,
             y: Tensor, res: Tensor | None, act: int) -> None:  # fmt: skip
        nth, ntw = -(-ho // TILE), -(-wo // TILE)
        rows = n * nth  # tile rows over the batch
        per_row = 36 * ntw * (self.c + self.k) * 4
        band = max(1, min(rows, BAND_BYTES // per_row))
        t_max = band * ntw
        v_buf = torch.empty(36 * t_max * self.c, dtype=torch.float32)
        m_buf = torch.empty(36 * t_max * self.k, dtype=torch.float32)
        ph, pw = self.padding
        rs = nhwc_strides(res) if res is not None else (0, 0, 0)
        for r0 in range(0, rows, band):
            r1 = min(rows, r0 + band)
            t = (r1 - r0) * ntw
            v = v_buf[: 36 * t * self.c].view(36, t, self.c)
            m = m_buf[: 36 * t * self.k].view(36, t, self.k)
            c_off = 0
            for src in sources:
                cs = int(src.shape[1])
                self.native.wino_in(
                    src.data_ptr(), n, h, w, cs, *nhwc_strides(src), c_off, self.c,
                    ph, pw, nth, ntw, r0, r1, v.data_ptr(),
                )  # fmt: skip
                c_off += cs
            torch.bmm(v, self.u, out=m)
            self.native.wino_out(
                m.data_ptr(), n, ho, wo, self.k, nth, ntw, r0, r1,
                0 if self.b is None else self.b.data_ptr(),
                0 if res is None else res.data_ptr(), *rs, int(self.residual_after_act),
                act, self.act_param, y.data_ptr(), *nhwc_strides(y),
            )  # fmt: skip


def reference(x: Tensor, weight: Tensor, bias: Tensor | None, padding: Sequence[int]) -> Tensor:
    """F(4×4, 3×3) in float64 PyTorch, tile by tile (slow; for tests): the same
    algorithm as the kernels, so a test can tell a transform bug from rounding."""
    n, _c, h, w = x.shape
    ph, pw = padding
    ho, wo = h + 2 * ph - 2, w + 2 * pw - 2
    nth, ntw = -(-ho // TILE), -(-wo // TILE)
    bt = torch.tensor(BT, dtype=torch.float64)
    at = torch.tensor(AT, dtype=torch.float64)
    xp = torch.nn.functional.pad(
        x.double(), (pw, TILE * ntw + 2 - w - pw, ph, TILE * nth + 2 - h - ph)
    )
    d = xp.unfold(2, 6, TILE).unfold(3, 6, TILE)  # [N, C, nth, ntw, 6, 6]
    v = torch.einsum("ai,nctuij,bj->nctuab", bt, d, bt)
    u = torch.einsum("ai,kcij,bj->kcab", torch.tensor(G, dtype=torch.float64),
                     weight.double(), torch.tensor(G, dtype=torch.float64))  # fmt: skip
    m = torch.einsum("nctuab,kcab->nktuab", v, u)
    yt = torch.einsum("pa,nktuab,qb->nktupq", at, m, at)  # [N, K, nth, ntw, 4, 4]
    y = yt.permute(0, 1, 2, 4, 3, 5).reshape(n, -1, TILE * nth, TILE * ntw)[:, :, :ho, :wo]
    if bias is not None:
        y = y + bias.double()[None, :, None, None]
    return y
