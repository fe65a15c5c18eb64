"""The pytest-benchmark suites run (a tiny case): `pytest benchmarks --benchmark-only`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_model_benchmark_harness_runs(tmp_path):
    out = tmp_path / "bench.json"
    # A clean pytest: under xdist the worker's variables would turn benchmarks off.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "XDIST"))}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "benchmarks" / "bench_models.py"), "-k",
         "smoke", "--benchmark-only", f"--benchmark-json={out}", "-q", "-p", "no:cacheprovider",
         "-p", "no:xdist"],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    names = {b["name"] for b in data["benchmarks"]}
    assert any("eager" in n for n in names)
    assert any("torch" in n for n in names)
    for b in data["benchmarks"]:
        assert b["stats"]["median"] > 0
        assert b["extra_info"]["rel_l2"] < 1e-4
