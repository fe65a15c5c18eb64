"""The ``segfast`` command line: ``main`` plus the argument helpers the
subcommands share. Each subcommand lives in ``segfast/commands/<name>.py``
(``register(subparsers)``) and is listed in ``COMMANDS``.
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


def writable_output(path: str | None, flag: str) -> None:
    """Refuse, before any work, an output path the command could only fail to write at
    its end (after minutes of benchmarking or a whole video): under a file, in an
    unwritable folder, or a folder where a file goes. Missing folders are fine (the
    writers make them)."""
    import os
    from pathlib import Path

    from segfast.errors import InputError

    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{flag} {path} is a directory; give a file name")
    folder = p.parent  # missing folders are made when written: the first that exists decides
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{flag} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise InputError(f"{flag} {path}: not writable here")


def usable_device(device: str | None) -> None:
    """Refuse ``--device cuda`` on a machine without a CUDA GPU in one line (torch's own
    error is an ``AssertionError`` from deep inside the first transfer)."""
    if device is None or not str(device).startswith("cuda"):
        return
    import torch

    from segfast.errors import InputError

    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA GPU is available here")


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


def add_model_arguments(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    """Arguments every model-taking command shares."""
    p.add_argument(
        "model",
        nargs="?" if optional else None,
        default=None,
        help="a zoo model name (see `segfast models`) or module:factory / file.py:factory",
    )
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


def refuse_model_flags(
    args: argparse.Namespace, settings: Sequence[tuple[str, Any]], purpose: str
) -> None:
    """Raise InputError when ``args.model`` is an engine file (built already) but model
    flags or ``settings`` ((flag, given?) pairs) were given, or when it does not exist.
    ``purpose``: what those flags apply to ("models compiled here")."""
    from pathlib import Path

    from segfast.errors import InputError

    common = (("--tiny", args.tiny), ("--classes", args.classes),
              ("--in-channels", args.in_channels), ("-o", args.option))  # fmt: skip
    given = [flag for flag, v in (*common, *settings) if v]
    if given:
        raise InputError(
            f"{args.model} is an engine file, built already: {', '.join(given)} apply to {purpose}"
        )
    if not Path(args.model).is_file():
        raise InputError(f"engine file {args.model} does not exist")


def refuse_compile_flags(args: argparse.Namespace) -> None:
    """:func:`refuse_model_flags` for the commands that compile MODEL with ``--weights``,
    ``--backend``, ``--precision`` and ``--size`` (run, serve, batch)."""
    settings = (("--weights", args.weights), ("--backend", args.backend != "auto"),
                ("--precision", args.precision != "fp32"), ("--size", args.size))  # fmt: skip
    refuse_model_flags(args, settings, "models compiled here")


def build_model(args: argparse.Namespace) -> Any:
    """The model an argparse namespace from :func:`add_model_arguments` names."""
    from segfast.models import build_from_reference

    for flag, n in (("--classes", args.classes), ("--in-channels", args.in_channels)):
        if n is not None and n < 1:
            raise ValueError(f"{flag} must be >= 1, got {n}")
    return build_from_reference(
        args.model,
        num_classes=args.classes,
        in_channels=args.in_channels,
        tiny=args.tiny,
        **dict(args.option),
    )


# Subcommand modules under segfast/commands/, in --help order.
COMMANDS = ("models", "info", "bench", "export", "build", "run", "serve", "batch")


def make_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="segfast", description="Fast, checked inference for image-segmentation networks."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"segfast.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (SegfastError, KeyError, TypeError, ValueError, OSError) as exc:
        if args.debug:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"segfast: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
