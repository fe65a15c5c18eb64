"""Statistics of latency samples (percentiles, summaries, throughput) and byte counts for reports.

Percentiles use linear interpolation between closest ranks (numpy's default,
"type 7"): p50 of [1, 2, 3, 4] is 2.5, p90 of 1..10 is 9.1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 ≤ q ≤ 100) of ``samples``, linearly interpolated."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    s = sorted(samples)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def percentiles(samples: Sequence[float], qs: Iterable[float] = (50, 90, 99)) -> dict[float, float]:
    """{q: percentile} for each q in ``qs``."""
    return {q: percentile(samples, q) for q in qs}


@dataclass(frozen=True)
class Summary:
    """Latency summary in milliseconds (input samples in seconds)."""

    n: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def summarize(samples_s: Sequence[float]) -> Summary:
    """Summarise per-call times given in seconds."""
    if not samples_s:
        raise ValueError("no samples to summarise")
    ms = [1e3 * s for s in samples_s]
    n = len(ms)
    mean = sum(ms) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in ms) / (n - 1)) if n > 1 else 0.0
    return Summary(
        n, mean, std, min(ms), percentile(ms, 50), percentile(ms, 90), percentile(ms, 99), max(ms)
    )


def throughput(batch: int, median_s: float) -> float:
    """Frames per second for ``batch`` frames per call at ``median_s`` seconds per call."""
    if median_s <= 0:
        raise ValueError(f"latency must be positive, got {median_s}")
    return batch / median_s


def format_bytes(n: float) -> str:
    """Human-readable bytes: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
