"""Every launched Triton kernel compiles for sm_90 and sm_87 without spills or
shared-memory overflow (``segfast.kernels.compile_check``; no GPU needed).

The check runs in a child process: this suite runs Triton's interpreter
(TRITON_INTERPRET=1, set by conftest), under which the kernels are interpreted functions
with a single interpreter config, while the check compiles the real JIT functions over
the GPU autotune spaces. CI compiles the hungriest config of every kernel in every dtype
on every target (``--configs kernels``, 104 compiles) and drives every case's launcher;
``python benchmarks/compile_targets.py --configs representative`` also compiles every
code path in fp16 on sm_90 (176 compiles: ~100 CPU-s more than CI's 20 minutes had room
for), and without ``--configs`` it sweeps every config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from segfast.kernels import compile_check as cc
from segfast.kernels._common import GpuTarget, check_device, meta_launches


def test_meta_tensors_need_meta_launches():
    """The compile check's way in is closed to users: a meta tensor is refused outside
    ``meta_launches`` with the usual device error."""
    x = torch.empty(1, device="meta")
    with pytest.raises(RuntimeError, match="got a meta tensor"):
        check_device(x)
    with meta_launches(GpuTarget((9, 0), 132, 232448)):
        assert check_device(x) == torch.device("meta")
    with pytest.raises(RuntimeError, match="got a meta tensor"):
        check_device(x)


def test_hungriest_config_has_the_most_elements_per_thread():
    import triton

    def c(m, n, w, s):
        return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)

    configs = [c(64, 64, 4, 4), c(128, 128, 8, 3), c(128, 128, 8, 4), c(128, 64, 8, 4)]
    assert cc.hungriest(configs) is configs[2]  # 2048 per warp, then 4 stages over 3
    assert cc.hungriest([None]) is None  # a plain launch


@pytest.mark.slow
def test_every_kernel_compiles_for_the_targets(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    report = tmp_path / "compile_check.json"
    cmd = [sys.executable, "-m", "segfast.kernels.compile_check", "--configs", "kernels",
           "--jobs", "2", "--problems-only", "--json", str(report)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert report.exists(), f"the compile check did not finish:\n{proc.stderr[-3000:]}"
    results = json.loads(report.read_text())

    # coverage: every launched kernel, on every target, in every dtype its cases take
    kernels = set(cc.launched_kernels().values())
    assert {r["kernel"] for r in results} == kernels
    for kernel in kernels:
        rows = [r for r in results if r["kernel"] == kernel]
        assert {r["target"] for r in rows} == set(cc.TARGETS), kernel
        dtypes = {
            d for case in cc.CASES for d in case.dtypes if case.module == kernel.split(".")[0]
        }
        assert {r["dtype"] for r in rows} == dtypes, kernel
    # every case was driven through its launcher: a capture error is a row with problems
    assert not [r for r in results if (r.get("error") or "").startswith("capture:")]

    bad = [r for r in results if r["problems"]]
    assert not bad, f"{len(bad)} combinations fail on the targets:\n{proc.stdout}"
    assert proc.returncode == 0, proc.stderr[-3000:]
