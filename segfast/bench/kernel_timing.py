"""The one timing helper of the kernel benchmarks (benchmarks/bench_<op>.py).

``measure_kernel`` runs the callable once outside the timings (autotuning, cuDNN
algorithm search), times it with ``triton.testing.do_bench`` (CUDA events,
median), records ms, GB/s and — when FLOPs are given — TFLOP/s with the device
name in pytest-benchmark's ``extra_info``, then lets pytest-benchmark time
synchronised calls for its own statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def measure_kernel(
    benchmark: Any, fn: Callable[[], object], *, bytes_moved: int, flops: int = 0
) -> float:
    """Benchmark ``fn`` (a CUDA workload); returns the do_bench median in ms."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    ms = float(triton.testing.do_bench(fn, return_mode="median"))
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "ms": ms,
        "gb_per_s": bytes_moved / ms / 1e6,
    }
    if flops:
        info["tflop_per_s"] = flops / ms / 1e9
    benchmark.extra_info.update(info)

    def run() -> None:
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, warmup_rounds=3)
    return ms
