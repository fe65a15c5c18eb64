"""``segfast serve ENGINE_FILE|MODEL``: an HTTP segmentation service on Ray Serve.

    POST /segment            body: an encoded image (PNG, JPEG, TIFF, BMP, WebP)
                             → 200 image/png: the class-id mask at the image's size
    POST /segment?format=json → 200 application/json: {"height", "width", "areas":
                             {class: pixels}, "order": "row-major", "runs": [[class, n], ...]}
    GET  /healthz            → 200 application/json: the engine, its batching, this
                             replica's request and batch counts

Requests are batched per replica by Ray Serve's ``@serve.batch`` (``--max-batch-size``
images, waiting at most ``--batch-wait-ms`` for a batch to fill) into one engine call;
the response says the batch it ran in (``X-Segfast-Batch``). Each replica builds its
engine once when it starts (loads the engine file, or compiles MODEL with a dynamic
batch at ``--size``). Bad requests get a 4xx and a one-line reason — 400 empty body or
unknown format, 413 over ``--max-pixels``, 415 not an image, 422 a channel count the
engine cannot take, 404/405 other paths and methods — and the service goes on. Without
``--address`` a local Ray instance starts (``--num-cpus`` of this machine). Ctrl-C
stops the service and Ray.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from collections import Counter
from typing import Any

from segfast.cli import add_model_arguments, parse_size, refuse_compile_flags, usable_device
from segfast.errors import InputError

APP_NAME = "segfast"


def engine_spec(args: argparse.Namespace) -> dict[str, Any]:
    """What a replica needs to build its engine (plain data: Ray ships it to replicas)."""
    keys = ("model", "classes", "in_channels", "option", "tiny", "weights", "backend",
            "precision", "device", "size")  # fmt: skip
    return {k: getattr(args, k) for k in keys}


def build_engine(spec: dict[str, Any]) -> Any:
    """An engine from :func:`engine_spec`'s data: a ``.segfast`` file loaded, or the model
    compiled with a dynamic batch at ``size`` (default: the zoo's standard size)."""
    import torch

    import segfast
    from segfast.cli import build_model
    from segfast.commands.bench import input_channels
    from segfast.models import find_spec

    ref = spec["model"]
    if ref.endswith(".segfast"):
        return segfast.load(ref, device=spec["device"])
    args = argparse.Namespace(**spec)
    model = build_model(args)
    if spec["weights"]:
        segfast.load_weights(model, spec["weights"])
    zoo = find_spec(ref)
    size = spec["size"] or (zoo.standard_size if zoo is not None else (512, 512))
    device = spec["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    return segfast.compile(
        model,
        input_shape=(1, input_channels(model), *size),
        backend=spec["backend"],
        precision=spec["precision"],
        output="mask",
        device=device,
        dynamic=("batch",),
    )


def preflight(args: argparse.Namespace) -> None:
    """What every replica would fail on, found here before Ray starts: a replica's error
    reaches the command line only as Ray's "Deploying application failed" ~25 s later.
    An engine file is read and verified (digests; versions and device too where the
    replicas run here, not on a cluster's ``--address``); a model is built and its
    weights loaded (the replicas compile it)."""
    import torch

    local = not args.address  # a cluster's replicas may have the GPUs this machine lacks
    if local:
        usable_device(args.device)
    if args.model.endswith(".segfast"):
        from pathlib import Path

        from segfast.runtime import engine_file

        meta, _ = engine_file.read(args.model)
        if local:
            dev = torch.device(args.device or meta["device"]["type"])
            engine_file.check_compatible(meta, Path(args.model), dev, None)
        return
    import segfast
    from segfast.cli import build_model

    model = build_model(args)
    if args.weights:
        segfast.load_weights(model, args.weights)


def _text(status: int, reason: str) -> Any:
    from starlette.responses import PlainTextResponse

    return PlainTextResponse(reason + "\n", status_code=status)


def deployment_class() -> type:
    """The Ray Serve deployment (a class made here so that importing this module, e.g.
    for ``segfast --help``, does not import Ray)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    from segfast.runtime.serving import FORMATS, BadRequest, SegmentService

    class SegmentDeployment:
        def __init__(
            self, spec: dict[str, Any], service: dict[str, Any], max_batch: int, wait_ms: float
        ) -> None:
            self.engine = build_engine(spec)
            self.service = SegmentService(self.engine, max_batch=max_batch, **service)
            self.segment_batch.set_max_batch_size(max_batch)
            self.segment_batch.set_batch_wait_timeout_s(wait_ms / 1e3)
            self.batches: Counter[int] = Counter()  # batches served, by size
            self.requests: Counter[int] = Counter()  # responses, by status
            self.started = time.time()
            self.lock = threading.Lock()  # the engine runs one batch at a time

        def _run(self, frames: list[Any]) -> list[Any]:
            with self.lock:
                return self.service.segment(frames)

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
        async def segment_batch(self, frames: list[Any]) -> list[Any]:
            masks = await asyncio.to_thread(self._run, frames)
            self.batches[len(frames)] += 1
            return [(m, len(frames)) for m in masks]

        def _status(self, response: Any) -> Any:
            self.requests[response.status_code] += 1
            return response

        async def __call__(self, request: Request) -> Any:
            path = request.url.path.rstrip("/") or "/"
            if path == "/healthz":
                if request.method != "GET":
                    return self._status(_text(405, "use GET /healthz"))
                info = self.service.info()
                return self._status(
                    JSONResponse(
                        {
                            "status": "ok",
                            "engine": info.engine,
                            "input": info.input,
                            "output": info.output,
                            "classes": info.classes,
                            "batching": info.batching,
                            "max_pixels": self.service.max_pixels,
                            "replica_pid": os.getpid(),
                            "uptime_s": round(time.time() - self.started, 3),
                            "batches": {str(k): v for k, v in sorted(self.batches.items())},
                            "responses": {str(k): v for k, v in sorted(self.requests.items())},
                        }
                    )
                )
            if path != "/segment":
                return self._status(_text(404, f"no route {path}: POST /segment, GET /healthz"))
            if request.method != "POST":
                return self._status(_text(405, "POST the image to /segment"))
            fmt = request.query_params.get("format", "png")
            if fmt not in FORMATS:
                return self._status(_text(400, f"format must be one of {FORMATS}, got {fmt!r}"))
            try:
                body = await request.body()
                frame = await asyncio.to_thread(self.service.decode, body)
                mask, batch = await self.segment_batch(frame)
                if isinstance(mask, Exception):  # this request's frame failed, alone
                    raise mask
                from segfast.runtime.serving import encode_mask

                data, ctype = await asyncio.to_thread(encode_mask, mask, fmt)
            except BadRequest as exc:
                return self._status(_text(exc.status, exc.reason))
            except InputError as exc:  # the engine refused this image (a guard, a size)
                return self._status(_text(422, str(exc)))
            except Exception as exc:  # the engine failed on this request; keep serving
                return self._status(_text(500, f"inference failed: {type(exc).__name__}: {exc}"))
            return self._status(
                Response(data, media_type=ctype, headers={"X-Segfast-Batch": str(batch)})
            )

    return SegmentDeployment


def build_app(args: argparse.Namespace) -> Any:
    """The Ray Serve application ``args`` describe (not started)."""
    from ray import serve

    if args.max_batch_size < 1:
        raise InputError(f"--max-batch-size must be ≥ 1, got {args.max_batch_size}")
    if args.batch_wait_ms < 0:
        raise InputError(f"--batch-wait-ms must be ≥ 0, got {args.batch_wait_ms}")
    if args.replicas < 1:
        raise InputError(f"--replicas must be ≥ 1, got {args.replicas}")
    if args.max_pixels < 1:
        raise InputError(f"--max-pixels must be ≥ 1, got {args.max_pixels}")
    if args.model.endswith(".segfast"):
        refuse_compile_flags(args)
    preflight(args)
    service = {"mean": args.mean, "std": args.std, "max_pixels": args.max_pixels}
    deployment = serve.deployment(deployment_class()).options(
        name="SegmentDeployment",
        num_replicas=args.replicas,
        max_ongoing_requests=max(64, 4 * args.max_batch_size),
        ray_actor_options={"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus},
    )
    return deployment.bind(engine_spec(args), service, args.max_batch_size, args.batch_wait_ms)


def start(args: argparse.Namespace) -> str:
    """Start Ray (local unless ``--address``) and the service; return its base URL."""
    import ray
    from ray import serve

    app = build_app(args)
    if not ray.is_initialized():
        if args.address:
            ray.init(address=args.address, log_to_driver=False)
        else:
            # A local Ray on a busy machine: Serve's controller gives the HTTP proxy 5 s to
            # say it is ready and kills it after that, which fails serve.start (seen on
            # 2 loaded cores). Its processes inherit this environment.
            os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
            ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    for attempt in range(3):
        try:
            serve.start(http_options={"host": args.host, "port": args.port})
            break
        except (ray.exceptions.RayActorError, TimeoutError):
            if attempt == 2:
                raise
            time.sleep(2.0)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{args.host}:{args.port}"


def run(args: argparse.Namespace) -> int:
    url = start(args)
    import ray
    from ray import serve

    print(f"segfast serve: {url}/segment (POST an image), {url}/healthz", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("segfast serve: stopping", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _floats(text: str) -> tuple[float, ...]:
    from segfast.commands.run import _floats as floats

    return floats(text)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP segmentation service on Ray Serve (POST /segment, GET /healthz)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--weights", default=None, help="weights file (safetensors or state dict)")
    p.add_argument("--backend", default="auto", help="backend to compile MODEL with (auto)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--size", type=parse_size, default=None, help="MODEL's input size HxW")
    p.add_argument("--mean", type=_floats, default=None, help="normalisation mean, e.g. 0.5")
    p.add_argument("--std", type=_floats, default=None, help="normalisation std")
    p.add_argument("--max-batch-size", type=int, default=8, help="images per batch (8)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="longest wait for a batch to fill, ms (5)")  # fmt: skip
    p.add_argument("--replicas", type=int, default=1, help="replicas, each with its engine (1)")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica (1)")
    p.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (0)")
    p.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="largest image accepted, in pixels (40 M)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (8000)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the local Ray instance (default: all)")  # fmt: skip
    p.set_defaults(func=run)


def healthz(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET ``url``/healthz as a dict (for scripts and tests waiting for a service)."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/healthz", timeout=timeout) as r:
        return json.loads(r.read())
