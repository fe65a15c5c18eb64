"""Device code shared by the convolution kernels' epilogues."""

from __future__ import annotations

import triton
import triton.language as tl

# Below this |y|, tanh is its odd Taylor series (the next term, 62/2835·y⁹, is
# < 1e-12 relative); above it the exp form loses at most ~3 bits to cancellation.
_TANH_SERIES_LIMIT = tl.constexpr(0.0625)


@triton.jit
def activate(y, ACT: tl.constexpr, act_param):
    """The activations of ``kernels._common.ACTIVATIONS`` on fp32 values.

    NaN propagates as in PyTorch (``where`` rather than min/max). tanh is built
    from exp(−2|y|) ∈ (0, 1], which never overflows; near zero, where 1 − exp(−2|y|)
    cancels, the odd Taylor series keeps the result accurate *relative* to y
    (a DCGAN generator's tiny outputs lost 3 digits to that cancellation).
    """
    if ACT == 1:  # relu
        y = tl.where(y < 0.0, 0.0, y)
    elif ACT == 2:  # relu6
        y = tl.where(y < 0.0, 0.0, tl.where(y > 6.0, 6.0, y))
    elif ACT == 3:  # leaky_relu
        y = tl.where(y > 0.0, y, y * act_param)
    elif ACT == 4:  # silu: y·σ(y); exp overflow to inf gives the right limit (−0)
        y = y / (1.0 + tl.exp(-y))
    elif ACT == 5:  # sigmoid
        y = 1.0 / (1.0 + tl.exp(-y))
    elif ACT == 6:  # tanh
        a = tl.abs(y)
        e = tl.exp(-2.0 * a)
        t = (1.0 - e) / (1.0 + e)
        y2 = y * y
        series = y * (1.0 - y2 * (1.0 / 3.0 - y2 * (2.0 / 15.0 - y2 * (17.0 / 315.0))))
        y = tl.where(a < _TANH_SERIES_LIMIT, series, tl.where(y < 0.0, -t, t))
    return y
