"""``segfast batch ENGINE_FILE|MODEL --input DIR_OR_LIST --output DIR``: segment archives
of images, videos and large (TIFF, .npy) images on Ray Data, one engine per actor.

Inputs: folders (walked recursively), glob patterns ("scans/**/*.tif"), list files
(.txt: one path a line) or files; ``--input`` repeats. Outputs in DIR: NAME.png for an
image (its class-id mask), NAME.mkv for a video (the mask video; ``--video-output png``:
a folder of class-id PNGs), NAME.mask.tif for a large image (a tiled TIFF of class ids
from overlap-tile inference, split into bands of tile rows across the actors), and
``manifest.jsonl`` (one line per input: status, frames/tiles, seconds, output size and
sha256, error). Outputs appear whole or not at all. Rerun the same command to continue
an interrupted job: finished, verified outputs are skipped. Without ``--address`` a
local Ray instance runs on ``--num-cpus`` CPUs of this machine.

Exit status: 0 when every input is done (now or before), 1 when some failed, now or in
an earlier run left alone (listed, and in the manifest; ``--retry-failed`` redoes
them), 130 when interrupted (rerun to continue).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from segfast.cli import add_model_arguments, parse_size, refuse_compile_flags
from segfast.errors import InputError


def _engine(args: argparse.Namespace) -> Any:
    """The engine file to run, or an engine compiled here from MODEL (dynamic batch)."""
    if args.model.endswith(".segfast"):
        refuse_compile_flags(args)  # (and that the file exists)
        return args.model
    from segfast.commands.serve import build_engine, engine_spec

    spec = engine_spec(args)
    spec["device"] = args.device or "cpu"  # the actors load it on their own device
    return build_engine(spec)


def run(args: argparse.Namespace) -> int:
    import segfast

    if args.batch is not None and args.batch < 1:
        raise InputError(f"--batch must be ≥ 1, got {args.batch}")
    if args.band_rows is not None and args.band_rows < 1:
        raise InputError(f"--band-rows must be ≥ 1, got {args.band_rows}")
    from segfast.runtime.batchjob import discover

    # the inputs before the engine: an empty folder was refused after a compile
    discover(args.input, video_output=args.video_output, exclude=args.output)
    if not args.model.endswith(".segfast") and not args.weights:
        print(
            f"segfast batch: warning: {args.model} has no --weights: its weights are a random "
            "initialisation, different on every run (so a rerun redoes every input)",
            file=sys.stderr,
            flush=True,
        )
    engine = _engine(args)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    tile = None if args.tile is None else (args.tile[0], args.tile[1])
    try:
        report = _batch(segfast, engine, args, progress, tile)
    except KeyboardInterrupt:  # before the job started, or a second Ctrl-C while it stopped
        return _interrupted(args)
    print(report.summary(), flush=True)
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(report.as_dict(), indent=2, default=str))
    if report.interrupted:
        return _interrupted(args)
    return 1 if report.failed or report.failed_before else 0


def _interrupted(args: argparse.Namespace) -> int:
    print(f"interrupted: {args.output} holds only complete outputs; rerun the same command "
          f"to continue", file=sys.stderr)  # fmt: skip
    return 130


def _batch(segfast: Any, engine: Any, args: argparse.Namespace, progress: bool,
           tile: Any) -> Any:  # fmt: skip
    return segfast.batch(
        engine,
        args.input,
        args.output,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        device=args.device,
        batch=args.batch,
        tile=tile,
        overlap=args.overlap,
        blend=args.blend,
        band_rows=args.band_rows,
        video_output=args.video_output,
        mean=args.mean,
        std=args.std,
        retries=args.retries,
        retry_failed=args.retry_failed,
        verify=args.verify,
        address=args.address,
        num_cpus=args.num_cpus,
        progress=progress,
    )


def _floats(text: str) -> tuple[float, ...]:
    from segfast.commands.run import _floats as floats

    return floats(text)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch",
        help="segment folders of images, videos and large TIFFs on Ray Data (resumable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--input", required=True, action="append",
                   help="folder, glob pattern, list file (.txt) or file; repeatable")  # fmt: skip
    p.add_argument("--output", required=True, help="output folder (manifest.jsonl goes there)")
    p.add_argument("--weights", default=None, help="weights file (safetensors or state dict)")
    p.add_argument("--backend", default="auto", help="backend to compile MODEL with (auto)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--size", type=parse_size, default=None,
                   help="MODEL's input size HxW (the tile size of large images)")  # fmt: skip
    p.add_argument("--device", default=None,
                   help="device of the actors' engines (default: cuda where an actor has a "
                        "GPU, else cpu)")  # fmt: skip
    p.add_argument("--actors", type=int, default=None,
                   help="actors, one engine each (default: CPUs ÷ --cpus-per-actor)")  # fmt: skip
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per actor (1)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0,
                   help="GPUs per actor (0: CPU actors; 0.5: two actors share a GPU)")  # fmt: skip
    p.add_argument("--batch", type=int, default=None,
                   help="frames / tiles / images per engine call (4)")  # fmt: skip
    p.add_argument("--tile", type=parse_size, default=None,
                   help="tile size HxW of dynamic-size engines (default: the engine's size)")  # fmt: skip
    p.add_argument("--overlap", type=int, default=64, help="tile overlap, pixels (64)")
    p.add_argument("--blend", default="crop", choices=("crop", "gaussian"),
                   help="large images: crop (bands across actors) or gaussian (one actor "
                        "per image; needs a logits/probs engine)")  # fmt: skip
    p.add_argument("--band-rows", type=int, default=None,
                   help="tile rows per band of a large image (default: ~4 bands per actor)")  # fmt: skip
    p.add_argument("--video-output", default="mkv", choices=("mkv", "mp4", "png"),
                   help="videos: a mask video (mkv, mp4) or a folder of class-id PNGs")  # fmt: skip
    p.add_argument("--mean", type=_floats, default=None, help="normalisation mean, e.g. 0.5")
    p.add_argument("--std", type=_floats, default=None, help="normalisation std")
    p.add_argument("--retries", type=int, default=1,
                   help="extra attempts for an input that raises (1)")  # fmt: skip
    p.add_argument("--retry-failed", action="store_true",
                   help="redo inputs a previous run recorded as failed")  # fmt: skip
    p.add_argument("--verify", default="digest", choices=("digest", "size"),
                   help="check finished outputs by sha256 (digest) or size before skipping")  # fmt: skip
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the local Ray instance (default: all)")  # fmt: skip
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")  # fmt: skip
    p.add_argument("--report-json", default=None, help="also write the report as JSON here")
    p.set_defaults(func=run)
