"""Overlap-tile inference on a 10000×10000 uint8 image: time and peak memory.

Run: ``pytest benchmarks/bench_tiling.py --benchmark-only`` (CPU; ~1 min on 2 cores).

The image is a 100 MB ``np.memmap`` on disk; a float32 copy of it would be 400 MB. The
model is deliberately tiny (two 3×3 convs, 1 → 4 → 2 channels, the fused ``torch``
backend) so the numbers show the tiling machinery, not the network. One round per
case (a run takes seconds). ``extra_info`` records, besides the device:

- ``peak_anon_mb``: the process's peak anonymous resident memory during the run, above
  what it held before (RSS − file-backed/shared pages, sampled every 2 ms by a thread
  reading psutil; freed heap memory is returned to the OS with glibc's ``malloc_trim``
  before each case): what tiling allocates (tiles, engine activations, the Gaussian
  band) plus the allocator's own slack.
  The input memmap's pages are file-backed and not in it; the mask is written into a
  memmap too, so this is the working set alone.
- ``peak_rss_mb``: the same for the whole RSS (file pages of the image included, as the
  OS keeps them resident).
- ``numpy_peak_mb``: tracemalloc's peak (numpy allocations; torch's are not traced).
- ``float_copy_mb``: 400, for comparison; ``mpix_per_s``: image megapixels per second.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn

import segfast
from segfast.runtime.tiling import segment_large

psutil = pytest.importorskip("psutil")

SIZE = 10_000


def _release_freed_memory() -> None:
    """Give memory freed by earlier cases back to the OS (glibc ``malloc_trim``), so a
    case's peak is its own and not hidden in a heap an earlier case grew."""
    gc.collect()
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class _PeakSampler:
    """Peak RSS and anonymous RSS (RSS − shared) above the starting values."""

    def __init__(self, interval: float = 0.002) -> None:
        self.proc = psutil.Process()
        self.interval = interval
        self.peak_rss = self.peak_anon = 0

    def _now(self) -> tuple[int, int]:
        m = self.proc.memory_info()
        return m.rss, m.rss - m.shared

    def __enter__(self) -> _PeakSampler:
        self.base_rss, self.base_anon = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, anon = self._now()
            self.peak_rss = max(self.peak_rss, rss - self.base_rss)
            self.peak_anon = max(self.peak_anon, anon - self.base_anon)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def big_image(tmp_path_factory) -> np.memmap:
    path = tmp_path_factory.mktemp("tiling") / "image.u8"
    mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(SIZE, SIZE))
    rng = np.random.default_rng(0)
    for r in range(0, SIZE, 1000):  # written in bands: no 100 MB temporary
        mm[r : r + 1000] = rng.integers(0, 256, (1000, SIZE), dtype=np.uint8)
    mm.flush()
    del mm
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(SIZE, SIZE))


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)
    ).eval()
    return segfast.compile(
        net, input_shape=(4, 1, 512, 512), backend="torch", output="logits", dynamic=["batch"]
    )


@pytest.mark.parametrize("blend", ["gaussian", "crop"])
def test_tiling_10000x10000(benchmark, big_image, engine, blend, tmp_path):
    out = np.memmap(tmp_path / "mask.u8", dtype=np.uint8, mode="w+", shape=(SIZE, SIZE))
    sampler = _PeakSampler()

    def run() -> None:
        _release_freed_memory()
        tracemalloc.start()
        with sampler:
            segment_large(engine, big_image, overlap=64, blend=blend, batch=4, out=out)
        benchmark.extra_info["numpy_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        {
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "image": f"{SIZE}x{SIZE} uint8 memmap",
            "tile": 512,
            "overlap": 64,
            "batch": 4,
            "float_copy_mb": SIZE * SIZE * 4 / 2**20,
            "peak_anon_mb": sampler.peak_anon / 2**20,
            "peak_rss_mb": sampler.peak_rss / 2**20,
            "mpix_per_s": SIZE * SIZE / 1e6 / seconds,
        }
    )
    print(
        f"\n{blend}: {seconds:.1f} s, {SIZE * SIZE / 1e6 / seconds:.1f} Mpix/s, peak anon "
        f"+{sampler.peak_anon / 2**20:.0f} MiB, peak RSS +{sampler.peak_rss / 2**20:.0f} MiB "
        f"(float32 copy of the image: {SIZE * SIZE * 4 / 2**20:.0f} MiB)"
    )
    # The whole mask was written (the model's two classes both occur on noise).
    assert set(np.unique(out[::97, ::89])) == {0, 1}
