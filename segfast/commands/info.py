"""``segfast info [MODEL]``: versions and backends; a model's parameters, GFLOPs
and activation memory for one input size; with ``--gpu NAME``, the roofline of its
fused plan on that device (per op: FLOPs, DRAM bytes, time floor; fused vs unfused)."""

from __future__ import annotations

import argparse

from segfast.cli import add_model_arguments, build_model, parse_size


def run(args: argparse.Namespace) -> int:
    import platform

    import torch

    import segfast

    if args.model is None:
        print(f"segfast {segfast.__version__}")
        print(f"python {platform.python_version()}, torch {torch.__version__}")
        print(f"cuda available: {torch.cuda.is_available()}")
        try:
            from segfast.backends import availability
        except ImportError:
            return 0
        print("backends:")
        for name, (ok, why) in availability().items():
            print(f"  {name:12s} {'available' if ok else 'unavailable'}: {why}")
        from segfast.backends.cpu import native

        ok, why = native.status()
        print(f"CPU kernels (torch backend on the CPU): {'loaded' if ok else 'not used'}: {why}")
        return 0

    from segfast.bench import roofline
    from segfast.bench.modelstats import model_stats
    from segfast.models import find_spec
    from segfast.stats import format_bytes

    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    device = None
    if args.gpu is not None:  # an unknown name fails before anything is built
        device = roofline.get_device(args.gpu)
    model = build_model(args)
    spec = find_spec(args.model)
    size = args.size or (spec.standard_size if spec else (512, 512))
    batch = args.batch or (spec.standard_batch if spec else 1)
    if spec is not None:
        inputs = spec.make_inputs(model, batch, size)
    else:
        inputs = (torch.randn(batch, int(getattr(model, "in_channels", 3)), *size),)
    st = model_stats(model, inputs)
    shapes = ", ".join("×".join(str(d) for d in t.shape) for t in inputs)
    print(f"model:       {args.model}")
    print(f"input:       {shapes}")
    print(f"parameters:  {st.params:,} ({format_bytes(st.param_bytes)})")
    print(f"GFLOPs:      {st.gflops:.2f} per forward (2 FLOPs per multiply-add)")
    print(
        f"activations: {format_bytes(st.activation_bytes_written)} written, "
        f"{format_bytes(st.activation_bytes_peak)} peak live (fp32, analysed on {st.device})"
    )
    if device is not None:
        roof = roofline.analyse(
            model, inputs, precision=args.precision, output=args.output,
            backend=roofline.plan_backend(device),
        )  # fmt: skip
        print()
        print(roofline.format_table(roof, device))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="environment and backends; with MODEL, its statistics")
    add_model_arguments(p, optional=True)
    p.add_argument("--size", type=parse_size, default=None, help="input size HxW")
    p.add_argument("--batch", type=int, default=None, help="batch size")
    p.add_argument(
        "--gpu", default=None, metavar="NAME",
        help="print the roofline of the fused plan on NAME: h100, h200, a100, l4, agx-orin, "
        "orin-nano, orin-nano-super, or cpu (this machine, estimated)",
    )  # fmt: skip
    p.add_argument(
        "--precision", choices=("fp32", "tf32", "fp16", "bf16", "int8"), default="fp16",
        help="the roofline's precision (default fp16)",
    )  # fmt: skip
    p.add_argument(
        "--output", choices=("logits", "probs", "mask"), default="logits",
        help="the engine output the fused plan ends in (default logits)",
    )  # fmt: skip
    p.set_defaults(func=run)
