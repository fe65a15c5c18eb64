"""benchmarks/gpu_suite.sh, checked on the CPU: it parses, its dry run lists the steps
with their budgets and commands and finds what they need, bad arguments are refused,
and a real run without a GPU (``--cpu-ok``) logs every step it skips and writes its
results where ``--out`` says. The GPU run itself happens on a lent GPU machine
(benchmarks/README.md)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"
STEPS = [
    "probe",
    "import",
    "tests-gpu",
    "compile",
    "kernel-bench",
    "models",
    "tests-rest",
    "report",
]
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


def _env(**extra: str) -> dict[str, str]:
    # A clean environment: no pytest/xdist worker variables, no GPU_SUITE_ overrides.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST_", "XDIST", "GPU_SUITE_", "TRITON_INTERPRET"))
    }
    env["PYTHON"] = sys.executable
    if not _segfast_from_this_tree():
        # The script would `pip install -e` this tree into the environment running the
        # tests (its way to make segfast importable on a GPU machine): a second checkout
        # sharing one venv (a git worktree) had the venv's segfast re-pointed at it.
        env["GPU_SUITE_IMPORT"] = "shim"
    env.update(extra)
    return env


def _segfast_from_this_tree() -> bool:
    """The script's own import check: segfast.kernels (mapped from kernels/ by an
    editable install) comes from this tree."""
    import segfast.kernels

    return Path(segfast.kernels.__file__).resolve().is_relative_to(ROOT)


def _run(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BASH, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
        env=_env(**env), timeout=timeout,
    )  # fmt: skip


def _steps(out: str) -> list[tuple[str, int, int]]:
    return [
        (m[1], int(m[2]), int(m[3]))
        for m in re.finditer(r"^step \d+ (\S+) budget=(\d+)s min=(\d+)s", out, re.M)
    ]


def test_script_parses():
    proc = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "set -euo pipefail" in SCRIPT.read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean():
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_help_names_every_step():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: bash benchmarks/gpu_suite.sh")
    for step in STEPS:
        assert re.search(rf"^  {re.escape(step)} ", proc.stdout, re.M), step


def test_dry_run_lists_steps_budgets_and_commands():
    proc = _run("--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    steps = _steps(out)
    assert [s for s, _, _ in steps] == STEPS
    budgets = {s: b for s, b, _ in steps}
    assert all(b >= m for _, b, m in steps)
    assert "total deadline 480s" in out  # 8 minutes, with the report's reserve inside it
    assert budgets["probe"] + budgets["import"] + budgets["tests-gpu"] < 480
    # the commands each step runs
    assert re.search(
        r"pytest .*-m gpu tests/kernels tests/backends --ignore=tests/backends/cpu", out
    )
    assert "-m 'not gpu' tests/kernels tests/backends" in out
    assert "tests/kernels/test_compile_targets.py" in out
    assert re.search(r"--benchmark-only .*benchmarks/bench_conv2d\.py", out)
    models = next(line for line in out.splitlines() if " -m segfast.bench.suite " in line)
    assert "--cases standard --only unet-512," in models
    assert "--precisions fp16,fp32" in models
    assert "--backends eager,eager_cl,torch,triton,inductor" in models
    assert "--time-budget" in models
    # what the steps need, found here (the compile test may or may not exist yet)
    for need in ("module torch", "module triton", "module pytest_benchmark", "module segfast.kernels",
                 "file benchmarks/bench_conv2d.py", "file segfast/bench/readme.py"):  # fmt: skip
        assert re.search(rf"^  ok +{re.escape(need)}$", out, re.M), need
    assert re.search(
        r"^  ok +segfast\.bench\.suite accepts the case list: 34 runs planned", out, re.M
    )
    assert "MISSING" not in out
    assert out.rstrip().endswith("dry run ok: 8 steps")


def test_dry_run_takes_budget_overrides_and_step_selection():
    proc = _run(
        "--dry-run", "--steps", "models", GPU_SUITE_BUDGET_MODELS="100", GPU_SUITE_TOTAL_S="300"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ("models", 100, 60) in _steps(proc.stdout)
    assert "total deadline 300s" in proc.stdout
    assert re.search(r"^step \d+ tests-gpu .*\(not selected by --steps\)", proc.stdout, re.M)
    assert not re.search(r"^step \d+ probe .*not selected", proc.stdout, re.M)


def test_dry_run_reports_what_is_missing():
    proc = _run(
        "--dry-run", GPU_SUITE_KERNEL_FILES="conv2d,no_such_op", GPU_SUITE_CASES="unet-512,nope"
    )
    assert proc.returncode == 1
    assert re.search(r"MISSING +file benchmarks/bench_no_such_op\.py", proc.stdout)
    assert re.search(r"MISSING +segfast\.bench\.suite rejects its arguments:.*'nope'", proc.stdout)
    assert "dry run: something the steps need is missing" in proc.stdout


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--bogus"], {}, "unknown argument: --bogus"),
        (["--out"], {}, "--out needs a directory"),
        (["--steps", "models,nope"], {}, "unknown step 'nope'"),
        (["--dry-run"], {"GPU_SUITE_TOTAL_S": "8m"}, "GPU_SUITE_TOTAL_S must be a whole number"),
        (["--dry-run"], {"GPU_SUITE_BUDGET_KERNEL_BENCH": "-1"}, "GPU_SUITE_BUDGET_KERNEL_BENCH"),
    ],
)
def test_bad_arguments_are_refused(args, env, message):
    proc = _run(*args, **env)
    assert proc.returncode == 64
    assert message in proc.stderr


@pytest.mark.slow
def test_cpu_run_logs_skips_and_writes_results(tmp_path):
    """A real run without a GPU: probe, import and report always run; the kernel
    benchmarks get a 5 s budget under their 20 s minimum and are skipped with the
    reason; the model suite runs its smoke case into --out."""
    out = tmp_path / "results"
    proc = _run(
        "--cpu-ok", "--steps", "kernel-bench,models", "--out", str(out), timeout=600,
        GPU_SUITE_TOTAL_S="400", GPU_SUITE_BUDGET_KERNEL_BENCH="5", GPU_SUITE_CASESET="smoke",
        GPU_SUITE_PRECISIONS="fp32", GPU_SUITE_BACKENDS="eager",
        GPU_SUITE_SUITE_ARGS="--warmup 1 --iters 2 --rounds 1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    log = (out / "logs" / "gpu-suite.log").read_text()
    assert re.search(r"SKIP kernel-bench: \d+s left before the deadline, needs at least 20s "
                     r"\(budget 5s\)", log)  # fmt: skip
    assert "SKIP tests-gpu: not selected" in log
    summary = log[log.index("gpu_suite summary") :]
    rows = dict(re.findall(r"^(\S+) +(ok|skipped|not selected|cut short|failed) ", summary, re.M))
    assert rows == {
        "probe": "ok", "import": "ok", "tests-gpu": "not selected", "compile": "not selected",
        "kernel-bench": "skipped", "models": "ok", "tests-rest": "not selected",
    }  # fmt: skip
    (results,) = out.glob("cpu-*.json")
    assert "unet-tiny-32" in results.read_text()
    assert results.with_suffix(".md").exists()
    assert f"{results.name} (" in summary  # the report lists the files written


def test_suite_runs_only_in_the_order_given_and_within_its_time_budget(tmp_path, capsys):
    """The two options of segfast.bench.suite the script relies on."""
    from segfast.bench import suite

    args = ["--cases", "cpu", "--precisions", "fp32", "--backends", "eager", "--out", str(tmp_path)]
    only = "deeplabv3plus_mobilenetv2-512,unet32-256"
    assert suite.main([*args, "--only", only, "--dry-run"]) == 0
    planned = re.findall(r"^would run (\S+) ", capsys.readouterr().out, re.M)
    assert planned == ["deeplabv3plus_mobilenetv2-512", "unet32-256"]
    with pytest.raises(SystemExit):
        suite.main([*args, "--only", "unet32-256,nope", "--dry-run"])
    assert "unknown case(s) ['nope']" in capsys.readouterr().err
    # a spent budget starts nothing and says what it skipped
    assert suite.main([*args, "--only", only, "--time-budget", "-1"]) == 0
    out = capsys.readouterr().out
    assert (
        "skipped for the time budget (2): deeplabv3plus_mobilenetv2-512/fp32 unet32-256/fp32" in out
    )
    assert not list(tmp_path.glob("*.json"))


def test_suite_skip_done_continues_a_cut_suite(tmp_path, capsys):
    from segfast.bench import suite

    args = ["--cases", "smoke", "--precisions", "fp32", "--backends", "eager", "--out",
            str(tmp_path), "--warmup", "1", "--iters", "2", "--rounds", "1"]  # fmt: skip
    assert suite.main(args) == 0
    (path,) = tmp_path.glob("*.json")
    before = path.read_text()
    capsys.readouterr()
    assert suite.main([*args, "--skip-done"]) == 0
    out = capsys.readouterr().out
    assert f"-- already in {path.name}: unet-tiny-32 fp32" in out
    assert "== unet-tiny-32" not in out
    assert path.read_text() == before


def test_default_cases_exist_and_edge_cases_build():
    """Every case the script runs by default is a case of the suite, and the edge-class
    networks (built from segfast.models.edge, not the zoo) build with their inputs."""
    import torch

    from segfast.bench import suite

    text = SCRIPT.read_text()
    found = re.findall(r"_default_cases\+?=([\w.,-]+)", text)
    default = [c for c in ",".join(found).split(",") if c]
    names = {c[0] for c in suite.STANDARD}
    assert default
    assert not [c for c in default if c not in names]
    for cid, name, opts, _size, batch in suite.STANDARD:
        if name.startswith("edge:"):
            model, sets = suite._build_case(name, opts, batch, (64, 64))
            assert len(sets) == 3
            with torch.no_grad():
                assert model(*sets[0]).shape[-2:] == (64, 64), cid
