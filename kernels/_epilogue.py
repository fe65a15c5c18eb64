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
        y = _tanh(y)
    elif ACT == 7:  # hardswish: y·relu6(y + 3)/6
        r = y + 3.0
        y = y * tl.where(r < 0.0, 0.0, tl.where(r > 6.0, 6.0, r)) * (1.0 / 6.0)
    elif ACT == 8:  # hardsigmoid: relu6(y + 3)/6
        r = y + 3.0
        y = tl.where(r < 0.0, 0.0, tl.where(r > 6.0, 6.0, r)) * (1.0 / 6.0)
    elif ACT == 9:  # gelu: act_param 0 exact (erf), else the tanh approximation
        exact = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        approx = 0.5 * y * (1.0 + _tanh(inner))
        y = tl.where(act_param != 0.0, approx, exact)
    return y


@triton.jit
def _tanh(y):
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    y2 = y * y
    series = y * (1.0 - y2 * (1.0 / 3.0 - y2 * (2.0 / 15.0 - y2 * (17.0 / 315.0))))
    return tl.where(a < _TANH_SERIES_LIMIT, series, tl.where(y < 0.0, -t, t))
