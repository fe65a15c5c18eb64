"""Batch segmentation on Ray Data: many inputs, a pool of actors with one engine each
(:func:`run_batch`; the pieces in :mod:`segfast.runtime.batchjob`).

How a job runs:

1. **Plan** (this process, the *driver*): find the inputs, read the manifest, skip what
   is done and verified, cut the rest into units — groups of ``batch`` images, one
   unit per video, bands of ``band_rows`` tile rows per large image (by default about
   four bands per actor for one image, so that one gigapixel image keeps every actor
   busy). Large images are read only for their size here.
2. **Run**: ``ray.data.from_items(units)`` (one block per unit, so that one unit is the
   unit of scheduling and of retry) → ``map_batches`` with an actor pool
   (``ActorPoolStrategy(size=actors)``, ``batch_size=1``): each actor builds its engine
   once (``make_engine()``: loads the engine file on its device) and runs units with a
   :class:`~segfast.runtime.batchjob.BatchWorker`. ``num_gpus`` per actor where GPUs are
   asked for, CPUs otherwise (and ``torch.set_num_threads`` to the actor's CPUs).
3. **Collect** (driver, as results stream back): each finished input gets its manifest
   line; a large image is stitched into its TIFF once all its bands are in.

Failures: an item that raises is retried in its actor and then reported failed with the
reason. An actor that *dies* (killed, out of memory, a crash in native code) is
restarted by Ray and its unit re-run on a live actor (``max_task_retries``); outputs
are written whole under their final names only, so a re-run unit overwrites nothing
half-done, and the driver keeps the first result of each unit (nothing reported twice).
A unit whose actor dies on every retry is reported failed, and the job goes on
(``DataContext.max_errored_blocks`` unlimited for this job). Ctrl-C stops the actors
(the local Ray instance this started is shut down), clears staging files, and leaves
the manifest describing exactly the outputs that are complete; a rerun continues.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from segfast.errors import InputError
from segfast.runtime._progress import Progress
from segfast.runtime.batchjob import (
    MANIFEST,
    SCRATCH,
    BatchWorker,
    Item,
    Manifest,
    WorkerOptions,
    assemble_bands,
    band_plan,
    discover,
    input_stamp,
    job_key,
    output_digest,
    remove_debris,
    still_done,
)

__all__ = ["BatchReport", "run_batch"]


@dataclass
class BatchReport:
    """What a job did. ``done`` / ``failed`` count this run's inputs, ``skipped`` the
    inputs a previous run finished (verified), ``failed_before`` the inputs that failed
    before and were left alone (``retry_failed`` redoes them)."""

    output: str
    manifest: str
    inputs: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    failed_before: int = 0
    ignored_files: int = 0
    frames: int = 0
    tiles: int = 0
    images: int = 0
    videos: int = 0
    large: int = 0
    seconds: float = 0.0
    actors: int = 0
    units: int = 0
    workers_replaced: int = 0  # actors that died (killed, crashed) and were restarted
    peak_actor_rss_mb: float = 0.0
    interrupted: bool = False
    failures: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def summary(self) -> str:
        rate = []
        if self.seconds > 0:
            if self.frames:
                rate.append(f"{self.frames / self.seconds:.1f} frames/s")
            if self.tiles:
                rate.append(f"{self.tiles / self.seconds:.1f} tiles/s")
        lines = [
            f"segfast batch: {self.inputs} input(s): {self.done} done, {self.failed} failed, "
            f"{self.skipped} already done, {self.failed_before} failed before (left alone)"
            + (" — INTERRUPTED" if self.interrupted else ""),
            f"  this run: {self.images} image(s), {self.videos} video(s), {self.large} large "
            f"image(s); {self.frames} frame(s), {self.tiles} tile(s) in {self.seconds:.1f} s"
            + (f" ({', '.join(rate)})" if rate else ""),
            f"  {self.actors} actor(s), {self.units} unit(s), {self.workers_replaced} worker(s) "
            f"died and replaced; peak actor memory {self.peak_actor_rss_mb:.0f} MB",
            f"  manifest: {self.manifest}",
        ]
        if self.ignored_files:
            lines.append(f"  {self.ignored_files} file(s) of other types ignored")
        for f in self.failures[:20]:
            lines.append(f"  FAILED {f['name']}: {f['error']}")
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more (see the manifest)")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


class _Actor:
    """A Ray Data actor: one engine, units in, JSON results out."""

    def __init__(self, make_engine: Callable[[], Any], options: dict[str, Any],
                 threads: int) -> None:  # fmt: skip
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.worker = BatchWorker(make_engine(), WorkerOptions(**options))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        out: list[str] = []
        for text in batch["unit"]:
            unit = json.loads(str(text))
            out.extend(json.dumps(r, default=str) for r in self.worker.run(unit))
        return {"result": np.array(out, dtype=object)}


@contextlib.contextmanager
def _lock(scratch: Path) -> Any:
    scratch.mkdir(parents=True, exist_ok=True)
    fh = open(scratch / "lock", "a+")  # noqa: SIM115 - held for the whole job
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"another segfast batch job is writing to {scratch.parent}; wait for it "
                f"or choose another output folder"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()


def _large_shape(path: str) -> tuple[int, int]:
    from segfast.runtime.largeimage import open_large

    r = open_large(path)
    try:
        return int(r.shape[0]), int(r.shape[1])
    finally:
        if hasattr(r, "close"):
            r.close()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_batch(
    make_engine: Callable[[], Any],
    inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    engine_digest: str,
    tile_grid: Callable[[int, int], Any],
    options: WorkerOptions | None = None,
    video_output: str = "mkv",
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    band_rows: int | None = None,
    max_task_retries: int = 3,
    retry_failed: bool = False,
    verify: str = "digest",
    address: str | None = None,
    num_cpus: int | None = None,
    progress: bool = False,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    quiet_ray: bool = True,
) -> BatchReport:
    """Run a batch job (module docstring); return its :class:`BatchReport`.

    ``make_engine``: a picklable zero-argument callable each actor calls once to build
    its engine. ``engine_digest``: names the engine in the job key (a changed engine
    redoes everything). ``tile_grid(h, w)``: the engine's overlap-tile grid for an
    h×w image (to cut bands). ``on_record`` is called with each manifest record as it
    is written (a progress hook; raising ``KeyboardInterrupt`` there stops the job as
    Ctrl-C does).
    """
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError(
            f"segfast batch runs on Ray Data: pip install 'segfast[batch]' ({exc})"
        ) from exc

    opts = options or WorkerOptions()
    if opts.blend not in ("crop", "gaussian"):
        raise InputError(f"blend must be 'crop' or 'gaussian', got {opts.blend!r}")
    if verify not in ("digest", "size"):
        raise InputError(f"verify must be 'digest' or 'size', got {verify!r}")
    if cpus_per_actor <= 0 or gpus_per_actor < 0:
        raise InputError("cpus_per_actor must be > 0 and gpus_per_actor ≥ 0")
    if actors is not None and actors < 1:
        raise InputError(f"actors must be ≥ 1, got {actors}")
    t_start = time.perf_counter()
    out_dir = Path(output).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output {out_dir} is a file; give a folder")
    items, ignored = discover(inputs, video_output=video_output, exclude=out_dir)
    input_paths = {it.path for it in items}
    for it in items:
        if it.output and str(out_dir / it.output) in input_paths:
            raise InputError(f"the output for {it.path} would overwrite an input: {it.output}")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out_dir / MANIFEST)
    scratch_root = out_dir / SCRATCH
    settings = {"engine": engine_digest, "video_output": video_output, **opts.as_dict()}
    settings.pop("retries")
    settings.pop("batch")  # a batch size changes no output
    key = job_key(settings)
    report = BatchReport(output=str(out_dir), manifest=str(manifest.path),
                         inputs=len(items), ignored_files=ignored)  # fmt: skip

    with _lock(scratch_root):
        scratch = scratch_root / f"job-{key}"
        for old in scratch_root.glob("job-*"):  # band files of other engines or settings
            if old != scratch:
                shutil.rmtree(old, ignore_errors=True)
        latest = manifest.latest()
        if manifest.bad_lines:
            report.notes.append(f"{manifest.bad_lines} unreadable manifest line(s) ignored")
        todo: list[Item] = []
        for it in items:
            rec = latest.get(it.path)
            if rec is not None and rec.get("job") == key:
                if still_done(rec, out_dir, it, verify):
                    report.skipped += 1
                    continue
                if rec.get("status") == "failed" and not retry_failed:
                    try:
                        same = all(rec.get(k) == v for k, v in input_stamp(it.path).items())
                    except OSError:
                        same = it.problem is not None and rec.get("error", "").endswith(it.problem)
                    if same:
                        report.failed_before += 1
                        continue
            todo.append(it)
        remove_debris({(out_dir / it.output).parent for it in todo if it.output} | {out_dir})

        def record(it: Item, status: str, **fields: Any) -> None:
            rec: dict[str, Any] = {
                "input": it.path, "name": it.name, "kind": it.kind or None,
                "output": it.output or None, "status": status,
            }  # fmt: skip
            with contextlib.suppress(OSError):
                rec.update(input_stamp(it.path))
            rec.update(fields)
            rec.update({"job": key, "time": _now()})
            manifest.append(rec)
            if status == "done":
                report.done += 1
                if it.kind == "image":
                    report.images += 1
                elif it.kind == "video":
                    report.videos += 1
                else:
                    report.large += 1
            else:
                report.failed += 1
                report.failures.append({"name": it.name, "error": rec.get("error")})
            if on_record is not None:
                on_record(rec)

        for it in todo:
            if it.problem is not None:
                record(it, "failed", error=f"{it.path} {it.problem}")
        runnable = [it for it in todo if it.problem is None]
        if not runnable:
            report.seconds = time.perf_counter() - t_start
            return report

        started_ray = False
        try:  # Ctrl-C anywhere from here on ends the job cleanly (the report says so)
            if not ray.is_initialized():
                started_ray = True
                if address:
                    ray.init(address=address, log_to_driver=not quiet_ray)
                else:
                    ray.init(num_cpus=num_cpus, include_dashboard=False,
                             log_to_driver=not quiet_ray)  # fmt: skip
            n_actors = actors or _default_actors(ray, cpus_per_actor, gpus_per_actor)
            units, large = _plan(runnable, out_dir, scratch, opts, tile_grid, n_actors,
                                 band_rows, record)  # fmt: skip
            report.units = len(units)
            # no more actors than units: each one loads an engine before its first unit
            n_actors = min(n_actors, len(units))
            report.actors = n_actors
            by_index = {it.index: it for it in runnable}
            if units:
                _execute(ray, make_engine, units, large, by_index, opts, n_actors,
                         cpus_per_actor, gpus_per_actor, max_task_retries, out_dir, record,
                         report, progress, quiet_ray)  # fmt: skip
            for lg in large.values():  # every band done (some by an interrupted run)
                if not lg.pending and not lg.failed and not lg.recorded:
                    _finish_large(lg, out_dir, record)
        except KeyboardInterrupt:
            report.interrupted = True
        finally:
            try:
                if started_ray:
                    ray.shutdown()  # stops every actor
            except KeyboardInterrupt:
                report.interrupted = True
            finally:
                remove_debris({(out_dir / it.output).parent for it in todo if it.output}
                              | {out_dir})  # fmt: skip
        if not report.interrupted:
            shutil.rmtree(scratch, ignore_errors=True)
        report.seconds = time.perf_counter() - t_start
    return report


def _default_actors(ray: Any, cpus: float, gpus: float) -> int:
    res = ray.cluster_resources()
    n = math.floor(float(res.get("CPU", 1)) / cpus)
    if gpus > 0:
        n = min(n, math.floor(float(res.get("GPU", 0)) / gpus))
        if n < 1:
            raise InputError(
                f"{gpus} GPU(s) per actor asked for, the Ray cluster has "
                f"{res.get('GPU', 0)}: drop --gpus-per-actor for CPU actors"
            )
    return max(n, 1)


@dataclass
class _Large:
    item: Item
    height: int
    width: int
    bands: list[tuple[int, Path]]  # (first image row, band file)
    pending: set[int]
    tiles: int
    failed: bool = False
    recorded: bool = False
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


def _plan(
    runnable: list[Item],
    out_dir: Path,
    scratch: Path,
    opts: WorkerOptions,
    tile_grid: Callable[[int, int], Any],
    n_actors: int,
    band_rows: int | None,
    record: Callable[..., None],
) -> tuple[list[dict[str, Any]], dict[int, _Large]]:
    """Units, biggest first: large-image bands, videos (largest file first), images."""
    units: list[dict[str, Any]] = []
    large: dict[int, _Large] = {}
    bands_first: list[tuple[int, list[dict[str, Any]]]] = []
    for it in runnable:
        if it.kind != "large":
            continue
        try:
            h, w = _large_shape(it.path)
            grid = tile_grid(h, w)
        except (InputError, OSError) as exc:
            record(it, "failed", error=str(exc))
            continue
        stamp = input_stamp(it.path)
        folder = scratch / f"{it.index:06d}-{stamp['input_bytes']}-{stamp['input_mtime_ns']}"
        whole = opts.blend != "crop"
        per = band_rows or max(1, math.ceil(grid.rows / (4 * n_actors)))
        plan = [(0, grid.rows)] if whole else band_plan(grid.rows, per)
        lg = _Large(it, h, w, [], set(), grid.rows * grid.cols)
        mine = []
        for b, (i0, i1) in enumerate(plan):
            y0, y1 = i0 * grid.sy, min(i1 * grid.sy, h)
            f = folder / f"band-{i0:05d}-{i1:05d}.npy"
            lg.bands.append((y0, f))
            if f.exists():  # finished by an interrupted run of this same job
                continue
            lg.pending.add(b)
            mine.append({
                "kind": "band", "item": it.index, "band": b, "path": it.path,
                "size": [h, w], "rows": [i0, i1], "y": [y0, y1], "file": str(f),
                "tiles": (i1 - i0) * grid.cols, "whole": whole,
            })  # fmt: skip
        large[it.index] = lg
        bands_first.append((h * w, mine))
    for _, mine in sorted(bands_first, key=lambda t: -t[0]):
        units.extend(mine)
    videos = sorted((it for it in runnable if it.kind == "video"),
                    key=lambda it: -os.path.getsize(it.path))  # fmt: skip
    for it in videos:
        units.append({"kind": "video", "item": it.index, "path": it.path,
                      "output": str(out_dir / it.output)})  # fmt: skip
    images = [it for it in runnable if it.kind == "image"]
    group = opts.batch or 4
    for k in range(0, len(images), group):
        g = images[k : k + group]
        units.append({"kind": "images", "items": [it.index for it in g],
                      "paths": [it.path for it in g],
                      "outputs": [str(out_dir / it.output) for it in g]})  # fmt: skip
    for u, unit in enumerate(units):
        unit["unit"] = u
    return units, large


def _execute(
    ray: Any,
    make_engine: Callable[[], Any],
    units: list[dict[str, Any]],
    large: dict[int, _Large],
    by_index: dict[int, Item],
    opts: WorkerOptions,
    n_actors: int,
    cpus: float,
    gpus: float,
    max_task_retries: int,
    out_dir: Path,
    record: Callable[..., None],
    report: BatchReport,
    progress: bool,
    quiet_ray: bool,
) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.max_errored_blocks, ctx.enable_progress_bars)
    ctx.max_errored_blocks = -1  # a unit whose actor always dies fails alone
    ctx.enable_progress_bars = False
    loggers = [logging.getLogger(n) for n in ("ray.data", "ray")]
    levels = [lg.level for lg in loggers]
    if quiet_ray:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
    rows = [{"unit": json.dumps(u)} for u in units]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    # Ray Data restarts dead actors and re-runs their units; finitely, so that an input
    # that kills its worker every time (a decoder crash) fails alone. (Passing these as
    # remote args is deprecated in Ray 2.60 but is the only way to bound the retries.)
    remote: dict[str, Any] = {"max_restarts": -1, "max_task_retries": max_task_retries}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = _map(ds, make_engine, opts, n_actors, cpus, gpus, remote)
    unit_items = {u["unit"]: u for u in units}
    seen: set[tuple[int, int, int]] = set()  # (unit, item, band): the first result counts
    units_done: set[int] = set()
    bar = Progress(progress, "units", len(units))
    pids: set[int] = set()
    rows_iter = iter(ds.iter_rows())
    try:
        for row in rows_iter:
            r = json.loads(str(row["result"]))
            tag = (r["unit"], r["item"], r.get("band", -1))
            if tag in seen:
                continue
            seen.add(tag)
            pids.add(r["pid"])
            report.peak_actor_rss_mb = max(report.peak_actor_rss_mb, r.get("peak_rss_mb") or 0)
            unit = unit_items[r["unit"]]
            if unit["kind"] == "band":
                units_done.add(unit["unit"])
                if r["status"] == "done":
                    report.tiles += r.get("tiles") or 0
                _band_done(large[r["item"]], r, out_dir, record)
            else:
                it = by_index[r["item"]]
                fields = {k: r.get(k) for k in ("frames", "seconds", "bytes", "sha256",
                                                  "error", "warning", "attempts", "pid",
                                                  "host", "peak_rss_mb")}  # fmt: skip
                record(it, r["status"], **{k: v for k, v in fields.items() if v is not None})
                if r["status"] == "done":
                    report.frames += r.get("frames") or 0
                members = unit.get("items", [unit.get("item")])
                if all((unit["unit"], i, -1) in seen for i in members):
                    units_done.add(unit["unit"])
            bar.update(0 if unit["unit"] not in units_done else 1,
                       status=f"done {report.done} failed {report.failed}")  # fmt: skip
    finally:
        close = getattr(rows_iter, "close", None)
        if close is not None:  # stops the streaming executor (and its actors) on Ctrl-C
            close()
        bar.close()
        ctx.max_errored_blocks, ctx.enable_progress_bars = saved
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)
    # Units that never came back: their actor died on every retry.
    lost = f"the worker running it died on each of {max_task_retries + 1} attempts"
    for unit in units:
        if unit["unit"] in units_done:
            continue
        if unit["kind"] == "band":
            lg = large[unit["item"]]
            if not lg.failed:
                lg.failed = True
                record(lg.item, "failed", error=f"band {unit['band']}: {lost}")
        else:
            for i in unit.get("items", [unit.get("item")]):
                if (unit["unit"], i, -1) not in seen:
                    record(by_index[i], "failed", error=lost)
    report.workers_replaced = max(0, len(pids) - n_actors)


def _map(ds: Any, make_engine: Callable[[], Any], opts: WorkerOptions, n_actors: int,
         cpus: float, gpus: float, remote: dict[str, Any]) -> Any:  # fmt: skip
    import ray.data

    return ds.map_batches(
        _Actor,
        fn_constructor_args=(make_engine, opts.as_dict(), max(1, int(cpus))),
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_cpus=cpus,
        num_gpus=gpus if gpus > 0 else None,
        **remote,
    )


def _band_done(lg: _Large, r: dict[str, Any], out_dir: Path, record: Callable[..., None]) -> None:
    if lg.failed:
        return
    lg.seconds += r.get("seconds") or 0.0
    lg.peak_rss_mb = max(lg.peak_rss_mb, r.get("peak_rss_mb") or 0.0)
    if r["status"] != "done":
        lg.failed = True
        record(lg.item, "failed", error=f"band {r.get('band')}: {r.get('error')}",
               attempts=r.get("attempts"))  # fmt: skip
        return
    lg.pending.discard(r["band"])
    if not lg.pending:
        _finish_large(lg, out_dir, record)


def _finish_large(lg: _Large, out_dir: Path, record: Callable[..., None]) -> None:
    lg.recorded = True
    target = out_dir / lg.item.output
    t0 = time.perf_counter()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        assemble_bands(target, lg.bands, lg.height, lg.width)
    except (InputError, OSError, ValueError) as exc:
        lg.failed = True
        record(lg.item, "failed", error=f"stitching the bands failed: {exc}")
        return
    size, digest = output_digest(target)
    record(lg.item, "done", tiles=lg.tiles, bands=len(lg.bands),
           seconds=round(lg.seconds + time.perf_counter() - t0, 4), bytes=size, sha256=digest,
           height=lg.height, width=lg.width, peak_rss_mb=lg.peak_rss_mb)  # fmt: skip
    for _, f in lg.bands:
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
