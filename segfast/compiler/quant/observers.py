"""Calibration observers: the range an activation tensor is quantized to.

Activations are quantized per tensor and symmetrically (int8, zero point 0):
``q = clamp(round(x / s), -127, 127)`` with ``s = amax / 127``. An observer sees
every calibration batch of one tensor and picks ``amax``:

- ``max``: the largest ``|x|`` seen — no clipping, the coarsest steps;
- ``percentile`` (99.99 % by default): the ``|x|`` below which that share of the
  values lie, read off a histogram — a few outliers no longer stretch the steps;
- ``entropy``: TensorRT's KL-divergence calibration — the clipping threshold whose
  128-level quantized histogram is closest (KL) to the 2048-bin one.

Histograms are of ``|x|`` over ``[0, range]`` with 2048 bins; when a batch exceeds
the range, the range grows to cover it and the counts so far are re-binned into
it (each old bin's count goes to the new bin holding its centre).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch

from segfast.errors import InputError

METHODS = ("max", "percentile", "entropy")
BINS = 2048
LEVELS = 128  # int8 symmetric: 0..127 for |x|


class Observer(ABC):
    """Collects one tensor's values over the calibration set; :meth:`amax` is the range."""

    def __init__(self) -> None:
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().float().abs()
        if not bool(torch.isfinite(a).all()):
            raise InputError(
                "calibration produced NaN or Inf in an activation: the calibration inputs "
                "hold non-finite values, or the model overflows on them"
            )
        self.batches += 1
        self._update(a)

    @abstractmethod
    def _update(self, a: torch.Tensor) -> None: ...

    @abstractmethod
    def amax(self) -> float:
        """The |x| mapped to ±127."""


class MaxObserver(Observer):
    def __init__(self) -> None:
        super().__init__()
        self.max = 0.0

    def _update(self, a: torch.Tensor) -> None:
        if a.numel():
            self.max = max(self.max, float(a.max()))

    def amax(self) -> float:
        return self.max


class _Histogram(Observer):
    """A 2048-bin histogram of |x| whose range grows with the data."""

    def __init__(self) -> None:
        super().__init__()
        self.hist = np.zeros(BINS, dtype=np.float64)
        self.range = 0.0

    def _update(self, a: torch.Tensor) -> None:
        if not a.numel():
            return
        top = float(a.max())
        if top > self.range:
            self._grow(top)
        if self.range == 0.0:  # all zeros so far
            self.hist[0] += a.numel()
            return
        counts = torch.histc(a.reshape(-1), bins=BINS, min=0.0, max=self.range)
        self.hist += counts.double().numpy()

    def _grow(self, top: float) -> None:
        new = top if self.range == 0.0 else max(top, 2.0 * self.range)
        if self.range > 0.0 and self.hist.any():
            width = self.range / BINS
            centres = (np.arange(BINS) + 0.5) * width
            idx = np.minimum((centres / (new / BINS)).astype(np.int64), BINS - 1)
            moved = np.zeros(BINS, dtype=np.float64)
            np.add.at(moved, idx, self.hist)
            self.hist = moved
        elif self.range == 0.0 and self.hist.any():
            zeros = self.hist.sum()
            self.hist = np.zeros(BINS, dtype=np.float64)
            self.hist[0] = zeros
        self.range = new

    @property
    def width(self) -> float:
        return self.range / BINS


class PercentileObserver(_Histogram):
    def __init__(self, percentile: float = 99.99) -> None:
        super().__init__()
        if not 0.0 < percentile <= 100.0:
            raise InputError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile

    def amax(self) -> float:
        total = self.hist.sum()
        if total == 0 or self.range == 0.0:
            return 0.0
        cdf = np.cumsum(self.hist) / total
        i = int(np.searchsorted(cdf, self.percentile / 100.0))
        return min(self.range, (i + 1) * self.width)


class EntropyObserver(_Histogram):
    def amax(self) -> float:
        hist = self.hist
        if hist.sum() == 0 or self.range == 0.0:
            return 0.0
        nonzero = np.nonzero(hist)[0]
        last = int(nonzero[-1]) + 1
        if last <= LEVELS:  # every value already fits 128 levels of this width
            return last * self.width
        best_i, best_kl = last, math.inf
        for i in range(LEVELS, last + 1):
            p = hist[:i].copy()
            p[i - 1] += hist[i:].sum()  # outliers clipped into the last bin
            kl = _kl_after_quantizing(p, hist[:i])
            if kl < best_kl:
                best_kl, best_i = kl, i
        return best_i * self.width


def _kl_after_quantizing(p: np.ndarray, unclipped: np.ndarray) -> float:
    """KL(P ‖ Q) where Q is ``unclipped`` merged into 128 levels and spread back evenly
    over the bins that were non-zero (TensorRT's entropy calibration)."""
    i = p.size
    edges = np.linspace(0, i, LEVELS + 1).astype(np.int64)
    starts = edges[:-1][edges[1:] > edges[:-1]]
    level_sum = np.add.reduceat(unclipped, starts)
    level_used = np.add.reduceat((unclipped > 0).astype(np.float64), starts)
    # which level each bin belongs to, then each used bin gets its level's mean
    level_of = np.searchsorted(starts, np.arange(i), side="right") - 1
    share = np.divide(level_sum, level_used, out=np.zeros_like(level_sum), where=level_used > 0)
    q = np.where(unclipped > 0, share[level_of], 0.0)
    ps, qs = p.sum(), q.sum()
    if ps == 0 or qs == 0:
        return math.inf
    p = p / ps
    q = q / qs
    mask = p > 0
    if np.any(q[mask] == 0):
        return math.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def make_observer(method: str, percentile: float = 99.99) -> Observer:
    if method == "max":
        return MaxObserver()
    if method == "percentile":
        return PercentileObserver(percentile)
    if method == "entropy":
        return EntropyObserver()
    raise InputError(f"calibration method must be one of {METHODS}, got {method!r}")
