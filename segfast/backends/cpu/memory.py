"""Large CPU activations reused between frames instead of faulted in afresh.

PyTorch's CPU allocator takes memory from malloc. glibc serves a block above its
mmap threshold — which grows with use but stops at 32 MiB on 64-bit Linux — with
a fresh ``mmap`` and returns it with ``munmap`` on free, so every frame faults
all of its pages in again (and the kernel zeroes them). DeepLab v3+ MobileNetV2
at 1024×2048 has a dozen such tensors (the 21-class logits alone are 176 MB):
1027 ms a frame as is, 778 ms with the blocks kept (2 cores, AMD EPYC Zen 4).
ONNX Runtime and TensorRT keep an arena for the same reason.

Below 32 MiB the pages come back too: glibc trims the heap's free top whenever it
exceeds the trim threshold (twice the largest block freed so far), so a frame's
blocks freed at its end go back to the kernel and the next frame faults them in
again. DeepLab v3+ MobileNetV2 at 512² (largest activation 25 MB, logits 22 MB) on 2
cores of an AVX2 EPYC: 3300–6000 page faults a frame and 174–203 ms as is, 0–270
faults and 124–167 ms with the thresholds (three alternating runs of 20 calls).

:func:`keep_large_allocations` raises glibc's mmap and trim thresholds to 1 GiB,
so freed blocks stay in the heap and the next frame reuses them. It is
process-wide and one-way (memory freed by the engine is kept by the process, as
an arena would), applied when a CPU engine has an activation of ``MIN_BYTES`` (1
MiB) or more, and never with ``SEGFAST_KEEP_MEMORY=0`` or
``options={"keep_memory": False}``.
It helps allocations of the main thread's heap; glibc gives other threads heaps
of at most 64 MiB, whose larger blocks are mmapped whatever the threshold
(measured: 1342 → 1204 ms there, against 791 ms on the main thread).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30
# An engine with an activation this large gets the thresholds (smaller ones fault a
# few pages a frame at most; tiny test models leave the process as it was).
MIN_BYTES = 1 << 20


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None  # not glibc (musl has no mallopt thresholds)
    return libc


def disabled() -> bool:
    return os.environ.get("SEGFAST_KEEP_MEMORY", "1").strip().lower() in ("0", "false", "no", "off")


@functools.cache
def keep_large_allocations() -> tuple[bool, str]:
    """Apply the thresholds once per process: (applied, one line saying what or why not)."""
    if disabled():
        return False, "off (SEGFAST_KEEP_MEMORY=0)"
    libc = _libc()
    if libc is None:
        return False, "not applied: the C library is not glibc"
    if not libc.mallopt(M_MMAP_THRESHOLD, KEEP_BYTES):
        return False, "not applied: glibc refused the mmap threshold"
    libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)
    return True, "glibc keeps freed blocks up to 1 GiB for reuse (process-wide)"
