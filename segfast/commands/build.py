"""``segfast build MODEL --backend tensorrt -o m.plan``: export a model to ONNX and build a
TensorRT plan, with the sidecar (``m.plan.json``) the loaders check.

    segfast build unet --tiny --backend tensorrt -o unet.plan --precision fp16 --size 512x512
    segfast build deeplabv3plus --backend tensorrt -o d.plan --dynamic \\
        --min-size 256x256 --max-size 1024x1024 --cache-dir ~/.cache/segfast/trt --head mask

Model options are ``--option KEY=VALUE`` here (``-o`` is the plan). Needs a CUDA GPU with
TensorRT ≥ 10; without it the command stops before building anything and says why.
"""

from __future__ import annotations

import argparse

from segfast.cli import add_model_arguments, build_model, parse_size


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, e.g. 0.485,0.456,0.406, got {text!r}"
        ) from None


def run(args: argparse.Namespace) -> int:
    import torch

    from segfast.backends.tensorrt_backend import TensorRTBackend
    from segfast.errors import BackendUnavailable, InputError

    if args.backend != "tensorrt":
        raise InputError(f"segfast build supports --backend tensorrt, got {args.backend!r}")
    if (args.min_size or args.max_size) and not args.dynamic:
        raise InputError("--min-size/--max-size need --dynamic (a static plan has one size)")
    if args.batch is not None and args.batch < 1:
        raise InputError(f"--batch must be >= 1, got {args.batch}")
    # Fail before exporting anything when the build cannot run here.
    ok, why = TensorRTBackend().availability(torch.device("cuda"))
    if not ok:
        raise BackendUnavailable(f"segfast build --backend tensorrt: {why}")

    from segfast.export.tensorrt import build_engine
    from segfast.models import find_spec

    model = build_model(args)
    if args.weights:
        from segfast.weights import load_weights

        load_weights(model, args.weights)
    spec = find_spec(args.model)
    size = args.size or (spec.standard_size if spec else (512, 512))
    batch = args.batch or 1
    if spec is not None:
        inputs = spec.make_inputs(model, batch, size)
    else:
        inputs = (torch.randn(batch, int(getattr(model, "in_channels", 3)), *size),)
    device = torch.device("cuda", torch.cuda.current_device())
    model = model.to(device).eval()
    inputs = tuple(t.to(device) for t in inputs)
    axes = (["height", "width"] if args.dynamic else []) + (["batch"] if args.max_batch else [])
    preprocess = {"input_order": args.input_order}
    if args.mean is not None:
        preprocess["mean"] = args.mean
    if args.std is not None:
        preprocess["std"] = args.std
    result = build_engine(
        model,
        args.out,
        precision=args.precision,
        example_input=inputs,
        output=args.head,
        threshold=args.threshold,
        dynamic=axes or False,
        min_size=args.min_size,
        max_size=args.max_size,
        max_batch=args.max_batch,
        workspace=args.workspace << 20,
        timing_cache=args.timing_cache,
        cache_dir=args.cache_dir,
        optimization_level=args.opt_level,
        preprocess=preprocess,
        device=device,
        keep_onnx=args.keep_onnx,
    )
    meta = result.meta
    how = "copied from the engine cache" if result.cache_hit else "built"
    print(
        f"plan:     {result.plan} ({meta.plan_bytes / 2**20:.1f} MiB, {how} in {result.seconds:.1f} s)"
    )
    print(f"sidecar:  {result.sidecar}")
    print(
        f"engine:   TensorRT {meta.tensorrt_version}, {meta.precision}, output {meta.output}, "
        f"for {meta.gpu_name} (sm_{meta.capability[0]}{meta.capability[1]})"
    )
    for t in meta.inputs:
        assert t.profile is not None
        rng = (
            f"{list(t.profile.min)} … {list(t.profile.opt)} … {list(t.profile.max)}"
            if t.profile.dynamic
            else str(list(t.profile.opt))
        )
        print(f"input:    {t.name} {t.dtype} {rng}")
    for t in meta.outputs:
        print(f"output:   {t.name} {t.dtype} {list(t.shape)}")
    for note in result.notes:
        print(f"note:     {note}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="build a TensorRT plan (+ sidecar) from a model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        conflict_handler="resolve",  # -o is the plan here; model options keep --option
    )
    add_model_arguments(p)
    p.add_argument("-o", "--out", required=True, metavar="PLAN", help="the plan to write")
    p.add_argument("--backend", default="tensorrt", choices=("tensorrt",), help="(tensorrt)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    p.add_argument(
        "--head",
        default="logits",
        choices=("logits", "probs", "mask"),
        help="the engine's output: logits, probs or an argmax mask (default logits)",
    )
    p.add_argument("--threshold", type=float, default=0.5, help="one-class mask threshold")
    p.add_argument("--weights", default=None, help="weights file (safetensors or state dict)")
    p.add_argument("--size", type=parse_size, default=None, help="input size HxW (the opt size)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 1)")
    p.add_argument("--dynamic", action="store_true", help="dynamic height and width")
    p.add_argument("--min-size", type=parse_size, default=None, help="smallest HxW (--dynamic)")
    p.add_argument("--max-size", type=parse_size, default=None, help="largest HxW (--dynamic)")
    p.add_argument("--max-batch", type=int, default=None, help="dynamic batch up to this size")
    p.add_argument("--cache-dir", default=None, help="engine cache directory")
    p.add_argument("--timing-cache", default=None, help="TensorRT timing-cache file")
    p.add_argument("--workspace", type=int, default=1024, help="workspace limit in MiB (1024)")
    p.add_argument("--opt-level", type=int, default=None, help="builder optimisation level 0-5")
    p.add_argument("--keep-onnx", action="store_true", help="keep the ONNX file as PLAN.onnx")
    p.add_argument("--mean", type=_floats, default=None, help="recorded normalisation mean")
    p.add_argument("--std", type=_floats, default=None, help="recorded normalisation std")
    p.add_argument(
        "--input-order", default="bgr", choices=("bgr", "rgb"), help="frames' channel order"
    )
    p.set_defaults(func=run)
