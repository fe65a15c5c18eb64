"""``segfast export MODEL_OR_ENGINE --format onnx -o m.onnx``: write a deployable ONNX file;
``--format triton -o repo/``: a Triton Inference Server model repository around it.

Prints what was written (path, size, sha256, inputs and outputs with their
dynamic axes, the proven ranges) and ONNX Runtime's accuracy against the eager
model on a random input (and, for dynamic exports, at two other sizes).
In this command ``-o`` is the output file (as in ``segfast build``), or for
``--format triton`` the model repository folder; model options go by their long
form, ``--option KEY=VALUE``.

MODEL_OR_ENGINE is a zoo name, ``module:factory`` / ``file.py:factory``, or a
``.segfast`` engine file: the engine is loaded (``segfast.load``) and its captured
program exported with the engine's head, precision and dynamic axes; the file is
also run against the engine itself.

``--format triton`` writes ``repo/<name>/config.pbtxt`` and ``repo/<name>/1/model.onnx``
(:mod:`segfast.export.triton_repo`): batch-dynamic exports (``--dynamic-batch``, or an
engine built so) get ``max_batch_size`` (``--max-batch-size``, default 8) and
``dynamic_batching``; static ones ``max_batch_size: 0``. ``model.plan`` is added where
TensorRT builds here; where it cannot, the output says so.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Any

from segfast.cli import (
    add_model_arguments,
    build_model,
    parse_option,
    parse_size,
    refuse_model_flags,
)
from segfast.errors import InputError

FORMATS = ("onnx", "triton")
# Options of --format triton, with their "not given" values.
TRITON_OPTIONS = {
    "--name": ("name", None),
    "--max-batch-size": ("max_batch_size", None),
    "--max-queue-delay-us": ("max_queue_delay_us", None),
    "--force": ("force", False),
    "--no-plan": ("no_plan", False),
}


def _dims(value: Any) -> str:
    dims = value.type.tensor_type.shape.dim
    return "[" + ", ".join(d.dim_param or str(d.dim_value) for d in dims) + "]"


def _type_name(value: Any) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type).lower()


def _size(n: int) -> str:
    from segfast.stats import format_bytes

    return format_bytes(n)


def _is_engine_file(ref: str) -> bool:
    return ref.endswith(".segfast")


def run(args: argparse.Namespace) -> int:
    from segfast.export import triton_repo

    if args.format not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {args.format!r}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    triton = args.format == "triton"
    if not triton:
        given = [
            flag for flag, (key, unset) in TRITON_OPTIONS.items() if getattr(args, key) != unset
        ]
        if given:
            raise InputError(f"{', '.join(given)}: for --format triton only")
    else:
        name = args.name if args.name is not None else triton_repo.default_name(args.model)
        # Refused before the export's work, and again by the writer.
        triton_repo.check_target(args.out_file, name, args.force)
        if args.max_batch_size is not None and args.max_batch_size < 1:
            raise InputError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
        if args.max_queue_delay_us is not None and args.max_queue_delay_us < 0:
            raise InputError(f"--max-queue-delay-us must be >= 0, got {args.max_queue_delay_us}")
    engine_file = _is_engine_file(args.model)
    if triton and not engine_file and not args.dynamic_batch:
        _check_static_batch(args)
    with contextlib.ExitStack() as stack:
        path = args.out_file
        if triton:
            path = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "model.onnx"
        if engine_file:
            exp, vs_engine = _export_engine(args, path)
        else:
            exp, vs_engine = _export_model(args, path), None
        if not triton:
            print(f"wrote {exp.path} ({_size(exp.path.stat().st_size)}, sha256 {exp.sha256})")
            _report(exp, exp.path, vs_engine)
            return 0
        max_batch = _max_batch_size(args, exp)
        repo = triton_repo.write_triton_repo(
            exp.path,
            args.out_file,
            name,
            max_batch_size=max_batch,
            max_queue_delay_us=args.max_queue_delay_us,
            output=exp.output,
            force=args.force,
            plan=not args.no_plan,
        )
    _report_repo(repo)
    _report(exp, repo.onnx, vs_engine)
    if exp.guards:
        print(
            "  note: Triton checks dims and types, not the shape guards above: keep requests "
            "inside them (the sizes the export was proven for)"
        )
    print(
        "  not run here: Triton Inference Server itself (a container); the config was written "
        "for it from the ONNX file's I/O"
    )
    return 0


def _max_batch_size(args: argparse.Namespace, exp: Any) -> int:
    """Triton's max_batch_size: N for batch-dynamic exports, 0 for static ones."""
    if "batch" not in exp.dynamic:
        _check_static_batch(args)
        return 0
    from segfast.export.triton_repo import DEFAULT_MAX_BATCH_SIZE

    return DEFAULT_MAX_BATCH_SIZE if args.max_batch_size is None else args.max_batch_size


def _check_static_batch(args: argparse.Namespace) -> None:
    if args.max_batch_size is not None or args.max_queue_delay_us is not None:
        raise InputError(
            "--max-batch-size and --max-queue-delay-us need a batch-dynamic export "
            "(--dynamic-batch): a static-batch model is served with max_batch_size 0"
        )


def _export_model(args: argparse.Namespace, path: Path) -> Any:
    """Build the model ``args`` names and export it to ``path``."""
    import torch

    from segfast.export import export_onnx
    from segfast.models import find_spec

    model = build_model(args)
    spec = find_spec(args.model)
    size = args.size or (spec.standard_size if spec else (512, 512))
    if spec is not None:
        inputs = spec.make_inputs(model, args.batch, size)
    else:
        inputs = (torch.randn(args.batch, int(getattr(model, "in_channels", 3)), *size),)
    axes = (["height", "width"] if args.dynamic else []) + (["batch"] if args.dynamic_batch else [])
    output = args.output or "logits"
    if args.precision == "int8":
        return _export_int8(model, inputs, axes, args, path)
    if args.calibration:
        raise ValueError("--calibration is for --precision int8")
    return export_onnx(
        model,
        path,
        example_input=inputs,
        output=output,
        precision=args.precision or "fp32",
        dynamic=axes,
        opset=args.opset,
        threshold=args.threshold,
        check=True,
    )


def _export_engine(args: argparse.Namespace, path: Path) -> tuple[Any, Any]:
    """Load the engine file ``args.model`` names, export its captured program to ``path`` with
    the engine's head, precision, threshold and dynamic axes; return the export and ONNX
    Runtime's accuracy against the engine itself on the example input."""
    import torch

    import segfast
    from segfast.export import export_onnx, run_onnx
    from segfast.metrics import compare
    from segfast.runtime import engine_file

    settings = (
        ("--size", args.size),
        ("--batch", args.batch != 1),
        ("--calibration", args.calibration),
        ("--threshold", args.threshold != 0.5),
    )
    refuse_model_flags(args, settings, "models exported here")
    # The settings are read (and the file verified) before anything is built.
    meta, _ = engine_file.read(args.model)
    for flag, asked, built in (
        ("--output", args.output, meta["output"]),
        ("--precision", args.precision, meta["precision"]),
    ):
        if asked is not None and asked != built:
            raise InputError(
                f"{args.model} was built with {flag} {built}; it exports as built (asked {asked})"
            )
    if meta["precision"] == "int8":
        raise InputError(
            f"{args.model} is an int8 engine: its Q/DQ ranges are not exported from engine "
            "files; export the model with --precision int8 --calibration DATA"
        )
    if meta["precision"] not in ("fp32", "fp16"):
        raise InputError(
            f"{args.model} is a {meta['precision']} engine: ONNX files are fp32 or fp16 here "
            "(export the model with --precision fp16)"
        )
    axes = tuple(meta["dynamic"])
    asked_axes = (["height", "width"] if args.dynamic else []) + (
        ["batch"] if args.dynamic_batch else []
    )
    static = [a for a in asked_axes if a not in axes]
    if static:
        raise InputError(
            f"{args.model} was built with a static {', '.join(static)}; rebuild the engine "
            "with those axes dynamic to export them so"
        )
    engine = segfast.load(args.model, device=None if torch.cuda.is_available() else "cpu")
    if engine.source is None:
        raise InputError(f"{args.model}: the loaded engine has no captured program to export")
    inputs = tuple(
        torch.randn(s.shape, dtype=torch.float32)
        if s.torch_dtype.is_floating_point
        else torch.zeros(s.shape, dtype=s.torch_dtype)
        for s in engine.info.inputs
    )
    program = engine.source.program()
    exp = export_onnx(
        program.module(),
        path,
        example_input=inputs,
        output=engine.output,
        precision=engine.precision,
        dynamic=axes,
        opset=args.opset,
        threshold=engine.info.threshold,
        check=True,
    )
    with torch.no_grad():
        ref = engine(*(t.to(engine.device) for t in inputs)).cpu()
    out = run_onnx(path, *inputs)
    out = out.float() if out.is_floating_point() else out
    return exp, compare(out, ref.float() if ref.is_floating_point() else ref)


def _report(exp: Any, path: Path, vs_engine: Any) -> None:
    """The export's lines: opset, precision, head, I/O, dynamic ranges, the ORT checks
    (``path``: where the file is now)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    print(
        f"  ONNX opset {exp.opset}, {exp.precision} graph, output {exp.output}"
        + (f", {exp.num_classes} classes" if exp.num_classes is not None else "")
    )
    example = {n: s for n, s in zip(exp.input_names, exp.input_shapes, strict=True)}
    for v in graph.input:
        shape = "×".join(str(d) for d in example.get(v.name, ()))
        print(f"  input   {v.name:8s} {_type_name(v):8s} {_dims(v)}  (example {shape})")
    for v in graph.output:
        print(f"  output  {v.name:8s} {_type_name(v):8s} {_dims(v)}")
    if exp.ranges:
        print(
            "  dynamic "
            + ", ".join(f"{a} {lo}..{hi}" for a, (lo, hi) in exp.ranges.items())
            + " (ranges proven by torch.export"
            + ("; batch 1 by running it" if exp.ranges.get("batch", (0,))[0] == 1 else "")
            + ")"
        )
        if exp.guards:
            print(
                f"  guards  {len(exp.guards)} shape condition(s) from torch.export, in the file's "
                "segfast.guards metadata (segfast's onnxruntime backend enforces them), e.g. "
                f"{exp.guards[0]}"
            )
        elif exp.guards is None:
            print("  guards  unknown: this torch keeps no export guards to read")
    else:
        print("  dynamic none (static shapes)")
    ref = "the Q/DQ model in PyTorch (fp32)" if exp.precision == "int8" else "PyTorch eager (fp32)"
    for c in exp.checks:
        shapes = ", ".join("×".join(str(d) for d in s) for s in c.shapes)
        a = c.accuracy
        verdict = "ok" if c.passed else f"FAILED: {c.reason}"
        if a is None:
            print(f"  ONNX Runtime vs {ref} at {shapes}: {verdict}")
            continue
        print(
            f"  ONNX Runtime vs {ref} at {shapes}: rel-L2 {a.rel_l2:.3g}, "
            f"max-abs {a.max_abs:.3g}{_agreement(a)} — {verdict}"
        )
    if vs_engine is not None:
        shapes = ", ".join("×".join(str(d) for d in s) for s in exp.input_shapes)
        print(
            f"  ONNX Runtime vs the engine at {shapes}: rel-L2 {vs_engine.rel_l2:.3g}, "
            f"max-abs {vs_engine.max_abs:.3g}{_agreement(vs_engine)}"
        )


def _agreement(a: Any) -> str:
    return f", mask agreement {100 * a.mask_agreement:.3f}%" if a.mask_agreement is not None else ""


def _report_repo(repo: Any) -> None:
    """The repository's lines: where each file went, and the config's I/O."""
    batching = (
        f"max_batch_size {repo.max_batch_size}, dynamic_batching"
        if repo.max_batch_size
        else "max_batch_size 0 (static batch)"
    )
    print(
        f"wrote Triton model repository {repo.path.parent}: model {repo.name!r}"
        + (" (replaced the existing one)" if repo.replaced else "")
    )
    print(f"  {repo.config}  platform onnxruntime_onnx, {batching}")
    print(f"  {repo.onnx}  ({_size(repo.onnx.stat().st_size)}, sha256 {repo.onnx_sha256})")
    plan = repo.plan or repo.onnx.with_name("model.plan")
    print(f"  {plan}  {repo.plan_note}")
    for kind, tensors in (("input", repo.inputs), ("output", repo.outputs)):
        for t in tensors:
            dims = ", ".join(str(d) for d in t.dims)
            batch = " (+ batch 1.." + str(repo.max_batch_size) + ")" if repo.max_batch_size else ""
            print(f"  config {kind:6s} {t.name:8s} {t.data_type:10s} dims [{dims}]{batch}")
    params = ", ".join(f"{k}={v}" for k, v in repo.parameters.items())
    print(f"  config parameters {params}")


def _export_int8(
    model: Any, inputs: Any, axes: list[str], args: argparse.Namespace, path: Path
) -> Any:
    """Calibrate, quantize with the accuracy guard (segfast.quantize), write the Q/DQ file."""
    import segfast
    from segfast.commands._calibration import load_calibration

    if not args.calibration:
        raise ValueError(
            "--precision int8 needs --calibration FILE.npy or DIR (inputs from your data: "
            "random inputs calibrate nothing useful)"
        )
    data = load_calibration(args.calibration)
    q = segfast.quantize(
        model, inputs,
        calibration=segfast.Calibration(
            data, method=args.calibration_method, max_float_layers=args.max_float_layers
        ),
        output=args.output or "logits", threshold=args.threshold,
    )  # fmt: skip
    print(q.summary())
    return q.export_onnx(path, dynamic=axes, opset=args.opset)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model (+ head) or an engine file to a deployable file: ONNX, checked in "
        "ONNX Runtime, or a Triton Inference Server model repository",
        description="MODEL is a zoo name, module:factory / file.py:factory, or a .segfast "
        "engine file (exported as built: its head, precision and dynamic axes).",
        # add_model_arguments gives -o to --option; here -o is the output file.
        conflict_handler="resolve",
    )
    add_model_arguments(p)
    p.add_argument(
        "--option",
        type=parse_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option, e.g. --option base=32 (repeatable; -o is the output file here)",
    )
    p.add_argument(
        "-o", "--out-file", type=Path, required=True,
        help="the file to write (--format triton: the model repository folder)",
    )  # fmt: skip
    p.add_argument(
        "--format", choices=FORMATS, default="onnx",
        help="onnx: one .onnx file; triton: REPO/NAME/config.pbtxt + REPO/NAME/1/model.onnx "
        "(+ model.plan where TensorRT builds here) for Triton Inference Server",
    )  # fmt: skip
    p.add_argument("--size", type=parse_size, default=None, help="example input size HxW")
    p.add_argument("--batch", type=int, default=1, help="example batch size (default 1)")
    p.add_argument(
        "--output",
        choices=("logits", "probs", "mask"),
        default=None,
        help="what the graph returns (mask: ArgMax in the graph); default logits, or an "
        "engine file's own",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "int8"),
        default=None,
        help="fp16: a strongly-typed fp16 graph (bf16 cannot be exported to ONNX here); int8: "
        "Q/DQ pairs (QDQ format, for ONNX Runtime and TensorRT 11), needs --calibration; "
        "default fp32, or an engine file's own",
    )
    p.add_argument(
        "--calibration", default=None,
        help="int8: a .npy file (N×C×H×W inputs) or a folder of .npy inputs, preprocessed as "
        "the model takes them; every fourth is held out to judge the result",
    )  # fmt: skip
    p.add_argument(
        "--calibration-method", choices=("percentile", "max", "entropy"), default="percentile",
        help="int8: how each activation's range is chosen",
    )  # fmt: skip
    p.add_argument(
        "--max-float-layers", type=float, default=0.5,
        help="int8: the share of layers the accuracy guard may keep in floating point",
    )  # fmt: skip
    p.add_argument("--dynamic", action="store_true", help="dynamic height and width")
    p.add_argument("--dynamic-batch", action="store_true", help="dynamic batch size")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, >= 17 (default 18)")
    p.add_argument("--threshold", type=float, default=0.5, help="one-class mask threshold")
    t = p.add_argument_group("--format triton")
    t.add_argument(
        "--name", default=None,
        help="the Triton model name (its folder): default the zoo name, the factory, or the "
        "engine file's stem",
    )  # fmt: skip
    t.add_argument(
        "--max-batch-size", type=int, default=None,
        help="batch-dynamic exports: Triton's max_batch_size (default 8); static exports are "
        "served with max_batch_size 0",
    )  # fmt: skip
    t.add_argument(
        "--max-queue-delay-us", type=int, default=None,
        help="batch-dynamic exports: dynamic_batching's max_queue_delay_microseconds",
    )  # fmt: skip
    t.add_argument("--force", action="store_true", help="replace an existing REPO/NAME")
    t.add_argument(
        "--no-plan", action="store_true",
        help="do not build REPO/NAME/1/model.plan even where TensorRT can",
    )  # fmt: skip
    p.set_defaults(func=run)
