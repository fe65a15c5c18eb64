"""``segfast bench MODEL``: every backend side by side — latency, throughput,
memory and accuracy against the fp32 eager model, on the same inputs."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from segfast.cli import (
    add_model_arguments,
    build_model,
    parse_size,
    usable_device,
    writable_output,
)


def input_channels(model: nn.Module) -> int:
    """The model's input channels: its ``in_channels`` or its first conv's."""
    n = getattr(model, "in_channels", None)
    if isinstance(n, int):
        return n
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            return int(m.in_channels)
    raise ValueError("cannot tell the model's input channels; pass --in-channels")


def make_input_sets(
    model: nn.Module, ref: str, batch: int, size: tuple[int, int] | None, n: int, seed: int = 0
) -> list[tuple[torch.Tensor, ...]]:
    """``n`` different random input sets (rotated while timing)."""
    from segfast.models import find_spec

    g = torch.manual_seed(seed)
    spec = find_spec(ref)
    sets = []
    for _ in range(n):
        if spec is not None:
            sets.append(spec.make_inputs(model, batch, size))
        else:
            h, w = size or (512, 512)
            sets.append((torch.randn(batch, input_channels(model), h, w, generator=g),))
    return sets


def run(args: argparse.Namespace) -> int:
    import segfast
    from segfast.bench import report
    from segfast.bench.runner import parse_backends, run_benchmark

    for flag, value, least in (
        ("--batch", args.batch, 1),
        ("--iters", args.iters, 1),
        ("--warmup", args.warmup, 0),
        ("--input-sets", args.input_sets, 1),
        ("--rounds", args.rounds, 1),
    ):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    usable_device(args.device)
    writable_output(args.json, "--json")
    writable_output(args.plot, "--plot")
    backends = parse_backends(args.backends)
    model = build_model(args)
    if args.weights:
        segfast.load_weights(model, args.weights)
    sets = make_input_sets(model, args.model, args.batch, args.size, args.input_sets)
    precisions = [p.strip() for p in str(args.precision).split(",") if p.strip()]
    calibration = None
    if "int8" in precisions:
        if args.calibration:
            from segfast.commands._calibration import load_calibration

            calibration = load_calibration(args.calibration)
        else:
            calibration = make_input_sets(model, args.model, args.batch, args.size, 8, seed=1)
            print(
                "note: int8 calibrates on 8 random input sets (timing only — give --calibration "
                "with real inputs for meaningful int8 accuracy)"
            )
    if args.int8_float is not None and "int8" not in precisions:
        raise ValueError("--int8-float is for int8 rows: add int8 to --precision")
    if calibration is not None and args.int8_float is not None:
        calibration = segfast.Calibration(calibration, float_precision=args.int8_float)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    progress: Any = None
    tasks: dict[str, Any] = {}
    if not args.no_progress:
        try:
            from rich.progress import Progress

            progress = Progress(transient=True)
        except ImportError:
            progress = None

    def on_progress(backend: str, done: int, total: int) -> None:
        if progress is None:
            return
        if backend not in tasks:
            tasks[backend] = progress.add_task(f"{backend:12s}", total=total)
        progress.update(tasks[backend], completed=done)

    if progress is not None:
        progress.start()
    try:
        res = run_benchmark(
            model, sets, name=args.model, backends=backends, precision=precisions,
            output=args.output, warmup=args.warmup, iters=args.iters, device=device,
            on_progress=on_progress, rounds=args.rounds, calibration=calibration,
        )  # fmt: skip
    finally:
        if progress is not None:
            progress.stop()
    report.print_table(res)
    if args.json:
        print(f"wrote {report.write_json(res, args.json)}")
    if args.plot:
        print(f"wrote {report.plot(res, args.plot)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="latency, throughput, memory and accuracy of every backend, side by side"
    )
    add_model_arguments(p)
    p.add_argument("--weights", default=None, help="safetensors / PyTorch state dict to load")
    p.add_argument("--size", type=parse_size, default=None, help="input H×W (default: standard)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--precision", "--precisions", dest="precision", default="fp32",
        help="fp32, fp16, bf16, int8, or several comma-separated (e.g. fp32,bf16,int8): one "
        "row per backend and precision, timed together",
    )  # fmt: skip
    p.add_argument(
        "--calibration", default=None,
        help="int8: a .npy file (N×C×H×W) or a folder of .npy inputs to calibrate on; without "
        "it, int8 calibrates on extra random inputs (speed only: not a real calibration)",
    )  # fmt: skip
    p.add_argument(
        "--int8-float", choices=("fp32", "fp16", "bf16"), default=None,
        help="int8: what the layers int8 does not cover run in (fallback layers, head, "
        "resizes); default fp16 on a GPU (triton, torch), fp32 elsewhere",
    )  # fmt: skip
    p.add_argument("--output", choices=("logits", "probs", "mask"), default="logits")
    p.add_argument(
        "--backends", default="all",
        help="comma-separated among eager,eager_cl,torch,triton,inductor,onnxruntime,tensorrt, or all",
    )  # fmt: skip
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--input-sets", type=int, default=3, help="input sets rotated while timing")
    p.add_argument(
        "--rounds", type=int, default=5,
        help="the timed calls are split into this many rounds, backends interleaved",
    )  # fmt: skip
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--json", default=None, help="write every raw sample and the environment")
    p.add_argument("--plot", default=None, help="write latency distributions (PNG)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
