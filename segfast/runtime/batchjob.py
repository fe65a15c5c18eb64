"""The pieces of a batch job that do not need Ray: finding inputs, naming outputs, the
manifest, and the work one engine does on one unit (:class:`BatchWorker`).

:mod:`segfast.runtime.batchrun` runs units on Ray Data actors; everything here also
runs in one process, which is how the tests check it against ``segfast run`` and
``segment_large``.

**Inputs** (:func:`discover`): directories (walked recursively, hidden entries skipped),
glob patterns (``**`` allowed), list files (``.txt``/``.lst``/``.list``: one path a
line, relative to the list's folder, ``#`` comments) and single files. By suffix:

* images (``.png .jpg .jpeg .bmp .webp .ppm .pgm``) → ``NAME.png``: the class-id mask
  at the image's size, exactly what ``segfast run IMAGE --output NAME.png --mask``
  writes (resized to the engine's input, mask resized back by nearest neighbour);
* videos (``.mp4 .mkv .mov .avi .webm .ts .m4v .mpg .mpeg .flv .wmv``) → ``NAME.mkv``
  (or ``.mp4``): the mask video ``segfast run VIDEO --mask`` writes (palette colours,
  lossy), or with ``video_output="png"`` a folder ``NAME/`` of class-id PNGs, one per
  frame (lossless);
* large images (``.tif .tiff``, tiled, striped or pyramidal, read tile by tile;
  ``.npy`` arrays, memory-mapped) → ``NAME.mask.tif``: a tiled, deflate-compressed TIFF
  of class ids from overlap-tile inference at full resolution (``segment_large``).

``NAME`` is the input's path relative to the folder (or the glob's fixed prefix, or the
list's common folder) it was found under, without its suffix; two inputs that would
share an output keep their suffix in it (``a.jpg.png``, ``a.png.png``).

**Units** are what one actor call does: a group of images (batched through the engine
together), one video (frames batched), or one band of tile rows of a large image (tiles
batched; the band's mask is written to a scratch ``.npy`` and the bands are stitched
into the TIFF once all are done — :func:`assemble_bands`).

**Outputs** appear whole or not at all: PNG and TIFF files are written under a
temporary name and renamed; a video or PNG folder is written under a staging name
(``.NAME.segfast-staging…``) and renamed when it is complete, so a crash, a killed
worker or Ctrl-C leaves no partial output under a final name. :func:`remove_debris`
clears staging and temporary names a killed process left.

**The manifest** (``manifest.jsonl`` in the output folder, :class:`Manifest`) gets one
JSON line per finished input: ``input``, ``name``, ``kind``, ``output``, ``status``
(``done`` / ``failed``), ``frames`` / ``tiles``, ``seconds``, ``bytes`` and ``sha256``
of the output (a folder's digest is over its files' names and digests), the input's
size and mtime, ``error`` / ``warning``, the worker's pid and peak memory, and ``job``
(a digest of the engine and the settings). A rerun with the same job skips inputs whose
latest record is ``done`` with the output still matching its size and digest and the
input unchanged, and inputs that failed unchanged (``retry_failed`` redoes them);
everything else is redone.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import resource
import shutil
import socket
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segfast._io import sha256_file
from segfast.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".ts", ".m4v", ".mpg", ".mpeg",
                  ".flv", ".wmv")  # fmt: skip
LARGE_SUFFIXES = (".tif", ".tiff", ".npy")
LIST_SUFFIXES = (".txt", ".lst", ".list")
VIDEO_OUTPUTS = ("mkv", "mp4", "png")
KINDS = ("image", "video", "large")
MANIFEST = "manifest.jsonl"
SCRATCH = ".segfast-batch"  # band files, the lock, engines the job saved
_STAGING = ".segfast-staging"
# what a killed process can leave: staging names, atomic_path's and VideoWriter's temps
_DEBRIS = re.compile(r"^\..*(\.segfast-staging.*|\.tmp-\d+|\.partial-\d+\.[A-Za-z0-9]+)$")


# -- inputs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One input file and where its output goes."""

    index: int
    path: str  # absolute
    name: str  # relative, posix
    kind: str  # "image" | "video" | "large"; "" when it cannot be run (problem says why)
    output: str  # relative to the output folder, posix ("" with a problem)
    problem: str | None = None


def kind_of(path: str | os.PathLike[str]) -> str:
    """ "image", "video", "large" or "" (not a supported file) by suffix."""
    s = Path(path).suffix.lower()
    if s in IMAGE_SUFFIXES:
        return "image"
    if s in VIDEO_SUFFIXES:
        return "video"
    if s in LARGE_SUFFIXES:
        return "large"
    return ""


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _inside(f: Path, folder: Path | None) -> bool:
    return folder is not None and (f == folder or folder in f.parents)


def _expand(spec: str, exclude: Path | None) -> tuple[list[tuple[Path, Path, bool]], int]:
    """(file, root, explicit) triples for one ``--input``, and files ignored (unknown
    suffix found by walking or globbing). Files under ``exclude`` (the output folder,
    when it lies inside an input folder) are not inputs."""
    p = Path(spec).expanduser()
    found: list[tuple[Path, Path, bool]] = []
    ignored = 0
    if p.is_dir():
        root = p.resolve()
        for f in sorted(root.rglob("*")):
            rel = f.relative_to(root)
            if _hidden(rel) or not f.is_file() or _inside(f, exclude):
                continue
            if kind_of(f):
                found.append((f, root, False))
            else:
                ignored += 1
        if not found:
            raise InputError(
                f"input folder {spec} holds no images ({' '.join(IMAGE_SUFFIXES)}), videos "
                f"({' '.join(VIDEO_SUFFIXES)}) or large images ({' '.join(LARGE_SUFFIXES)})"
            )
        return found, ignored
    if glob.has_magic(spec):
        root = _glob_root(spec).resolve()
        for m in sorted(glob.glob(str(p), recursive=True)):
            f = Path(m)
            if not f.is_file() or _inside(f.resolve(), exclude):
                continue
            if kind_of(f):
                found.append((f.resolve(), root, False))
            else:
                ignored += 1
        if not found:
            raise InputError(f"input pattern {spec} matches no image, video or large image")
        return found, ignored
    if p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
        base = p.resolve().parent
        entries = []
        for line in p.read_text(errors="replace").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            q = Path(line).expanduser()
            entries.append((q if q.is_absolute() else base / q).resolve())
        if not entries:
            raise InputError(f"list file {spec} names no input")
        root = Path(os.path.commonpath([str(e.parent) for e in entries]))
        return [(e, root, True) for e in entries], 0
    if p.is_file():
        f = p.resolve()
        return [(f, f.parent, True)], 0
    raise InputError(
        f"input {spec} does not exist: give a folder, a glob pattern, a list file "
        f"({' '.join(LIST_SUFFIXES)}) or a file"
    )


def _output_name(rel: str, kind: str, video_output: str, keep_suffix: bool) -> str:
    stem = rel if keep_suffix else str(Path(rel).with_suffix("").as_posix())
    if kind == "image":
        return f"{stem}.png"
    if kind == "large":
        return f"{stem}.mask.tif"
    return stem if video_output == "png" else f"{stem}.{video_output}"


def discover(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    video_output: str = "mkv",
    exclude: str | os.PathLike[str] | None = None,
) -> tuple[list[Item], int]:
    """Every input file (module docstring), in a stable order, and the number of files
    ignored for an unknown suffix. Files named explicitly (a list file, a path) that are
    missing or of an unknown kind are kept as items with a ``problem``. Folders and
    globs skip what lies under ``exclude`` (the job's output folder)."""
    skip = Path(exclude).resolve() if exclude is not None else None
    if video_output not in VIDEO_OUTPUTS:
        raise InputError(f"video_output must be one of {VIDEO_OUTPUTS}, got {video_output!r}")
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    if not inputs:
        raise InputError("no input given")
    seen: dict[str, tuple[Path, Path, bool]] = {}
    ignored = 0
    for spec in inputs:
        found, n = _expand(os.fspath(spec), skip)
        ignored += n
        for f, root, explicit in found:
            seen.setdefault(str(f), (f, root, explicit))
    rows = []
    for f, root, _ in seen.values():
        try:
            rel = f.relative_to(root).as_posix()
        except ValueError:
            rel = f.name
        problem = None
        kind = kind_of(f)
        if not f.exists():
            problem = "does not exist"
        elif not f.is_file():
            problem = "is not a file"
        elif not kind:
            problem = f"unsupported file type {f.suffix or '(no suffix)'!r}"
        rows.append((f, rel, kind if problem is None else "", problem))
    names = Counter(_output_name(r, k, video_output, False) for _, r, k, p in rows if not p)
    items: list[Item] = []
    taken: dict[str, str] = {}
    for f, rel, kind, problem in rows:
        out = ""
        if problem is None:
            out = _output_name(rel, kind, video_output, False)
            if names[out] > 1:
                out = _output_name(rel, kind, video_output, True)
            if out in taken:
                raise InputError(
                    f"inputs {taken[out]} and {f} would both write {out}: run them as "
                    f"separate jobs (or rename one)"
                )
            taken[out] = str(f)
        items.append(Item(len(items), str(f), rel, kind, out, problem))
    return items, ignored


# -- digests, manifest ----------------------------------------------------------------------
def output_digest(path: str | os.PathLike[str]) -> tuple[int, str]:
    """(bytes, sha256) of an output file, or of a folder (over its files' relative
    names and digests, sorted)."""
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha256()
        total = 0
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            total += f.stat().st_size
            h.update(f"{f.relative_to(p).as_posix()}\0{sha256_file(f)}\n".encode())
        return total, h.hexdigest()
    return p.stat().st_size, sha256_file(p)


def input_stamp(path: str | os.PathLike[str]) -> dict[str, int]:
    """The input's size and mtime (a changed input is redone)."""
    st = os.stat(path)
    return {"input_bytes": st.st_size, "input_mtime_ns": st.st_mtime_ns}


def job_key(settings: dict[str, Any]) -> str:
    """A digest of what decides an output: the engine's digest and the settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class Manifest:
    """``manifest.jsonl``: append-only, one JSON object a line, each line flushed and
    synced before the next input is reported; a line cut short by a crash is ignored
    on reading (and counted in ``bad_lines``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.bad_lines = 0

    def records(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        self.bad_lines = 0
        if not self.path.exists():
            return out
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    self.bad_lines += 1
                    continue
                if isinstance(rec, dict) and "input" in rec and "status" in rec:
                    out.append(rec)
                else:
                    self.bad_lines += 1
        return out

    def latest(self) -> dict[str, dict[str, Any]]:
        """The last record of each input."""
        return {r["input"]: r for r in self.records()}

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, default=str)
        with open(self.path, "a+b") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() > 0:  # a line cut short by a crash: start on a line of our own
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
            fh.write(line.encode("utf-8") + b"\n")
            fh.flush()
            os.fsync(fh.fileno())


def still_done(record: dict[str, Any], out_dir: Path, item: Item, verify: str) -> bool:
    """Whether a ``done`` record still stands: same output name, the output there with
    the recorded size (and digest, ``verify="digest"``), the input unchanged."""
    if record.get("status") != "done" or record.get("output") != item.output:
        return False
    target = out_dir / item.output
    if not target.exists():
        return False
    try:
        stamp = input_stamp(item.path)
    except OSError:
        return False
    if any(record.get(k) != v for k, v in stamp.items()):
        return False
    if verify == "size":
        if target.is_dir():
            size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        else:
            size = target.stat().st_size
        return size == record.get("bytes")
    size, digest = output_digest(target)
    return size == record.get("bytes") and digest == record.get("sha256")


def remove_debris(folders: Iterable[Path]) -> int:
    """Delete staging and temporary names (``.NAME.segfast-staging…``, ``.NAME.tmp-PID``,
    ``.NAME.partial-PID.ext``) a killed process left in ``folders``; return how many."""
    n = 0
    for d in folders:
        if not d.is_dir():
            continue
        for entry in d.iterdir():
            if _DEBRIS.match(entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
                n += 1
    return n


# -- large images: bands ----------------------------------------------------------------------
def band_plan(rows: int, band_rows: int) -> list[tuple[int, int]]:
    """Tile rows 0..rows split into bands of ``band_rows``."""
    if band_rows < 1:
        raise InputError(f"band_rows must be ≥ 1, got {band_rows}")
    return [(i, min(i + band_rows, rows)) for i in range(0, rows, band_rows)]


def assemble_bands(
    target: Path,
    bands: Sequence[tuple[int, Path]],
    height: int,
    width: int,
) -> None:
    """Stitch band masks (``(first image row, .npy file)``, in row order, covering rows
    0..height) into the tiled TIFF ``target`` (written atomically), reading them as
    memmaps a tile row at a time."""
    from segfast.runtime.largeimage import write_tiled_tiff

    arrays = []  # (first row, rows, file, data offset, dtype)
    y = 0
    for y0, f in bands:
        with open(f, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)  # fmt: skip
            shape, fortran, dt = read(fh)
            offset = fh.tell()
        if y0 != y or len(shape) != 2 or shape[1] != width or fortran:
            raise InputError(f"band {f} (rows from {y0}, shape {shape}) does not fit at row {y}")
        if f.stat().st_size != offset + shape[0] * shape[1] * dt.itemsize:
            raise InputError(f"band {f} is truncated")
        arrays.append((y0, shape[0], f, offset, dt))
        y += shape[0]
    if y != height:
        raise InputError(f"bands cover {y} rows of {height}")
    if len({a[4] for a in arrays}) != 1:
        raise InputError(f"bands of {target} differ in dtype")
    dtype = arrays[0][4]

    def rows(y0: int, y1: int) -> np.ndarray:
        # plain reads, no memory map: the stitching process holds one tile row
        out = np.empty((y1 - y0, width), dtype)
        for b0, n, f, offset, _ in arrays:
            lo, hi = max(y0, b0), min(y1, b0 + n)
            if lo < hi:
                with open(f, "rb") as fh:
                    fh.seek(offset + (lo - b0) * width * dtype.itemsize)
                    buf = fh.read((hi - lo) * width * dtype.itemsize)
                out[lo - y0 : hi - y0] = np.frombuffer(buf, dtype).reshape(hi - lo, width)
        return out

    write_tiled_tiff(target, rows, height, width, dtype)


# -- the work of one actor ------------------------------------------------------------------
@dataclass
class WorkerOptions:
    """What a worker needs besides its engine (plain data: Ray ships it to actors)."""

    batch: int | None = None  # frames / tiles per engine call (None: 4, or the static batch)
    tile: tuple[int, int] | None = None  # dynamic engines' tile (None: segment_large's)
    overlap: int = 64
    blend: str = "crop"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    retries: int = 1  # extra attempts for an item that raises (not for bad input)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / 1024, 1)


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip() or traceback.format_exception_only(type(exc), exc)[-1].strip()
    return f"{type(exc).__name__}: {text}"


@dataclass
class _Outcome:
    status: str = "done"
    error: str | None = None
    warning: str | None = None
    frames: int | None = None
    tiles: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class BatchWorker:
    """Runs units (module docstring) through one engine and writes their outputs.

    ``run(unit)`` returns one result dict per item of the unit (a band: one for the
    band). An item that raises is retried ``retries`` times (bad input — an
    :class:`InputError` — is not), then reported ``failed`` with the reason; the worker
    goes on with the next.
    """

    def __init__(self, engine: Any, options: WorkerOptions | dict[str, Any]) -> None:
        from segfast.runtime.engine_io import EngineIO

        self.engine = engine
        self.options = options if isinstance(options, WorkerOptions) else WorkerOptions(**options)
        self.io = EngineIO.of(engine)
        self._reader: tuple[str, Any] | None = None  # the large image last read
        self.host = socket.gethostname()

    # one item, with retries -----------------------------------------------------------
    def _attempt(self, fn: Any, *args: Any) -> tuple[_Outcome, int]:
        attempts = 0
        while True:
            attempts += 1
            try:
                return fn(*args), attempts
            except InputError as exc:
                return _Outcome("failed", error=_error_text(exc)), attempts
            except Exception as exc:
                if attempts > self.options.retries:
                    return _Outcome("failed", error=_error_text(exc)), attempts

    def _result(self, unit: dict[str, Any], item: int, outcome: _Outcome, attempts: int,
                seconds: float, **extra: Any) -> dict[str, Any]:  # fmt: skip
        return {
            "unit": unit["unit"], "item": item, "kind": unit["kind"],
            "status": outcome.status, "error": outcome.error, "warning": outcome.warning,
            "frames": outcome.frames, "tiles": outcome.tiles, "seconds": round(seconds, 4),
            "attempts": attempts, "pid": os.getpid(), "host": self.host,
            "peak_rss_mb": peak_rss_mb(), **outcome.extra, **extra,
        }  # fmt: skip

    def run(self, unit: dict[str, Any]) -> list[dict[str, Any]]:
        kind = unit["kind"]
        if kind == "images":
            return self._images(unit)
        t0 = time.perf_counter()
        if kind == "video":
            outcome, attempts = self._attempt(self._video, unit)
            return [self._result(unit, unit["item"], outcome, attempts, time.perf_counter() - t0)]
        if kind == "band":
            outcome, attempts = self._attempt(self._band, unit)
            return [self._result(unit, unit["item"], outcome, attempts, time.perf_counter() - t0,
                                 band=unit["band"])]  # fmt: skip
        raise InputError(f"unknown unit kind {kind!r}")

    # images --------------------------------------------------------------------------
    def _stream_options(self) -> dict[str, Any]:
        return {"output": "mask", "mean": self.options.mean, "std": self.options.std}

    def _images(self, unit: dict[str, Any]) -> list[dict[str, Any]]:
        """All images of the unit through one multi-stream (batched); the images it did
        not finish (an unreadable file stops or skips its lane — or the whole stream)
        then run one at a time, so only a bad one fails."""
        from segfast.runtime.multistream import MultiStream

        paths, outputs, items = unit["paths"], unit["outputs"], unit["items"]
        outcomes: list[_Outcome | None] = [None] * len(paths)
        t0 = time.perf_counter()
        if len(paths) > 1:
            try:
                for o in outputs:
                    Path(o).parent.mkdir(parents=True, exist_ok=True)
                ms = MultiStream(
                    self.engine, paths, max_batch=self._max_batch(), writers=outputs,
                    **self._stream_options(),
                )  # fmt: skip
                with ms:
                    for _ in ms:
                        pass
                for k, (stats, o) in enumerate(zip(ms.stats, outputs, strict=True)):
                    out = self._image_outcome(stats, Path(o))
                    outcomes[k] = out if out.status == "done" else None
            except Exception:
                outcomes = [None] * len(paths)  # the batch as a whole failed: one at a time
        done = sum(o is not None for o in outcomes)
        per = (time.perf_counter() - t0) / max(done, 1)
        results = []
        for k, (i, p, o) in enumerate(zip(items, paths, outputs, strict=True)):
            got = outcomes[k]
            if got is not None:
                results.append(self._result(unit, i, got, 1, per))
                continue
            t1 = time.perf_counter()
            outcome, attempts = self._attempt(self._one_image, p, Path(o))
            results.append(self._result(unit, i, outcome, attempts, time.perf_counter() - t1))
        return results

    def _max_batch(self) -> int:
        return self.options.batch or 4

    def _image_outcome(self, stats: Any, target: Path) -> _Outcome:
        if stats.frames_out != 1 or not target.exists():
            reasons = "; ".join(stats.skip_reasons) or stats.end_reason or "no frame decoded"
            return _Outcome("failed", error=reasons)
        size, digest = output_digest(target)
        return _Outcome(frames=1, extra={"bytes": size, "sha256": digest})

    def _one_image(self, path: str, target: Path) -> _Outcome:
        from segfast.runtime.stream import Stream

        target.parent.mkdir(parents=True, exist_ok=True)
        s = Stream(self.engine, path, writer=target, **self._stream_options())
        with s:
            for _ in s:
                pass
        return self._image_outcome(s.stats, target)

    # videos --------------------------------------------------------------------------
    def _video(self, unit: dict[str, Any]) -> _Outcome:
        from segfast.runtime.multistream import MultiStream

        final = Path(unit["output"])
        final.parent.mkdir(parents=True, exist_ok=True)
        folder = final.suffix == ""
        staging = final.with_name(f".{final.name}{_STAGING}{final.suffix}")
        _remove(staging)
        try:
            from segfast.runtime.writers import ImageWriter

            writer = ImageWriter(staging) if folder else staging  # (its name has no suffix)
            ms = MultiStream(
                self.engine, [unit["path"]], max_batch=self._max_batch(),
                writers=[writer], **self._stream_options(),
            )  # fmt: skip
            with ms:
                for _ in ms:
                    pass
            stats = ms.stats[0]
            if stats.frames_out == 0 or not staging.exists():
                why = stats.end_reason or "; ".join(stats.skip_reasons) or "no frame decoded"
                return _Outcome("failed", error=f"no frame segmented: {why}", frames=0)
            warning = None
            if stats.end_reason or stats.skipped:
                parts = [f"{stats.skipped} frame(s) skipped"] if stats.skipped else []
                if stats.end_reason:
                    parts.append(f"source ended early: {stats.end_reason}")
                warning = "; ".join(parts)
            if folder:
                _remove(final)
            os.replace(staging, final)
            size, digest = output_digest(final)
            return _Outcome(frames=stats.frames_out, warning=warning,
                            extra={"bytes": size, "sha256": digest})  # fmt: skip
        finally:
            _remove(staging)

    # large images: one band ----------------------------------------------------------
    def _open(self, path: str) -> Any:
        from segfast.runtime.largeimage import open_large

        if self._reader is not None and self._reader[0] == path:
            return self._reader[1]
        self._close_reader()
        reader = open_large(path)
        self._reader = (path, reader)
        return reader

    def _close_reader(self) -> None:
        if self._reader is not None:
            r = self._reader[1]
            if hasattr(r, "close"):
                r.close()
            self._reader = None

    def _band(self, unit: dict[str, Any]) -> _Outcome:
        from segfast.runtime.tiling import _SCALES, mean_std, segment_large

        reader = self._open(unit["path"])
        h, w = int(reader.shape[0]), int(reader.shape[1])
        if [h, w] != unit["size"]:
            raise InputError(f"{unit['path']} is {h}×{w} now, {unit['size']} when planned")
        y0, y1 = unit["y"]
        k = self.io.num_classes or 1
        dtype = np.uint8 if k <= 256 else np.int32
        final = Path(unit["file"])
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.with_name(f".{final.name}{_STAGING}.npy")
        normalize = None
        if self.options.mean is not None or self.options.std is not None:
            c = self.io.channels
            mean = self.options.mean or (0.0,)
            std = self.options.std or (1.0,)
            mean = mean * c if len(mean) == 1 else mean
            std = std * c if len(std) == 1 else std
            normalize = mean_std(mean, std, scale=_SCALES[np.dtype(reader.dtype)])
        kw = dict(tile=self.options.tile, overlap=self.options.overlap,
                  blend=self.options.blend, batch=self.options.batch, output="mask",
                  normalize=normalize)  # fmt: skip
        try:
            if unit["whole"]:  # gaussian: the whole image in this actor, into a memmap
                out = np.lib.format.open_memmap(staging, "w+", dtype=dtype, shape=(h, w))
                segment_large(self.engine, reader, out=out, **kw)
                out.flush()
                del out
            else:  # one tile row at a time, appended: memory is one tile row's mask
                with open(staging, "wb") as fh:
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                              "fortran_order": False, "shape": (y1 - y0, w)}  # fmt: skip
                    np.lib.format.write_array_header_1_0(fh, header)
                    for i in range(*unit["rows"]):
                        part = segment_large(self.engine, reader, tile_rows=(i, i + 1), **kw)
                        fh.write(np.ascontiguousarray(part, dtype=dtype).tobytes())
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(staging, final)
        finally:
            _remove(staging)
        return _Outcome(tiles=unit["tiles"])


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
