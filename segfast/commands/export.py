"""``segfast export MODEL --format onnx -o m.onnx``: write a deployable ONNX file.

Prints what was written (path, size, sha256, inputs and outputs with their
dynamic axes, the proven ranges) and ONNX Runtime's accuracy against the eager
model on a random input (and, for dynamic exports, at two other sizes).
In this command ``-o`` is the output file (as in ``segfast build``); model
options go by their long form, ``--option KEY=VALUE``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from segfast.cli import add_model_arguments, build_model, parse_option, parse_size

FORMATS = ("onnx",)


def _dims(value: Any) -> str:
    dims = value.type.tensor_type.shape.dim
    return "[" + ", ".join(d.dim_param or str(d.dim_value) for d in dims) + "]"


def _type_name(value: Any) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type).lower()


def _size(n: int) -> str:
    from segfast.stats import format_bytes

    return format_bytes(n)


def run(args: argparse.Namespace) -> int:
    import onnx
    import torch

    from segfast.export import export_onnx
    from segfast.models import find_spec

    if args.format not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {args.format!r}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    model = build_model(args)
    spec = find_spec(args.model)
    size = args.size or (spec.standard_size if spec else (512, 512))
    if spec is not None:
        inputs = spec.make_inputs(model, args.batch, size)
    else:
        inputs = (torch.randn(args.batch, int(getattr(model, "in_channels", 3)), *size),)
    axes = (["height", "width"] if args.dynamic else []) + (["batch"] if args.dynamic_batch else [])
    if args.precision == "int8":
        exp = _export_int8(model, inputs, axes, args)
    else:
        if args.calibration:
            raise ValueError("--calibration is for --precision int8")
        exp = export_onnx(
            model,
            args.out_file,
            example_input=inputs,
            output=args.output,
            precision=args.precision,
            dynamic=axes,
            opset=args.opset,
            threshold=args.threshold,
            check=True,
        )
    graph = onnx.load(str(exp.path), load_external_data=False).graph
    print(f"wrote {exp.path} ({_size(exp.path.stat().st_size)}, sha256 {exp.sha256})")
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
        agree = (
            f", mask agreement {100 * a.mask_agreement:.3f}%"
            if a.mask_agreement is not None
            else ""
        )
        print(
            f"  ONNX Runtime vs {ref} at {shapes}: rel-L2 {a.rel_l2:.3g}, "
            f"max-abs {a.max_abs:.3g}{agree} — {verdict}"
        )
    return 0


def _export_int8(model: Any, inputs: Any, axes: list[str], args: argparse.Namespace) -> Any:
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
        output=args.output, threshold=args.threshold,
    )  # fmt: skip
    print(q.summary())
    return q.export_onnx(args.out_file, dynamic=axes, opset=args.opset)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model (+ head) to a deployable file: ONNX, checked in ONNX Runtime",
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
    p.add_argument("-o", "--out-file", type=Path, required=True, help="the file to write")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="file format (onnx)")
    p.add_argument("--size", type=parse_size, default=None, help="example input size HxW")
    p.add_argument("--batch", type=int, default=1, help="example batch size (default 1)")
    p.add_argument(
        "--output",
        choices=("logits", "probs", "mask"),
        default="logits",
        help="what the graph returns (mask: ArgMax in the graph)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "int8"),
        default="fp32",
        help="fp16: a strongly-typed fp16 graph (bf16 cannot be exported to ONNX here); int8: "
        "Q/DQ pairs (QDQ format, for ONNX Runtime and TensorRT 11), needs --calibration",
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
    p.set_defaults(func=run)
