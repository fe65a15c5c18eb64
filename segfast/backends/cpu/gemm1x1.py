"""1×1 convolutions as one GEMM: on CPUs without AVX-512, and small layers everywhere.

A dense 1×1 conv (stride 1, no padding, one group) over an NHWC map is a matrix
product: the map's pixels as rows, ``[N·H·W, C] @ [C, K]``. On the AVX2 EPYC measured
here, PyTorch's ``addmm`` (MKL's sgemm, the bias added by it) followed by the
activation in place beat oneDNN's prepacked 1×1 convolution on every layer tried,
interleaved in one process (2026-12-07, 2 threads, ms): 16→64 at 128² 1.45 → 0.62,
64→32 at 32² 0.15 → 0.10, 128→64 at 16² 0.15 → 0.09, 64→16 at 64² 0.22 → 0.16, and
1.05–1.2× on larger ones — but repeated runs showed large maps swinging either way
(see :data:`MAX_OUTPUT`), so only outputs up to 2 MB take it. Where AVX-512 is,
oneDNN's kernels are the faster ones but for small layers: each call of its packed conv
costs ~30 µs however little it computes, MKL's GEMM a few (see :func:`small`).

A squeeze-excitation gate in front of the conv (``conv(x · g)``, g per image and
channel) folds into the weight: ``(x · g) @ W = x @ (g ⊙ W)`` — a [C, K] scaling per
image instead of a pass over the whole map (:class:`GatedGemmConv1x1`).

The numbers are the convolution's up to the summation order of the channel reduction
(fp32 rounding). Inputs the GEMM cannot take as they are (not NHWC pixel rows, another
dtype, a residual of another shape) run the composite
(:func:`segfast.compiler.ops.conv2d_impl`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from segfast.compiler import ops


def applies(weight: Tensor, stride: Any, padding: Any, dilation: Any, groups: int) -> bool:
    """A dense fp32 1×1 conv with stride 1 and no padding."""
    return (
        weight.dim() == 4
        and weight.dtype == torch.float32
        and tuple(int(d) for d in weight.shape[2:]) == (1, 1)
        and int(groups) == 1
        and all(int(s) == 1 for s in stride)
        and all(int(p) == 0 for p in padding)
        and all(int(d) == 1 for d in dilation)
    )


# Outputs up to this many floats (2 MB) take the GEMM. Measured on the AVX2 EPYC,
# interleaved, three repeats (oneDNN ÷ GEMM): 64→32 at 32² 1.24–1.31, 128→64 at 16²
# 1.27–1.41, 64→16 at 64² 1.03–1.12, 80→480 at 32² (hardswish) 1.02–1.12, 960→128 at
# 32² 0.95–1.02; larger maps swing either way between runs (16→64 at 128² and 256²:
# 0.80–1.90, 24→72 at 128²: 0.81–0.95), where oneDNN's fused activation saves a pass
# over the output: they stay on oneDNN.
MAX_OUTPUT = 512 * 1024


def worthwhile(n: int | None, h: int | None, w: int | None, k: int) -> bool:
    """Whether a 1×1 conv with ``k`` outputs over ``n`` maps of ``h × w`` (the example's
    static sizes; None where dynamic) takes the GEMM: small outputs only."""
    if n is None or h is None or w is None:
        return False
    return n * h * w * k <= MAX_OUTPUT


# Small layers (any CPU): at most this many multiply-adds and this many weights.
# Measured on 2 cores of an AVX-512 Zen 4 EPYC (2026-12-07, oneDNN's packed conv ÷ this
# GEMM, the activation included): 16→16 at 4² 2.77, 64→64 at 8² 2.03, 40→120 at 16²
# 1.38, 120→40 at 16² 1.57, 96→24 and 24→96 at 32² 1.20, 64→64 at 32² 1.14, 128→128
# at 16² 1.02; past these oneDNN wins or ties: 32→64 at 64² 1.00, 72→24 at 64² 0.89,
# 128→128 at 32² 0.85, 960→160 at 4² 1.05 but 160→960 at 8² 0.91 (wide weights).
SMALL_MACS = 4_500_000
SMALL_WEIGHTS = 16_384


def small(n: int | None, h: int | None, w: int | None, c: int, k: int) -> bool:
    """Whether a 1×1 conv of ``c`` → ``k`` channels over ``n`` maps of ``h × w`` (static
    sizes; None where dynamic) is small enough for the GEMM to beat oneDNN on a CPU with
    AVX-512."""
    if n is None or h is None or w is None:
        return False
    return c * k <= SMALL_WEIGHTS and n * h * w * c * k <= SMALL_MACS


def available() -> bool:
    """PyTorch's CPU GEMM is MKL's (what was measured)."""
    return bool(torch.backends.mkl.is_available())


def _rows(x: Tensor) -> Tensor | None:
    """An NHWC fp32 map as its [N·H·W, C] pixel rows (a view), else None."""
    if x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    if not x.is_contiguous(memory_format=torch.channels_last):
        return None
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class GemmConv1x1:
    """``segfast.conv2d`` of a 1×1 weight as ``addmm``; called as ``conv(x, residual,
    x2)`` (a second source runs the composite)."""

    def __init__(
        self,
        weight: Tensor,  # [K, C, 1, 1]
        bias: Tensor | None,
        act: str,
        act_param: float,
        residual_after_act: bool,
    ) -> None:
        self.weight = weight
        self.k, self.c = int(weight.shape[0]), int(weight.shape[1])
        self.wt = weight.detach().reshape(self.k, self.c).t().contiguous()  # [C, K]
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.act, self.act_param = act, float(act_param)
        self.residual_after_act = bool(residual_after_act)

    def _composite(self, x: Tensor, residual: Tensor | None, x2: Tensor | None) -> Tensor:
        return ops.conv2d_impl(
            x, self.weight, self.bias, [1, 1], [0, 0], [1, 1], 1, self.act, self.act_param,
            residual, self.residual_after_act, x2, "none", False, None, None, False,
        )  # fmt: skip

    def _gemm(self, rows: Tensor, wt: Tensor, n: int, h: int, w: int) -> Tensor:
        """[N·H·W, K] = rows @ wt + bias, as an NCHW-shaped channels_last tensor."""
        if self.bias is None:
            y = torch.mm(rows, wt)
        else:
            y = torch.addmm(self.bias, rows, wt)
        return y.view(n, h, w, self.k).permute(0, 3, 1, 2)

    def _epilogue(self, y: Tensor, residual: Tensor | None) -> Tensor:
        if residual is None:
            return ops.activation_(y, self.act, self.act_param)
        if self.residual_after_act:
            return ops.activation_(y, self.act, self.act_param).add_(residual)
        return ops.activation_(y.add_(residual), self.act, self.act_param)

    def _residual_ok(self, residual: Tensor | None, y_shape: tuple[int, ...]) -> bool:
        return residual is None or (
            residual.dtype == torch.float32 and tuple(residual.shape) == y_shape
        )

    def __call__(
        self, x: Tensor, residual: Tensor | None = None, x2: Tensor | None = None
    ) -> Tensor:
        rows = None if x2 is not None or x.shape[1] != self.c else _rows(ops.to_nhwc(x))
        n, _, h, w = x.shape
        if rows is None or not self._residual_ok(residual, (n, self.k, h, w)):
            return self._composite(x, residual, x2)
        return self._epilogue(self._gemm(rows, self.wt, n, h, w), residual)


class GatedGemmConv1x1(GemmConv1x1):
    """``segfast.conv2d_gated`` of a 1×1 weight: ``conv(x · gate)`` with the gate (one
    value per image and channel) folded into the weight — per image ``x @ (g ⊙ W)`` —
    so the map is read once, by the GEMM. Called as ``conv(x, gate, residual)``."""

    def __call__(  # type: ignore[override]
        self, x: Tensor, gate: Tensor, residual: Tensor | None = None
    ) -> Tensor:
        n, c, h, w = x.shape
        rows = None if c != self.c else _rows(ops.to_nhwc(x))
        g = gate.reshape(gate.shape[0], -1) if gate.dim() == 4 else None
        if (
            rows is None
            or g is None
            or g.dtype != torch.float32
            or g.shape[1] != c
            or g.shape[0] not in (1, n)
            or tuple(gate.shape[2:]) != (1, 1)
            or not self._residual_ok(residual, (n, self.k, h, w))
        ):
            return self._composite(torch.mul(x, gate), residual, None)
        if n == 1 or g.shape[0] == 1:
            wt = self.wt * g[0].unsqueeze(1)  # [C, K] scaled by the gate's rows
            y = self._gemm(rows, wt, n, h, w)
        else:  # one GEMM per image, each with its own scaled weight
            wts = self.wt.unsqueeze(0) * g.unsqueeze(2)  # [N, C, K]
            per = rows.view(n, h * w, c)
            y = torch.bmm(per, wts)
            if self.bias is not None:
                y.add_(self.bias)
            y = y.view(n, h, w, self.k).permute(0, 3, 1, 2)
        return self._epilogue(y, residual)
