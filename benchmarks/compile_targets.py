"""Compile every config of every launched Triton kernel for sm_90 and sm_87, and say which
spill registers or overflow shared memory. No GPU needed (``segfast.kernels.compile_check``).

    python benchmarks/compile_targets.py                      # the full sweep, every config
    python benchmarks/compile_targets.py --target sm_87 --kernel conv2d --dtype fp32
    python benchmarks/compile_targets.py --configs representative --problems-only

Prints one row per (kernel, case, config, target, dtype) — registers, spill bytes
(stores/loads), shared bytes, warps, estimated occupancy — and the summary line
"N combinations: E compile errors, S spills, O shared-memory overflows (sm_90, sm_87)";
exits 1 if any combination has a problem. Every config is compiled (Triton's cache goes
to a fresh temporary directory), in ``--jobs`` processes (default: every CPU).
Run it with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import sys

from segfast.kernels.compile_check import main

if __name__ == "__main__":
    sys.exit(main())
