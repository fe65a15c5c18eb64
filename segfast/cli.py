"""The ``segfast`` command line.

segfast models                       list the model zoo with parameter counts
segfast info [MODEL --size HxW]      environment and backends; a model's stats
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence
from typing import Any

from segfast.errors import SegfastError


def parse_size(text: str) -> tuple[int, int]:
    """'512x1024' -> (512, 1024); '256' -> (256, 256)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size must look like HxW, e.g. 512x512, got {text!r}"
        ) from None
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"size must be two positive integers HxW, got {text!r}")
    return dims  # type: ignore[return-value]


def parse_option(text: str) -> tuple[str, Any]:
    """'base=32' -> ('base', 32); values are Python literals or plain strings."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"option must be key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments every model-taking command shares."""
    p.add_argument("model", help="a zoo model name (see `segfast models`) or module:factory")
    p.add_argument("--classes", type=int, default=None, help="number of output classes")
    p.add_argument("--in-channels", type=int, default=None, help="number of input channels")
    p.add_argument(
        "-o",
        "--option",
        type=parse_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option, e.g. -o base=32 -o depth=4 (repeatable)",
    )
    p.add_argument("--tiny", action="store_true", help="use the model's tiny test configuration")


def build_model(args: argparse.Namespace) -> Any:
    """The model an argparse namespace from :func:`add_model_arguments` names."""
    from segfast.models import build_from_reference

    return build_from_reference(
        args.model,
        num_classes=args.classes,
        in_channels=args.in_channels,
        tiny=args.tiny,
        **dict(args.option),
    )


def _cmd_models(args: argparse.Namespace) -> int:
    import torch

    from segfast import models

    rows = []
    for name in models.names():
        spec = models.get_spec(name)
        opts = spec.reference.options if spec.reference else {}
        with torch.device("meta"):
            model = models.create(name, **opts)
        n = models.count_parameters(model)
        ref = spec.reference
        if ref is not None and not ref.published:
            refs = "(no published count)"
        elif ref is not None:
            dev = 100.0 * (n - ref.params) / ref.params
            refs = f"{ref.params / 1e6:8.2f}M ({dev:+.2f}%)"
        else:
            refs = "-"
        rows.append((name, spec.task, f"{n / 1e6:8.2f}M", refs, spec.description))
    header = ("model", "task", "params", "published", "description")
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(4)]
    print("  ".join(h.ljust(w) for h, w in zip(header, [*widths, 0], strict=False)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, [*widths, 0], strict=False)))
    if args.verbose:
        for name in models.names():
            ref = models.get_spec(name).reference
            if ref is not None:
                print(f"\n{name}: reference options {ref.options}\n  source: {ref.source}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
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
        return 0

    from segfast.bench.modelstats import format_bytes, model_stats
    from segfast.models import get_spec

    model = build_model(args)
    try:
        spec = get_spec(args.model)
    except KeyError:
        spec = None
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
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segfast", description="Fast, checked inference for image-segmentation networks."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the model zoo with parameter counts")
    p.add_argument("-v", "--verbose", action="store_true", help="also print reference sources")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("info", help="environment and backends; with MODEL, its statistics")
    p.add_argument("model", nargs="?", default=None, help="a zoo model name or module:factory")
    p.add_argument("--size", type=parse_size, default=None, help="input size HxW")
    p.add_argument("--batch", type=int, default=None, help="batch size")
    p.add_argument("--classes", type=int, default=None)
    p.add_argument("--in-channels", type=int, default=None)
    p.add_argument(
        "-o",
        "--option",
        type=parse_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option (repeatable)",
    )
    p.add_argument("--tiny", action="store_true")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (SegfastError, KeyError, TypeError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"segfast: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
