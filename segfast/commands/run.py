"""``segfast run MODEL|ENGINE_FILE --input SRC --output DST``: segment a video, a live
stream, an image directory or an image, and write overlays or masks.

Several ``--input`` options run every source through the one engine, frames batched
across the streams (``--max-batch``); DST is then a directory holding each source's
output under its own name, and the report has each stream's table and the total.

MODEL is a zoo name or ``module:factory`` / ``file.py:factory`` (compiled here, at
``--size`` or at the source's frame size); ENGINE_FILE is a ``.segfast`` file from
``engine.save`` (loaded with :func:`segfast.load`). The statistics table (frames
in/out/dropped/skipped, per-stage and end-to-end latency percentiles, FPS) is printed
at the end; Ctrl-C stops the run with the output finalised.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from segfast.cli import (
    add_model_arguments,
    build_model,
    parse_size,
    refuse_compile_flags,
    usable_device,
    writable_output,
)
from segfast.errors import InputError


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, e.g. 0.485,0.456,0.406, got {text!r}"
        ) from None


def _is_engine_file(ref: str) -> bool:
    return ref.endswith(".segfast")


def load_engine(args: argparse.Namespace) -> Any:
    """The engine ``args`` name: a loaded ``.segfast`` file or a model compiled here."""
    import torch

    import segfast
    from segfast.runtime import video

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if _is_engine_file(args.model):
        refuse_compile_flags(args)
        return segfast.load(args.model, device=args.device)
    from segfast.commands.bench import input_channels

    model = build_model(args)
    if args.weights:
        segfast.load_weights(model, args.weights)
    size = args.size or video.probe_size(args.input[0])
    shape = (1, input_channels(model), *size)
    return segfast.compile(
        model,
        input_shape=shape,
        backend=args.backend,
        precision=args.precision,
        output="probs" if args.otsu else "mask",
        device=device,
        # several streams: one call per tick for all of them
        dynamic=("batch",) if len(args.input) > 1 else False,
    )


def run(args: argparse.Namespace) -> int:
    from segfast.runtime import postprocess, video

    ops = postprocess.ops_from_args(args)
    connectivity = 1 if args.connectivity == 4 else 2
    usable_device(args.device)
    writable_output(args.stats_json, "--stats-json")
    engine = load_engine(args)
    post = None
    if ops:

        def post(m: Any) -> Any:
            return postprocess.apply(m, ops, connectivity=connectivity)

    progress = sys.stderr.isatty() if args.progress is None else args.progress
    multi = len(args.input) > 1
    if not multi and args.max_batch is not None:
        raise InputError("--max-batch batches several --input sources")
    options: dict[str, Any] = dict(
        realtime=args.realtime,
        queue_size=args.queue_size,
        output="mask" if args.mask else "overlay",
        postprocess=post,
        postprocess_input="foreground" if args.otsu else "mask",
        alpha=args.alpha,
        mean=args.mean,
        std=args.std,
        fps=args.fps,
        progress=progress,
    )
    if multi:
        s = video.stream(engine, list(args.input), writer=args.output, max_batch=args.max_batch,
                         **options)  # fmt: skip
    else:
        s = video.stream(engine, args.input[0], writer=args.output, **options)
    interrupted = False
    with warnings.catch_warnings():
        # The report below says why a source ended early; don't say it twice.
        warnings.simplefilter("ignore", video.SourceEndedWarning)
        try:
            with s:
                for _ in s:
                    pass
        except KeyboardInterrupt:
            interrupted = True
    print(f"engine: {engine!r}")
    print(s.report() if multi else s.stats.report())
    print(f"output: {args.output}")
    if args.stats_json:
        if multi:
            data: Any = {
                "streams": [x.as_dict() for x in s.stats],
                "total": s.total().as_dict(),
                "batch_sizes": {str(k): v for k, v in sorted(s.batch_sizes.items())},
            }
        else:
            data = s.stats.as_dict()
        Path(args.stats_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.stats_json).write_text(json.dumps(data, indent=2, default=str))
    if interrupted:
        done = s.total().frames_out if multi else s.stats.frames_out
        print(f"interrupted: {args.output} holds the {done} frame(s) written", file=sys.stderr)
        return 130
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from segfast.runtime import postprocess

    p = sub.add_parser(
        "run",
        help="segment a video, stream, image directory or image; write overlays or masks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument(
        "--input",
        required=True,
        action="append",
        help="video file, rtsp:// (or other) URL, image dir, image; repeat it to run "
        "several streams through one engine, batched",
    )
    p.add_argument(
        "--output",
        required=True,
        help="video file (.mp4 .mkv .mov .ts .avi .webm), a directory (PNGs) or a .png; "
        "with several --input, a directory holding each one's output",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="several --input: frames per engine call (default: one per stream)",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--overlay", action="store_true", help="write frames with the mask blended in (default)"
    )
    what.add_argument(
        "--mask",
        action="store_true",
        help="write masks (palette colours in videos, class ids in PNGs)",
    )
    p.add_argument(
        "--realtime",
        action="store_true",
        help="pace the source at its frame rate; drop the oldest frame when behind",
    )
    p.add_argument("--weights", default=None, help="weights file (safetensors or state dict)")
    p.add_argument("--backend", default="auto", help="backend to compile with (default auto)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument(
        "--size",
        type=parse_size,
        default=None,
        help="engine input size HxW (default: the source's frame size)",
    )
    p.add_argument("--mean", type=_floats, default=None, help="normalisation mean, e.g. 0.5")
    p.add_argument("--std", type=_floats, default=None, help="normalisation std")
    p.add_argument("--fps", type=float, default=None, help="frame rate of image sources (25)")
    p.add_argument("--queue-size", type=int, default=4, help="capacity of each queue (4)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (0.5)")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="live progress bar (default: when stderr is a terminal)",
    )
    p.add_argument("--stats-json", default=None, help="also write the statistics as JSON here")
    postprocess.add_arguments(p)
    p.set_defaults(func=run)
