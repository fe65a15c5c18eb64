"""The standard benchmark suite: every zoo model at its standard size, on every
backend, in the requested precisions; results appended run by run to
``<out>/<device-name>.json`` (so a suite cut short by a time limit keeps what
finished) plus a markdown table beside it.

    python -m segfast.bench.suite --out benchmarks/results                # GPU: the full suite
    python -m segfast.bench.suite --out benchmarks/results --cases cpu    # CPU: the CPU comparison

``--only`` runs the named cases in the order given (most wanted first);
``--time-budget S`` starts no run predicted to end past S seconds and lists what it
skipped; ``--skip-done`` leaves out the runs already in the results file, so a later
call continues a suite cut short (benchmarks/gpu_suite.sh uses all three);
``--dry-run`` prints the plan and exits.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
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
    # edge-class networks (segfast.models.edge: torchvision's / smp's layouts, outside
    # the zoo): hardswish, SiLU, squeeze-excitation, GroupNorm
    ("lraspp_mobilenetv3-512", "edge:lraspp_mobilenet_v3_large", {"num_classes": 21},
     (512, 512), 1),
    ("deeplabv3_mobilenetv3-512", "edge:deeplabv3_mobilenet_v3_large", {"num_classes": 21},
     (512, 512), 1),
    ("unet_efficientnet_b0-512", "edge:unet_efficientnet_b0", {"num_classes": 1}, (512, 512), 1),
    ("fpn_groupnorm-512", "edge:fpn_groupnorm", {"num_classes": 1}, (512, 512), 1),
]  # fmt: skip
# The CPU comparison of the compiler issue: 2 cores, fp32 and bf16.
CPU = [
    ("unet32-256", "unet", {"base": 32, "in_channels": 3, "num_classes": 2}, (256, 256), 1),
    ("deeplabv3plus_mobilenetv2-512", "deeplabv3plus_mobilenetv2", {}, (512, 512), 1),
]
# Seconds: proves the suite end to end (tests use it).
SMOKE = [("unet-tiny-32", "unet", {"tiny": True}, (32, 32), 1)]
CASES = {"standard": STANDARD, "cpu": CPU, "smoke": SMOKE}


def _build_case(
    name: str, opts: dict, batch: int, size: tuple[int, int]
) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, ...]]]:
    """A case's model (eval mode) and three input sets: a zoo name, or ``edge:<factory>``
    of :mod:`segfast.models.edge` (RGB input, standard-normal pixels)."""
    if name.startswith("edge:"):
        from segfast.models import edge

        model = getattr(edge, name.removeprefix("edge:"))(**opts).eval()
        return model, [(torch.randn(batch, 3, *size),) for _ in range(3)]
    model = models.create(name, **opts).eval()
    spec = models.get_spec(name)
    return model, [spec.make_inputs(model, batch, size) for _ in range(3)]


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
    ap.add_argument("--only", default=None, help="comma-separated case names to run, in this order")
    ap.add_argument("--precisions", default=None, help="default: fp32,fp16 (GPU), fp32,bf16 (CPU)")
    ap.add_argument("--backends", default=",".join(ALL_BACKENDS))
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument(
        "--time-budget", type=float, default=None, metavar="S",
        help="start no run predicted to end after S seconds; the skipped runs are listed",
    )  # fmt: skip
    ap.add_argument(
        "--skip-done", action="store_true",
        help="leave out the (case, precision) runs already in the results file",
    )  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="print the runs planned and exit")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precisions = (args.precisions or ("fp32,fp16" if device == "cuda" else "fp32,bf16")).split(",")
    backends = parse_backends(args.backends)
    cases = CASES[args.cases]
    if args.only:
        by_id = {c[0]: c for c in cases}
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in by_id]
        if unknown:
            ap.error(f"--only: unknown case(s) {unknown}; {args.cases} has {', '.join(by_id)}")
        cases = [by_id[w] for w in dict.fromkeys(wanted)]
    if args.dry_run:
        for cid, name, _, size, batch in cases:
            for precision in precisions:
                print(f"would run {cid} ({name}, {batch}×{size[0]}×{size[1]}) {precision} "
                      f"on {','.join(backends)}")  # fmt: skip
        return 0
    start = time.monotonic()
    took: dict[str, float] = {}  # case id -> seconds of its last (case, precision) run
    skipped: list[str] = []
    dev_name = torch.cuda.get_device_name() if device == "cuda" else "cpu-" + report_cpu()
    out_dir = Path(args.out)
    path = out_dir / f"{device_slug(dev_name)}.json"
    results = load_results(path) if path.exists() else []
    done = {(r.model, r.precision) for r in results} if args.skip_done else set()

    def over_budget(cid: str, what: str) -> bool:
        if args.time_budget is None:
            return False
        left = args.time_budget - (time.monotonic() - start)
        guess = _predict(cid, took)
        if guess <= left:
            return False
        print(
            f"-- skipped {what}: {left:.0f} s of the time budget left, predicted {guess:.0f} s",
            flush=True,
        )
        return True

    for cid, name, opts, size, batch in cases:
        todo = [p for p in precisions if (cid, p) not in done]
        if len(todo) < len(precisions):
            print(
                f"-- already in {path.name}: {cid} {','.join(sorted(set(precisions) - set(todo)))}"
            )
        if not todo:
            continue
        if over_budget(cid, f"{cid} ({','.join(todo)})"):
            skipped += [f"{cid}/{p}" for p in todo]
            continue
        torch.manual_seed(0)
        model, sets = _build_case(name, opts, batch, size)
        for precision in todo:
            if cid in took and over_budget(cid, f"{cid} {precision}"):
                skipped.append(f"{cid}/{precision}")
                continue
            print(f"== {cid} {precision} on {dev_name}", flush=True)
            t0 = time.monotonic()
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
            took[cid] = time.monotonic() - t0
            sys.stdout.flush()
    if skipped:
        print(f"skipped for the time budget ({len(skipped)}): {' '.join(skipped)}")
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


def _predict(cid: str, took: dict[str, float]) -> float:
    """Seconds a run of case ``cid`` is expected to take: its other precision's run,
    else the longest run so far (0 before the first run, which always starts)."""
    if cid in took:
        return took[cid]
    return max(took.values(), default=0.0)


def report_cpu() -> str:
    from segfast.bench.runner import _cpu_name

    return f"{_cpu_name()}-{torch.get_num_threads()}threads"


if __name__ == "__main__":
    raise SystemExit(main())
