"""The standard benchmark suite: every zoo model at its standard size, on every
backend, in the requested precisions; results appended run by run to
``<out>/<device-name>.json`` (so a suite cut short by a time limit keeps what
finished) plus a markdown table beside it.

    python -m segfast.bench.suite --out benchmarks/results                # GPU: the full suite
    python -m segfast.bench.suite --out benchmarks/results --cases cpu    # CPU: the CPU comparison
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from segfast import models
from segfast.bench import report
from segfast.bench.runner import ALL_BACKENDS, BenchResult, Row, parse_backends, run_benchmark

# (name, zoo model, options, (H, W), batch) — the sizes of the issue tracker's suite
STANDARD = [
    ("unet-512", "unet", {"in_channels": 3, "num_classes": 2}, (512, 512), 1),
    ("fcn8s-512", "fcn8s", {}, (512, 512), 1),
    ("fcn8s-1024x2048", "fcn8s", {}, (1024, 2048), 1),
    ("fcn_resnet50-512", "fcn_resnet50", {}, (512, 512), 1),
    ("fcn_resnet50-1024x2048", "fcn_resnet50", {}, (1024, 2048), 1),
    ("pspnet-512", "pspnet", {}, (512, 512), 1),
    ("pspnet-1024x2048", "pspnet", {}, (1024, 2048), 1),
    ("deeplabv3plus_resnet50-512", "deeplabv3plus_resnet50", {}, (512, 512), 1),
    ("deeplabv3plus_resnet50-1024x2048", "deeplabv3plus_resnet50", {}, (1024, 2048), 1),
    ("deeplabv3plus_mobilenetv2-512", "deeplabv3plus_mobilenetv2", {}, (512, 512), 1),
    ("deeplabv3plus_mobilenetv2-1024x2048", "deeplabv3plus_mobilenetv2", {}, (1024, 2048), 1),
    ("segnet-360x480", "segnet", {}, (360, 480), 1),
    ("dcgan-b64", "dcgan_generator", {}, (64, 64), 64),
]
# The CPU comparison of the compiler issue: 2 cores, fp32 and bf16.
CPU = [
    ("unet32-256", "unet", {"base": 32, "in_channels": 3, "num_classes": 2}, (256, 256), 1),
    ("deeplabv3plus_mobilenetv2-512", "deeplabv3plus_mobilenetv2", {}, (512, 512), 1),
]
# Seconds: proves the suite end to end (tests use it).
SMOKE = [("unet-tiny-32", "unet", {"tiny": True}, (32, 32), 1)]
CASES = {"standard": STANDARD, "cpu": CPU, "smoke": SMOKE}


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def load_results(path: Path) -> list[BenchResult]:
    """BenchResults from a suite file (written by this module)."""
    data = json.loads(path.read_text())
    out = []
    for run in data.get("runs", []):
        rows = [Row(**r) for r in run["rows"]]
        fields = {k: v for k, v in run.items() if k not in ("rows", "schema")}
        fields["input_shape"] = tuple(fields["input_shape"])
        out.append(BenchResult(rows=rows, **fields))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--cases", choices=sorted(CASES), default="standard")
    ap.add_argument("--only", default=None, help="comma-separated case names to run")
    ap.add_argument("--precisions", default=None, help="default: fp32,fp16 (GPU), fp32,bf16 (CPU)")
    ap.add_argument("--backends", default=",".join(ALL_BACKENDS))
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precisions = (args.precisions or ("fp32,fp16" if device == "cuda" else "fp32,bf16")).split(",")
    backends = parse_backends(args.backends)
    cases = CASES[args.cases]
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in cases if c[0] in wanted]
    dev_name = torch.cuda.get_device_name() if device == "cuda" else "cpu-" + report_cpu()
    out_dir = Path(args.out)
    path = out_dir / f"{device_slug(dev_name)}.json"
    results = load_results(path) if path.exists() else []
    for cid, name, opts, size, batch in cases:
        torch.manual_seed(0)
        model = models.create(name, **opts).eval()
        spec = models.get_spec(name)
        sets = [spec.make_inputs(model, batch, size) for _ in range(3)]
        for precision in precisions:
            print(f"== {cid} {precision} on {dev_name}", flush=True)
            res = run_benchmark(
                model, sets, name=cid, backends=backends, precision=precision,
                warmup=args.warmup, iters=args.iters, device=device, rounds=args.rounds,
            )  # fmt: skip
            report.print_table(res)
            results = [r for r in results if (r.model, r.precision) != (cid, precision)]
            results.append(res)
            report.write_json(results, path)
            md = path.with_suffix(".md")
            md.write_text(report.markdown_table(results) + "\n")
            sys.stdout.flush()
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


def report_cpu() -> str:
    from segfast.bench.runner import _cpu_name

    return f"{_cpu_name()}-{torch.get_num_threads()}threads"


if __name__ == "__main__":
    raise SystemExit(main())
