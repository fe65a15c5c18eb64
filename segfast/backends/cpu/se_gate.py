"""Squeeze-excitation gates on segfast's CPU kernel (``sf_se_gate``), fp32 or bf16 maps.

``segfast.se_gate`` is the mean over H×W, a 1×1 conv + activation and usually a second
one: a few thousand multiply-adds after one read of the map. As PyTorch ops it is five
or six dispatches (mean, linear, activation, linear, sigmoid), 36–58 µs a gate in
fp32 and 117–171 µs in bf16 on 2 cores of a Zen 4 — an EfficientNet-B0 has 16 of them.
The kernel reads the map once in parallel and does the rest on one thread, in fp32.

Reference: :func:`segfast.compiler.ops.se_gate_impl` (what the graph means).
"""

from __future__ import annotations

import torch
from torch import Tensor

from segfast.backends.cpu.depthwise import ACT_CODES
from segfast.backends.cpu.native import Native
from segfast.compiler import ops


def applies(act1: str, w2: Tensor | None, act2: str) -> bool:
    """Whether the kernel computes these activations (the rest stays composite)."""
    return act1 in ACT_CODES and (w2 is None or act2 in ACT_CODES)


def _flat(w: Tensor) -> Tensor:
    return w.detach().float().reshape(w.shape[0], -1).contiguous()


class NativeSEGate:
    """``segfast.se_gate`` with constant weights; called as ``gate(p)`` → [N, C2, 1, 1]
    in ``p``'s dtype. Maps that are not channels-contiguous NHWC with evenly spaced
    pixels, empty maps and dtypes other than fp32/bf16 run the composite."""

    def __init__(
        self,
        native: Native,
        w1: Tensor,
        b1: Tensor | None,
        act1: str,
        act1_param: float,
        w2: Tensor | None,
        b2: Tensor | None,
        act2: str,
        act2_param: float,
    ) -> None:
        if not applies(act1, w2, act2):
            raise ValueError(f"sf_se_gate has no activation {act1!r}/{act2!r}")
        self.native = native
        self.raw = (w1, b1, act1, float(act1_param), w2, b2, act2, float(act2_param))
        self.w1 = _flat(w1)
        self.c = int(self.w1.shape[1])
        self.c1 = int(self.w1.shape[0])
        self.b1 = None if b1 is None else b1.detach().float().contiguous()
        self.act1 = (ACT_CODES[act1], float(act1_param))
        w2_flat = None if w2 is None else _flat(w2)
        if w2_flat is not None and int(w2_flat.shape[1]) != self.c1:
            raise ValueError(
                f"second conv takes {w2_flat.shape[1]} channels, first gives {self.c1}"
            )
        self.c2 = self.c1 if w2_flat is None else int(w2_flat.shape[0])
        self.w2t = None if w2_flat is None else w2_flat.t().contiguous()  # [C1, C2]
        self.b2 = None if b2 is None else b2.detach().float().contiguous()
        self.act2 = (ACT_CODES[act2], float(act2_param)) if w2 is not None else (0, 0.0)

    def __call__(self, p: Tensor) -> Tensor:
        n, c, h, w = p.shape
        sn, sc, sh, sw = p.stride()
        if (
            p.dtype not in (torch.float32, torch.bfloat16)
            or p.device.type != "cpu"
            or c != self.c
            or n * h * w == 0
            or (sc != 1 and c > 1)
            or (h > 1 and sh != w * sw)
        ):
            return ops.se_gate_impl(p, *self.raw)
        pooled = torch.empty(n * c, dtype=torch.float32)
        return self._run(p.data_ptr(), int(p.dtype == torch.bfloat16), n, h * w, sw, sn, pooled,
                         p.dtype)  # fmt: skip

    def _run(self, x: int | None, bf16: int, n: int, hw: int, xs: int, xsn: int, pooled: Tensor,
             dtype: torch.dtype) -> Tensor:  # fmt: skip
        """sf_se_gate over ``n`` images: of the map at ``x`` or, when None, of the means
        already in ``pooled``."""
        hidden = torch.empty(self.c1, dtype=torch.float32)
        out = torch.empty((n, self.c2), dtype=torch.float32)
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        self.native.se_gate(
            x, bf16, n, hw, self.c, xs, xsn,
            self.w1.data_ptr(), ptr(self.b1), self.c1, *self.act1,
            ptr(self.w2t), ptr(self.b2), self.c2, *self.act2,
            pooled.data_ptr(), hidden.data_ptr(), out.data_ptr(),
        )  # fmt: skip
        return out.to(dtype).view(n, self.c2, 1, 1)

    def from_pooled(self, pooled: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """The gate from the map's mean over H×W, ``[N, C]`` fp32, already taken (by
        :class:`~.invres.NativeInvertedResidual`'s SE-block front) → [N, C2, 1, 1]."""
        n, c = pooled.shape
        if c != self.c or pooled.dtype != torch.float32 or not pooled.is_contiguous():
            raise ValueError(f"need [N, {self.c}] contiguous fp32 means, got "
                             f"{tuple(pooled.shape)} {pooled.dtype}")  # fmt: skip
        if n == 0:
            return torch.empty((0, self.c2, 1, 1), dtype=dtype)
        return self._run(None, 0, n, 1, c, c, pooled, dtype)
