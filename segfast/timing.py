"""Timers: host wall-clock with device synchronisation, and CUDA events.

CPU work is timed with ``time.perf_counter``; CUDA work with events recorded on
the current stream around the call (device time) and the host clock around the
same call after a synchronise (host latency). Warm-up runs are excluded and the
inputs are rotated over several sets so caches don't flatter the numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Samples:
    host_s: list[float] = field(default_factory=list)  # per call, seconds
    device_s: list[float] = field(default_factory=list)  # CUDA event time, seconds (GPU only)


def sync(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device (no-op elsewhere), so a timed span is its own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[..., object],
    input_sets: Sequence[tuple[torch.Tensor, ...]],
    *,
    warmup: int = 3,
    iters: int = 10,
    device: torch.device | str = "cpu",
    on_iteration: Callable[[int], None] | None = None,
) -> Samples:
    """Time ``fn(*inputs)`` ``iters`` times, rotating over ``input_sets``."""
    device = torch.device(device)
    if not input_sets:
        raise ValueError("measure needs at least one input set")
    for i in range(warmup):
        fn(*input_sets[i % len(input_sets)])
    sync(device)
    samples = Samples()
    for i in range(iters):
        inputs = input_sets[i % len(input_sets)]
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            fn(*inputs)
            end.record()
            end.synchronize()
            samples.host_s.append(time.perf_counter() - t0)
            samples.device_s.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(*inputs)
            samples.host_s.append(time.perf_counter() - t0)
        if on_iteration is not None:
            on_iteration(i)
    return samples


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        raise ValueError("median of no samples")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
